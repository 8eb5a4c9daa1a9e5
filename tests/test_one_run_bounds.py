"""One-run ε lower bounds that can reach the claim (DESIGN §6): published values, closed forms, and
validity over simulated audits of correct mechanisms."""
import math

import numpy as np
import pytest
from scipy.stats import binom, norm

from attacks.one_run_bounds import (
    audit_bounds,
    fdp_audit,
    gaussian_model_mu,
    map_guesses,
    order_statistics_bound,
    order_statistics_tail,
)
from attacks.tradeoff import (
    GaussianCurve,
    ProfileCurve,
    bayes_error,
    epsilon_delta_family,
    gdp_family,
    subsampled_gaussian_family,
)
from pfedpg.gdp import gdp_delta, gdp_epsilon, gdp_mu


def deterministic_normal(shift: float, n: int) -> np.ndarray:
    """jax_privacy's test scores: the normal quantiles at (i + ½)/n, shifted."""
    return norm.ppf(np.linspace(0, 1, n, endpoint=False) + 1 / (2 * n)) + shift


def test_gdp_and_dp_convert_as_published():
    assert gdp_epsilon(1.0, 1e-5) == pytest.approx(4.3772, abs=5e-5)
    assert gdp_mu(8.0, 1e-5) == pytest.approx(1.6660, abs=5e-5)
    assert gdp_delta(gdp_mu(3.0, 1e-6), 3.0) == pytest.approx(1e-6, rel=1e-8)


@pytest.mark.parametrize("n, r, u, expected",
                         [(1000, 1000, 159, 9.0038), (1000, 500, 20, 8.9216), (1000, 100, 10, 3.1645)])
def test_order_statistics_bound_reproduces_xiang_et_al(n, r, u, expected):
    """Xiang et al. (arXiv 2509.08704), GDP family, α = 0.05, ε at δ = 1e-5."""
    _, eps = order_statistics_bound(gdp_family(1e-5), n=n, r=r, u=u, alpha=0.05)
    assert eps == pytest.approx(expected, abs=5e-4)


def test_all_guesses_released_is_the_binomial_at_the_bayes_error():
    mu = 1.3
    assert bayes_error(GaussianCurve(mu)) == pytest.approx(norm.cdf(-mu / 2), rel=1e-9)
    at_bayes = binom.cdf(40, 300, norm.cdf(-mu / 2))
    assert order_statistics_tail(GaussianCurve(mu), n=300, r=300, u=40) == pytest.approx(at_bayes)
    # r < n reads the curve through γ̄(w) ≤ γ̄(0): the released guesses are the confident ones, so u
    # mistakes are likelier than at the Bayes error — between that binomial and the one at γ̄ of the
    # largest abstained rank (here E[W] = 1/301)
    near = order_statistics_tail(GaussianCurve(mu), n=300, r=299, u=40)
    worst = GaussianCurve(mu).min_error(np.array([1 - 5 / 301]))[0] / (1 - 5 / 301)
    assert binom.cdf(40, 299, norm.cdf(-mu / 2)) < near < binom.cdf(40, 299, worst)


def test_profile_curve_of_a_fine_gdp_profile_matches_the_closed_form():
    """The curve implied by μ-GDP's own privacy profile is μ-GDP's curve: both readings agree."""
    mu = 1.5
    eps = np.linspace(0, 12, 3000)
    prof = ProfileCurve(tuple(eps), tuple(gdp_delta(mu, e) for e in eps))
    g = GaussianCurve(mu)
    for y in (0.05, 0.3, 0.7, 0.95):
        assert prof.fbar_inv(y) == pytest.approx(g.fbar_inv(y), abs=2e-4)
        assert prof.fbar_inv(y) <= g.fbar_inv(y) + 1e-12  # never more private than the mechanism
    mass = np.array([0.2, 0.5, 1.0])
    np.testing.assert_allclose(prof.min_error(mass), g.min_error(mass), atol=2e-4)
    assert np.all(prof.min_error(mass) <= g.min_error(mass) + 1e-12)


def test_epsilon_delta_curve_closed_forms():
    e, d = 1.0, 1e-3
    c = ProfileCurve((e,), (d,))
    assert bayes_error(c) == pytest.approx((1 - d) / (1 + math.e))
    assert c.fbar_inv(0.5) == pytest.approx(max((0.5 - d) / math.e, 1 - d - math.e * 0.5, 0))
    # Steinke et al.'s reading: with every one of n guesses right, the (ε, 0) bound is the ε whose
    # correct-guess probability e^ε / (1 + e^ε) has p^n = α
    _, eps = order_statistics_bound(epsilon_delta_family(0.0), n=100, r=100, u=0, alpha=0.05)
    p = 0.05 ** (1 / 100)
    assert eps == pytest.approx(math.log(p / (1 - p)), abs=1e-4)


@pytest.mark.parametrize("shift, expected", [(1, 2.164749), (2, 4.7218075), (4, 9.133752)])
def test_fdp_recursion_reproduces_jax_privacy(shift, expected):
    """Mahloujifar et al.'s recursion over the ROC hull with a Bonferroni correction: jax_privacy's
    test vectors (10,000 in and 10,000 out, α 0.05, δ 1e-6)."""
    _, eps, _, _ = fdp_audit(deterministic_normal(shift, 10_000), deterministic_normal(0, 10_000), gdp_family(1e-6),
                             alpha=0.05)
    assert eps == pytest.approx(expected, rel=1e-5)


