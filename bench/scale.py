"""Scale: N clients in one process, m = 10 sampled per round (DESIGN §9; issue 31).

Recipe, the same at every N so that N = 500, 1,000 and 10,000 compare like with like: the real
digits of ``../shared/data/digits_32.npz`` (28,299 images, 32x32, 10 classes), taken in a seeded
random order and repeated until there are 24·N records (at N = 10,000 each image appears 8 or 9
times), written to a temporary npz as one domain. ``partition: domain`` with ``clients_per_domain:
N`` deals them stratified by label, so every client holds exactly 24 records, and ``test_fraction:
1/3`` splits them into 16 training and 8 test records (the caps 16 / 8 of the earlier recipe are
then no-ops). Why not the earlier Dirichlet(10) label split with min_size 24: the file has 2.8
records per client at N = 10,000, and already at N = 1,000 a draw left a client with 20 records
(DataError). The records repeat across clients, so this measures time and memory, not learning.

The shared backbone's shape (32x32, patch 4, width 192, depth 6, K = 10 prompts; random weights:
speed and memory do not depend on them), pFedPG with the cross-attention generator, m = 10 clients
per round from the seeded schedule, ``threads: 1``. Each N runs in its own process. Reported: setup
seconds; RSS after setup; peak RSS up to the end of the training rounds (VmHWM before the last
round, read by a hook at round R-1); peak RSS of the whole run (VmHWM at the end: the last round
evaluates every one of the N clients, then the checkpoint and summary); seconds per round (the
median of rounds 2..R: training and server step, no evaluation); the final evaluation's seconds;
and bytes per client of records, client state and descriptor. Ratios are against the first N
listed (500 by default). Peak RSS is the process's own VmHWM (/proc/self/status), which starts
afresh at exec. ``--train-only`` stops after round R-1 (no final evaluation: minutes instead of
~25 at N = 10,000); ``--repeat K`` runs the list K times, interleaved, for round times on a shared
machine. ``--breakdown`` builds the run only, traced, and prints per-client bytes by component.
Skips with a message when the data file is absent.
Usage: python bench/scale.py [--clients 500 1000 10000] [--rounds 6] [--threads 1]
       python bench/scale.py --clients 500 10000 --train-only --repeat 3
       python bench/scale.py --breakdown --clients 1000 10000
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "digits_32.npz"
RECORDS_PER_CLIENT, TRAIN, TEST = 24, 16, 8


def tiled_digits(n_clients: int, out: Path) -> Path:
    """The recipe's data file: 24·N digits records (seeded order, repeated), one domain."""
    with np.load(DATA) as z:
        images, labels, classes = z["images"], z["labels"], z["class_names"]
    rng = np.random.default_rng(0)
    need = RECORDS_PER_CLIENT * n_clients
    order = np.concatenate([rng.permutation(len(labels)) for _ in range(need // len(labels) + 1)])[:need]
    np.savez(out, images=images[order], labels=labels[order], domains=np.zeros(need, dtype=np.int64),
             class_names=classes, domain_names=np.array(["digits"]))
    return out


def memory() -> dict[str, float]:
    """This process's resident set now (VmRSS) and its peak (VmHWM), in MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def recipe(n: int, rounds: int, threads: int, data: Path):
    """The run's config at N clients (the module docstring's recipe)."""
    sys.path.insert(0, str(REPO))
    from pfedpg.config import config_from_dict

    return config_from_dict({
        "rounds": rounds, "clients_per_round": 10, "eval_every": 10_000, "checkpoint_every": 0, "threads": threads,
        "data": {"source": "npz", "path": str(data), "image_size": 32, "partition": "domain",
                 "clients_per_domain": n, "num_clients": n, "test_fraction": 1 / 3, "min_size": RECORDS_PER_CLIENT,
                 "max_train_per_client": TRAIN, "max_test_per_client": TEST, "public_fraction": 0.0},
        "model": {"weights": "random", "kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 6,
                                                  "num_heads": 3, "mlp_ratio": 4.0}},
    })


def tensor_bytes(t) -> dict[str, float]:
    """Bytes of the clients' records, states (prompt, head) and the server's descriptors, all N."""
    records = t.clients.records
    pairs = [*records.train_data, *records.test_data]
    n = t.num_clients
    assert all(len(y) == TRAIN for _, y in pairs[:n]) and all(len(y) == TEST for _, y in pairs[n:]), "the recipe"
    return {"records": sum(x.numel() * x.element_size() + y.numel() * y.element_size() for x, y in pairs),
            "state": sum(v.numel() * v.element_size() for s in t.clients.states
                         for v in (s.prompt, s.head_weight, s.head_bias)),
            "descriptors": t.server.descriptors.numel() * t.server.descriptors.element_size()}


def one(n: int, rounds: int, threads: int, data: Path, train_only: bool = False) -> dict:
    """One timed run at N clients: memory at each stage, seconds per round, the final evaluation
    (``train_only``: rounds 1..R-1 through the round loop, no final evaluation, checkpoint or summary)."""
    from pfedpg.hooks import Hook, HookChain
    from pfedpg.run import Trainer

    cfg = recipe(n, rounds, threads, data)

    class Watch(Hook):
        """Reads this process's memory at the end of round R - 1 (before the final evaluation)."""

        name = "watch"
        seen: dict = {}

        def end_of_round(self, ctx, *, round, record):
            if round == rounds - 1:
                Watch.seen = memory()

    at_import = memory()
    with tempfile.TemporaryDirectory() as d:
        t = Trainer(cfg, run_dir=Path(d) / "run", hooks=HookChain([Watch()]))
        built = memory()
        if train_only:
            rows = [t.loop.run_round(r) for r in range(1, rounds)]
            Watch.seen = memory()
        else:
            t.run()
            rows = [json.loads(line) for line in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
    end = memory()
    rounds_ = [r for r in rows if r["type"] == "round"]
    per_round = [r["time_round_s"] - r["time_eval_s"] for r in rounds_ if r["round"] > 1]
    return {"clients": n, "setup_s": t.setup_seconds, "s_per_round": statistics.median(per_round),
            "rounds_s": per_round, "final_eval_s": None if train_only else rounds_[-1]["time_eval_s"],
            "rss_at_import_mb": at_import["VmRSS"], "rss_after_setup_mb": built["VmRSS"],
            "peak_setup_mb": built["VmHWM"], "rss_before_final_eval_mb": Watch.seen.get("VmRSS"),
            "peak_training_mb": Watch.seen.get("VmHWM"), "peak_rss_mb": None if train_only else end["VmHWM"],
            **{f"{k}_bytes": v for k, v in tensor_bytes(t).items()}}


def breakdown(n: int, data: Path) -> dict:
    """Setup only, traced: live RSS after setup (freed heap returned with malloc_trim), the clients'
    tensors by component, and what tracemalloc sees (numpy's arrays; Python objects by source line)."""
    import ctypes
    import gc
    import tracemalloc

    from pfedpg.run import Trainer

    cfg = recipe(n, 1, 1, data)
    tracemalloc.start()
    with tempfile.TemporaryDirectory() as d:
        t = Trainer(cfg, run_dir=Path(d) / "run")
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        snap = tracemalloc.take_snapshot()
        tracemalloc.stop()
        rss = memory()["VmRSS"]
    numpy = tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)
    lines = snap.filter_traces([tracemalloc.DomainFilter(False, np.lib.tracemalloc_domain)]).statistics("lineno")
    return {"clients": n, "rss_mb": rss, **{f"{k}_bytes": v for k, v in tensor_bytes(t).items()},
            "numpy_bytes": sum(s.size for s in snap.filter_traces([numpy]).statistics("filename")),
            "python_bytes": sum(s.size for s in lines),
            "python_lines": {f"{Path(s.traceback[0].filename).name}:{s.traceback[0].lineno}": s.size
                             for s in lines if s.size >= 1000}}


def print_breakdown(a: dict, b: dict) -> None:
    """Per client: what grows from N = a to N = b, by component."""
    dn = b["clients"] - a["clients"]

    def per(key: str) -> float:
        return (b[key] - a[key]) / dn

    rss = (b["rss_mb"] - a["rss_mb"]) * 2**20 / dn
    known = {"records (uint8 images, int64 labels)": per("records_bytes"),
             "client state: prompt K×D, head C×D + C (float32)": per("state_bytes"),
             "server descriptor d_n (K×D float32)": per("descriptors_bytes"),
             "numpy arrays (tracemalloc)": per("numpy_bytes"),
             "Python objects (tracemalloc)": per("python_bytes")}
    print(f"| component | bytes per client (N = {a['clients']:,} -> {b['clients']:,}) |\n|---|---|")
    for k, v in known.items():
        print(f"| {k} | {v:,.0f} |")
    print(f"| rest: tensor headers, allocator overhead (RSS minus the above) | {rss - sum(known.values()):,.0f} |")
    print(f"| **RSS after setup** (malloc_trim) | **{rss:,.0f}** |")
    grown = {k: (v - a["python_lines"].get(k, 0)) / dn for k, v in b["python_lines"].items()}
    print("\nPython objects, the source lines that allocate the most per client (bytes per client):")
    for k in sorted(grown, key=lambda k: -grown[k])[:8]:
        print(f"  {k}: {grown[k]:,.0f}")


def child(mode: str, n: int, args) -> dict:
    """Run ``mode`` (one | breakdown) at N clients in a fresh process on the recipe's data file."""
    with tempfile.TemporaryDirectory() as d:
        data = tiled_digits(n, Path(d) / f"digits_tiled_{n}.npz")
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--clients", str(n), "--rounds",
                              str(args.rounds), "--threads", str(args.threads), "--data", str(data),
                              *(["--train-only"] if args.train_only else [])], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{mode} at N = {n} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def print_runs(runs: list[dict]) -> None:
    """One row per N: memory (the largest over repeats), s/round (the median of the runs' medians,
    each run's in brackets when repeated) and the ratios against the first N."""
    by_n: dict[int, list[dict]] = {}
    for r in runs:
        by_n.setdefault(r["clients"], []).append(r)

    def worst(rs: list[dict], key: str) -> float | None:
        values = [r[key] for r in rs if r[key] is not None]
        return max(values) if values else None

    rows = {n: {"setup_s": statistics.median([r["setup_s"] for r in rs]),
                **{k: worst(rs, k) for k in ("rss_after_setup_mb", "peak_training_mb", "peak_rss_mb", "final_eval_s")},
                "s_per_round": statistics.median([r["s_per_round"] for r in rs]),
                "each": [r["s_per_round"] for r in rs]} for n, rs in by_n.items()}
    first = next(iter(rows))
    base = rows[first]

    def mb(v: float | None, ratio: bool = False, key: str = "") -> str:
        if v is None:
            return "—"
        return f"{v:,.0f}" + (f" ({v / base[key]:.2f})" if ratio and base[key] else "")

    print(f"| N | setup s | RSS after setup MB | peak RSS to the end of training MB (÷ N = {first:,}) | peak RSS, "
          f"whole run MB (÷ N = {first:,}) | s/round (÷ N = {first:,}) | final evaluation s |")
    print("|---|---|---|---|---|---|---|")
    for n, r in rows.items():
        each = " [" + ", ".join(f"{v:.2f}" for v in r["each"]) + "]" if len(r["each"]) > 1 else ""
        print(f"| {n:,} | {r['setup_s']:.1f} | {mb(r['rss_after_setup_mb'])} | "
              f"{mb(r['peak_training_mb'], True, 'peak_training_mb')} | {mb(r['peak_rss_mb'], True, 'peak_rss_mb')} | "
              f"{r['s_per_round']:.2f} ({r['s_per_round'] / base['s_per_round']:.2f}){each} | "
              f"{mb(r['final_eval_s'])} |")
    last_n = list(rows)[-1]
    last, dn, tensors = rows[last_n], last_n - first, by_n[last_n][0]

    def kb(key: str) -> str:
        return "—" if last[key] is None else f"{(last[key] - base[key]) * 2**20 / dn / 1024:.1f} KB"

    print(f"\nper client, N = {first:,} -> {last_n:,}: RSS after setup {kb('rss_after_setup_mb')}, peak to the end "
          f"of training {kb('peak_training_mb')}, whole-run peak {kb('peak_rss_mb')}; tensors held: records "
          f"{tensors['records_bytes'] / last_n / 1024:.1f} KB, client state (prompt, head) "
          f"{tensors['state_bytes'] / last_n / 1024:.1f} KB, descriptor "
          f"{tensors['descriptors_bytes'] / last_n / 1024:.1f} KB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[500, 1000, 10_000])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-only", action="store_true",
                    help="rounds 1..R-1 only: no final evaluation of every client (minutes at N = 10,000)")
    ap.add_argument("--repeat", type=int, default=1, help="run the list of N this many times, interleaved")
    ap.add_argument("--breakdown", action="store_true",
                    help="setup only, traced: per-client bytes by component between the first and last N")
    ap.add_argument("--child", choices=["one", "breakdown"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "one":
        print(json.dumps(one(args.clients[0], args.rounds, args.threads, Path(args.data), args.train_only)))
        return
    if args.child == "breakdown":
        print(json.dumps(breakdown(args.clients[0], Path(args.data))))
        return
    if not DATA.is_file():
        print(f"skipped: {DATA} not found (see ../shared/data/README.md)")
        return
    if args.breakdown:
        print_breakdown(child("breakdown", args.clients[0], args), child("breakdown", args.clients[-1], args))
    else:
        print_runs([child("one", n, args) for _ in range(args.repeat) for n in args.clients])


if __name__ == "__main__":
    main()
