"""Leakage pooled over seeds: the probes' (score, label) pools and the client canary audit, read
back from each run's ``audit/`` folder, and the TPR-vs-ε plot — shared by the privacy sweep (with
``audit:``) and the audit command (``evaluations.leakage_sweep``)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pfedpg import jsonio

#: the axis of a privacy unit's ε (PrivacyResult.unit): ε of different units are not comparable
UNITS = {"client": "client-level ε (one client's whole data set)", "record": "record-level ε (one record)"}


def group_key(cell) -> str:
    """The cell's group over seeds: its name without the seed (``dp_client-eps8-s1`` -> ``dp_client-eps8``)."""
    return cell.name.rsplit("-s", 1)[0]


def pooled_probes(run_dirs: list[Path]) -> dict[str, Any]:
    """Pool each probe's (scores, labels) over runs; metrics on the pool; canaries get the one-run
    bound on all canaries of all runs (independent runs form one product mechanism)."""
    from attacks.metrics import probe_metrics
    from attacks.probes import record_canary_bounds

    pools: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    per_run: list[dict] = []
    for d in run_dirs:
        audit = jsonio.read(d / "audit" / "audit.json")
        per_run.append(audit)
        data = np.load(d / "audit" / "scores.npz")
        for key in data.files:
            if key.endswith("__scores"):
                name = key[: -len("__scores")]
                pools.setdefault(name, []).append((data[key], data[name + "__labels"]))
    first = per_run[0]["probes"]
    dp = per_run[0].get("dp")
    out: dict[str, Any] = {}
    for name, parts in pools.items():
        s = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts]).astype(bool)
        seeds = np.concatenate([np.full(len(p[0]), i) for i, p in enumerate(parts)])  # the independent units
        res = probe_metrics(s, y, groups=seeds)
        if name.startswith("canary_"):
            side = name.split("_", 1)[1]
            ref = first["canary"][side]
            eps = max((r["probes"]["canary"][side]["accountant_epsilon"] or -1) for r in per_run)
            eps = None if eps < 0 else eps
            steinke = ref["bounds"]["steinke"]
            res.update(record_canary_bounds(s, y, claim=eps, delta=ref["delta"],
                                            guess_fraction=steinke["guesses"] / steinke["canaries"]),
                       threat_model=ref["threat_model"], accountant_epsilon=eps)
        else:
            ref = first.get(name, {})
            res.update(threat_model=ref.get("threat_model"), dp_envelope=ref.get("dp_envelope"))
            if ref.get("dp_envelope"):
                res["dp_envelope"] = {**ref["dp_envelope"],
                                      "epsilon": max(r["probes"][name]["dp_envelope"]["epsilon"] for r in per_run)}
            for extra in ("top1_accuracy", "chance", "permutation_p_value", "null_auc_mean"):
                vals = [r["probes"][name].get(extra) for r in per_run
                        if r["probes"].get(name, {}).get(extra) is not None]
                if vals:
                    res[f"{extra}_per_seed"] = vals
        res["runs"] = len(parts)
        out[name] = res
    # A probe that broke down in a run (audit.json status "failed: ..."): said beside the pool, or alone.
    for r, d in zip(per_run, run_dirs):
        for name, res in r["probes"].items():
            if str(res.get("status", "")).startswith("failed"):
                out.setdefault(name, {"status": "failed in every run", "runs": 0}).setdefault(
                    "failed_runs", []).append(f"{d.name}: {res['status']}")
    seconds = {}
    for r in per_run:
        for name, res in r["probes"].items():
            if "seconds_per_training_round" in res and res["seconds_per_training_round"] is not None:
                seconds.setdefault(name, []).append(res["seconds_per_training_round"])
    client = [jsonio.read(d / "audit" / "client_canary.json") for d in run_dirs
              if (d / "audit" / "client_canary.json").is_file()]
    if client:
        out["client_canary"] = pooled_client_canaries(client)
    grad = [jsonio.read(d / "audit" / "gradient_canary.json") for d in run_dirs
            if (d / "audit" / "gradient_canary.json").is_file()]
    if grad:
        from attacks.gradient_canary import pooled_gradient_canaries

        out["gradient_canary"] = pooled_gradient_canaries(grad)
    return {"probes": out, "dp": dp, "cost_in_training_rounds": {k: float(np.mean(v)) for k, v in seconds.items()},
            "_pools": pools}


