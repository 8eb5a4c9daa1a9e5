"""Descriptor attribute inference (DESIGN §6): what the server's per-client state reveals about a
client's data (dominant domain, label skew, presence of a class).

The curious server holds features per client — its descriptor d_n, the generated P_n or a released
ΔP_n — and, for shadow clients it runs itself on auxiliary data, the true property. A scikit-learn
probe learns feature -> property. ``grouped_probe`` scores every client out of fold with grouped
cross-validation (one client's features never straddle train and test, even when a client
contributes several feature vectors, e.g. one per round), and a permutation test (labels shuffled
across groups) gives a p-value against "no signal".
"""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from attacks.metrics import probe_metrics


def _probe():
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))


def out_of_fold_scores(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, folds: int = 5) -> np.ndarray:
    """Scores for the positive class, each from a probe that never saw that row's group."""
    x = np.asarray(features, dtype=float).reshape(len(labels), -1)
    y = np.asarray(labels).astype(int)
    groups = np.asarray(groups)
    k = min(folds, len(np.unique(groups)))
    scores = np.empty(len(y))
    for train, test in GroupKFold(n_splits=k).split(x, y, groups):
        if len(np.unique(y[train])) < 2:  # a fold without both classes: no evidence either way
            scores[test] = 0.5
            continue
        model = _probe().fit(x[train], y[train])
        scores[test] = model.predict_proba(x[test])[:, 1]
    return scores


def grouped_probe(features, labels, groups, *, folds: int = 5, permutations: int = 100,
                  rng: np.random.Generator) -> dict:
    """AUC and friends of the out-of-fold probe, plus a permutation-test p-value."""
    labels = np.asarray(labels).astype(int)
    groups = np.asarray(groups)
    scores = out_of_fold_scores(features, labels, groups, folds=folds)
    result = probe_metrics(scores, labels)
    # Permute the property across groups (a client keeps one label), recompute the AUC.
    uniq = np.unique(groups)
    group_label = {g: labels[groups == g][0] for g in uniq}
    null = []
    for _ in range(permutations):
        perm = dict(zip(uniq, rng.permutation([group_label[g] for g in uniq])))
        y_perm = np.array([perm[g] for g in groups])
        if len(np.unique(y_perm)) < 2:
            continue
        null.append(probe_metrics(out_of_fold_scores(features, y_perm, groups, folds=folds), y_perm)["auc"])
    null = np.asarray(null)
    result["permutation_p_value"] = float((1 + (null >= result["auc"]).sum()) / (1 + len(null)))
    result["scores"] = scores.tolist()
    return result