def test_gaussian_model_bound_by_hand_and_its_coverage():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1.0, 60), rng.normal(0.0, 1.0, 60)
    # the non-central t bound is just below the plain z-interval with the pooled spread
    sd = math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    z_bound = (a.mean() - b.mean()) / sd - 1.645 * math.sqrt(2 / 60)
    assert z_bound - 0.05 < gaussian_model_mu(a, b) < z_bound
    misses = sum(gaussian_model_mu(rng.normal(1.2, 2.0, 50), rng.normal(0.0, 2.0, 50)) > 0.6 for _ in range(400))
    assert misses <= binom.ppf(0.999, 400, 0.05)


def simulated_gdp_game(rng, mu, n):
    inserted = rng.random(n) < 0.5
    return rng.normal(np.where(inserted, mu, 0.0), 1.0), inserted


@pytest.mark.parametrize("released", [None, 120])
def test_order_statistics_bound_is_valid_on_a_correct_gaussian_mechanism(released):
    """Over 400 simulated one-run audits of a μ-GDP mechanism, its own member is rejected (the bound
    above the true ε) at most α of the time, up to binomial slack — for all guesses released and for
    the 120 most confident of 200."""
    rng, mu, n = np.random.default_rng(1), 1.2, 200
    rejected = 0
    for _ in range(400):
        s, inc = simulated_gdp_game(rng, mu, n)
        _, r, u = map_guesses(s, inc, threshold=mu / 2, released=released)
        rejected += order_statistics_tail(GaussianCurve(mu), n=n, r=r, u=u, nodes=400) < 0.05
    assert rejected <= binom.ppf(0.999, 400, 0.05), rejected


def test_fdp_recursion_is_valid_on_a_correct_gaussian_mechanism():
    rng, mu, n = np.random.default_rng(2), 1.0, 200
    fam = gdp_family(1e-5)
    true_eps = gdp_epsilon(mu, 1e-5)
    above = 0
    for _ in range(200):
        s, inc = simulated_gdp_game(rng, mu, n)
        above += fdp_audit(s[inc], s[~inc], fam)[1] > true_eps
    assert above <= binom.ppf(0.999, 200, 0.05), above


def test_audit_bounds_reach_a_broken_mechanism_and_respect_a_correct_one():
    """The issue's example at 100 canaries: claim ε = 8 (μ 1.666); a mechanism leaking ε = 16 is
    certified above 8 by the order-statistics bound, not by Steinke et al.'s."""
    delta = 1e-5
    claim_mu = gdp_mu(8.0, delta)
    leak_mu = gdp_mu(16.0, delta)
    n = 100
    inserted = np.arange(n) % 2 == 0
    expected = np.where(inserted, 1.0, -1.0) * np.abs(norm.ppf((np.arange(n) // 2 + 0.5) / (n // 2)))
    # the outcome at the expected error rate: Φ(−μ/2) of the guesses wrong
    for mu, violated in ((leak_mu, True), (claim_mu * 0.8, False)):
        wrong = int(round(n * norm.cdf(-mu / 2)))
        s = np.where(inserted, 1.0, -1.0)
        s[:wrong] *= -1
        res = audit_bounds(s + 0.001 * expected, inserted, family=gdp_family(delta), claimed_epsilon=8.0, delta=delta,
                           threshold=0.0)
        assert res["violation"] is violated and res["can_fail"], res
        assert res["bounds"]["steinke"]["violation"] is False


def test_subsampled_gaussian_family_is_valid_on_the_simulated_mechanism():
    """DP-SGD's own family: over 200 simulated one-run audits of T Poisson-subsampled Gaussian steps
    (a canary's score Σ_t (b·Bernoulli(q) + N(0, σ²))), the mechanism's own member is rejected at most
    α of the time; q = 1 reduces the family to μ-GDP with μ = √T / σ."""
    q, steps, sigma, n = 0.2, 20, 1.0, 400
    fam = subsampled_gaussian_family(sample_rate=q, steps=steps, delta=1e-5)
    own = fam.curve(1 / sigma)
    rng = np.random.default_rng(3)
    rejected = 0
    for _ in range(200):
        inserted = rng.random(n) < 0.5
        drawn = rng.binomial(steps, q, size=n) * inserted
        s = drawn + rng.normal(0.0, sigma * math.sqrt(steps), size=n)
        _, r, u = map_guesses(s, inserted, threshold=q * steps / 2)
        rejected += order_statistics_tail(own, n=n, r=r, u=u) < 0.05
    assert rejected <= binom.ppf(0.999, 200, 0.05), rejected
    full = subsampled_gaussian_family(sample_rate=1.0, steps=9, delta=1e-5).curve(1 / 2.0)
    assert bayes_error(full) == pytest.approx(norm.cdf(-math.sqrt(9) / 2.0 / 2), abs=1e-3)
    assert bayes_error(full) <= norm.cdf(-math.sqrt(9) / 2.0 / 2) + 1e-9  # never more private than the mechanism
