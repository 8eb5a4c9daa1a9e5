"""Trade-off curves and the families of mechanisms a one-run audit tests (DESIGN §6, "Audits that can fail").

A mechanism is f-DP (Dong, Roth & Su 2019) when no test telling a canary's presence ("in", P) from its
absence ("out", Q) does better than the trade-off curve f: a test with false-positive rate x under Q
has a false-negative rate ≥ f(x) under P. A one-run audit asks whether the canaries' guesses were too
good for *any* f-DP mechanism; it needs two readings of f:

* ``fbar_inv(y)`` — the least probability under Q of an event that has probability ≥ y under P, i.e.
  the inverse of f̄(x) = 1 − f(x) (Mahloujifar, Melis & Chaudhuri, ICML 2025);
* ``min_error(g)`` — the least error probability of guesses made on a region of total probability g
  when the canary is in or out with probability ½ each (the guesser abstains elsewhere). For a
  symmetric f the optimum guesses on both tails: error x, guess mass x + 1 − f(x), so min_error(g) is
  the x with x + 1 − f(x) = g. Xiang et al. (arXiv 2509.08704) read the order statistics of the
  released guesses through γ̄(w) = min_error(1 − w) / (1 − w).

Curves: :class:`GaussianCurve` (μ-GDP, in closed form) and :class:`ProfileCurve` (the curve implied by
a privacy profile {(ε_j, δ_j)}: f = sup_j f_{ε_j, δ_j}, Dong et al. Prop. 2.12 — a lower bound on the
mechanism's f whenever each δ_j bounds its δ(ε_j), so never a false alarm; one pair is the plain
(ε, δ)-DP curve). Families are ordered by a strength t (larger = less private): μ for GDP, ε for
(ε, δ), 1/σ for DP-SGD's Poisson-subsampled Gaussian, whose profile comes from a pessimistic privacy
loss distribution (:mod:`pfedpg.pld`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Protocol

import numpy as np
from scipy.special import ndtr, ndtri

from pfedpg.gdp import gdp_epsilon


class Curve(Protocol):
    def fbar_inv(self, y: float) -> float: ...

    def min_error(self, mass: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class GaussianCurve:
    """μ-GDP: f(x) = Φ(Φ⁻¹(1 − x) − μ), the curve of N(0, 1) against N(μ, 1)."""

    mu: float

    def fbar_inv(self, y: float) -> float:
        return float(ndtr(ndtri(y) - self.mu))

    def min_error(self, mass: np.ndarray) -> np.ndarray:
        # Guess "in" above μ/2 + s and "out" below μ/2 − s: mass Φ(μ/2 − s) + Φ(−μ/2 − s), error Φ(−μ/2 − s);
        # the mass falls with s, so bisect s for each target mass (vectorised).
        g = np.asarray(mass, dtype=float)
        lo, hi = np.full_like(g, -40.0), np.full_like(g, 40.0)
        for _ in range(80):
            s = 0.5 * (lo + hi)
            more = ndtr(self.mu / 2 - s) + ndtr(-self.mu / 2 - s) > g
            lo, hi = np.where(more, s, lo), np.where(more, hi, s)
        return ndtr(-self.mu / 2 - 0.5 * (lo + hi))


@dataclass(frozen=True)
class ProfileCurve:
    """The symmetric curve sup_j max(0, 1 − δ_j − e^{ε_j} x, e^{−ε_j}(1 − δ_j − x)) of a privacy profile.
    Both readings are the maxima of what each line alone allows (each line is a lower bound on f)."""

    eps: tuple[float, ...]
    delta: tuple[float, ...]

    def _arrays(self):
        # ε beyond 700 bounds nothing a float can tell apart from certainty; e^ε would overflow
        eps = np.minimum(np.asarray(self.eps, dtype=float), 700.0)
        return eps[:, None], np.asarray(self.delta, dtype=float)[:, None]

    def fbar_inv(self, y: float) -> float:
        e, d = (a[:, 0] for a in self._arrays())
        return float(max(0.0, np.max((y - d) * np.exp(-e)), np.max(1 - d - np.exp(e) * (1 - y))))

    def min_error(self, mass: np.ndarray) -> np.ndarray:
        e, d = self._arrays()
        g = np.asarray(mass, dtype=float)[None, :]
        a = (g - d) / (1 + np.exp(e))
        b = (g - 1 + np.exp(-e) * (1 - d)) / (1 + np.exp(-e))
        return np.maximum(0.0, np.maximum(a.max(0), b.max(0)))


@dataclass(frozen=True)
class Family:
    """The mechanisms an audit tests, by strength t (larger = less private): ``curve(t)``, the ε of a
    member at the run's δ (``epsilon(t)``), and how a member is named (``describe(t)``)."""

    name: str
    curve: Callable[[float], Curve]
    epsilon: Callable[[float], float]
    describe: Callable[[float], dict]
    t_max: float


def gdp_family(delta: float) -> Family:
    """μ-GDP, exact for Gaussian releases at full participation (``dp_client``)."""
    return Family("μ-GDP", GaussianCurve, lambda mu: gdp_epsilon(mu, delta), lambda mu: {"mu": mu}, 40.0)


def epsilon_delta_family(delta: float) -> Family:
    """(ε, δ)-DP at the run's δ: no assumption on the mechanism's shape (the fallback)."""
    return Family("(ε, δ)-DP", lambda e: ProfileCurve((e,), (delta,)), lambda e: e, lambda e: {"epsilon": e}, 200.0)


def subsampled_gaussian_family(*, sample_rate: float, steps: int, delta: float,
                               epsilon: Callable[[float], float] | None = None) -> Family:
    """DP-SGD's mechanism for one record: ``steps`` Poisson-subsampled Gaussian steps at rate q, by noise
    multiplier σ (t = 1/σ). ``epsilon(σ)`` reports a member's ε — the run's own accountant, so that a
    lower bound and the accountant's claim are read on one scale; default the same pessimistic PLD."""
    from pfedpg.pld import subsampled_gaussian_epsilon, subsampled_gaussian_profile

    @lru_cache(maxsize=256)
    def member(t: float) -> ProfileCurve:
        eps, dl = subsampled_gaussian_profile(1.0 / t, sample_rate, steps)
        # At most ~2,000 of the profile's points: fewer lines only lower the curve (still never a false alarm).
        keep = np.unique(np.r_[np.arange(0, len(eps), max(1, len(eps) // 2000)), len(eps) - 1])
        return ProfileCurve(tuple(eps[keep]), tuple(dl[keep]))

    def curve(t: float) -> ProfileCurve:
        # Members on a grid of 0.1 % in t, rounded up (less private: harder to reject), so that the
        # bisections of many thresholds share their privacy loss distributions.
        return member(float(np.exp(np.ceil(np.log(t) / 1e-3) * 1e-3)))

    eps_of = epsilon or (lambda sigma: subsampled_gaussian_epsilon(sigma, sample_rate, steps, delta))
    return Family(f"Poisson-subsampled Gaussian (q = {sample_rate:.4g}, {steps} steps)", curve,
                  lambda t: eps_of(1.0 / t), lambda t: {"noise_multiplier": 1.0 / t}, 20.0)


def bayes_error(curve: Curve) -> float:
    """The least error of a guess on every canary (prior ½): min_error at mass 1."""
    return float(curve.min_error(np.array([1.0]))[0])


__all__ = ["Curve", "Family", "GaussianCurve", "ProfileCurve", "bayes_error", "epsilon_delta_family", "gdp_family",
           "subsampled_gaussian_family"]

