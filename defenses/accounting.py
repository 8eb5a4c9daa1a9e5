"""Privacy accounting helpers around Opacus' accountants (DESIGN §5).

One accountant per client for the whole run; it is checkpointed through ``state_dict`` so a resumed
run keeps its ε. ``gdp_epsilon`` is the exact ε(δ) of a μ-GDP mechanism (Dong, Roth & Su 2019,
Cor. 2.13), the closed form that a composition of T full-participation Gaussian releases with
per-release μ_0 = sensitivity / σ reaches: μ = μ_0 · √T.
"""
from __future__ import annotations

import math

from scipy.optimize import brentq
from scipy.stats import norm

from pfedpg.errors import ConfigError

ACCOUNTANTS = ("rdp", "prv")


def make_accountant(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise ConfigError(f"accountant={name!r} is not one of {', '.join(ACCOUNTANTS)}")


def accountant_epsilon(accountant, delta: float) -> float:
    if not accountant.history:
        return 0.0
    return float(accountant.get_epsilon(delta=delta))


def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The noise multiplier (per unit sensitivity) that reaches ``target_epsilon`` after ``steps``."""
    from opacus.accountants.utils import get_noise_multiplier

    if steps < 1:
        raise ConfigError("target_epsilon needs at least one planned release; check rounds and clients_per_round")
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=accountant, epsilon_tolerance=0.005))


def gdp_delta(mu: float, eps: float) -> float:
    """δ(ε) of μ-GDP."""
    return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest ε with δ(ε) ≤ delta for μ-GDP (exact; monotone in ε)."""
    if mu <= 0:
        return 0.0
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0
    hi = 1.0
    while gdp_delta(mu, hi) > delta:
        hi *= 2
    return float(brentq(lambda e: gdp_delta(mu, e) - delta, 0.0, hi, xtol=1e-10))
