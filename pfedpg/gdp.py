"""Gaussian privacy profiles, in one place for the accountants' checks and the audits.

* μ-GDP (Dong, Roth & Su 2019, Cor. 2.13): δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2), and
  :func:`gdp_epsilon`, the smallest ε with δ(ε) ≤ δ. A composition of T full-participation Gaussian
  releases of per-release μ_0 = sensitivity / σ is μ-GDP with μ = μ_0·√T.
* Two Gaussians with their own spreads, P = N(m1, s1²) and Q = N(m0, s0²) — what the client-level
  one-run audit fits to its canaries and its null (Andrew et al., ICLR 2024). The hockey-stick
  divergence E_ε(P‖Q) = P(L > ε) − e^ε Q(L > ε), with the privacy loss L(y) = log p(y)/q(y) =
  a y² + b y + c a quadratic, so {L > ε} is a half-line (equal spreads) or the inside or outside of
  two roots; :func:`gaussians_epsilon` is the smallest ε at which both directions are ≤ δ. With
  s1 = s0 it is μ-GDP with μ = |m1 − m0| / s0.
"""
from __future__ import annotations

import math

from scipy.optimize import brentq
from scipy.special import log_ndtr
from scipy.stats import norm


def gdp_delta(mu: float, eps: float) -> float:
    """δ(ε) of μ-GDP; the second term as exp(ε + log Φ(·)), so that a huge ε neither overflows nor is cut."""
    return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps + float(log_ndtr(-eps / mu - mu / 2))))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest ε with δ(ε) ≤ delta for μ-GDP (exact; monotone in ε); ∞ for an infinite μ."""
    if mu <= 0:
        return 0.0
    if not math.isfinite(mu):
        return math.inf
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0
    hi = 1.0
    while gdp_delta(mu, hi) > delta:
        hi *= 2
        if hi > 1e6:
            return math.inf
    return float(brentq(lambda e: gdp_delta(mu, e) - delta, 0.0, hi, xtol=1e-10))


def gdp_mu(eps: float, delta: float) -> float:
    """The μ whose μ-GDP gives exactly (ε, δ) (the inverse of :func:`gdp_epsilon` in μ; δ(ε) grows with μ)."""
    if gdp_delta(1e-12, eps) >= delta:
        return 0.0
    hi = 1.0
    while gdp_delta(hi, eps) < delta:
        hi *= 2
    return float(brentq(lambda m: gdp_delta(m, eps) - delta, 1e-12, hi, xtol=1e-12))


def _log_prob_region(m: float, s: float, lo: float | None, hi: float | None) -> float:
    """log P(lo < Y < hi) for Y ~ N(m, s²); None = unbounded."""
    a = -math.inf if lo is None else (lo - m) / s
    b = math.inf if hi is None else (hi - m) / s
    if b <= a:
        return -math.inf
    if a == -math.inf:
        return float(log_ndtr(b))
    if b == math.inf:
        return float(log_ndtr(-a))
    # P(a < Z < b), from the side with the smaller tail so the difference keeps its digits
    if a > 0:
        hi_tail, lo_tail = log_ndtr(-a), log_ndtr(-b)
    else:
        hi_tail, lo_tail = log_ndtr(b), log_ndtr(a)
    return float(hi_tail + math.log1p(-math.exp(min(0.0, lo_tail - hi_tail))))


def _log_region_probs(m1: float, s1: float, m0: float, s0: float, eps: float) -> tuple[float, float]:
    """(log P(L > ε), log Q(L > ε)) for P = N(m1, s1²), Q = N(m0, s0²), L = log p/q."""
    a = 0.5 * (1 / s0 ** 2 - 1 / s1 ** 2)
    b = m1 / s1 ** 2 - m0 / s0 ** 2
    c = 0.5 * ((m0 / s0) ** 2 - (m1 / s1) ** 2) + math.log(s0) - math.log(s1)
    if a == 0:  # equal spreads: a half-line
        if b == 0:
            return (-math.inf, -math.inf) if c <= eps else (0.0, 0.0)
        t = (eps - c) / b
        regions = [(t, None)] if b > 0 else [(None, t)]
    else:
        disc = b * b - 4 * a * (c - eps)
        if disc <= 0:  # L > ε nowhere (a < 0) or everywhere (a > 0)
            return (-math.inf, -math.inf) if a < 0 else (0.0, 0.0)
        r = sorted(((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)))
        regions = [(r[0], r[1])] if a < 0 else [(None, r[0]), (r[1], None)]

    def logsum(ms):
        vals = [_log_prob_region(ms[0], ms[1], lo, hi) for lo, hi in regions]
        top = max(vals)
        return top if top == -math.inf else top + math.log(sum(math.exp(v - top) for v in vals))

    return logsum((m1, s1)), logsum((m0, s0))


def gaussians_delta(m1: float, s1: float, m0: float, s0: float, eps: float) -> float:
    """E_ε(P‖Q) = P(L > ε) − e^ε Q(L > ε) for P = N(m1, s1²), Q = N(m0, s0²)."""
    lp, lq = _log_region_probs(m1, s1, m0, s0, eps)
    if lp == -math.inf:
        return 0.0
    return max(0.0, math.exp(lp) * -math.expm1(min(0.0, eps + lq - lp))) if eps + lq < lp else 0.0


def gaussians_epsilon(m1: float, s1: float, m0: float, s0: float, delta: float) -> float:
    """The smallest ε ≥ 0 at which E_ε(P‖Q) ≤ δ and E_ε(Q‖P) ≤ δ (∞ beyond 1e4)."""
    if s1 <= 0 or s0 <= 0:
        raise ValueError(f"spreads must be positive, got {s1} and {s0}")

    def excess(eps: float) -> float:
        return max(gaussians_delta(m1, s1, m0, s0, eps), gaussians_delta(m0, s0, m1, s1, eps)) - delta

    if excess(0.0) <= 0:
        return 0.0
    hi = 1.0
    while excess(hi) > 0:
        hi *= 2
        if hi > 1e4:
            return math.inf
    return float(brentq(excess, hi / 2 if hi > 1 else 0.0, hi, xtol=1e-8))


__all__ = ["gaussians_delta", "gaussians_epsilon", "gdp_delta", "gdp_epsilon", "gdp_mu"]
