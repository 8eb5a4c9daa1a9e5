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

from attacks.metrics import auc, probe_metrics


def _probe():
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))


def out_of_fold_scores(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, folds: int = 5) -> np.ndarray:
    """Log-likelihood-ratio scores for the positive class, each from a probe that never saw that
    row's group (0 = no evidence either way)."""
    x = np.asarray(features, dtype=float).reshape(len(labels), -1)
    y = np.asarray(labels).astype(int)
    groups = np.asarray(groups)
    k = min(folds, len(np.unique(groups)))
    scores = np.empty(len(y))
    for train, test in GroupKFold(n_splits=k).split(x, y, groups):
        if len(np.unique(y[train])) < 2:  # a fold without both classes: no evidence either way
            scores[test] = 0.0
            continue
        model = _probe().fit(x[train], y[train])
        # The probe's log-odds minus the training fold's prior log-odds (a likelihood ratio): with
        # few clients, leaving a positive client out lowers the fold's base rate, and raw posteriors
        # would then rank held-out positives low — a systematic AUC < 0.5 under no signal.
        prior = y[train].mean()
        scores[test] = model.decision_function(x[test]) - np.log(prior / (1 - prior))
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
        null.append(auc(out_of_fold_scores(features, y_perm, groups, folds=folds), y_perm))
    null = np.asarray(null)
    result["permutation_p_value"] = float((1 + (null >= result["auc"]).sum()) / (1 + len(null)))
    result["null_auc_mean"] = float(null.mean()) if len(null) else None
    result["scores"] = scores.tolist()
    return result


# ------------------------------------------------------------------------------------------------
# Client properties and the pooled probe over them


def client_properties(info: list[dict], *, presence_threshold: float = 0.05,
                      min_clients: int = 2) -> dict[str, np.ndarray]:
    """Binary properties per client from what the audit knows of each client's training data.

    * ``domain=<name>`` — the client's (dominant) domain is <name> (one-vs-rest per domain);
    * ``has_class=<c>`` — at least ``presence_threshold`` of its training records are class c;
    * ``label_skew`` — its largest class fraction is above the median client's.

    A property is kept only when at least ``min_clients`` clients hold it and ``min_clients`` do not
    (a constant property has nothing to infer)."""
    out: dict[str, np.ndarray] = {}
    names = info[0].get("domain_names") or []
    domains = np.array([-1 if i["domain"] is None else i["domain"] for i in info])
    for d in sorted(set(domains.tolist()) - {-1}):
        out[f"domain={names[d] if d < len(names) else d}"] = domains == d
    counts = np.array([i["label_counts"] for i in info], dtype=float)
    frac = counts / np.maximum(1.0, counts.sum(1, keepdims=True))
    for c in range(frac.shape[1]):
        out[f"has_class={c}"] = frac[:, c] >= presence_threshold
    top = frac.max(1)
    out["label_skew"] = top > np.median(top)
    return {k: v for k, v in out.items() if min_clients <= int(v.sum()) <= len(v) - min_clients}


