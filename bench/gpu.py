"""Paper scale on a GPU: one script to run whenever a GPU is available (under 10 minutes on one GPU).

At paper scale (default on a CUDA machine): ViT-B/16 at 224 px with random weights (speed does not
depend on the weights), shallow prompts K = 10, clients of 64 training records each (synthetic
32×32 uint8 records, resized to 224 per batch on the GPU, as CIFAR is), E = 1, batch 32. Measures

1. one pFedPG round of 10 clients, float32 and ``amp: bf16`` (time, images/s, peak GPU memory);
2. a DP-SGD step ÷ a plain step (the local training of 4 clients, one after another);
3. batched clients ÷ sequential, m = 4, 10, 32 clients per round;
4. the generator step alone (the server's per-client VJPs, the sum and the SGD step), m = 10, 32;
5. determinism: the same two rounds from two fresh builds, compared bit for bit (server state and
   every client's prompt and head).

Without CUDA it runs a reduced size (the shared backbone's shape: 32 px, patch 4, width 192,
depth 6; 16 records per client; no bf16) and says so. Prints a table with the ratios and writes its
rows to ``OUT/gpu.json`` and ``OUT/gpu.md`` (``--out``, default ``$OUT`` or ``bench/out``). Every
measurement is written as soon as it is taken, and one that fails is a row with its error.
Usage: python bench/gpu.py [--out DIR] [--only NAME ...] [--reduced]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluations.plugins import load_plugins  # noqa: E402
from pfedpg.config import config_from_dict  # noqa: E402
from pfedpg.run import Trainer  # noqa: E402
from pfedpg.server import plain_aggregate  # noqa: E402

PAPER = {"name": "vit_base_patch16_224", "kwargs": {}, "image_size": 224, "records": 64,
         "label": "paper scale: ViT-B/16, 224 px"}
REDUCED = {"name": "vit_tiny_patch16_224", "image_size": 32, "records": 16,
           "kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 6, "num_heads": 3, "mlp_ratio": 4.0},
           "label": "REDUCED (no CUDA): ViT width 192, depth 6, patch 4, 32 px"}
MEASUREMENTS = ("round", "dp_step", "batched", "generator", "determinism")


def synthetic_npz(path: Path, clients: int, records: int) -> str:
    """CIFAR-like records: 10 classes of 32×32 uint8 images with a class-dependent mean colour."""
    rng = np.random.default_rng(0)
    n = clients * (records + 16) * 2
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    images[..., labels % 3] //= 2
    np.savez(path, images=images, labels=labels, domains=np.zeros(n, dtype=np.int64),
             class_names=np.array([f"c{i}" for i in range(10)]), domain_names=np.array(["synthetic"]))
    return str(path)


def config(size: dict, data: str, *, clients: int, per_round: int, batched: bool = False, amp: str | None = None,
           hooks: list | None = None) -> dict:
    return {
        "rounds": 1000, "eval_every": 1000, "checkpoint_every": 0, "device": "auto", "amp": amp,
        "batched_clients": batched, "clients_per_round": per_round, "hooks": hooks or [],
        "data": {"source": "npz", "path": data, "image_size": size["image_size"], "partition": "dirichlet",
                 "num_clients": clients, "alpha": 100.0, "min_size": 8, "public_fraction": 0.0,
                 "max_train_per_client": size["records"], "max_test_per_client": 16},
        "model": {"name": size["name"], "weights": "random", "kwargs": size["kwargs"], "num_prompts": 10},
        "client": {"batch_size": 32, "local_epochs": 1, "lr": 0.25},
        "server": {"lr": 1e-3},
    }


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rounds(cfg: dict, n: int = 2) -> dict:
    """Build the run, take one warm-up round, then ``n`` timed rounds (no evaluation)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as d:
        t = Trainer(config_from_dict(cfg), run_dir=d)
        t.hooks.setup(t.ctx)  # (what run() does first)
        t.loop.run_round(1)
        recs = [t.loop.run_round(r) for r in range(2, n + 2)]
        sync()
        images = sum(t.loop.roster.clients[c].train for c in t.schedule[1]) * cfg["client"]["local_epochs"]
    out = {"round_s": statistics.median(r["time_round_s"] for r in recs),
           "train_s": statistics.median(r["time_train_s"] for r in recs), "images_per_round": images}
    out["images_per_s"] = images / out["train_s"]
    if torch.cuda.is_available():
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def generator_step(size: dict, data: str, m: int, repeats: int = 5) -> dict:
    """The server step alone for m clients: per-client VJPs through G, the plain sum and the update."""
    with tempfile.TemporaryDirectory() as d:
        t = Trainer(config_from_dict(config(size, data, clients=m, per_round=m)), run_dir=d)
        g = torch.Generator().manual_seed(0)
        k, d = t.loop.shape.prompt_tokens, t.loop.shape.dim
        deltas = {n: (0.01 * torch.randn(k, d, generator=g)).to(t.device) for n in range(m)}
        times = []
        for _ in range(repeats + 1):
            sync()
            t0 = time.perf_counter()
            grads = t.server.client_gradients(deltas)
            t.server.apply(plain_aggregate(grads), grads)
            sync()
            times.append(time.perf_counter() - t0)
    return {"clients": m, "server_step_ms": 1e3 * statistics.median(times[1:])}


def state_of(t: Trainer) -> list[torch.Tensor]:
    out = [v.detach().cpu() for v in t.server.state_dict().values()]
    for s in t.clients.states:
        out += [s.prompt.cpu(), s.head_weight.cpu(), s.head_bias.cpu()]
    return out


