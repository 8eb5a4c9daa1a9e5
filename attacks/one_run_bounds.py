"""One-run ε lower bounds that can reach the claim (DESIGN §6, "Audits that can fail").

n canaries, each inserted independently with probability ½, one run of the mechanism; the auditor
guesses each canary's bit from the output. A bound tests each member of a family of mechanisms
(:mod:`attacks.tradeoff`) — "could an f_t-DP mechanism have let the guesses be this good?" — rejects
the members under which the observed outcome has probability < α, and reports the ε (at the run's δ)
of the least private member rejected. Its cap is the same bound with every guess right: a claim above
the cap cannot be contradicted (``can_fail`` false); a bound above the claim is a ``violation``.

* :func:`order_statistics_bound` — Xiang et al. (arXiv 2509.08704): two-sided MAP guesses, the r most
  confident released (r fixed before the run; r = n needs no tuning), u of them wrong. Under an f-DP
  mechanism P[U ≤ u] ≤ ∫ Beta(w; n − r, r + 1) · BinCDF(u; r, γ̄(w)) dw with γ̄(w) = min_error(1 − w)
  / (1 − w): w is the (n − r)-th of n uniform confidence ranks, and each released guess errs with
  probability ≥ γ̄(w). For r = n the integral is BinCDF(u; n, γ̄(0)), γ̄(0) = Φ(−μ/2) for μ-GDP.
  Reproduces the paper's (n, r, u) = (1000, 1000, 159) → ε 9.0038 at δ = 1e-5 (tests).
* :func:`fdp_audit` — Mahloujifar, Melis & Chaudhuri (ICML 2025): one-sided guesses ("in" above a
  threshold), the recursion of their Algorithm "audit with cap" with a pluggable f̄⁻¹, over every
  threshold on the ROC's upper hull with a Bonferroni correction — the protocol of DeepMind's
  jax_privacy (Apache-2.0), whose test vectors it reproduces (tests).
* :func:`gaussian_model_bound` — for continuous scores: a one-sided lower bound on μ = (mean_in −
  mean_out)/sd under the model "both Gaussian with one spread" (non-central t). Model-based: right
  only if the scores are Gaussian; its cap is unbounded.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
from scipy.special import expit
from scipy.stats import beta, binom, nct, norm

from attacks.tradeoff import Family, bayes_error
from pfedpg.gdp import gdp_epsilon


@dataclass
class OneRunBound:
    """One bound of a one-run audit, as ``audit.json`` writes it."""

    method: str
    family: str
    epsilon_lb: float
    epsilon_cap: float
    claimed_epsilon: float | None
    alpha: float
    delta: float
    canaries: int
    guesses: int
    correct: int
    member: dict[str, Any] = field(default_factory=dict)  # the least private member rejected (μ, σ or ε)
    model_based: bool = False
    #: P[guesses at least this good] under the claimed member (order statistics only): a violation's weight
    claim_p_value: float | None = None

    @property
    def can_fail(self) -> bool | None:
        return None if self.claimed_epsilon is None else bool(self.epsilon_cap > self.claimed_epsilon)

    @property
    def violation(self) -> bool | None:
        return None if self.claimed_epsilon is None else bool(self.epsilon_lb > self.claimed_epsilon)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "can_fail": self.can_fail, "violation": self.violation}


def check_level(hook: str, alpha, out) -> None:
    """An audit hook's shared options: the bounds' level α and its output folder inside the run directory."""
    from pathlib import PurePath

    from pfedpg.errors import ConfigError

    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 0.5:
        raise ConfigError(f"{hook}.alpha={alpha!r} must be a number in (0, 0.5) (the bounds' level; 0.05 by default)")
    if not isinstance(out, str) or not out or PurePath(out).is_absolute() or ".." in PurePath(out).parts:
        raise ConfigError(f"{hook}.out={out!r} must be a folder name inside the run directory (default audit)")


def _largest_rejected(rejects: Callable[[float], bool], t_max: float, tol: float = 1e-6) -> float:
    """The largest strength t in (0, t_max] that ``rejects`` (monotone: weaker members are rejected
    first); 0 when none is, t_max when all are (the search limit, reported as such)."""
    lo = 1e-9
    if not rejects(lo):
        return 0.0
    if rejects(t_max):
        return t_max
    hi = t_max
    while hi - lo > tol * max(1.0, lo):
        mid = math.sqrt(lo * hi) if hi / lo > 4 else 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rejects(mid) else (lo, mid)
    return lo


# ------------------------------------------------------------------------------------------------
# Xiang et al.: order statistics of the released guesses

def order_statistics_tail(curve, *, n: int, r: int, u: int, nodes: int = 4000) -> float:
    """P[U ≤ u] for an f-DP mechanism (``curve``): u mistakes among the r most confident of n guesses."""
    if not 0 <= u <= r <= n or r < 1:
        raise ValueError(f"need 0 <= u <= r <= n and r >= 1, got u={u}, r={r}, n={n}")
    if r == n:
        return float(binom.cdf(u, n, bayes_error(curve)))
    # E over the (n − r)-th uniform order statistic W ~ Beta(n − r, r + 1), by its quantiles (midpoint rule)
    w = beta.ppf((np.arange(nodes) + 0.5) / nodes, n - r, r + 1)
    gamma = np.clip(curve.min_error(1 - w) / (1 - w), 0.0, 1.0)
    return float(np.mean(binom.cdf(u, r, gamma)))


def order_statistics_bound(family: Family, *, n: int, r: int, u: int, alpha: float = 0.05) -> tuple[float, float]:
    """(t, ε): the least private member of ``family`` that u mistakes in r of n guesses reject."""
    t = _largest_rejected(lambda s: order_statistics_tail(family.curve(s), n=n, r=r, u=u) < alpha, family.t_max)
    return t, (family.epsilon(t) if t > 0 else 0.0)


def map_guesses(scores, included, *, threshold: float, released: int | None = None) -> tuple[int, int, int]:
    """(n, r, u): guess "in" above ``threshold`` and "out" below it (fixed by the game, or read from the
    output without the inclusion bits, as a median is), release the ``released`` guesses farthest from
    it (default all), count the wrong ones."""
    s, inc = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    n = len(s)
    r = n if released is None else int(released)
    order = np.argsort(-np.abs(s - threshold), kind="mergesort")[:r]
    wrong = int(((s[order] > threshold) != inc[order]).sum())
    return n, r, wrong


def claimed_member(family: Family, claimed_epsilon: float) -> float:
    """The strength t of the family's member whose ε is the claim (ε grows with t), by bisection."""
    if family.epsilon(family.t_max) <= claimed_epsilon:
        return family.t_max
    lo, hi = 0.0, family.t_max
    while hi - lo > 1e-6 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if family.epsilon(mid) < claimed_epsilon else (lo, mid)
    return hi


