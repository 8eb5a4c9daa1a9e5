"""Empirical privacy auditing: lower bounds on ε and μ from a distinguishing game (DESIGN §6).

The auditor picks two neighbouring inputs (canaries), runs the mechanism on one of them with
probability ½, and guesses which from the output with a threshold fixed in advance. With false
positive and false negative rates FPR, FNR, any (ε, δ)-DP mechanism satisfies
FPR + e^ε FNR ≥ 1 − δ (and symmetrically), so
ε ≥ ln((1 − δ − FNR_hi) / FPR_hi) with Clopper–Pearson upper bounds FPR_hi, FNR_hi. This certifies at
most about ln(n / ln(2/α)) with n trials per side and is weak at moderate ε, so the Gaussian-DP
bound μ̂_lb = Φ⁻¹(1 − FPR_hi) − Φ⁻¹(FNR_hi) is reported too (Dong, Roth & Su 2019). A lower
bound above the accountant's value means the mechanism or its accounting is broken.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from scipy.stats import beta, norm


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Two-sided (1 − alpha) Clopper–Pearson interval for a binomial proportion k / n."""
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


@dataclass
class AuditResult:
    trials_per_side: int
    fpr: float
    fnr: float
    fpr_hi: float
    fnr_hi: float
    epsilon_lb: float
    mu_lb: float
    claimed_epsilon: float
    claimed_mu: float

    @property
    def violated(self) -> bool:
        """True when the empirical lower bound exceeds the claim: a broken mechanism."""
        return self.epsilon_lb > self.claimed_epsilon or self.mu_lb > self.claimed_mu

    def to_dict(self) -> dict:
        return {**asdict(self), "violated": self.violated}


def epsilon_lower_bound(*, fp: int, fn: int, n: int, delta: float, alpha: float = 0.05) -> tuple[float, float, float]:
    """(ε_lb, FPR_hi, FNR_hi) from fp false positives and fn false negatives in n trials per side."""
    fpr_hi = clopper_pearson(fp, n, alpha)[1]
    fnr_hi = clopper_pearson(fn, n, alpha)[1]
    bounds = []
    for a, b in ((fpr_hi, fnr_hi), (fnr_hi, fpr_hi)):
        if a > 0 and 1 - delta - b > 0:
            bounds.append(math.log((1 - delta - b) / a))
    return max([0.0, *bounds]), fpr_hi, fnr_hi


def gdp_mu_lower_bound(fpr_hi: float, fnr_hi: float) -> float:
    """μ̂_lb = Φ⁻¹(1 − FPR_hi) − Φ⁻¹(FNR_hi), clipped at 0."""
    return max(0.0, float(norm.ppf(1 - fpr_hi) - norm.ppf(fnr_hi)))


def audit_delta_mechanism(release: Callable[[torch.Tensor, int], torch.Tensor], *, canary: torch.Tensor,
                          other: torch.Tensor, trials: int, delta: float, claimed_epsilon: float,
                          claimed_mu: float, alpha: float = 0.05) -> AuditResult:
    """Distinguish release(canary) from release(other) by the projection on (canary − other).

    ``release(x, trial)`` must be the exact client-side code path with fresh noise per trial. The
    threshold is fixed in advance at the midpoint of the two noiseless projections; for replace
    adjacency use (+c, −c), for add/remove (c, 0).
    """
    direction = (canary - other).reshape(-1)
    direction = direction / direction.norm()
    mid = 0.5 * float((canary.reshape(-1) + other.reshape(-1)) @ direction)
    # "positive" = the canary world; the statistic should be above the threshold there.
    fn = sum(float(release(canary, 2 * t).reshape(-1) @ direction) <= mid for t in range(trials))
    fp = sum(float(release(other, 2 * t + 1).reshape(-1) @ direction) > mid for t in range(trials))
    eps_lb, fpr_hi, fnr_hi = epsilon_lower_bound(fp=fp, fn=fn, n=trials, delta=delta, alpha=alpha)
    return AuditResult(trials, fp / trials, fn / trials, fpr_hi, fnr_hi, eps_lb, gdp_mu_lower_bound(fpr_hi, fnr_hi),
                       claimed_epsilon, claimed_mu)


def certifiable_epsilon(n: int, alpha: float = 0.05) -> float:
    """About the largest ε that n trials per side can certify with zero errors: ln(n / ln(2/α))."""
    return math.log(n / math.log(2 / alpha))


# ------------------------------------------------------------------------------------------------
# One training run (Steinke, Nasr & Jagielski 2023): m canaries, each included independently with
# probability ½; the auditor guesses "in" for its k+ highest scores and "out" for its k− lowest
# (counts fixed in advance), abstaining on the rest; v of the r = k+ + k− guesses are right. Under
# (ε, δ)-DP, P[V ≥ v] ≤ P[Binom(r, e^ε/(1+e^ε)) ≥ v] + 2mδ·max_i P[v > Binom(r, ·) ≥ v − i]/i
# (their Theorem 3 / Proposition 5.7); ε_lb is the largest ε this p-value rejects at level α.


def one_run_p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    from scipy.stats import binom

    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    p = float(binom.sf(v - 1, r, q))  # P[Binom(r, q) >= v]
    if delta > 0 and v > 0:
        pmf = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v-1], P[B = v-2], ..., P[B = 0]
        alpha_term = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
        p += 2 * m * delta * alpha_term
    return min(p, 1.0)


def one_run_epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, alpha: float = 0.05) -> float:
    """Largest ε with p-value < alpha (0 when even ε = 0 cannot be rejected); bisection to 1e-4."""
    if one_run_p_value(m=m, r=r, v=v, epsilon=0.0, delta=delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m=m, r=r, v=v, epsilon=hi, delta=delta) < alpha:
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return math.inf
    while hi - lo > 1e-4:
        mid = 0.5 * (lo + hi)
        if one_run_p_value(m=m, r=r, v=v, epsilon=mid, delta=delta) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


def one_run_audit(scores, included, *, delta: float, guess_fraction: float = 0.5, alpha: float = 0.05) -> dict:
    """Guess the top and bottom ``guess_fraction / 2`` of the canaries by score (higher = "in"),
    count correct guesses, and bound ε. ``included``: the canaries' true coin flips."""
    s = np.asarray(scores, dtype=float)
    inc = np.asarray(included).astype(bool)
    m = len(s)
    k = int(guess_fraction * m / 2)
    if k < 1:
        raise ValueError(f"{m} canaries with guess_fraction {guess_fraction} make no guesses; add canaries")
    order = np.argsort(-s, kind="mergesort")
    top, bottom = order[:k], order[m - k:]
    v = int(inc[top].sum() + (~inc[bottom]).sum())
    # epsilon_cap: what the same canaries would certify with every guess right, the most this audit
    # can ever say. At an accountant ε above it, "no violation" is no evidence: the audit cannot fail.
    return {"canaries": m, "guesses": 2 * k, "correct": v, "delta": delta, "alpha": alpha,
            "epsilon_lower_bound": one_run_epsilon_lower_bound(m=m, r=2 * k, v=v, delta=delta, alpha=alpha),
            "epsilon_cap": one_run_epsilon_lower_bound(m=m, r=2 * k, v=2 * k, delta=delta, alpha=alpha)}


__all__ = ["AuditResult", "audit_delta_mechanism", "certifiable_epsilon", "clopper_pearson",
           "epsilon_lower_bound", "gdp_mu_lower_bound", "one_run_audit", "one_run_epsilon_lower_bound",
           "one_run_p_value"]
