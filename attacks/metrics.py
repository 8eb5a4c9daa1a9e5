"""Metrics of a membership or attribute probe (DESIGN §6): members / property holders are the
positive class, and a higher score means "more likely positive".

AUC (ties count ½), the best balanced accuracy over thresholds, and TPR at a fixed FPR with a
bootstrap interval that refits the threshold (over seeds where the scores come from several runs).
TPR at FPR α is only reported when α ≥ 10 / n_negatives and some threshold reaches near α;
otherwise it is ``unresolved`` (pool targets over clients and seeds to reach low FPR).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), predicting positive when score >= threshold; thresholds descending."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels).astype(bool)
    if y.all() or not y.any():
        raise ValueError("ROC needs both positives (members) and negatives (non-members)")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each score value
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    tpr = np.r_[0.0, tps / y.sum()]
    fpr = np.r_[0.0, fps / (~y).sum()]
    return fpr, tpr, np.r_[np.inf, s[distinct]]


def auc(scores, labels) -> float:
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(np.trapezoid(tpr, fpr))


def balanced_accuracy_max(scores, labels) -> float:
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(np.max((tpr + 1 - fpr) / 2))


def _tpr_point(s: np.ndarray, y: np.ndarray, target_fpr: float) -> tuple[float, float]:
    """(TPR, its FPR) at the largest threshold whose FPR ≤ target (no interpolation)."""
    fpr, tpr, _ = roc_curve(s, y)
    i = int(np.flatnonzero(fpr <= target_fpr + 1e-12).max())
    return float(tpr[i]), float(fpr[i])


def tpr_at_fpr(scores, labels, target_fpr: float, *, groups=None, alpha: float = 0.05, bootstrap: int = 300,
               seed: int = 0) -> dict:
    """TPR at the largest threshold whose FPR ≤ target, with a (1 − alpha) percentile-bootstrap
    interval that refits the threshold in every resample, so it covers the threshold's uncertainty
    (set by the few negatives beyond it) as well as the TPR's. ``groups`` (e.g. the seed of each
    score) makes the bootstrap resample whole groups — the independent units, since the records
    scored against one model are not independent; without it records are resampled, positives and
    negatives apart (and the interval says so).

    ``unresolved`` when fewer than 10 / target negatives were scored, or when tied scores leave no
    threshold near the target (the largest FPR ≤ target is below half of it: a block of tied
    negatives straddles it, as RMIA's discrete scores do)."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels).astype(bool)
    n_neg = int((~y).sum())
    if target_fpr < 10.0 / n_neg:
        return {"value": "unresolved", "reason": "too few negatives", "interval": None, "n_negatives": n_neg,
                "needs_negatives": int(np.ceil(10.0 / target_fpr))}
    value, achieved = _tpr_point(s, y, target_fpr)
    if achieved < 0.5 * target_fpr:
        return {"value": "unresolved", "reason": f"tied scores: no threshold between FPR {achieved:.2g} and the target",
                "interval": None, "n_negatives": n_neg, "achieved_fpr": achieved}
    how, caveat, resamples = _resamples(y, groups, np.random.default_rng(seed), bootstrap)
    method = f"{how}, threshold refitted{caveat}"
    draws = [_tpr_point(s[idx], y[idx], target_fpr)[0] for idx in resamples]
    lo, hi = np.percentile(draws, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"value": value, "interval": [float(lo), float(hi)], "interval_method": method, "n_negatives": n_neg,
            "achieved_fpr": achieved}


def auc_interval(scores, labels, *, groups=None, alpha: float = 0.05, bootstrap: int = 300,
                 seed: int = 0) -> dict:
    """A (1 − alpha) percentile-bootstrap interval of the AUC, resampled as :func:`tpr_at_fpr` does:
    whole ``groups`` (seeds) when there are several, else records (positives and negatives apart),
    which understates the spread (records scored against one model are not independent) and says so."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels).astype(bool)
    how, caveat, resamples = _resamples(y, groups, np.random.default_rng(seed), bootstrap)
    draws = [auc(s[idx], y[idx]) for idx in resamples]
    lo, hi = np.percentile(draws, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"auc_interval": [float(lo), float(hi)], "auc_interval_method": how + caveat}


def _resamples(y: np.ndarray, groups, rng: np.random.Generator, bootstrap: int):
    """The bootstrap's index sets for :func:`tpr_at_fpr` and :func:`auc_interval`: whole ``groups``
    (seeds) drawn with replacement when there are several (a draw holding one class only is left
    out), else records, positives and negatives apart. Returns (how, caveat, the index sets, lazily)."""
    if groups is not None and len(np.unique(groups)) > 1:
        g = np.asarray(groups)
        ids = np.unique(g)
        members = {k: np.flatnonzero(g == k) for k in ids}
        picks = (np.concatenate([members[k] for k in rng.choice(ids, size=len(ids))]) for _ in range(bootstrap))
        return (f"bootstrap over {len(ids)} groups (seeds)", "",
                (idx for idx in picks if y[idx].any() and not y[idx].all()))
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    return ("bootstrap over records (positives and negatives apart)",
            "; records of one model are not independent, so this understates the spread",
            (np.concatenate([rng.choice(pos, size=len(pos)), rng.choice(neg, size=len(neg))])
             for _ in range(bootstrap)))


def probe_metrics(scores, labels, *, groups=None) -> dict:
    """AUC with its bootstrap interval, the best balanced accuracy, TPR at 1 % and 0.1 % FPR, the counts."""
    y = np.asarray(labels).astype(bool)
    return {"auc": auc(scores, labels), **auc_interval(scores, labels, groups=groups),
            "balanced_accuracy": balanced_accuracy_max(scores, labels),
            "tpr_at_1pct_fpr": tpr_at_fpr(scores, labels, 0.01, groups=groups),
            "tpr_at_0.1pct_fpr": tpr_at_fpr(scores, labels, 0.001, groups=groups),
            "n_targets": int(len(y)), "n_positives": int(y.sum())}


def dp_region(epsilon: float, delta: float, fpr: np.ndarray) -> np.ndarray:
    """Largest TPR any (ε, δ)-DP mechanism allows at each FPR (both hypothesis-testing constraints:
    TPR ≤ e^ε FPR + δ and 1 − TPR ≥ e^{−ε}(1 − δ − FPR))."""
    e = math.exp(min(epsilon, 700.0))
    return np.minimum(1.0, np.minimum(e * fpr + delta, 1.0 - (1.0 - delta - fpr) / e))


def plot_roc(path: str | Path, curves: dict[str, tuple], *, title: str = "",
             envelope: tuple[float, float, str] | None = None) -> Path:
    """Log–log ROC of several probes: ``curves[name] = (scores, labels)``; ``envelope`` = (ε, δ,
    label) draws the largest ROC an (ε, δ)-DP mechanism allows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.4), dpi=120)
    lo = 1.0
    styles = ("-", "--", "-.", ":")
    for i, (name, (scores, labels)) in enumerate(curves.items()):  # a colour and dash of its own per curve
        fpr, tpr, _ = roc_curve(scores, labels)
        lo = min(lo, 1.0 / max(1, int((~np.asarray(labels).astype(bool)).sum())))
        ax.plot(np.maximum(fpr, 1e-6), np.maximum(tpr, 1e-6), color=plt.cm.tab20(i % 20), ls=styles[(i // 10) % 4],
                lw=1.2, label=f"{name} (AUC {auc(scores, labels):.3f})")
    ax.plot([lo, 1], [lo, 1], "k:", lw=1, label="chance")
    if envelope is not None and math.isfinite(envelope[0]):
        f = np.logspace(math.log10(lo), 0, 200)
        ax.plot(f, dp_region(envelope[0], envelope[1], f), "k--", lw=1, label=envelope[2])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1)
    ax.set_ylim(lo, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside, not over, the curves
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    with matplotlib.rc_context({"pdf.fonttype": 42}):  # a vector copy for a paper, as evaluations.plots.save_figure
        fig.savefig(Path(path).with_suffix(".pdf"), bbox_inches="tight", metadata={"CreationDate": None})
    plt.close(fig)
    return Path(path)
