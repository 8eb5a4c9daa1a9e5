"""Honest statistics for every table (DESIGN §8): paired-by-seed differences with a 95% t-interval,
and verdicts that say "level" unless the interval excludes zero."""
from __future__ import annotations

import math


def t95(df: int) -> float:
    """Two-sided 95% Student-t quantile with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def paired(a: dict, b: dict) -> dict | None:
    """a − b over the seeds both have: per-seed values, mean, std (n−1) and 95% t-interval
    (None for one seed: a single difference has no spread)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = [a[s] - b[s] for s in seeds]
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return {"seeds": seeds, "diffs": d, "mean": mean, "std": None, "ci": None}
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = t95(n - 1) * std / math.sqrt(n)
    return {"seeds": seeds, "diffs": d, "mean": mean, "std": std, "ci": (mean - half, mean + half)}


MIN_SEEDS = 3  # a verdict from fewer paired seeds rests on one or two numbers and their (t(1)) spread


def verdict(p: dict | None, *, below: str = "dominated (below local)", above: str = "above local",
            level: str = "level with local") -> str:
    """``below`` only when the whole 95% interval is below zero, ``above`` when it is above, else
    ``level`` — from at least three paired seeds whose differences are not all the same (two
    identical differences would give a zero-width interval and a verdict from nothing)."""
    if p is None:
        return ""
    n = len(p["seeds"])
    if n < MIN_SEEDS:
        return f"too few seeds ({n}; a verdict needs {MIN_SEEDS})"
    if p["std"] <= 1e-9 * max(1.0, abs(p["mean"])):  # identical differences (up to rounding)
        return f"no spread over the {n} seeds: no interval"
    lo, hi = p["ci"]
    return below if hi < 0 else above if lo > 0 else level


def mean_spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± std (n = k)``; a single value is printed alone — no spread from one seed."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "—"
    if any(math.isinf(v) for v in vals):
        return "∞"
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{scale * m:.{digits}f}"
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return f"{scale * m:.{digits}f} ± {scale * sd:.{digits}f}"


def fmt_paired(p: dict | None, scale: float = 100.0) -> str:
    """``+2.1 [−0.4, +4.6]`` in points; one seed: the difference alone."""
    if p is None:
        return "—"
    if p["ci"] is None:
        return f"{scale * p['mean']:+.1f} (1 seed)"
    lo, hi = p["ci"]
    return f"{scale * p['mean']:+.1f} [{scale * lo:+.1f}, {scale * hi:+.1f}]"
