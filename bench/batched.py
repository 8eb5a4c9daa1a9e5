"""Clients trained in one batch vs one after another: round time batched ÷ sequential (DESIGN §9).

For m = 4, 10, 32 clients (embedded digits at 32x32, Dirichlet(1.0) split into m clients, up to 64
training records each, all m in every round) and the shared backbone's shape (patch 4, width 192,
depth 6, random weights: speed does not depend on the weights), each mode runs ``--rounds`` rounds
in a fresh Trainer; the figure is the mean training time per round (local training + server step,
no evaluation), rounds after the first. Both modes give the same updates (tests/test_batched.py).
Usage: python bench/batched.py [--rounds 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pfedpg.config import config_from_dict  # noqa: E402
from pfedpg.run import Trainer  # noqa: E402


def config(m: int, rounds: int, threads: int, batched: bool) -> dict:
    return {
        "rounds": rounds, "eval_every": 10_000, "checkpoint_every": 0, "threads": threads, "batched_clients": batched,
        "data": {"image_size": 32, "partition": "dirichlet", "num_clients": m, "alpha": 1.0, "min_size": 16,
                 "max_train_per_client": 64, "max_test_per_client": 16, "public_fraction": 0.0},
        "model": {"weights": "random", "kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 6,
                                                  "num_heads": 3, "mlp_ratio": 4.0}},
    }


def round_seconds(m: int, rounds: int, threads: int, batched: bool) -> tuple[float, list[int]]:
    cfg = config_from_dict(config(m, rounds, threads, batched))
    with tempfile.TemporaryDirectory() as d:
        t = Trainer(cfg, run_dir=Path(d) / "run")
        t.run()
        rows = [json.loads(line) for line in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
    times = [r["time_round_s"] - r["time_eval_s"] for r in rows if r["type"] == "round" and r["round"] > 1]
    return statistics.mean(times), [int(y.numel()) for _, y in t.clients.records.train_data]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", type=int, nargs="+", default=[4, 10, 32])
    args = ap.parse_args()
    print("| m | records per client (min–max) | sequential s/round | batched s/round | batched ÷ sequential |")
    print("|---|---|---|---|---|")
    for m in args.clients:
        seq, sizes = round_seconds(m, args.rounds, args.threads, False)
        bat, _ = round_seconds(m, args.rounds, args.threads, True)
        print(f"| {m} | {min(sizes)}–{max(sizes)} | {seq:.2f} | {bat:.2f} | {bat / seq:.3f} |", flush=True)


if __name__ == "__main__":
    main()
