"""A pessimistic privacy profile of T compositions of the Poisson-subsampled Gaussian (add/remove adjacency).

Privacy loss distributions (PLDs; Koskela et al. 2020, Doroshenko et al. 2022, "Connect the dots").

* Remove: X ~ P = (1−q)N(0,σ²) + qN(1,σ²) vs Q = N(0,σ²). L(x) = log(1 − q + q·e^{(2x−1)/(2σ²)}) increases in x
  from log(1 − q); L(x) ≤ t ⟺ x ≤ x(t) = σ²(t + log1p(−(1−q)e^{−t}) − log q) + 1/2 for t > log(1 − q).
  q = 1 is the plain Gaussian, L(x) = (2x − 1)/(2σ²).
* Add: X ~ Q vs P, loss −L(x), so L' ≤ t ⟺ x ≥ x(−t).
* One direction, X ~ its first measure: δ(ε) = E[(1 − e^{ε−L})₊] + Pr(L = +∞); under T compositions L is a sum of T
  independent copies. The profile returned is the max over the two directions.

Why every δ returned is ≥ the true δ (for any ε):
* Discretisation, connect-the-dots: the first measure's mass m₁ of L in [l, l + g] goes to the grid points l and
  l + g as a + b = m₁ with a·e^{−l} + b·e^{−l−g} = m₂, the second measure's mass. Merging the two atoms back is a
  post-processing, so the grid pair dominates the true pair (each atom's (m₁ − γm₂)₊ splits subadditively), and
  products of dominating pairs dominate. Rounding each loss up a grid step would be pessimistic too but biases the
  composed loss by ≈ T·g/2 (0.5 nats at T = 1000, g = 1e−3); this split costs O(T·g²).
* Truncation: δ increases with L, so moving mass up never lowers it. The first measure's lower tail moves up to the
  lowest grid point; its upper tail (≤ tail/2 per step) goes to +∞ and counts in full.
* Composition: one FFT power over a window from Chernoff bounds on the grid PLD. Wrap-around moves the mass below
  the window up (pessimistic) and the mass above it down, so that mass's bound (≤ tail) is added at +∞.
* δ on the grid is summed from the top in terms that are all ≥ 0, so small δ keep their digits.
Floating-point rounding (≈1e−16 of the total mass per grid point) is the one error not bounded.

Written here, for the one-run audits' DP-SGD family (``attacks.tradeoff``), rather than taken from Google's
dp-accounting (it pins attrs < 24, below what Flower and Ray install) or Opacus' PRV accountant (the remove
direction only, and an ε with error bounds rather than a profile a trade-off curve can be read from). Checked in
tests/test_pld.py: μ-GDP exactly at q = 1, and within 0.5 % of Opacus' PRV estimate below its RDP bound.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import fft, signal, special

_LAMBDAS = np.geomspace(1e-4, 1e3, 71)  # Chernoff exponents × one step's sd; a 1.26x ladder loses little


def _loss(x: float, sigma: float, q: float) -> float:
    """The remove direction's loss L(x) (logaddexp keeps it finite for any x; q = 1 drops the first term)."""
    log1m_q = -math.inf if q == 1 else math.log1p(-q)
    return float(np.logaddexp(log1m_q, math.log(q) + (2 * x - 1) / (2 * sigma ** 2)))


