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


__all__ = ["AuditResult", "audit_delta_mechanism", "certifiable_epsilon", "clopper_pearson",
           "epsilon_lower_bound", "gdp_mu_lower_bound"]
