"""Framework overhead: wall time of a full pFedPG round ÷ the same local training steps alone.

Both sides run in this process on the same data, model and batch order. "Steps alone" is a bare
loop (forward, backward, SGD step) over each participating client's minibatches, on the records
already normalised to float (made once, outside the timing — what the runner held before records
stayed uint8); the full round adds everything the toolkit does around it: the per-batch input
pipeline (uint8 -> float, normalised, on the device), hook chain, loading prompts and heads, deltas,
the server's per-client VJPs, aggregation and the update. Evaluation is reported separately (it is measurement,
not overhead). Target: ratio <= 1.15. Usage: python bench/overhead.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pfedpg.client import load_into, make_optimizer  # noqa: E402
from pfedpg.config import config_from_dict  # noqa: E402
from pfedpg.run import Trainer  # noqa: E402

PRESETS = {
    # The embedded default (16x16, patch 4, width 64, depth 4), 4 clients.
    "embedded-default": {"model": {"weights": "random"}, "data": {"num_domains": 4}},
    # The shared backbone's shape (32x32, patch 4, width 192, depth 6), random weights, 3 clients.
    "vit-d192-l6-32px": {
        "data": {"image_size": 32, "num_domains": 3, "max_train_per_client": 128},
        "model": {"weights": "random", "kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 6,
                                                  "num_heads": 3, "mlp_ratio": 4.0}},
    },
}


def bare_steps(trainer: Trainer, r: int) -> float:
    """The local SGD steps of round r's clients, with nothing around them."""
    cfg = trainer.cfg.client
    model = trainer.clients.model
    t = 0.0
    for n in trainer.schedule[r - 1]:
        st = trainer.clients.states[n]
        load_into(model, prompt=st.prompt, head_weight=st.head_weight, head_bias=st.head_bias)
        x, y = trainer.clients.records.train_data[n]
        x, y = model.prepare(x), y.to(model.device)  # the float copy the bare loop reads (not timed)
        g = trainer.seeds.torch("local_train", client=n, round=r)
        t0 = time.perf_counter()
        model.train()
        opt = make_optimizer(model, cfg)
        for _ in range(cfg.local_epochs):
            order = torch.randperm(x.shape[0], generator=g)
            for i in range(0, x.shape[0], cfg.batch_size):
                idx = order[i:i + cfg.batch_size]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        t += time.perf_counter() - t0
    return t


def measure(name: str, overrides: dict, rounds: int) -> dict:
    values = {"rounds": rounds + 1, "eval_every": 10_000, "checkpoint_every": 0, **overrides}
    cfg = config_from_dict(values)
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(cfg, run_dir=d)
        trainer.loop.run_round(1)  # warm-up: allocator, kernels, first-touch
        full, bare, server = [], [], []
        for r in range(2, rounds + 2):
            bare.append(bare_steps(trainer, r))  # does not change trainer state (states are copied in)
            rec = trainer.loop.run_round(r)
            full.append(rec["time_round_s"])
            server.append(rec["time_round_s"] - rec["time_train_s"])
        t0 = time.perf_counter()
        trainer.loop.evaluate_all(rounds + 1)
        eval_s = time.perf_counter() - t0
    f, b = statistics.median(full), statistics.median(bare)
    return {"preset": name, "clients": len(trainer.schedule[0]), "round_s": f, "steps_s": b, "ratio": f / b,
            "server_s": statistics.median(server), "eval_s": eval_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per preset (median reported)")
    ap.add_argument("--preset", choices=sorted(PRESETS), action="append", help="default: all")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| preset | clients/round | full round (s) | steps alone (s) | ratio | server step (s) "
          "| eval all clients (s) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.preset or sorted(PRESETS):
        m = measure(name, PRESETS[name], args.rounds)
        print(f"| {m['preset']} | {m['clients']} | {m['round_s']:.3f} | {m['steps_s']:.3f} | {m['ratio']:.3f} | "
              f"{m['server_s']:.4f} | {m['eval_s']:.3f} |")


if __name__ == "__main__":
    main()