def xiang_bound(scores, included, family: Family, *, threshold: float, claimed_epsilon: float | None,
                delta: float, alpha: float = 0.05, released: int | None = None,
                claim_member: float | None = None) -> OneRunBound:
    """``claim_member``: the strength of the claimed member when the caller knows it (e.g. DP-SGD's σ as
    1/σ), else found from ``claimed_epsilon``; it gives the outcome's p-value under the claim."""
    n, r, u = map_guesses(scores, included, threshold=threshold, released=released)
    t, eps = order_statistics_bound(family, n=n, r=r, u=u, alpha=alpha)
    _, cap = order_statistics_bound(family, n=n, r=r, u=0, alpha=alpha)
    p = None
    if claimed_epsilon is not None and math.isfinite(claimed_epsilon):
        t_claim = claim_member if claim_member is not None else claimed_member(family, claimed_epsilon)
        p = order_statistics_tail(family.curve(t_claim), n=n, r=r, u=u)
    return OneRunBound("order statistics (Xiang et al. 2025)", family.name, eps, cap, claimed_epsilon, alpha, delta,
                       n, r, r - u, family.describe(t) if t > 0 else {}, claim_p_value=p)


# ------------------------------------------------------------------------------------------------
# Mahloujifar et al.: the f-DP recursion, one-sided guesses

