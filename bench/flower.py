"""Flower simulation engine vs the in-process runner: seconds per round at N clients, m = 10 per round.

The scale benchmark's setting (``bench/scale.py``: real digits, Dirichlet(10) split into N clients
with at most 16 training and 8 test records each, the shared backbone's shape with random weights,
pFedPG with the cross-attention generator, m = 10 from the seeded schedule), run once in-process and
once on Flower's simulation engine (Ray, one virtual SuperNode per client, 1 CPU per ClientApp actor,
``threads: 1`` on both sides). Prints seconds per training round (rounds after the first, without
the final evaluation), the ratio Flower ÷ in-process, and whether the per-client accuracies agree
exactly, and memory: the largest resident set (RSS) of each Ray ClientApp actor process, sampled
every 0.2 s, and the last one seen before the actor ended (between messages: one client's records),
against the in-process runner's own RSS after its run (what one process holding every client
needs). The simulation goes through ``flwr run`` on a simulation SuperLink (evaluations.flower.app).
Skips with a message when the data file is absent.
Usage: python bench/flower.py [--clients 10 100 500] [--rounds 4]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "digits_32.npz"


def config(n: int, rounds: int, engine: str):
    sys.path.insert(0, str(REPO))
    from pfedpg.config import config_from_dict

    return config_from_dict({
        "rounds": rounds, "clients_per_round": 10, "eval_every": 10_000, "checkpoint_every": 0, "threads": 1,
        "engine": engine,
        "data": {"source": "npz", "path": str(DATA), "image_size": 32, "partition": "dirichlet", "num_clients": n,
                 "alpha": 10.0, "min_size": 24, "max_train_per_client": 16, "max_test_per_client": 8,
                 "public_fraction": 0.0},
        "model": {"weights": "random", "kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 6,
                                                  "num_heads": 3, "mlp_ratio": 4.0}},
    })


def per_round(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = max(r["round"] for r in rows if r["type"] == "round")
    return statistics.mean(r["time_round_s"] for r in rows if r["type"] == "round" and 1 < r["round"] < last)


class ActorRSS:
    """Peak and last-seen RSS per Ray ClientApp worker process (a ``ray::`` process title other than
    IDLE), read from /proc every ``every`` seconds in a thread (Linux)."""

    def __init__(self, every: float = 0.2):
        import threading

        self.every, self.peak, self.last, self._stop = every, {}, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for d in Path("/proc").iterdir():
                if not d.name.isdigit():
                    continue
                try:
                    title = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    if title.startswith("ray::") and "IDLE" not in title:
                        rss = next(int(ln.split()[1]) * 1024 for ln in (d / "status").read_text().splitlines()
                                   if ln.startswith("VmRSS:"))
                        self.peak[int(d.name)] = max(self.peak.get(int(d.name), 0), rss)
                        self.last[int(d.name)] = rss
                except (OSError, StopIteration):
                    pass
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def rss_bytes() -> int:
    """This process's resident set now (Linux /proc)."""
    return next(int(ln.split()[1]) * 1024 for ln in Path("/proc/self/status").read_text().splitlines()
                if ln.startswith("VmRSS:"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 500])
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    if not DATA.is_file():
        print(f"skipped: {DATA} not found (see ../shared/data/README.md)")
        return
    sys.path.insert(0, str(REPO))
    from evaluations.flower.app import run_flower
    from evaluations.plugins import load_plugins
    from pfedpg.run import Trainer

    load_plugins()
    mib = 2 ** 20
    print(f"{'N':>5} {'in-process s/round':>19} {'flower s/round':>15} {'ratio':>6} {'flower wall s':>14} "
          f"{'in-process RSS MiB':>19} {'actor peak RSS MiB':>19} {'actor last RSS MiB':>19} same accuracies")
    for n in args.clients:
        with tempfile.TemporaryDirectory() as d:
            tr = Trainer(config(n, args.rounds, "inprocess"), run_dir=Path(d) / "in")
            ref = tr.run()
            rss_in = rss_bytes() / mib
            del tr
            t0 = time.time()
            with ActorRSS() as rss:
                got = run_flower(config(n, args.rounds, "flower"), Path(d) / "fl", log=lambda m: None)
            wall = time.time() - t0
            a, b = per_round(Path(d) / "in"), per_round(Path(d) / "fl")
            same = got["accuracy"]["per_client"] == ref["accuracy"]["per_client"]
            pids = sorted(rss.peak, key=lambda p: -rss.peak[p])[:4]
            peak = " / ".join(f"{rss.peak[p] / mib:.0f}" for p in pids) or "none seen"
            last = " / ".join(f"{rss.last[p] / mib:.0f}" for p in pids) or "none seen"
            print(f"{n:>5} {a:>19.2f} {b:>15.2f} {b / a:>6.2f} {wall:>14.1f} {rss_in:>19.0f} {peak:>19} {last:>19} "
                  f"{same}", flush=True)


if __name__ == "__main__":
    main()
