"""Aggregation time per rule ÷ the sum rule, and ÷ a round's total time (issue: robustness bench 1).

Each rule aggregates an (m, P) stack of per-client gradients on pFedPG's shared parameters, where
P = 4·D² + K·D (W_Q, W_K, W_V, W_O and P_base). The round time is the median full round of the
bench/overhead.py preset of the same width D, measured here (D = 64: embedded default, 4 clients;
D = 192: the shared backbone's shape, 3 clients) — one round's training, not the m clients above.
Usage: python bench/aggregation.py [--clients 10] [--repeats 20]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defenses.robust import AGGREGATION_RULES, RobustAggregation  # noqa: E402
from pfedpg.server import ClientGradients, plain_aggregate  # noqa: E402


def median_time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    from overhead import PRESETS, measure  # noqa: E402

    presets = {64: "embedded-default", 192: "vit-d192-l6-32px"}
    round_s = {d: measure(name, PRESETS[name], 3)["round_s"] for d, name in presets.items()}
    m = args.clients
    f = (m - 3) // 4  # the largest f that every rule (Bulyan: m >= 4f + 3) accepts
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; m = {m} clients, f = {f}; "
          f"reference rounds {', '.join(f'D={d}: {t:.3f} s' for d, t in round_s.items())}")
    print("| D | P (shared numbers) | rule | ms | ÷ sum | ÷ round |")
    print("|---|---|---|---|---|---|")
    for d in (64, 192):
        p = 4 * d * d + 10 * d
        g = torch.randn(m, p, generator=torch.Generator().manual_seed(0))
        grads = ClientGradients(list(range(m)), g, torch.ones(m))
        t_sum = median_time(lambda: plain_aggregate(grads), args.repeats)
        print(f"| {d} | {p:,} | sum | {1e3 * t_sum:.3f} | 1.0 | {t_sum / round_s[d]:.2e} |")
        for rule in AGGREGATION_RULES.names():
            hook = RobustAggregation(rule=rule, f=f)
            t = median_time(lambda: hook.aggregate(None, round=1, grads=grads), args.repeats)
            print(f"| {d} | {p:,} | {rule} | {1e3 * t:.3f} | {t / t_sum:.1f} | {t / round_s[d]:.2e} |")


if __name__ == "__main__":
    main()
