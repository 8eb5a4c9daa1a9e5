"""The one-run bounds in the idealised game (issue 29's table), recomputed by the toolkit's code.

Each canary's score is an independent draw from N(0, 1) when out and N(μ, 1) when in, for the
Gaussian mechanism whose true ε is 8 at δ = 1e-5 (μ = 1.666); n canaries, half in. "Expected outcome":
the scores are the normal quantiles at (i + ½)/(n/2) on each side (jax_privacy's deterministic normal),
so every bound reads the outcome a typical run gives, with no sampling luck.

* Steinke et al. 2023: top/bottom guesses, the best number of guesses with hindsight.
* Mahloujifar et al. 2025: one-sided guesses over every threshold, Bonferroni (jax_privacy's protocol).
* Xiang et al. 2025: every guess released (r = n), MAP split at μ/2; and the best r with hindsight.
* Model-based Gaussian: our non-central t (spread estimated), and the z interval with the spread known
  (what the issue's table used).
The caps ("most certifiable") are each bound with every guess right.

    python bench/one_run_bounds.py            # ~1 min on 2 cores
"""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm

from attacks.epsilon_bounds import one_run_epsilon_lower_bound
from attacks.one_run_bounds import fdp_audit, gaussian_model_mu, map_guesses, order_statistics_bound
from attacks.tradeoff import epsilon_delta_family, gdp_family
from pfedpg.gdp import gdp_epsilon, gdp_mu

DELTA, ALPHA = 1e-5, 0.05


def deterministic(shift: float, n: int) -> np.ndarray:
    return norm.ppf(np.linspace(0, 1, n, endpoint=False) + 1 / (2 * n)) + shift


def steinke_best(s, inc, m):
    """Steinke et al.'s bound at the best symmetric number of guesses (k on each side)."""
    order = np.argsort(-s, kind="mergesort")
    best = 0.0
    for k in range(1, m // 2 + 1, max(1, m // 200)):
        v = int(inc[order[:k]].sum() + (~inc[order[m - k:]]).sum())
        best = max(best, one_run_epsilon_lower_bound(m=m, r=2 * k, v=v, delta=DELTA, alpha=ALPHA))
    return best


def xiang(s, inc, released=None):
    n, r, u = map_guesses(s, inc, threshold=MU / 2, released=released)
    return order_statistics_bound(gdp_family(DELTA), n=n, r=r, u=u, alpha=ALPHA)[1]


def main() -> None:
    global MU
    MU = gdp_mu(8.0, DELTA)
    print(f"μ = {MU:.4f} (ε 8 at δ 1e-5), α = {ALPHA}")
    print("| canaries | Steinke 2023 | Mahloujifar 2025 (GDP) | Xiang 2025, r = n (GDP) | Xiang 2025, best r | "
          "Xiang 2025, r = n, (ε, δ) family | Gaussian model (sd estimated) | Gaussian model (sd known) |")
    print("|---|---|---|---|---|---|---|---|")
    caps = {}
    for n in (100, 1000):
        half = n // 2
        s = np.r_[deterministic(MU, half), deterministic(0.0, half)]
        inc = np.r_[np.ones(half, bool), np.zeros(half, bool)]
        row = [steinke_best(s, inc, n), fdp_audit(s[inc], s[~inc], gdp_family(DELTA), alpha=ALPHA)[1], xiang(s, inc),
               max(xiang(s, inc, r) for r in range(n // 10, n + 1, n // 20)),
               order_statistics_bound(epsilon_delta_family(DELTA), n=n, r=n,
                                      u=map_guesses(s, inc, threshold=MU / 2)[2])[1],
               gdp_epsilon(gaussian_model_mu(s[inc], s[~inc], alpha=ALPHA), DELTA),
               gdp_epsilon(MU - norm.ppf(1 - ALPHA) * math.sqrt(2 / half), DELTA)]
        print(f"| {n:,} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
        perfect = np.r_[np.ones(half), np.zeros(half)]
        caps[n] = [one_run_epsilon_lower_bound(m=n, r=n, v=n, delta=DELTA, alpha=ALPHA),
                   fdp_audit(perfect[inc], perfect[~inc], gdp_family(DELTA), alpha=ALPHA)[1],
                   order_statistics_bound(gdp_family(DELTA), n=n, r=n, u=0, alpha=ALPHA)[1],
                   max(order_statistics_bound(gdp_family(DELTA), n=n, r=r, u=0, alpha=ALPHA)[1]
                       for r in range(n // 10, n + 1, n // 20)),
                   order_statistics_bound(epsilon_delta_family(DELTA), n=n, r=n, u=0, alpha=ALPHA)[1]]
    print("| most certifiable at 100 / 1,000 | " + " | ".join(
        f"{caps[100][i]:.2f} / {caps[1000][i]:.2f}" for i in range(5)) + " | unbounded | unbounded |")


if __name__ == "__main__":
    main()
