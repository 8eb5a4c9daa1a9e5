"""Known answers for every number the audit statistics print (DESIGN §6, §8).

Each test pins a computed number to a closed form evaluated here, independently of the code under
test (own loops, ``math.erfc`` for Φ, ``math.lgamma`` for binomial pmfs, ``scipy.integrate.quad``
for a hockey-stick divergence), or to a published value:

* the one-run bound of Steinke, Nasr & Jagielski (2023) against the published test vectors of
  Google DeepMind's jax_privacy auditing library (Apache-2.0; only its numbers and its construction —
  deterministic normal scores, one-sided guesses over the ROC's upper hull, Bonferroni over the hull
  — are used here, no code) and against the p-value written as the paper writes it (a sum of pmfs);
* Clopper–Pearson, the two-sided ε bound, the GDP μ bound and the certifiable ε by hand;
* μ-GDP (Dong, Roth & Su 2019): ε(μ = 1, δ = 1e-5) = 4.3772, μ(ε = 8, δ = 1e-5) = 1.6660, δ(ε)
  from Cor. 2.13, and the two-Gaussian ε against a quadrature of its hockey-stick divergence;
* the client-level canary audit's cap and equal-variance reading;
* dp_client's adjacency conversion: what the accountant is told and the ε it then reports;
* AUC, ROC, TPR at FPR, the (ε, δ) ROC region, LiRA/RMIA scores and source inference on hand-made
  arrays; the Student-t quantiles of the paired-seed tables against the printed t table.

Every tolerance is tight enough that a changed constant fails (see the report of the mutation run).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.optimize import brentq
from scipy.stats import beta as beta_dist
from scipy.stats import norm

from attacks.canary_estimate import epsilon_cap, estimate_epsilon
from attacks.epsilon_bounds import (
    audit_delta_mechanism,
    certifiable_epsilon,
    clopper_pearson,
    epsilon_lower_bound,
    gdp_mu_lower_bound,
    one_run_audit,
    one_run_epsilon_lower_bound,
    one_run_p_value,
)
from attacks.metrics import auc, balanced_accuracy_max, dp_region, roc_curve, tpr_at_fpr
from pfedpg import gdp
from pfedpg.gdp import gaussians_delta, gaussians_epsilon, gdp_delta, gdp_epsilon

# ------------------------------------------------------------------------------------------------
# Independent helpers (no code under test inside)


def _phi(x: float) -> float:
    """Standard normal CDF through erfc (not scipy's ndtr, which the code under test uses)."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _drs_delta(mu: float, eps: float) -> float:
    """Dong, Roth & Su (2019), Cor. 2.13: δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)."""
    return _phi(-eps / mu + mu / 2) - math.exp(eps) * _phi(-eps / mu - mu / 2)


def _drs_epsilon(mu: float, delta: float) -> float:
    """The ε with δ(ε) = delta, by bisection on the closed form (δ(ε) decreases in ε)."""
    if _drs_delta(mu, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while _drs_delta(mu, hi) > delta:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _drs_delta(mu, mid) > delta else (lo, mid)
    return 0.5 * (lo + hi)


def _binom_pmf(k: int, n: int, q: float) -> float:
    """P[Binom(n, q) = k] from log-gamma (0 < q < 1)."""
    return math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                    + k * math.log(q) + (n - k) * math.log1p(-q))


def _one_run_p_value_naive(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The one-run p-value as Steinke, Nasr & Jagielski (2023, Thm. 3 and their listed code) write it:
    P[Binom(r, q) ≥ v] + 2mδ · max_{i=1..v} P[v > Binom(r, q) ≥ v − i] / i, q = e^ε / (1 + e^ε),
    each probability a plain sum of pmfs."""
    q = 1.0 / (1.0 + math.exp(-eps))
    beta_term = sum(_binom_pmf(k, r, q) for k in range(v, r + 1))
    alpha_term, running = 0.0, 0.0
    for i in range(1, v + 1):
        running += _binom_pmf(v - i, r, q)  # P[v > B >= v - i]
        if running > i * alpha_term:
            alpha_term = running / i
    return min(beta_term + alpha_term * delta * 2 * m, 1.0)


def _deterministic_normal(shift: float, n: int) -> np.ndarray:
    """jax_privacy's test construction: Φ⁻¹ at the n mid-quantiles, shifted."""
    return norm.ppf(np.linspace(0, 1, n, endpoint=False) + 1 / (2 * n)) + shift


def _upper_hull(points: np.ndarray) -> np.ndarray:
    """Indices of the points (sorted by x) that are not on or below a chord between a left and a right
    neighbour, removing dominated points until none is left (collinear points are dropped)."""
    idx = np.arange(len(points))
    while len(idx) > 2:
        d = np.diff(points[idx].astype(np.int64), axis=0)
        # cross((b − a), (c − b)) ≥ 0: b is on or below the chord a–c
        cross = d[:-1, 0] * d[1:, 1] - d[:-1, 1] * d[1:, 0]
        dominated = cross >= 0
        if not dominated.any():
            break
        idx = idx[np.r_[True, ~dominated, True]]
    return idx


def _one_run_epsilon_over_thresholds(in_scores, out_scores, *, alpha: float, delta: float) -> tuple[float, int]:
    """ε of the one-sided one-run audit, best threshold on the (FN, TN) upper hull, Bonferroni over it.

    For speed the hull's thresholds are tried most precise first (Clopper–Pearson lower bound on the
    precision) and a threshold is skipped when its p-value already fails at the best ε so far — exact
    whenever the p-value grows with ε, which the bisection in ``one_run_epsilon_lower_bound`` assumes too."""
    thresholds = np.r_[np.union1d(in_scores, out_scores), np.inf]
    fn = np.searchsorted(np.sort(in_scores), thresholds, side="left")  # in-canaries below t
    tn = np.searchsorted(np.sort(out_scores), thresholds, side="left")
    hull = _upper_hull(np.stack([fn, tn], axis=1))
    a = alpha / len(hull)
    m = len(in_scores) + len(out_scores)
    cands = []
    for j in hull:
        tp, fp = len(in_scores) - int(fn[j]), len(out_scores) - int(tn[j])
        if tp + fp:
            cands.append((tp + fp, tp))
    precision_lb = [beta_dist.ppf(a, v, r - v + 1) if v else 0.0 for r, v in cands]
    best = 0.0
    for k in np.argsort(precision_lb)[::-1]:
        r, v = cands[k]
        if v / r <= 1 / (1 + math.exp(-best)) or one_run_p_value(m=m, r=r, v=v, epsilon=best, delta=delta) >= a:
            continue
        best = max(best, one_run_epsilon_lower_bound(m=m, r=r, v=v, delta=delta, alpha=a))
    return best, len(hull)


# ------------------------------------------------------------------------------------------------
# 1. attacks/epsilon_bounds.py — the one-run bound


def test_upper_hull_helper_on_published_frontier_cases():
    """The helper itself, on jax_privacy's published Pareto-frontier cases."""
    cases = [([[0, 0], [0, 2], [3, 2], [3, 5], [5, 5]], [0, 1, 3, 4]),
             ([[0, 0], [0, 2], [2, 2], [2, 3], [3, 3], [3, 5], [5, 5]], [0, 1, 5, 6]),
             ([[0, 0], [0, 2], [1, 2], [1, 4], [3, 4], [3, 5], [5, 5]], [0, 1, 3, 5, 6]),
             ([[0, 0], [0, 2], [1, 2], [1, 3], [2, 3], [2, 4], [4, 4]], [0, 1, 5, 6]),
             ([[i, i] for i in range(10)], [0, 9])]
    for pts, expected in cases:
        assert _upper_hull(np.array(pts)).tolist() == expected


@pytest.mark.parametrize("shift, expected", [(0, 0.0), (1, 1.13346), (2, 2.311945), (4, 4.395568)])
def test_one_run_bound_reproduces_the_published_jax_privacy_vectors(shift, expected):
    """10,000 in (N(shift, 1) mid-quantiles) and 10,000 out canaries, α = 0.05, δ = 1e-6, m = 20,000,
    one-sided guesses: jax_privacy's epsilon_one_run test gives 1.13346 / 2.311945 / 4.395568 (rtol
    1e-5, brentq to 1e-6). Our bisection stops within 1e-4 *below* the root, so the number may sit up
    to 1e-4 under the published one and never above it (beyond the published rounding)."""
    eps, hull = _one_run_epsilon_over_thresholds(_deterministic_normal(shift, 10_000), _deterministic_normal(0, 10_000),
                                                 alpha=0.05, delta=1e-6)
    assert expected - 2e-4 <= eps <= expected * (1 + 1e-5) + 1e-9, (eps, expected, hull)
    if shift == 0:
        assert hull == 2  # identical scores: only the two end thresholds are on the hull


def _p_value_grid():
    for m in (10, 100, 1000):
        for r in (1, 10, 100, 1000):
            for wrong in (0, 1, 10, 100):
                if wrong <= r <= m:
                    yield m, r, r - wrong
        yield m, m, 0
        yield m, m // 2, m // 4


@pytest.mark.parametrize("m, r, v", sorted(set(_p_value_grid())))
def test_one_run_p_value_equals_the_papers_sum_of_pmfs(m, r, v):
    for eps in (0.0, 0.5, 1.0):
        for delta in (0.0, 1e-6, 1e-3, 0.1, 1.0):
            naive = _one_run_p_value_naive(m, r, v, eps, delta)
            got = one_run_p_value(m=m, r=r, v=v, epsilon=eps, delta=delta)
            assert got == pytest.approx(naive, rel=1e-9, abs=1e-300), (m, r, v, eps, delta)


@pytest.mark.parametrize("m, r, v, delta", [(100, 100, 100, 0.0), (1000, 100, 95, 1e-4), (20000, 3376, 2807, 1e-6),
                                            (1000, 200, 180, 1e-3), (500, 500, 500, 1e-5), (10, 10, 10, 1e-3)])
def test_one_run_epsilon_brackets_the_papers_root(m, r, v, delta):
    """ε_lb is within the bisection's 1e-4 *below* the root of the paper's p-value: p(ε_lb) < α ≤ p(ε_lb + 1e-4)."""
    alpha = 0.05
    eps = one_run_epsilon_lower_bound(m=m, r=r, v=v, delta=delta, alpha=alpha)
    assert eps > 0
    assert _one_run_p_value_naive(m, r, v, eps, delta) < alpha <= _one_run_p_value_naive(m, r, v, eps + 1e-4, delta)


def test_one_run_epsilon_closed_form_all_guesses_right_without_delta():
    """δ = 0, v = r: p = q^r, so the root is q = α^{1/r}, ε = ln(q / (1 − q))."""
    for r, alpha in ((100, 0.05), (10, 0.05), (1000, 0.01), (37, 0.1)):
        q = alpha ** (1 / r)
        truth = math.log(q / (1 - q))
        eps = one_run_epsilon_lower_bound(m=2 * r, r=r, v=r, delta=0.0, alpha=alpha)
        assert truth - 1e-4 <= eps <= truth
    # p-value at ε = 0 and δ = 0 with all r guesses right: 2^-r; with one wrong, (r + 1) 2^-r.
    assert one_run_p_value(m=20, r=10, v=10, epsilon=0.0, delta=0.0) == pytest.approx(2 ** -10, rel=1e-12)
    assert one_run_p_value(m=20, r=10, v=9, epsilon=0.0, delta=0.0) == pytest.approx(11 * 2 ** -10, rel=1e-12)
    # δ term by hand at ε = 0, r = v = 2: max(P[B=1]/1, P[B∈{0,1}]/2) = max(1/2, 3/8) = 1/2.
    assert one_run_p_value(m=5, r=2, v=2, epsilon=0.0, delta=0.01) == pytest.approx(0.25 + 2 * 5 * 0.01 * 0.5,
                                                                                    rel=1e-12)
    # r = v = 3 at ε = 0: P[B=2] = 3/8, P[B∈{1,2}]/2 = 3/8, P[B∈{0,1,2}]/3 = 7/24 -> 3/8.
    assert one_run_p_value(m=7, r=3, v=3, epsilon=0.0, delta=1e-3) == pytest.approx(1 / 8 + 14e-3 * 3 / 8, rel=1e-12)


def test_one_run_audit_counts_by_hand():
    """8 canaries, guess_fraction 0.5 -> k = 2 "in" guesses (top 2) and 2 "out" guesses (bottom 2)."""
    scores = np.array([0.9, 0.1, 0.8, 0.3, 0.7, 0.2, 0.0, 0.5])
    inc = np.array([1, 0, 0, 1, 1, 0, 1, 0], dtype=bool)
    res = one_run_audit(scores, inc, delta=1e-5)
    # top 2: 0.9 (in, right), 0.8 (out, wrong); bottom 2: 0.0 (in, wrong), 0.1 (out, right) -> 2 of 4.
    assert (res["canaries"], res["guesses"], res["correct"]) == (8, 4, 2)
    assert res["epsilon_lower_bound"] == 0.0
    # the cap (all 4 right) is 0: at ε = 0 the p-value is 1/16 + 2·8·1e-5·max(4/16, 10/32, 14/48, 15/64) > 0.05
    assert _one_run_p_value_naive(8, 4, 4, 0.0, 1e-5) == pytest.approx(1 / 16 + 16e-5 * 5 / 16, rel=1e-12)
    assert one_run_p_value(m=8, r=4, v=4, epsilon=0.0, delta=1e-5) == pytest.approx(1 / 16 + 16e-5 * 5 / 16, rel=1e-12)
    assert res["epsilon_cap"] == 0.0
    # 400 canaries, perfectly separated, 10 % guessed: r = v = 2·int(0.1·400/2) = 40.
    inc = np.arange(400) % 2 == 0
    big = one_run_audit(inc.astype(float), inc, delta=0.0, guess_fraction=0.1)
    q = 0.05 ** (1 / 40)
    assert (big["guesses"], big["correct"]) == (40, 40)
    assert math.log(q / (1 - q)) - 1e-4 <= big["epsilon_lower_bound"] <= math.log(q / (1 - q))
    assert big["epsilon_cap"] == big["epsilon_lower_bound"]


# ------------------------------------------------------------------------------------------------
# 1b. attacks/epsilon_bounds.py — Clopper–Pearson, the two-sided ε bound, μ bound, certifiable ε


@pytest.mark.parametrize("n, alpha", [(1, 0.05), (7, 0.05), (100, 0.05), (2000, 0.05), (50, 0.01), (30, 0.2)])
def test_clopper_pearson_closed_forms(n, alpha):
    lo, hi = clopper_pearson(0, n, alpha)
    assert lo == 0.0 and hi == pytest.approx(1 - (alpha / 2) ** (1 / n), rel=1e-12)
    lo, hi = clopper_pearson(n, n, alpha)
    assert hi == 1.0 and lo == pytest.approx((alpha / 2) ** (1 / n), rel=1e-12)
    # interior k: the bounds solve the binomial tail equations P[B(n, hi) ≤ k] = α/2 = P[B(n, lo) ≥ k]
    for k in {1, n // 3, n // 2, n - 1} - {0, n}:
        lo, hi = clopper_pearson(k, n, alpha)
        assert sum(_binom_pmf(j, n, hi) for j in range(0, k + 1)) == pytest.approx(alpha / 2, rel=1e-9)
        assert sum(_binom_pmf(j, n, lo) for j in range(k, n + 1)) == pytest.approx(alpha / 2, rel=1e-9)
        assert lo < k / n < hi


def test_epsilon_lower_bound_by_hand():
    n, alpha = 1000, 0.05
    # zero errors: FPR_hi = FNR_hi = 1 − 0.025^(1/1000); ε = ln((1 − δ − p) / p)
    p = 1 - 0.025 ** (1 / n)
    eps, fpr_hi, fnr_hi = epsilon_lower_bound(fp=0, fn=0, n=n, delta=1e-5, alpha=alpha)
    assert fpr_hi == pytest.approx(p, rel=1e-12) and fnr_hi == pytest.approx(p, rel=1e-12)
    assert eps == pytest.approx(math.log((1 - 1e-5 - p) / p), rel=1e-12)
    # asymmetric: the better of the two directions
    fp_hi = float(beta_dist.ppf(0.975, 3 + 1, n - 3))
    fn_hi = float(beta_dist.ppf(0.975, 40 + 1, n - 40))
    eps, a, b = epsilon_lower_bound(fp=3, fn=40, n=n, delta=0.0, alpha=alpha)
    assert (a, b) == pytest.approx((fp_hi, fn_hi), rel=1e-12)
    assert eps == pytest.approx(max(math.log((1 - fn_hi) / fp_hi), math.log((1 - fp_hi) / fn_hi)), rel=1e-12)
    assert eps == pytest.approx(math.log((1 - fn_hi) / fp_hi), rel=1e-12)  # the FP side is the informative one
    # chance-level errors certify nothing: both logs negative -> 0
    assert epsilon_lower_bound(fp=500, fn=500, n=n, delta=0.0)[0] == 0.0


def test_gdp_mu_lower_bound_by_hand():
    # Φ⁻¹(0.975) = 1.959963984540054 (printed normal table: 1.96)
    assert gdp_mu_lower_bound(0.025, 0.025) == pytest.approx(2 * 1.959963984540054, rel=1e-12)
    assert gdp_mu_lower_bound(0.05, 0.05) == pytest.approx(2 * 1.6448536269514722, rel=1e-12)
    assert gdp_mu_lower_bound(0.01, 0.2) == pytest.approx(2.3263478740408408 + 0.8416212335729143, rel=1e-12)
    assert gdp_mu_lower_bound(0.6, 0.6) == 0.0  # worse than chance: clipped at 0
    assert gdp_mu_lower_bound(0.5, 0.5) == pytest.approx(0.0, abs=1e-15)


def test_certifiable_epsilon_by_hand():
    assert certifiable_epsilon(2000) == pytest.approx(math.log(2000 / math.log(40)), rel=1e-12)
    assert certifiable_epsilon(2000) == pytest.approx(6.2955797, abs=1e-7)
    assert certifiable_epsilon(100, alpha=0.01) == pytest.approx(math.log(100 / math.log(200)), rel=1e-12)


def test_audit_delta_mechanism_counts_by_hand():
    """A deterministic 'mechanism': trials are counted exactly, the midpoint counts as a miss."""
    c = torch.tensor([3.0, 4.0])  # ±c: direction (0.6, 0.8), midpoint 0

    def release(x, s):
        t = s // 2
        if s % 2 == 0:  # canary world: 3 of 10 land at or below the midpoint (one exactly on it)
            return torch.zeros(2) if t == 0 else (-x if t in (1, 2) else x)
        return -x if t in (4, 5, 6, 7) else x  # other world: 4 of 10 land above it

    res = audit_delta_mechanism(release, canary=c, other=-c, trials=10, delta=1e-5, claimed_epsilon=1.0, claimed_mu=1.0)
    assert (res.fnr, res.fpr) == (0.3, 0.4)
    fnr_hi = float(beta_dist.ppf(0.975, 4, 7))
    fpr_hi = float(beta_dist.ppf(0.975, 5, 6))
    assert (res.fnr_hi, res.fpr_hi) == pytest.approx((fnr_hi, fpr_hi), rel=1e-12)
    assert res.epsilon_lb == max(0.0, *(math.log((1 - 1e-5 - b) / a) for a, b in ((fpr_hi, fnr_hi), (fnr_hi, fpr_hi))
                                        if 1 - 1e-5 - b > 0))
    assert res.mu_lb == pytest.approx(max(0.0, norm.ppf(1 - fpr_hi) - norm.ppf(fnr_hi)), abs=1e-12)


# ------------------------------------------------------------------------------------------------
# 2. pfedpg/gdp.py


def test_gdp_epsilon_published_values():
    assert round(gdp_epsilon(1.0, 1e-5), 4) == 4.3772
    assert gdp_epsilon(1.0, 1e-5) == pytest.approx(_drs_epsilon(1.0, 1e-5), abs=1e-8)
    # μ(ε = 8, δ = 1e-5) = 1.6660: invert gdp_epsilon by bisection
    lo, hi = 0.5, 5.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if gdp_epsilon(mid, 1e-5) < 8.0 else (lo, mid)
    assert round(0.5 * (lo + hi), 4) == 1.6660
    for mu in (0.1, 0.5, 2.0, 5.0):
        for delta in (1e-3, 1e-5, 1e-8):
            assert gdp_epsilon(mu, delta) == pytest.approx(_drs_epsilon(mu, delta), abs=1e-8)
    # edges: μ = 0 -> 0; μ = ∞ -> ∞; δ at or above δ(0) = 2Φ(μ/2) − 1 -> 0
    assert gdp_epsilon(0.0, 1e-5) == 0.0 and gdp_epsilon(math.inf, 1e-5) == math.inf
    assert gdp_epsilon(0.5, 2 * _phi(0.25) - 1 + 1e-12) == 0.0


def test_gdp_mu_inverts_gdp_epsilon():
    assert round(gdp.gdp_mu(8.0, 1e-5), 4) == 1.6660
    assert _drs_delta(gdp.gdp_mu(8.0, 1e-5), 8.0) == pytest.approx(1e-5, rel=1e-8)
    # past e^700 (σ = 0.5, 500 steps: μ ≈ 44.7) the δ of μ-GDP is still exact, not cut at e^700
    import mpmath

    mu, eps = mpmath.mpf(44.72), mpmath.mpf(1000)
    exact = mpmath.ncdf(-eps / mu + mu / 2) - mpmath.exp(eps) * mpmath.ncdf(-eps / mu - mu / 2)
    assert gdp_delta(44.72, 1000.0) == pytest.approx(float(exact), rel=1e-9)


@pytest.mark.parametrize("mu", [0.05, 0.3, 1.0, 2.5, 6.0])
def test_gdp_delta_is_dong_roth_su(mu):
    for eps in (0.0, 0.1, 1.0, 3.0, 10.0):
        assert gdp_delta(mu, eps) == pytest.approx(_drs_delta(mu, eps), rel=1e-9, abs=1e-15)
    assert gdp_delta(mu, 0.0) == pytest.approx(2 * _phi(mu / 2) - 1, rel=1e-12)


def test_gaussians_epsilon_equal_spreads_is_gdp():
    for m1, m0, s in ((1.0, 0.0, 1.0), (0.3, 0.1, 0.1), (-2.0, 1.0, 3.0), (5.0, 5.5, 0.25)):
        for delta in (1e-5, 1e-3):
            assert gaussians_epsilon(m1, s, m0, s, delta) == pytest.approx(gdp_epsilon(abs(m1 - m0) / s, delta),
                                                                           abs=1e-6)
    assert gaussians_epsilon(0.4, 2.0, 0.4, 2.0, 1e-5) == 0.0


def _hockey_stick(mp, sp, mq, sq, eps) -> float:
    """E_ε(P‖Q) = ∫ max(0, p − e^ε q) by quadrature over the regions where p > e^ε q, found numerically."""
    def f(y):
        return norm.logpdf(y, mp, sp) - norm.logpdf(y, mq, sq) - eps

    span = 60 * max(sp, sq)
    grid = np.linspace(min(mp, mq) - span, max(mp, mq) + span, 400_001)
    vals = f(grid)
    cuts = [brentq(f, grid[i], grid[i + 1], xtol=1e-14)
            for i in np.flatnonzero(np.sign(vals[:-1]) != np.sign(vals[1:]))]
    edges = [-math.inf, *cuts, math.inf]
    total = 0.0
    for a, b in zip(edges[:-1], edges[1:]):
        if math.isfinite(a) and math.isfinite(b):
            mid = (a + b) / 2
        else:
            mid = b - 1 if math.isfinite(b) else a + 1 if math.isfinite(a) else 0.0
        if f(mid) > 0:
            total += quad(lambda y: norm.pdf(y, mp, sp) - math.exp(eps) * norm.pdf(y, mq, sq), a, b,
                          epsabs=1e-16, epsrel=1e-11, limit=200)[0]
    return total


@pytest.mark.parametrize("m1, s1, m0, s0, delta", [(1.0, 0.8, 0.0, 1.0, 1e-5), (0.5, 1.6, 0.0, 1.0, 1e-5),
                                                   (2.0, 1.3, -0.5, 0.7, 1e-3), (0.2, 0.05, 0.0, 0.06, 1e-5)])
def test_gaussians_epsilon_unequal_spreads_against_quadrature(m1, s1, m0, s0, delta):
    eps = gaussians_epsilon(m1, s1, m0, s0, delta)
    at = max(_hockey_stick(m1, s1, m0, s0, eps), _hockey_stick(m0, s0, m1, s1, eps))
    assert at == pytest.approx(delta, rel=1e-5)
    # and the smallest such ε: a little less and one direction exceeds δ
    assert max(_hockey_stick(m1, s1, m0, s0, eps - 1e-3), _hockey_stick(m0, s0, m1, s1, eps - 1e-3)) > delta
    # gaussians_delta itself, at a few ε, against the quadrature
    for e in (0.0, 0.5 * eps, eps):
        assert gaussians_delta(m1, s1, m0, s0, e) == pytest.approx(_hockey_stick(m1, s1, m0, s0, e), rel=1e-6,
                                                                   abs=1e-14)


# ------------------------------------------------------------------------------------------------
# 3. attacks/client_canary.py


@pytest.mark.parametrize("k, n0, delta", [(2, 2000, 1e-5), (8, 500, 1e-5), (64, 1000, 1e-6), (3, 100, 1e-3)])
def test_epsilon_cap_closed_form(k, n0, delta):
    fnr_hi = 1 - 0.025 ** (1 / k)  # Clopper–Pearson upper bound at zero errors, α = 0.05
    fpr_hi = 1 - 0.025 ** (1 / n0)
    want = math.log((1 - delta - fnr_hi) / fpr_hi)
    assert want > 0 and epsilon_cap(k, n0, delta) == pytest.approx(want, rel=1e-12)


def test_epsilon_cap_zero_when_the_canaries_cannot_show_anything():
    # one canary: FNR_hi = 0.975, and 1 − δ − 0.975 < 0 for δ = 0.03 -> 0
    assert epsilon_cap(1, 1000, 0.03) == 0.0
    # ... and 0 when the ratio is below 1 (few null directions): ln((0.025^(1/3) − 1e-3) / (1 − 0.025^(1/10))) < 0
    assert math.log((0.025 ** (1 / 3) - 1e-3) / (1 - 0.025 ** (1 / 10))) < 0 and epsilon_cap(3, 10, 1e-3) == 0.0
    assert epsilon_cap(1, 2, 1e-5) == 0.0


def test_estimate_epsilon_readings_on_fixed_arrays():
    cin = np.array([0.30, 0.25, 0.35, 0.28])
    c0 = np.array([0.0, 0.1, -0.1, 0.05, -0.05])
    m1, m0 = 0.295, 0.0
    s1 = math.sqrt(((0.005) ** 2 + 0.045 ** 2 + 0.055 ** 2 + 0.015 ** 2) / 3)
    s0 = math.sqrt(0.025 / 4)
    res = estimate_epsilon(cin, c0, delta=1e-5, bootstrap=20, seed=0)
    assert (res["cos_in_mean"], res["null_mean"]) == pytest.approx((m1, m0), abs=1e-15)
    assert (res["cos_in_std"], res["null_std"]) == pytest.approx((s1, s0), rel=1e-12)
    mu = (m1 - m0) / s0
    assert res["equal_variance"]["mu_hat"] == pytest.approx(mu, rel=1e-12)
    assert res["equal_variance"]["epsilon_hat"] == pytest.approx(_drs_epsilon(mu, 1e-5), abs=1e-7)
    assert res["epsilon_hat"] == pytest.approx(gaussians_epsilon(m1, s1, m0, s0, 1e-5), rel=1e-9)
    # 4 canaries against 5 null directions cannot show anything: ln((0.025^¼ − δ) / (1 − 0.025^⅕)) < 0 -> 0
    assert math.log((0.025 ** (1 / 4) - 1e-5) / (1 - 0.025 ** (1 / 5))) < 0 and res["epsilon_cap"] == 0.0
    wide = estimate_epsilon(np.r_[cin, cin + 0.01], np.r_[c0, c0 + 0.001], delta=1e-5, bootstrap=2)  # 8 and 10
    assert wide["epsilon_cap"] == pytest.approx(math.log((0.025 ** (1 / 8) - 1e-5) / (1 - 0.025 ** (1 / 10))),
                                                rel=1e-12)
    # canaries below the null: μ̂ < 0 reads ε̂ = 0
    low = estimate_epsilon(-cin, c0, delta=1e-5, bootstrap=5)
    assert low["equal_variance"]["mu_hat"] == pytest.approx(-mu, rel=1e-12) and \
        low["equal_variance"]["epsilon_hat"] == 0.0


# ------------------------------------------------------------------------------------------------
# 4. defenses/dp_client.py — the ε conversion between adjacencies


def _dp_run(adjacency: str, z: float, clip: float, releases: int):
    from defenses.dp_client import ClientLevelDP
    from pfedpg.context import RunContext
    from pfedpg.seeding import Seeds

    hook = ClientLevelDP(clip=clip, noise_multiplier=z, adjacency=adjacency)
    ctx = RunContext(config=None, seeds=Seeds(0), run_dir=None, num_clients=3, log=lambda m: None,
                     schedule=[[0, 1, 2]] * releases)
    hook.setup(ctx)
    side = getattr(ctx, "client_side", ctx)
    for r in range(1, releases + 1):
        hook.outgoing_delta(side, client=0, round=r, delta=torch.full((2, 3), 10.0))
    return hook


@pytest.mark.parametrize("adjacency, units", [("replace", 2.0), ("add_remove", 1.0)])
@pytest.mark.parametrize("z, clip, releases", [(1.0, 0.5, 1), (2.0, 1.0, 10), (4.0, 0.1, 25), (0.8, 3.0, 3)])
def test_dp_client_adjacency_conversion(adjacency, units, z, clip, releases):
    from opacus.accountants import RDPAccountant

    hook = _dp_run(adjacency, z, clip, releases)
    sensitivity = units * clip  # by definition: replace moves a release by 2C, add/remove by C
    assert hook.sensitivity == pytest.approx(sensitivity, rel=1e-15)
    told = z * clip / sensitivity  # noise std z·C per unit sensitivity
    assert hook.accounting_multiplier == pytest.approx(z / units, rel=1e-15)
    assert told == pytest.approx(z / units, rel=1e-15)
    hist = hook.client_state(0)["accountant"]["history"]
    assert [tuple(h) for h in hist] == [(pytest.approx(told, rel=1e-15), 1.0, releases)]
    # ε: an RDP accountant of our own for (told, q = 1, R steps) ...
    acc = RDPAccountant()
    acc.history = [(told, 1.0, releases)]
    rdp_eps = acc.get_epsilon(delta=1e-5)
    assert hook.epsilon(0) == pytest.approx(rdp_eps, rel=1e-12)
    # ... which is q = 1 RDP in closed form: min_α R·α/(2σ²) − (ln δ + ln α)/(α − 1) + ln((α − 1)/α)
    alphas = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    closed = np.min(releases * alphas / (2 * told ** 2) - (math.log(1e-5) + np.log(alphas)) / (alphas - 1)
                    + np.log((alphas - 1) / alphas))
    assert rdp_eps == pytest.approx(closed, rel=1e-12)
    # ... and lies between the exact μ-GDP ε and 1.15 × it, μ = (sensitivity / C)·√R / z
    exact = _drs_epsilon(units * math.sqrt(releases) / z, 1e-5)
    assert exact <= hook.epsilon(0) <= 1.15 * exact


@pytest.mark.parametrize("adjacency, units", [("replace", 2.0), ("add_remove", 1.0)])
def test_dp_client_calibrated_noise_meets_the_target_under_each_adjacency(adjacency, units):
    """target_epsilon: z is chosen so that the accountant's multiplier per unit sensitivity, z·C/sensitivity,
    reaches the target after the planned releases — checked with an accountant of our own."""
    from opacus.accountants import RDPAccountant

    from defenses.dp_client import ClientLevelDP
    from pfedpg.context import RunContext
    from pfedpg.seeding import Seeds

    hook = ClientLevelDP(clip=0.5, target_epsilon=3.0, adjacency=adjacency)
    ctx = RunContext(config=None, seeds=Seeds(0), run_dir=None, num_clients=4, log=lambda m: None,
                     schedule=[[0, 1]] * 4)
    hook.setup(ctx)
    unit = hook.noise_multiplier * 0.5 / (units * 0.5)
    acc = RDPAccountant()
    acc.history = [(unit, 1.0, 4)]
    assert 3.0 - 0.02 <= acc.get_epsilon(delta=1e-5) <= 3.0


# ------------------------------------------------------------------------------------------------
# 5. attacks/metrics.py on hand-made arrays


def test_auc_roc_and_balanced_accuracy_by_hand():
    s = [3.0, 2.0, 2.0, 2.0, 1.0]
    y = [1, 1, 1, 0, 0]  # positives 3, 2, 2; negatives 2, 1
    # pairs (pos, neg): (3,2)=1 (3,1)=1 (2,2)=½ (2,1)=1 (2,2)=½ (2,1)=1 -> 5/6
    assert auc(s, y) == pytest.approx(5 / 6, abs=1e-15)
    fpr, tpr, thr = roc_curve(s, y)
    np.testing.assert_array_equal(thr, [np.inf, 3.0, 2.0, 1.0])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 1, 1], atol=1e-15)
    np.testing.assert_allclose(fpr, [0, 0, 1 / 2, 1], atol=1e-15)
    # balanced accuracy: thresholds give (tpr + 1 − fpr)/2 = ½, 2/3, 3/4, ½ -> 3/4
    assert balanced_accuracy_max(s, y) == pytest.approx(0.75, abs=1e-15)
    assert auc([1, 2, 3, 4], [1, 0, 1, 0]) == pytest.approx(1 / 4, abs=1e-15)  # pairs: 1<2,1<4,3>2,3<4


def test_tpr_at_fpr_by_hand():
    neg = np.arange(20.0)  # 20 negatives: 0 … 19
    pos = np.array([25.0, 22.0, 19.5, 18.5, 10.5, 5.0])
    s, y = np.r_[pos, neg], np.r_[np.ones(6), np.zeros(20)].astype(int)
    r = tpr_at_fpr(s, y, 0.5, bootstrap=50)
    # FPR ≤ 0.5: threshold 10 (negatives 10 … 19 above: FPR exactly ½); positives ≥ 10: 5 of 6
    assert r["value"] == pytest.approx(5 / 6, abs=1e-15) and r["achieved_fpr"] == 0.5 and r["n_negatives"] == 20
    r = tpr_at_fpr(s, y, 0.52, bootstrap=5)  # 0.52·20 = 10.4: still 10 negatives
    assert r["value"] == pytest.approx(5 / 6, abs=1e-15) and r["achieved_fpr"] == 0.5
    r = tpr_at_fpr(s, y, 0.7, bootstrap=5)  # 14 negatives (6 … 19): positives ≥ 6 -> 5 of 6
    assert r["value"] == pytest.approx(5 / 6) and r["achieved_fpr"] == pytest.approx(0.7)
    r = tpr_at_fpr(s, y, 0.75, bootstrap=5)  # 15 negatives (5 … 19): positive 5.0 ties -> all 6
    assert r["value"] == 1.0 and r["achieved_fpr"] == pytest.approx(0.75)
    # resolution: 20 negatives resolve FPR ≥ 10/20 only
    low = tpr_at_fpr(s, y, 0.1)
    assert low["value"] == "unresolved" and low["needs_negatives"] == 100 and low["n_negatives"] == 20
    # tied block: 12 negatives tied on top jump the FPR from 0 to 0.6, the target 0.5 is not reached
    tied = np.r_[pos + 100, np.full(12, 50.0), np.arange(8.0)]
    t = tpr_at_fpr(tied, y, 0.5)
    assert t["value"] == "unresolved" and t["achieved_fpr"] == 0.0
    # perfect separation: every resample reads 1
    sep = tpr_at_fpr(np.r_[pos + 100, neg], y, 0.5, bootstrap=30)
    assert sep["value"] == 1.0 and sep["interval"] == [1.0, 1.0]


def test_dp_region_closed_form():
    f = np.array([0.0, 0.01, 0.1, 0.3, 0.5, 0.9, 1.0])
    e = 2.0  # ε = ln 2
    want = [min(1.0, 2 * x + 0.01, 1 - (1 - 0.01 - x) / 2) for x in f]
    # by hand at 0.1: min(0.21, 0.555) = 0.21; at 0.5: min(1.01, 0.755) = 0.755
    np.testing.assert_allclose(dp_region(math.log(e), 0.01, f), want, rtol=1e-12)
    assert dp_region(math.log(e), 0.01, np.array([0.1, 0.5])).tolist() == pytest.approx([0.21, 0.755], rel=1e-12)
    np.testing.assert_allclose(dp_region(0.0, 0.0, f), f, atol=1e-15)


# ------------------------------------------------------------------------------------------------
# 6. Other numbers of the audit report: LiRA / RMIA scores, source inference, the paired-seed tables


def test_lira_scores_by_hand():
    from attacks.lira import lira_scores

    shadow = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    # offline, fixed variance: μ_out = (3, 4), residuals ±2, 0 -> pooled sd = √(16 / 5)
    np.testing.assert_allclose(lira_scores(np.array([4.0, 4.0]), shadow), [1 / math.sqrt(3.2), 0.0], rtol=1e-12)
    # online: in-mask per record; record 0 IN for shadow 0, record 1 IN for shadows 1 and 2
    in_mask = np.array([[True, False], [False, True], [False, True]])
    # IN: μ_in = (1, 5), residuals (0), (−1, 1) -> pooled sd √(2 / 2) = 1
    # OUT: μ_out = (4, 2), residuals (−1, 1), (0) -> pooled sd √(2 / 2) = 1
    t = np.array([2.0, 4.0])
    want = [-0.5 * (2 - 1) ** 2 + 0.5 * (2 - 4) ** 2, -0.5 * (4 - 5) ** 2 + 0.5 * (4 - 2) ** 2]
    np.testing.assert_allclose(lira_scores(t, shadow, in_mask), want, rtol=1e-12)


def test_rmia_scores_by_hand():
    from attacks.rmia import rmia_scores

    # a = 0.3: prior = ½((1.3)·mean_ref + 0.7)
    p_x, ref_x = np.array([0.8, 0.2]), np.array([[0.5, 0.2], [0.7, 0.4]])
    p_z, ref_z = np.array([0.5, 0.9, 0.1]), np.array([[0.5, 0.9, 0.1], [0.5, 0.9, 0.1]])
    prior_x = 0.5 * (1.3 * np.array([0.6, 0.3]) + 0.7)  # 0.74, 0.545
    prior_z = 0.5 * (1.3 * np.array([0.5, 0.9, 0.1]) + 0.7)  # 0.675, 0.935, 0.415
    rx, rz = np.array([0.8, 0.2]) / prior_x, np.array([0.5, 0.9, 0.1]) / prior_z
    want = [(rx[i] > rz).mean() for i in range(2)]
    np.testing.assert_allclose(rmia_scores(p_x, ref_x, p_z, ref_z), want, rtol=1e-12)
    # by hand: rx = (1.081, 0.367), rz = (0.741, 0.963, 0.241) -> 3/3 and 1/3
    assert rmia_scores(p_x, ref_x, p_z, ref_z).tolist() == pytest.approx([1.0, 1 / 3], abs=1e-15)
    assert rmia_scores(p_x, ref_x, p_z, ref_z, gamma=1.2).tolist() == pytest.approx([2 / 3, 1 / 3], abs=1e-15)


def test_source_inference_by_hand():
    from attacks.linkability import source_inference

    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.1], [0.5, 0.4, 0.6], [0.0, 0.7, 0.8]])
    owners = np.array([10, 11, 10, 12])
    res = source_inference(scores, owners, [10, 11, 12])
    # argmax: 10, 11, 12, 12 -> right, right, wrong, right
    assert res["top1_accuracy"] == 0.75 and res["chance"] == pytest.approx(1 / 3) and res["records"] == 4
    # AUC over the 12 (record, client) pairs: positives 0.9, 0.3, 0.5, 0.8
    # vs negatives 0.1, 0, 0.2, 0.1, 0.4, 0.6, 0, 0.7
    pos, neg = [0.9, 0.3, 0.5, 0.8], [0.1, 0.0, 0.2, 0.1, 0.4, 0.6, 0.0, 0.7]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    assert res["auc"] == pytest.approx(wins / 32, abs=1e-15) and wins == 27


def test_student_t_quantiles_against_the_printed_table():
    from evaluations.stats import fmt_paired, paired, t95

    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 29: 2.045, 120: 1.980}
    for df, t in table.items():
        assert round(t95(df), 3) == t
    p = paired({0: 0.60, 1: 0.70, 2: 0.80}, {0: 0.50, 1: 0.65, 2: 0.70})
    mean, sd = 0.25 / 3, math.sqrt(((0.1 - 0.25 / 3) ** 2 * 2 + (0.05 - 0.25 / 3) ** 2) / 2)
    half = 4.302652729749464 * sd / math.sqrt(3)  # t_{0.975, 2}
    assert p["mean"] == pytest.approx(mean, abs=1e-15) and p["std"] == pytest.approx(sd, rel=1e-12)
    assert p["ci"] == pytest.approx((mean - half, mean + half), rel=1e-12)
    assert fmt_paired(p) == "+8.3 [+1.2, +15.5]"