def _inverse_loss(t: np.ndarray, sigma: float, q: float) -> np.ndarray:
    """x(t), −∞ where t ≤ log(1 − q): L never lies that low."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        x = sigma ** 2 * (t + np.log1p(-(1 - q) * np.exp(np.minimum(-t, 700.0))) - math.log(q)) + 0.5
        floor = -math.inf if q == 1 else math.log1p(-q)
    return np.where(t > floor, x, -np.inf)


def _gauss_mass(a: np.ndarray, b: np.ndarray, mean: float, sigma: float) -> np.ndarray:
    """N(mean, σ²) mass of [a, b], from the side of the smaller tail so tiny masses keep their digits."""
    za, zb = (a - mean) / sigma, (b - mean) / sigma
    with np.errstate(invalid="ignore"):
        upper = za + zb > 0
    return np.where(upper, special.ndtr(-za) - special.ndtr(-zb), special.ndtr(zb) - special.ndtr(za))


def _one_step(sigma: float, q: float, g: float, tail: float, add: bool) -> tuple[int, np.ndarray, float]:
    """(i0, pmf, p_inf): one step's pessimistic PLD, pmf[j] the mass at loss (i0 + j)·g."""
    z = -special.ndtri(tail / 2)
    # both measures put ≤ tail/2 below −σz and above 1 + σz (the mixture is bounded by its components)
    sign = -1 if add else 1
    lo, hi = sorted(sign * _loss(x, sigma, q) for x in (-sigma * z, 1 + sigma * z))
    i0, i1 = math.floor(lo / g), math.ceil(hi / g)
    t = np.arange(i0, i1 + 1) * g
    # cells in a variable the loss increases in: x (remove), or u = −x with N(0,σ²), N(−1,σ²) and L' ≤ t ⟺ u ≤ −x(−t)
    u = -_inverse_loss(-t, sigma, q) if add else _inverse_loss(t, sigma, q)
    edges = np.concatenate(([-np.inf], u, [np.inf]))
    n0 = _gauss_mass(edges[:-1], edges[1:], 0.0, sigma)
    mix = (1 - q) * n0 + q * _gauss_mass(edges[:-1], edges[1:], sign * 1.0, sigma)
    m1, m2 = (n0, mix) if add else (mix, n0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = np.exp(t[:-1]) * m2[1:-1] / m1[1:-1]  # = E[e^{l − L}] over the cell, in [e^{−g}, 1]
    ratio = np.clip(np.nan_to_num(ratio, nan=1.0), math.exp(-g), 1.0)
    b = m1[1:-1] * (1 - ratio) / -math.expm1(-g)
    pmf = np.zeros(i1 - i0 + 1)
    pmf[:-1] += m1[1:-1] - b
    pmf[1:] += b
    pmf[0] += m1[0]
    return i0, pmf, float(m1[-1])


def _log_mgf(lams: np.ndarray, loss: np.ndarray, mass: np.ndarray) -> np.ndarray:
    """log Σ mass·e^{λ·loss} for each λ, shifted by the max so that large λ·loss cannot overflow."""
    a = lams[:, None] * loss[None, :]
    top = a.max(axis=1)
    with np.errstate(divide="ignore"):
        return top + np.log(np.exp(a - top[:, None]) @ mass)


def _window(i0: int, pmf: np.ndarray, steps: int, g: float, tail: float) -> tuple[int, int]:
    """Grid indices (k_lo, k_hi) with the composed mass above k_hi and below k_lo each ≤ tail, by Chernoff:
    Pr(S ≥ s) ≤ e^{−λs}·M(λ)^T, M the (sub-probability) moment generating function of one step's finite part."""
    width = -(-len(pmf) // 4096)  # blocks of grid points keep this cheap; rounding outward keeps it a bound
    starts = np.arange(0, len(pmf), width)
    mass, bottom = np.add.reduceat(pmf, starts), (i0 + starts) * g
    mean = mass @ bottom / mass.sum()
    lams = _LAMBDAS / max(math.sqrt(mass @ (bottom - mean) ** 2 / mass.sum()), g)
    s_hi = np.min((steps * _log_mgf(lams, bottom + (width - 1) * g, mass) - math.log(tail)) / lams)
    s_lo = np.max((math.log(tail) - steps * _log_mgf(-lams, bottom, mass)) / lams)
    return max(math.floor(s_lo / g), steps * i0), min(math.ceil(s_hi / g), steps * (i0 + len(pmf) - 1))


def _power(z: np.ndarray, n: int) -> np.ndarray:
    """z**n by repeated squaring (several times faster than numpy's complex power)."""
    out = None
    while n:
        if n & 1:
            out = z if out is None else out * z
        n >>= 1
        if n:
            z = z * z
    return out


def _compose(i0: int, pmf: np.ndarray, p_inf: float, steps: int, g: float, tail: float):
    """(k0, pmf_T, p_inf_T): the T-fold composition on a window [k0, k0 + len) of grid indices."""
    k_lo, k_hi = _window(i0, pmf, steps, g, tail)
    size = fft.next_fast_len(max(k_hi - k_lo + 1, len(pmf)), real=True)
    out = fft.irfft(_power(fft.rfft(pmf, size), steps), size)
    out = np.maximum(np.roll(out, -(k_lo - steps * i0)), 0.0)  # position j holds index k_lo + j
    wrapped = tail if k_hi < steps * (i0 + len(pmf) - 1) else 0.0
    return k_lo, out, -math.expm1(steps * math.log1p(-p_inf)) + wrapped


def _delta_curve(k0: int, pmf: np.ndarray, p_inf: float, g: float) -> np.ndarray:
    """δ(j·g) for j = 0, 1, …: (1 − e^{−g})·Σ_{m>j} C_m + p_inf, C_m = p_m + e^{−g}C_{m+1} = Σ_{k≥m} p_k e^{(m−k)g}."""
    if k0 > 0:  # the curve continues below the window, where there is no mass
        pmf, k0 = np.concatenate((np.zeros(k0), pmf)), 0
    nz = np.flatnonzero(pmf)
    if len(nz) == 0 or nz[-1] + k0 < 0:
        return np.array([p_inf])
    pmf = pmf[: nz[-1] + 1]
    c = signal.lfilter([1.0], [1.0, -math.exp(-g)], pmf[::-1])  # C from the top
    above = np.concatenate((np.cumsum(c)[-2::-1], [0.0]))  # Σ_{m>j} C_m
    return -math.expm1(-g) * above[-k0:] + p_inf


def subsampled_gaussian_profile(noise_multiplier: float, sample_rate: float, steps: int, *,
                                grid: float = 1e-3, tail: float = 1e-14) -> tuple[np.ndarray, np.ndarray]:
    """(eps, delta): an upper bound delta[j] >= delta_true(eps[j]) of the add/remove privacy profile of
    `steps` compositions of the Poisson-subsampled Gaussian (rate q, noise σ, sensitivity 1), on a grid of
    eps >= 0 (increasing, eps[0] == 0, covering every ε where delta exceeds its last value), max over the add and
    the remove direction. Past eps[-1], delta stays delta[-1] (the mass at +∞, ≈ (T/2 + 1)·tail).

    eps[j] = j·h: h = grid, or finer (down to 1e−7) where one step's loss spreads over less than 64·grid.
    """
    if int(steps) != steps:
        raise ValueError(f"steps must be a whole number, got {steps}")
    sigma, q = float(noise_multiplier), float(sample_rate)
    if not (sigma > 0 and 0 <= q <= 1 and steps >= 0 and grid > 0 and 0 < tail < 1):
        raise ValueError(f"need σ > 0, 0 ≤ q ≤ 1, steps ≥ 0, grid > 0, 0 < tail < 1; got {sigma}, {q}, {steps}, "
                         f"{grid}, {tail}")
    if q == 0 or steps == 0:  # nothing about the record is released
        return np.zeros(1), np.zeros(1)
    # the split's error grows like T·g·(one step's loss spread), so a small spread gets a finer grid (cheaply: the
    # window is a fixed number of spreads wide)
    spread = min(1 / sigma, q * math.sqrt(math.expm1(min(1 / sigma ** 2, 700.0))))
    g = max(min(grid, spread / 64), 1e-7)
    curves = [_delta_curve(*_compose(*_one_step(sigma, q, g, tail, add), int(steps), g, tail), g)
              for add in ((False,) if q == 1 else (False, True))]  # q = 1: both directions are the same PLD
    n = max(len(c) for c in curves)
    delta = np.max([np.pad(c, (0, n - len(c)), constant_values=c[-1]) for c in curves], axis=0)
    return np.arange(n) * g, np.minimum(delta, 1.0)


def subsampled_gaussian_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, *,
                                grid: float = 1e-3, tail: float = 1e-14) -> float:
    """The smallest grid ε with profile δ <= delta (an upper bound on the true ε); ∞ if the mass at +∞ exceeds it."""
    eps, prof = subsampled_gaussian_profile(noise_multiplier, sample_rate, steps, grid=grid, tail=tail)
    ok = np.flatnonzero(prof <= delta)
    return float(eps[ok[0]]) if len(ok) else math.inf
