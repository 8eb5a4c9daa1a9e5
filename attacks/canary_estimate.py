"""The client-level one-run *estimate* of Andrew et al. (ICLR 2024, "One-shot empirical privacy
estimation for federated learning"), DESIGN §6: a Gaussian fitted to the inserted canaries' cosines and
one to never-inserted directions' (the null), ε̂ the ε at which the two are indistinguishable, with the
equal-variance (μ-GDP) reading beside it and bootstrap intervals that refit both. An estimate, not a
bound: the lower bounds that can contradict a claim are in :mod:`attacks.one_run_bounds`; the canary
clients that produce the cosines in :mod:`attacks.client_canary`.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from pfedpg.gdp import gaussians_epsilon, gdp_epsilon

MIN_CANARIES = 3  # a spread fitted to fewer canaries is no fit


def _fit(x: np.ndarray) -> tuple[float, float]:
    return float(np.mean(x)), float(np.std(x, ddof=1))


def _two_gaussians(cin: np.ndarray, c0: np.ndarray, delta: float) -> float:
    (m1, s1), (m0, s0) = _fit(cin), _fit(c0)
    return gaussians_epsilon(m1, max(s1, 1e-6 * s0), m0, s0, delta)


def epsilon_cap(canaries: int, null_directions: int, delta: float, alpha: float = 0.05) -> float:
    """The most a threshold test on these many canaries and null directions can show: the
    Clopper–Pearson bound with the canaries perfectly separated from the null,
    ln((1 − δ − FNR_hi) / FPR_hi). A two-Gaussian estimate above it rests on the fitted tails, not on
    anything the canaries were seen to do."""
    from attacks.epsilon_bounds import clopper_pearson

    fnr_hi = clopper_pearson(0, canaries, alpha)[1]
    fpr_hi = clopper_pearson(0, null_directions, alpha)[1]
    return max(0.0, math.log((1 - delta - fnr_hi) / fpr_hi)) if 1 - delta - fnr_hi > 0 else 0.0


def estimate_epsilon(cos_in, cos_null, *, delta: float, groups=None, null_groups=None, bootstrap: int = 1000,
                     seed: int = 0) -> dict[str, Any]:
    """ε̂ of the client-level one-run audit as Andrew et al. (2024) define it: a Gaussian fitted to
    the canaries' cosines and one to the null's, each with its own mean and spread, and ε̂ the
    smallest ε at which the two are (ε, δ)-indistinguishable (:func:`pfedpg.gdp.gaussians_epsilon`).
    Beside it, labelled, the equal-variance reading: μ̂ = (mean_in − mean_null) / sd_null as μ-GDP
    (right when the canaries' spread is the null's, as under isotropic Gaussian noise).

    Both readings get a 95 % bootstrap interval that refits both Gaussians every time: canaries and
    null directions resampled with replacement — with ``groups`` (a seed id per canary, and
    ``null_groups`` per null direction: pooled runs) the seeds first, then each chosen seed's
    canaries and null — so it covers both fits' uncertainty and the run-to-run spread. The
    two-Gaussian estimate is biased upwards when the canaries are few (any error in their fitted
    spread raises ε), so its interval is the basic (bias-reflecting) bootstrap interval, clipped at
    0; the equal-variance one is the percentile interval. In simulation (canaries N(1, 1) against a
    null N(0, 1), δ = 1e-5) the basic interval covered the true ε in 96–99 % of draws at 8–128
    canaries, the percentile one in 53–64 %. An interval of an estimate, not a confidence bound.
    ``epsilon_cap``: what these many canaries can show at all (:func:`epsilon_cap`)."""
    cin, c0 = np.asarray(cos_in, dtype=float), np.asarray(cos_null, dtype=float)
    k, n0 = len(cin), len(c0)
    m0, s0 = _fit(c0)
    m1 = float(cin.mean())
    out: dict[str, Any] = {
        "canaries": k, "null_directions": n0, "delta": delta, "cos_in_mean": m1,
        "cos_in_std": _fit(cin)[1] if k > 1 else None, "null_mean": m0, "null_std": s0,
        "epsilon_cap": epsilon_cap(k, n0, delta),
    }
    mu = (m1 - m0) / s0
    eq = {"mu_hat": mu, "epsilon_hat": gdp_epsilon(max(mu, 0.0), delta),
          "reading": "μ-GDP, the null's spread taken for the canaries' too"}
    if k < MIN_CANARIES:
        out.update(epsilon_hat=None, epsilon_ci=None, equal_variance={**eq, "epsilon_ci": None},
                   status=f"{k} canaries cannot fit a spread or an interval: the audit needs >= {MIN_CANARIES} "
                          "(client_canary_audit.clients)")
        return out
    out["epsilon_hat"] = _two_gaussians(cin, c0, delta)
    rng = np.random.default_rng(seed)
    g_in = np.zeros(k, dtype=int) if groups is None else np.asarray(groups)
    g_0 = np.zeros(n0, dtype=int) if null_groups is None else np.asarray(null_groups)
    ids = np.unique(g_in)
    two, mus = [], []
    for _ in range(bootstrap):
        chosen = rng.choice(ids, size=len(ids), replace=True) if len(ids) > 1 else ids
        bi = np.concatenate([rng.choice(cin[g_in == g], size=int((g_in == g).sum())) for g in chosen])
        b0 = np.concatenate([rng.choice(c0[g_0 == g], size=int((g_0 == g).sum())) for g in chosen])
        two.append(_two_gaussians(bi, b0, delta))
        mus.append((bi.mean() - b0.mean()) / b0.std(ddof=1))
    # (no interpolation between draws: an infinite draw must not turn a quantile into inf − inf)
    two = np.asarray(two, dtype=float)
    lo, hi = float(np.percentile(two, 2.5, method="lower")), float(np.percentile(two, 97.5, method="higher"))
    eps = out["epsilon_hat"]
    out["epsilon_ci"] = [max(0.0, 2 * eps - hi), max(0.0, 2 * eps - lo)] if math.isfinite(eps) and math.isfinite(hi) \
        else [lo, math.inf]
    mlo, mhi = np.percentile(mus, 2.5, method="lower"), np.percentile(mus, 97.5, method="higher")
    eq["epsilon_ci"] = [gdp_epsilon(max(mlo, 0.0), delta), gdp_epsilon(max(mhi, 0.0), delta)]
    eq["mu_ci"] = [float(mlo), float(mhi)]
    out.update(equal_variance=eq, bootstrap=bootstrap,
               resampled="seeds, then each seed's canaries and null directions" if len(ids) > 1
               else "canaries and null directions")
    return out


def compare(res: dict[str, Any], claim: float | None, accountant: float | None) -> dict[str, Any]:
    """The estimate against what the mechanism claims for this game (see :class:`ClientCanaryAudit`):
    ``flagged`` when either reading's whole interval lies above the claim."""
    known = claim is not None and math.isfinite(claim)
    above = {"two_gaussians": bool(res["epsilon_ci"] and res["epsilon_ci"][0] > claim) if known else None,
             "equal_variance": bool(res["equal_variance"].get("epsilon_ci")
                                    and res["equal_variance"]["epsilon_ci"][0] > claim)
             if known else None}
    return {"claimed_epsilon": claim, "accountant_epsilon": accountant,
            "estimate_above_claim": bool(res["epsilon_hat"] is not None and res["epsilon_hat"] > claim)
            if known else None,
            "interval_above_claim": above, "flagged": bool(any(above.values())) if known else None,
            "claim_within_reach": bool(claim < res["epsilon_cap"]) if known else None}


__all__ = ["MIN_CANARIES", "compare", "epsilon_cap", "estimate_epsilon"]