def fdp_rejects(curve, *, m: int, guesses: int, correct: int, alpha: float) -> bool:
    """True when ``correct`` right of ``guesses`` one-sided guesses among m canaries falsify f-DP."""
    r = alpha * correct / m
    h = alpha * (guesses - correct) / m
    for i in range(correct - 1, -1, -1):
        h_new = max(h, curve.fbar_inv(r))
        if h_new == h:  # neither moves again
            break
        r = min(r + (i / (guesses - i)) * (h_new - h), 1.0)
        h = h_new
    return r + h > guesses / m


def _upper_hull(fn: np.ndarray, tn: np.ndarray) -> np.ndarray:
    """Indices of the (fn, tn) points not on or under a chord of their neighbours (the ROC's hull)."""
    idx = np.arange(len(fn))
    while len(idx) > 2:
        dx, dy = np.diff(fn[idx]), np.diff(tn[idx])
        dominated = dy[:-1] * dx[1:] - dy[1:] * dx[:-1] <= 0
        if not dominated.any():
            break
        idx = idx[np.r_[True, ~dominated, True]]
    return idx


def fdp_audit(in_scores, out_scores, family: Family, *, alpha: float = 0.05) -> tuple[float, float, int, int]:
    """(t, ε, guesses, correct) of the best threshold ("in" at score ≥ it) on the ROC hull, each tested
    at α / (hull points); thresholds tried in order of their precision's lower bound, skipping those
    whose precision cannot beat the best ε so far (jax_privacy's search)."""
    s_in, s_out = np.sort(np.asarray(in_scores, float)), np.sort(np.asarray(out_scores, float))
    m = len(s_in) + len(s_out)
    thresholds = np.concatenate([np.union1d(s_in, s_out), [np.inf]])
    fn, tn = np.searchsorted(s_in, thresholds, "left"), np.searchsorted(s_out, thresholds, "left")
    keep = _upper_hull(fn, tn)
    a = alpha / len(keep)
    tp, fp = len(s_in) - fn[keep], len(s_out) - tn[keep]
    total = tp + fp
    prec_lb = 1 - np.where(fp < total, beta.ppf(1 - a, fp + 1, np.maximum(total - fp, 1)), 1.0)
    best = (0.0, 0.0, 0, 0)
    for i in np.argsort(-prec_lb, kind="stable"):
        g, c = int(total[i]), int(tp[i])
        if g == 0 or c / g <= expit(best[1]):
            continue
        t = _largest_rejected(lambda s: fdp_rejects(family.curve(s), m=m, guesses=g, correct=c, alpha=a), family.t_max)
        if t > best[0]:  # ε grows with t: read it only for a new best
            best = (t, family.epsilon(t), g, c)
    return best


def mahloujifar_bound(scores, included, family: Family, *, claimed_epsilon: float | None, delta: float,
                      alpha: float = 0.05) -> OneRunBound:
    s, inc = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    t, eps, g, c = fdp_audit(s[inc], s[~inc], family, alpha=alpha)
    # The cap: every canary "in" scored above every canary "out".
    _, cap, _, _ = fdp_audit(np.ones(int(inc.sum())), np.zeros(int((~inc).sum())), family, alpha=alpha)
    return OneRunBound("f-DP recursion (Mahloujifar et al. 2025)", family.name, eps, cap, claimed_epsilon, alpha,
                       delta, len(s), g, c, family.describe(t) if t > 0 else {})


# ------------------------------------------------------------------------------------------------
# Model-based: Gaussian scores with one spread