def pooled_property_probe(features: dict[int, list[np.ndarray]], properties: dict[str, np.ndarray], *,
                          folds: int = 5, permutations: int = 50, rng: np.random.Generator,
                          shadow_clients: list[int] | None = None) -> dict:
    """One grouped-CV probe per property (rows = a client's feature vectors, e.g. one per round;
    groups = clients), scores pooled over properties (micro-average), and a permutation test that
    shuffles every property across clients together. With ``shadow_clients`` (the server's own
    clients, whose properties it knows), also the transfer setting: train on the shadows only,
    score the other clients."""
    clients = sorted(features)
    rows = np.concatenate([np.stack([np.asarray(f, dtype=float).reshape(-1) for f in features[n]]) for n in clients])
    groups = np.concatenate([[n] * len(features[n]) for n in clients])

    def pooled(perm: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, dict]:
        scores, labels, per = [], [], {}
        for name, prop in properties.items():
            p = prop if perm is None else prop[perm]
            y = np.array([p[g] for g in groups]).astype(int)
            s = out_of_fold_scores(rows, y, groups, folds=folds)
            scores.append(s)
            labels.append(y)
            per[name] = auc(s, y)
        return np.concatenate(scores), np.concatenate(labels), per

    if not properties:
        return {"status": "not applicable: no property varies across clients"}
    scores, labels, per = pooled(None)
    result = probe_metrics(scores, labels)
    n_all = len(next(iter(properties.values())))
    null = [auc(*pooled(rng.permutation(n_all))[:2]) for _ in range(permutations)]
    # With few clients and many features the out-of-fold AUC is biased below 0.5 under no signal;
    # the permutation null shows by how much, and the p-value is against that null, not against 0.5.
    result.update(permutation_p_value=float((1 + sum(a >= result["auc"] for a in null)) / (1 + len(null))),
                  null_auc_mean=float(np.mean(null)) if null else None,
                  null_auc_std=float(np.std(null)) if null else None,
                  per_property_auc=per, clients=len(clients), rows=int(len(groups)), properties=len(properties))
    if shadow_clients:
        shadow = np.isin(groups, shadow_clients)
        t_scores, t_labels = [], []
        for prop in properties.values():
            y = np.array([prop[g] for g in groups]).astype(int)
            if len(np.unique(y[shadow])) < 2 or len(np.unique(y[~shadow])) < 2:
                continue
            model = _probe().fit(rows[shadow], y[shadow])
            prior = y[shadow].mean()
            t_scores.append(model.decision_function(rows[~shadow]) - np.log(prior / (1 - prior)))
            t_labels.append(y[~shadow])
        if t_scores:
            t = probe_metrics(np.concatenate(t_scores), np.concatenate(t_labels))
            result["transfer"] = {k: t[k] for k in ("auc", "balanced_accuracy", "n_targets")}
        else:
            result["transfer"] = {"status": "not applicable: no property varies among both shadows and targets"}
    result["_curve"] = (scores, labels)
    return result


def transfer_property_probe(train: dict[int, list[np.ndarray]], test: dict[int, list[np.ndarray]],
                            properties: dict[str, np.ndarray], *, permutations: int = 0,
                            rng: np.random.Generator | None = None) -> dict:
    """Fit one probe per property on the ``train`` clients' rows (clients whose properties the server
    knows) and score the ``test`` clients' rows (e.g. new clients' join rounds), pooled over
    properties. ``properties[name][n]`` is client n's property (ids index the arrays). With
    ``permutations``, the null: the known clients' properties shuffled among them (all properties
    together, a client keeps one set), the probes refitted, and the p-value of the observed AUC."""
    def stack(feats):
        ids = sorted(feats)
        rows = np.concatenate([np.stack([np.asarray(f, dtype=float).reshape(-1) for f in feats[n]]) for n in ids])
        return rows, np.concatenate([[n] * len(feats[n]) for n in ids])

    x_tr, g_tr = stack(train)
    x_te, g_te = stack(test)
    known = np.array(sorted(train))

    def pooled(owner: dict[int, int] | None):
        scores, labels = [], []
        src = g_tr if owner is None else np.array([owner[g] for g in g_tr])
        for prop in properties.values():
            y_tr, y_te = prop[src].astype(int), prop[g_te].astype(int)
            if len(np.unique(y_tr)) < 2:
                continue
            model = _probe().fit(x_tr, y_tr)
            prior = y_tr.mean()
            scores.append(model.decision_function(x_te) - np.log(prior / (1 - prior)))
            labels.append(y_te)
        return scores, labels

    scores, labels = pooled(None)
    if not scores or len(np.unique(np.concatenate(labels))) < 2:
        return {"status": "not applicable: no property varies among both the known and the probed clients"}
    scores, labels = np.concatenate(scores), np.concatenate(labels)
    result = probe_metrics(scores, labels)
    result.update(clients_known=len(train), clients_probed=len(test), rows_probed=int(len(g_te)),
                  properties=len(labels) // max(1, len(g_te)))
    if permutations:
        rng = rng if rng is not None else np.random.default_rng(0)
        null = []
        for _ in range(permutations):
            s, lab = pooled(dict(zip(known.tolist(), rng.permutation(known).tolist())))
            if s and len(np.unique(np.concatenate(lab))) == 2:
                null.append(auc(np.concatenate(s), np.concatenate(lab)))
        result.update(permutation_p_value=float((1 + sum(a >= result["auc"] for a in null)) / (1 + len(null))),
                      null_auc_mean=float(np.mean(null)) if null else None,
                      null_auc_std=float(np.std(null)) if null else None)
    result["_curve"] = (scores, labels)
    return result