def determinism(size: dict, data: str) -> dict:
    finals = []
    for _ in range(2):
        with tempfile.TemporaryDirectory() as d:
            t = Trainer(config_from_dict(config(size, data, clients=4, per_round=4)), run_dir=d)
            t.loop.run_round(1)
            t.loop.run_round(2)
            finals.append(state_of(t))
    same = all(torch.equal(a, b) for a, b in zip(*finals))
    diff = max(float((a.double() - b.double()).abs().max()) for a, b in zip(*finals))
    return {"identical": same, "max_abs_difference": diff, "tensors_compared": len(finals[0])}


def _recorder(out: Path, header: dict, rows: list[dict]):
    """``record(name, fn, **facts)``: runs one measurement, keeps its row (or its error: a failed
    measurement is a row, and the others still run) in ``gpu.json`` at once, prints it."""

    def record(name: str, fn, **facts) -> dict | None:
        t0 = time.perf_counter()
        try:
            res = {"measurement": name, **facts, **fn()}
        except Exception as e:
            res = {"measurement": name, **facts, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
            print(f"  {name} {facts}: FAILED {res['error']}", flush=True)
        res["wall_s"] = time.perf_counter() - t0
        rows.append(res)
        (out / "gpu.json").write_text(json.dumps({**header, "rows": rows}, indent=1))
        if "error" not in res:
            print(f"  {name} {facts}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in res.items()
                                                     if k not in ("measurement", *facts, "wall_s")),
                  flush=True)
        return None if "error" in res else res

    return record


def _round_and_dp_lines(want: set, size: dict, data: Path, cuda: bool, record) -> list[str]:
    lines = []
    if "round" in want:
        fp32 = record("round", lambda: rounds(config(size, data, clients=10, per_round=10)), clients=10, amp=None)
        bf16 = record("round", lambda: rounds(config(size, data, clients=10, per_round=10, amp="bf16")),
                      clients=10, amp="bf16") if cuda else None
        if fp32:
            lines.append(f"| one round, 10 clients, float32 | {fp32['round_s']:.2f} s "
                         f"({fp32['images_per_s']:.0f} img/s) |"
                         + (f" {fp32['peak_gib']:.1f} GiB |" if "peak_gib" in fp32 else " – |"))
        if fp32 and bf16:
            lines.append(f"| one round, 10 clients, bf16 | {bf16['round_s']:.2f} s ({bf16['images_per_s']:.0f} img/s); "
                         f"bf16 ÷ float32 = {bf16['round_s'] / fp32['round_s']:.2f} | {bf16['peak_gib']:.1f} GiB |")
    if "dp_step" in want:
        dp = [{"name": "dp_sgd", "clip": 1.0, "noise_multiplier": 1.0}]
        plain = record("dp_step", lambda: rounds(config(size, data, clients=4, per_round=4)), clients=4, dp=False)
        priv = record("dp_step", lambda: rounds(config(size, data, clients=4, per_round=4, hooks=dp)),
                      clients=4, dp=True)
        if plain and priv:
            lines.append(f"| DP-SGD step ÷ plain step (4 clients, training time) | "
                         f"{priv['train_s'] / plain['train_s']:.2f} | – |")
    return lines


def _server_and_determinism_lines(want: set, size: dict, data: Path, record) -> list[str]:
    lines = []
    if "batched" in want:
        for m in (4, 10, 32):
            seq = record("batched", lambda: rounds(config(size, data, clients=32, per_round=m)),
                         clients=m, batched=False)
            bat = record("batched", lambda: rounds(config(size, data, clients=32, per_round=m, batched=True)),
                         clients=m, batched=True)
            if seq and bat:
                lines.append(f"| batched ÷ sequential, m = {m} | {bat['train_s'] / seq['train_s']:.2f} "
                             f"({seq['train_s']:.2f} s → {bat['train_s']:.2f} s) | "
                             + (f"{bat['peak_gib']:.1f} GiB |" if "peak_gib" in bat else "– |"))
    if "generator" in want:
        for m in (10, 32):
            g = record("generator", lambda: generator_step(size, data, m), clients=m)
            if g:
                lines.append(f"| generator step (VJPs + sum + update), m = {m} | {g['server_step_ms']:.1f} ms | – |")
    if "determinism" in want:
        det = record("determinism", lambda: determinism(size, data), clients=4)
        if det:
            lines.append(f"| two fresh builds, two rounds, bit-identical | {det['identical']} "
                         f"(max difference {det['max_abs_difference']:.2g}) | – |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "out"))
    ap.add_argument("--only", nargs="+", choices=MEASUREMENTS, help="run only these measurements")
    ap.add_argument("--reduced", action="store_true", help="the reduced size even on a GPU (a quick check)")
    args = ap.parse_args()
    load_plugins()  # dp_sgd is a plug-in (defenses)
    cuda = torch.cuda.is_available()
    size = PAPER if cuda and not args.reduced else REDUCED
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    header = {"size": size["label"], "device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
              "records_per_client": size["records"], "batch_size": 32, "local_epochs": 1}
    print(f"bench/gpu.py on {device}: {size['label']}" + ("" if cuda else " — this is not the paper-scale measurement"))
    record = _recorder(out, header, [])
    want = set(args.only or MEASUREMENTS)
    with tempfile.TemporaryDirectory() as d:
        data = synthetic_npz(Path(d) / "synthetic.npz", 32, size["records"])
        lines = (_round_and_dp_lines(want, size, data, cuda, record)
                 + _server_and_determinism_lines(want, size, data, record))
    table = [f"{size['label']} on {device} (torch {torch.__version__}), {size['records']} records per client, "
             "batch 32, E = 1", "", "| measurement | result | peak GPU memory |", "|---|---|---|", *lines]
    (out / "gpu.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