def gaussian_model_mu(in_scores, out_scores, *, alpha: float = 0.05) -> float:
    """One-sided (1 − α) lower bound on μ = (mean_in − mean_out) / sd when both are Gaussian with one sd:
    the pooled t statistic is non-central t with n_in + n_out − 2 degrees of freedom and non-centrality
    μ / √(1/n_in + 1/n_out); the bound inverts it."""
    a, b = np.asarray(in_scores, dtype=float), np.asarray(out_scores, dtype=float)
    n1, n0 = len(a), len(b)
    if n1 < 2 or n0 < 2:
        raise ValueError(f"the Gaussian model needs >= 2 canaries in and out, got {n1} and {n0}")
    df = n1 + n0 - 2
    sd = math.sqrt(((n1 - 1) * a.var(ddof=1) + (n0 - 1) * b.var(ddof=1)) / df)
    scale = math.sqrt(1 / n1 + 1 / n0)
    t_obs = (a.mean() - b.mean()) / (sd * scale) if sd > 0 else math.inf
    if not math.isfinite(t_obs):
        return math.inf
    if t_obs > 30:  # scipy's non-central t does not converge out there: its large-sample normal reading
        return max(0.0, t_obs - float(norm.ppf(1 - alpha)) * math.sqrt(1 + t_obs ** 2 / (2 * df))) * scale
    if nct.sf(t_obs, df, 0.0) >= alpha:  # not even μ = 0 is rejected
        return 0.0
    lo, hi = 0.0, max(1.0, 2 * t_obs)
    while nct.sf(t_obs, df, hi) < alpha:
        lo, hi = hi, 2 * hi
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if nct.sf(t_obs, df, mid) < alpha else (lo, mid)
    return lo * scale


def gaussian_model_bound(scores, included, *, claimed_epsilon: float | None, delta: float,
                         alpha: float = 0.05) -> OneRunBound:
    s, inc = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    mu = gaussian_model_mu(s[inc], s[~inc], alpha=alpha)
    return OneRunBound("model-based (Gaussian scores)", "μ-GDP", gdp_epsilon(mu, delta), math.inf, claimed_epsilon,
                       alpha, delta, len(s), len(s), len(s), {"mu": mu}, model_based=True)


def audit_bounds(scores, included, *, family: Family, claimed_epsilon: float | None, delta: float,
                 alpha: float = 0.05, threshold: float | None = None, continuous: bool = False,
                 steinke_guess_fraction: float = 0.5, claim_member: float | None = None) -> dict[str, Any]:
    """Every one-run bound on one game's canary scores (higher = "in"), headed by Xiang et al.'s under
    ``family`` (the mechanism the claim is made for): beside it Mahloujifar et al.'s recursion under the
    same family, Xiang et al.'s under the assumption-free (ε, δ) family, the model-based Gaussian bound
    (``continuous`` scores only) and Steinke et al.'s. The MAP guesses split at ``threshold`` (fixed by
    the game, e.g. the midpoint of the noiseless scores), else at the median score (label-free)."""
    from attacks.epsilon_bounds import one_run_audit
    from attacks.tradeoff import epsilon_delta_family

    s, inc = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    thr = float(np.median(s)) if threshold is None else float(threshold)
    kw = {"claimed_epsilon": claimed_epsilon, "delta": delta, "alpha": alpha}
    bounds = {"order_statistics": xiang_bound(s, inc, family, threshold=thr, claim_member=claim_member, **kw),
              "fdp_recursion": mahloujifar_bound(s, inc, family, **kw),
              "order_statistics_epsilon_delta": xiang_bound(s, inc, epsilon_delta_family(delta), threshold=thr, **kw)}
    if continuous and inc.sum() >= 2 and (~inc).sum() >= 2:
        bounds["gaussian_model"] = gaussian_model_bound(s, inc, **kw)
    st = one_run_audit(s, inc, delta=delta, guess_fraction=steinke_guess_fraction, alpha=alpha)
    bounds["steinke"] = OneRunBound("Steinke et al. 2023", "(ε, δ)-DP", st["epsilon_lower_bound"], st["epsilon_cap"],
                                    claimed_epsilon, alpha, delta, st["canaries"], st["guesses"], st["correct"])
    head = bounds["order_statistics"].to_dict()
    return {**{k: head[k] for k in ("epsilon_lb", "epsilon_cap", "family", "claimed_epsilon", "can_fail", "violation",
                                    "claim_p_value", "alpha", "delta", "canaries", "guesses", "correct")},
            "method": head["method"], "threshold": thr, "included": int(inc.sum()),
            "bounds": {k: b.to_dict() for k, b in bounds.items()}}


__all__ = ["OneRunBound", "audit_bounds", "check_level", "fdp_audit", "fdp_rejects", "gaussian_model_bound",
           "gaussian_model_mu", "mahloujifar_bound", "map_guesses", "order_statistics_bound", "order_statistics_tail",
           "xiang_bound"]
