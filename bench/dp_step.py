"""DP-SGD step time ÷ non-DP step time on the same batch (target ≤ 1.3).

Both steps: forward, backward and SGD update of prompt and head on one batch. The DP step adds
Opacus per-sample gradients (the prompt's own grad sampler), per-sample clipping and noise.
Usage: python bench/dp_step.py [--batch 64] [--repeats 20]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defenses.dp_sgd import PerSampleGradients  # noqa: E402
from pfedpg.client import trainable_parameters  # noqa: E402
from pfedpg.models import ModelConfig, PromptedViT, build_backbone  # noqa: E402

SHAPES = {
    "embedded-default (16px, d64, depth 4)": {"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 4,
                                              "num_heads": 4, "mlp_ratio": 2.0},
    "shared backbone shape (32px, d192, depth 6)": {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 6,
                                                    "num_heads": 3, "mlp_ratio": 4.0},
}


def time_steps(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print("| backbone | normal step (ms) | DP-SGD step (ms) | ratio |")
    print("|---|---|---|---|")
    for name, kw in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        model = PromptedViT(build_backbone(ModelConfig(weights="random", kwargs=kw)), num_prompts=10, num_classes=10)
        x = torch.randn(args.batch, 3, kw["img_size"], kw["img_size"], generator=g)
        y = torch.randint(0, 10, (args.batch,), generator=g)
        params = trainable_parameters(model)
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        model.train()

        def normal():
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        psg = PerSampleGradients(model)

        def dp():
            grads, _ = psg(x, y)
            norms = torch.stack([gr.reshape(gr.shape[0], -1).norm(dim=1) for gr in grads]).norm(dim=0)
            factor = (1.0 / (norms + 1e-6)).clamp(max=1.0)
            for p, gr in zip(params, grads):
                p.grad = (torch.einsum("b,b...->...", factor, gr) + torch.randn(p.shape, generator=g)) / args.batch
            opt.step()

        t_dp = time_steps(dp, args.repeats)
        psg.close()
        t_n = time_steps(normal, args.repeats)
        print(f"| {name} | {1e3 * t_n:.1f} | {1e3 * t_dp:.1f} | {t_dp / t_n:.3f} |")


if __name__ == "__main__":
    main()