def pooled_client_canaries(client: list[dict[str, Any]]) -> dict[str, Any]:
    """The client-level one-run audit pooled over seeds: the canaries of every run are independent
    draws of one game, so the bounds run on all of them at once; Andrew et al.'s estimate reads each
    run's cosines in units of its own null (its mean and spread) and resamples the seeds first."""
    from attacks.client_canary import canary_views_result

    def unit(v: dict[str, Any], key: str) -> np.ndarray:
        null = np.asarray(v["cos_null"])
        return (np.asarray(v[key]) - null.mean()) / null.std(ddof=1)

    views: dict[str, dict[str, Any]] = {}
    for name in ("releases", "final_state"):
        parts = [c["views"][name] for c in client if name in c["views"]]
        if len(parts) == len(client):
            views[name] = {"scores": np.concatenate([p["scores"] for p in parts]),
                           "inserted": np.concatenate([p["inserted"] for p in parts]),
                           "threshold": parts[0]["threshold"], "cos": np.concatenate([unit(p, "cos") for p in parts]),
                           "cos_null": np.concatenate([unit(p, "cos_null") for p in parts])}
    groups = (np.concatenate([np.full(len(c["views"]["final_state"]["scores"]), i) for i, c in enumerate(client)]),
              np.concatenate([np.full(len(c["views"]["final_state"]["cos_null"]), i) for i, c in enumerate(client)]))
    claims = [c["claimed_epsilon"] for c in client if c.get("claimed_epsilon") is not None]
    accs = [c["accountant_epsilon"] for c in client if c.get("accountant_epsilon") is not None]
    head = client[0][client[0]["headline"]]
    res = canary_views_result(views, claim=max(claims) if claims else None, accountant=max(accs) if accs else None,
                              delta=head["delta"], alpha=head["alpha"], groups=groups)
    res.update(runs=len(client), epsilon_lb_per_seed=[c["epsilon_lb"] for c in client],
               violation_per_seed=[c["violation"] for c in client],
               **{k: client[0][k] for k in ("pair", "claim", "threat_model", "view", "rounds")},
               canary_clients=sum(c["canary_clients"] for c in client), inserted=sum(c["inserted"] for c in client))
    return res


def auc_reading(r: dict[str, Any], digits: int = 3) -> str:
    """``0.647 [0.601, 0.690]``, and for a probe with a permutation test (the attribute probes) its
    p-value and the null's mean AUC — per seed where several were pooled: ``(null 0.355, p 0.67)``."""
    out = f"{r['auc']:.{digits}f}"
    if r.get("auc_interval"):
        lo, hi = r["auc_interval"]
        out += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    ps = r.get("permutation_p_value_per_seed") or ([r["permutation_p_value"]] if "permutation_p_value" in r else [])
    nulls = [v for v in (r.get("null_auc_mean_per_seed") or [r.get("null_auc_mean")]) if v is not None]
    if ps:
        null = f"null {np.mean(nulls):.{digits}f}, " if nulls else ""
        out += f" ({null}p {', '.join(f'{p:.2g}' for p in ps)})"
    return out


#: the FPRs whose TPR an audit reports, and the negatives each needs (10 / FPR)
TPR_KEYS = {"tpr_at_1pct_fpr": ("1%", 1_000), "tpr_at_0.1pct_fpr": ("0.1%", 10_000)}


