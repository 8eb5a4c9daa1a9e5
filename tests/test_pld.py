"""The pessimistic PLD profile of the Poisson-subsampled Gaussian (pfedpg.pld) against exact and independent values.

Measured when written (grid 1e-3, tail 1e-14, δ = 1e-5), ours vs Opacus 1.6's PRV accountant [lower, estimate, upper]
(remove direction, eps_error 0.01) and its RDP ε:
(σ, q, T) = (1.0, 0.01, 1000): 1.8284 vs [1.818, 1.8282, 1.838], RDP 2.101; (0.8, 0.1, 40): 7.359 vs
[7.348, 7.3587, 7.369], RDP 8.478; (2.0, 0.3, 100): 7.925 vs [7.914, 7.9248, 7.935], RDP 8.620; (1.1, 0.004, 2000):
0.78959 vs [0.7795, 0.78956, 0.7996], RDP 1.004. q = 1 is above μ-GDP's δ by a relative 1e-8 to 1e-6 on ε ∈ [0, 10];
one step (q = 0.2, σ = 1) is above the quad-integrated δ by ~1e-14 (the mass at +∞) at grid points.
"""
import math
import warnings

import numpy as np
import pytest
from scipy import integrate, optimize
from scipy.stats import norm

from pfedpg.gdp import gdp_delta, gdp_epsilon
from pfedpg.pld import subsampled_gaussian_epsilon, subsampled_gaussian_profile


def _near(eps_grid, delta, eps):
    """(ε', δ(ε')) at the grid point ε' nearest ε."""
    j = int(np.argmin(np.abs(eps_grid - eps)))
    return eps_grid[j], delta[j]


@pytest.mark.parametrize("sigma,steps", [(1.0, 10), (2.0, 100), (0.7, 3)])
def test_full_participation_is_gdp(sigma, steps):
    mu = math.sqrt(steps) / sigma
    eps, delta = subsampled_gaussian_profile(sigma, 1.0, steps)
    assert eps[0] == 0 and np.all(np.diff(eps) > 0)
    for e in np.linspace(0, 10, 41):
        e, ours = _near(eps, delta, e)
        exact = gdp_delta(mu, e)
        assert ours >= exact - 1e-15  # pessimistic
        assert ours <= exact * (1 + 1e-2) or ours <= exact + 1e-6
    ours_eps, exact_eps = subsampled_gaussian_epsilon(sigma, 1.0, steps, 1e-5), gdp_epsilon(mu, 1e-5)
    assert exact_eps <= ours_eps <= exact_eps * 1.01


@pytest.mark.parametrize("sigma,q,steps", [(1.0, 0.01, 1000), (0.8, 0.1, 40), (2.0, 0.3, 100), (1.1, 0.004, 2000)])
def test_between_prv_and_rdp(sigma, q, steps):
    """Opacus' PRV accountant (remove direction, its own error bars) and its RDP bound, at δ = 1e-5."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    delta, eps_error = 1e-5, 0.01
    prv = PRVAccountant()
    prv.history = [(sigma, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dprv = prv._get_dprv(eps_error=eps_error, delta_error=delta / 1000)
    prv_lower, prv_estimate, _ = dprv.compute_epsilon(delta, delta / 1000, eps_error)
    rdp = RDPAccountant()
    rdp.history = [(sigma, q, steps)]
    ours = subsampled_gaussian_epsilon(sigma, q, steps, delta)
    assert prv_lower <= ours <= rdp.get_epsilon(delta=delta)
    assert ours == pytest.approx(prv_estimate, rel=0.005)


def test_monotone_and_total_variation():
    eps, delta = subsampled_gaussian_profile(1.0, 0.2, 30)
    assert np.all(np.diff(delta) <= 0) and delta[0] <= 1
    # one step: δ(0) is TV(P, Q) = q·TV(N(1,σ²), N(0,σ²)); T steps: TV is subadditive; q = 1: TV of μ-GDP
    tv_one = 0.2 * (2 * norm.cdf(0.5) - 1)
    assert subsampled_gaussian_profile(1.0, 0.2, 1)[1][0] == pytest.approx(tv_one, rel=1e-6)
    assert delta[0] <= 30 * tv_one
    assert subsampled_gaussian_profile(2.0, 1.0, 16)[1][0] == pytest.approx(2 * norm.cdf(1.0) - 1, rel=1e-6)
    e = [subsampled_gaussian_epsilon(s, q, t, 1e-5) for s, q, t in
         [(1.0, 0.1, 50), (1.0, 0.1, 100), (1.0, 0.2, 50), (1.5, 0.1, 50)]]
    assert e[1] > e[0] and e[2] > e[0] and e[3] < e[0]
    assert subsampled_gaussian_profile(1.0, 0.0, 10)[1].max() == 0.0
    with pytest.raises(ValueError):
        subsampled_gaussian_profile(0.0, 0.1, 10)


def test_single_step_against_numerical_integration():
    """δ(ε) = ∫ (p − e^ε q)₊ for both orders of P = 0.8·N(0,1) + 0.2·N(1,1) and Q = N(0,1), by quad."""
    sigma, q = 1.0, 0.2
    pdf = lambda x, m: math.exp(-((x - m) / sigma) ** 2 / 2) / (sigma * math.sqrt(2 * math.pi))  # noqa: E731
    p = lambda x: (1 - q) * pdf(x, 0) + q * pdf(x, 1)  # noqa: E731
    r = lambda x: pdf(x, 0)  # noqa: E731
    eps, delta = subsampled_gaussian_profile(sigma, q, 1)
    for e in [0.0, 0.05, 0.1, 0.2, 0.4]:
        e, ours = _near(eps, delta, e)
        true = []
        for a, b in [(p, r), (r, p)]:
            gap = lambda x: a(x) - math.exp(e) * b(x)  # noqa: E731
            cut = optimize.brentq(gap, -40, 40) if gap(-40) * gap(40) < 0 else None
            val = integrate.quad(lambda x: max(gap(x), 0.0), -40, 40, points=None if cut is None else [cut],
                                 limit=400, epsabs=1e-15, epsrel=1e-12)[0]
            true.append(val)
        assert max(true) <= ours + 1e-15  # at grid points the split is exact: ours is true + the mass at +∞
        assert ours <= max(true) * (1 + 1e-3) + 1e-9