def unresolved_tprs(groups: dict[str, dict[str, Any]]) -> list[str]:
    """One sentence for each FPR at which no probe of any group has a TPR: what the pools hold and
    what it would take (the report says it in words instead of drawing an empty plot)."""
    out = []
    for key, (fpr, needs) in TPR_KEYS.items():
        tprs = [r[key] for g in groups.values() for r in g["probes"].values() if isinstance(r.get(key), dict)]
        if not tprs or any(isinstance(t.get("value"), float) for t in tprs):
            continue
        most = max(t.get("n_negatives", 0) for t in tprs)
        tied = any(str(t.get("reason", "")).startswith("tied") for t in tprs)
        out.append(f"TPR at {fpr} FPR is unresolved for every probe and group: the largest pool holds {most:,} "
                   f"non-members and a TPR at {fpr} FPR needs {needs:,}"
                   + (" (or tied scores left no threshold near it)" if tied else "")
                   + " — pool more seeds (audit.seeds) or more targets per client (audit.probes.targets_per_client).")
    return out


def plot_tpr_vs_epsilon(path: Path, groups: dict[str, dict[str, Any]], eps_of: dict[str, float] | None = None) -> bool:
    """TPR at 1% FPR (solid) and at 0.1% FPR (dashed), pooled, against ε, wherever the pooled
    negatives resolve that FPR: one panel per DP mechanism (client-level and record-level ε are not
    comparable), each with the non-private groups at its right edge; one colour per probe. Where no
    TPR resolves at all nothing is drawn (an empty plot says nothing; :func:`unresolved_tprs` says
    why in words): returns whether the plot was written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evaluations.plots import save_figure

    def points(res):
        for p, r in res["probes"].items():
            for key in ("tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr"):
                v = r.get(key, {}).get("value") if isinstance(r.get(key), dict) else None
                if isinstance(v, float):
                    yield p, key, v

    if not any(True for r in groups.values() for _ in points(r)):
        path.unlink(missing_ok=True)  # (a plot of an earlier run of this folder would say what this one does not)
        return False
    private = {g: r for g, r in groups.items() if (r.get("dp") or {}).get("epsilon") is not None
               and math.isfinite(r["dp"]["epsilon"])}
    open_ = {g: r for g, r in groups.items() if g not in private}
    mechs = sorted({r["dp"]["hook"] for r in private.values()}) or [None]
    probes = sorted({p for r in groups.values() for p, _, _ in points(r)})
    colour = {p: plt.cm.tab20(i % 20) for i, p in enumerate(probes)}
    fig, axes = plt.subplots(1, len(mechs), figsize=(4.6 * len(mechs) + 2.4, 4.4), dpi=120, sharey=True, squeeze=False)
    drawn = {}
    for ax, mech in zip(axes[0], mechs):
        mine = {g: r for g, r in private.items() if r["dp"]["hook"] == mech}
        finite = [r["dp"]["epsilon"] for r in mine.values()]
        right = max(finite) * 4 if finite else 10.0
        series: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for res, x in [(r, r["dp"]["epsilon"]) for r in mine.values()] + [(r, right) for r in open_.values()]:
            for p, key, v in points(res):
                series.setdefault((p, key), []).append((x, v))
        for (p, key), pts in sorted(series.items()):
            xs, ys = zip(*sorted(pts))
            line, = ax.plot(xs, ys, "-o" if key == "tpr_at_1pct_fpr" else "--s", ms=3, color=colour[p])
            drawn.setdefault(f"{p}{'' if key == 'tpr_at_1pct_fpr' else ', 0.1% FPR'}", line)
        ax.set_xscale("log")
        ax.axvline(right, color="k", lw=0.5, ls=":")
        unit = next((UNITS[r["dp"]["unit"]] for r in mine.values()), "ε")
        ax.set_xlabel(f"{unit}\n(dotted line at {right:.3g}: no DP, ε = ∞)", fontsize=8)
        ax.set_title(mech or "no DP mechanism", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        if not series:
            ax.text(0.5, 0.5, "TPR at 1% and 0.1% FPR unresolved here\n(pool more targets: >= 1,000 non-members)",
                    ha="center", va="center", transform=ax.transAxes, fontsize=8)
    axes[0][0].set_ylabel("TPR at 1% FPR (solid) / 0.1% FPR (dashed), pooled")
    if drawn:
        fig.legend(list(drawn.values()), list(drawn), fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    save_figure(fig, path, bbox_inches="tight")
    plt.close(fig)
    return True
