"""``pfedpg-eval audit``: the leakage audit over a privacy grid (DESIGN §6).

An audit file has the privacy sweep's shape — ``base_config``, ``base`` and an ``audit:`` section
with ``seeds``, ``mechanisms``, ``target_epsilons`` / ``noise_multipliers``, ``baselines``
(``nonprivate``, ``clip_only``) and ``out_dir`` — plus ``audit.probes``, the options of the
``leakage_audit`` hook (``attacks.leakage``), which every cell runs at its end. Each cell is an
ordinary run directory (with ``audit/audit.json``); the audit pools each probe's scores over seeds
(and clients) per (mechanism, privacy level) — pooling is how low FPRs become resolvable — and
writes ``audit.json``, ``roc_<group>.png``, ``tpr_vs_epsilon.png`` and ``report.md`` / ``.html``.
"""
from __future__ import annotations

import copy
import html
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from evaluations.report import html_page, img_tag, run_header
from evaluations.sweep import load_grid_file, run_cells
from pfedpg.config import build_dataclass
from pfedpg.errors import ConfigError

AUDIT_BASELINES = ("nonprivate", "clip_only")


def load_audit(path, overrides=None):
    """-> (PrivacySweepConfig of the grid, leakage_audit options, base run config dict)."""
    from evaluations.privacy import MECHANISMS, PrivacySweepConfig

    section, cfg = load_grid_file(path, "audit", overrides, example="configs/audit_digits_shared.yaml")
    section = dict(section)
    probes = section.pop("probes", None) or {}
    client_canaries = section.pop("client_canaries", None)
    if client_canaries is not None and not isinstance(client_canaries, dict):
        raise ConfigError("audit.client_canaries must be a mapping of client_canary_audit options, e.g. {clients: 2}")
    if not isinstance(probes, dict):
        raise ConfigError("audit.probes must be a mapping of leakage_audit options, e.g. {shadow_clients: 6}")
    section.setdefault("mechanisms", {})
    section.setdefault("baselines", ["nonprivate"])
    if not section["mechanisms"]:
        section.setdefault("target_epsilons", [1.0])  # unused without mechanisms; keeps the grid valid
    bad = [b for b in section["baselines"] if b not in AUDIT_BASELINES]
    if bad:
        raise ConfigError(f"audit.baselines: {bad[0]!r} cannot be audited (the server sees nothing from `local`); "
                          f"choose from {', '.join(AUDIT_BASELINES)}")
    if section.get("out_dir") is None:
        section["out_dir"] = "runs/audit"
    grid = build_dataclass(PrivacySweepConfig, section, "audit")
    if any(h.get("name") in (*MECHANISMS, "leakage_audit") for h in cfg.hooks):
        raise ConfigError("base.hooks lists a DP or leakage_audit hook; the audit adds them itself — remove it from base")
    if cfg.method != "pfedpg":
        raise ConfigError(f"the audit evaluates pfedpg (base.method is {cfg.method!r}); set it to pfedpg")
    if cfg.engine != "inprocess":
        raise ConfigError("the audit's probes run in one process (engine: inprocess); drop --engine flower / engine: flower")
    # Validate the probe options now, not in the first cell.
    from attacks.leakage import LeakageAudit

    try:
        LeakageAudit(**probes)
    except TypeError as e:
        raise ConfigError(f"audit.probes: {e}") from None
    if client_canaries is not None:
        from attacks.client_canary import ClientCanaryAudit

        try:
            ClientCanaryAudit(**client_canaries)
        except TypeError as e:
            raise ConfigError(f"audit.client_canaries: {e}") from None
        probes = {**probes, "_client_canaries": client_canaries}
    return grid, probes, cfg.to_dict()


def with_audit_hook(base: dict[str, Any], probes: dict[str, Any]) -> dict[str, Any]:
    """The base with the audit's hooks; they come before each cell's DP hook (appended later), so
    client canaries go through the mechanism."""
    b = copy.deepcopy(base)
    probes = dict(probes)
    client = probes.pop("_client_canaries", None)
    b["hooks"] = [*b["hooks"], {"name": "leakage_audit", **probes},
                  *([{"name": "client_canary_audit", **client}] if client is not None else [])]
    return b


# ------------------------------------------------------------------------------------------------
# Pooling over seeds


def group_key(cell: dict[str, Any]) -> str:
    name = cell["cell"]
    return name.rsplit("-s", 1)[0]


def pooled_probes(run_dirs: list[Path]) -> dict[str, Any]:
    """Pool each probe's (scores, labels) over runs; metrics on the pool; canaries get the one-run
    bound on all canaries of all runs (independent runs form one product mechanism)."""
    from attacks.audit import one_run_audit
    from attacks.metrics import probe_metrics

    pools: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    per_run: list[dict] = []
    for d in run_dirs:
        audit = json.loads((d / "audit" / "audit.json").read_text())
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
            one = one_run_audit(s, y, delta=ref["delta"], guess_fraction=ref["guesses"] / ref["canaries"])
            eps = max((r["probes"]["canary"][side]["accountant_epsilon"] or -1) for r in per_run)
            eps = None if eps < 0 else eps
            res.update(one, threat_model=ref["threat_model"], accountant_epsilon=eps,
                       violation=bool(eps is not None and one["epsilon_lower_bound"] > eps),
                       can_fail=bool(eps is not None and one["epsilon_cap"] > eps))
        else:
            ref = first.get(name, {})
            res.update(threat_model=ref.get("threat_model"), dp_envelope=ref.get("dp_envelope"))
            if ref.get("dp_envelope"):
                res["dp_envelope"] = {**ref["dp_envelope"],
                                      "epsilon": max(r["probes"][name]["dp_envelope"]["epsilon"] for r in per_run)}
            for extra in ("top1_accuracy", "chance", "permutation_p_value", "null_auc_mean"):
                vals = [r["probes"][name].get(extra) for r in per_run if r["probes"].get(name, {}).get(extra) is not None]
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
    client = [json.loads((d / "audit" / "client_canary.json").read_text()) for d in run_dirs
              if (d / "audit" / "client_canary.json").is_file()]
    if client:
        out["client_canary"] = pooled_client_canaries(client)
    return {"probes": out, "dp": dp, "cost_in_training_rounds": {k: float(np.mean(v)) for k, v in seconds.items()},
            "_pools": pools}


def _eps(v) -> str:
    return "∞" if v is not None and math.isinf(v) else ("—" if v is None else f"{v:.2f}")


def epsilon_reading(r: dict[str, Any]) -> str:
    """``ε̂ 2.1 [0.0, 4.3] (equal variance 1.2 [0.3, 2.4])`` of one view of the client canary audit."""
    if r.get("epsilon_hat") is None:
        return r.get("status", "no estimate")
    ev = r["equal_variance"]
    return (f"ε̂ {_eps(r['epsilon_hat'])} [{_eps(r['epsilon_ci'][0])}, {_eps(r['epsilon_ci'][1])}] (equal variance "
            f"{_eps(ev['epsilon_hat'])} [{_eps(ev['epsilon_ci'][0])}, {_eps(ev['epsilon_ci'][1])}])")


def client_canary_cell(r: dict[str, Any]) -> str:
    """The report's cell for the client-level one-run audit: both views, the cap, claim and flags."""
    out = f"final state: {epsilon_reading(r)}"
    if "releases" in r:
        out += f"; releases: {epsilon_reading(r['releases'])}" + (" **flagged**" if r["releases"].get("flagged") else "")
    out += f"; {r['canaries']} canaries, cap {_eps(r['epsilon_cap'])}"
    if r.get("claimed_epsilon") is not None:
        out += f"; claim {_eps(r['claimed_epsilon'])}, accountant {_eps(r.get('accountant_epsilon'))}"
    return out + (" **flagged**" if r.get("flagged") else "")


def pooled_client_canaries(client: list[dict[str, Any]]) -> dict[str, Any]:
    """The client-level one-run audit pooled over seeds: each run's cosines in units of its own null
    (its null's mean and spread), one estimate on the pool, and the bootstrap resampling seeds first."""
    from attacks.client_canary import compare, estimate_epsilon

    def pool(views: list[dict[str, Any]]) -> dict[str, Any]:
        cin = np.concatenate([(np.asarray(v["cos_in"]) - v["null_mean"]) / v["null_std"] for v in views])
        null = np.concatenate([(np.asarray(v["cos_null"]) - v["null_mean"]) / v["null_std"] for v in views])
        groups = np.concatenate([np.full(len(v["cos_in"]), i) for i, v in enumerate(views)])
        null_groups = np.concatenate([np.full(len(v["cos_null"]), i) for i, v in enumerate(views)])
        est = estimate_epsilon(cin, null, delta=views[0]["delta"], groups=groups, null_groups=null_groups)
        return {**est, "epsilon_hat_per_seed": [v["epsilon_hat"] for v in views],
                "epsilon_ci_per_seed": [v["epsilon_ci"] for v in views]}

    acc = max((c["accountant_epsilon"] for c in client if c.get("accountant_epsilon") is not None), default=None)
    claims = [c.get("claimed_epsilon") for c in client if c.get("claimed_epsilon") is not None]
    claim = max(claims) if claims else None
    res = pool(client)
    res.update(compare(res, claim, acc), runs=len(client), view=client[0]["view"], note=client[0]["note"],
               threat_model=client[0].get("threat_model"), claim=client[0].get("claim"))
    if all("releases" in c for c in client):
        rel = pool([c["releases"] for c in client])
        res["releases"] = {**rel, **compare(rel, claim, acc)}
    return res


def _v(t) -> str:
    if isinstance(t, dict):
        t = t.get("value")
    if t is None:
        return "—"
    return t if isinstance(t, str) else f"{t:.3f}"


def _tpr(t: dict) -> str:
    if not isinstance(t.get("value"), float):
        return str(t.get("value"))
    lo, hi = t["interval"]
    return f"{t['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def write_audit_outputs(out: Path, rows: list[dict[str, Any]], groups: dict[str, dict[str, Any]]) -> None:
    from attacks.leakage import plot_audit_roc

    clean = {}
    for g, res in groups.items():
        pools = res.pop("_pools")
        curves = {k: (np.concatenate([p[0] for p in v]), np.concatenate([p[1] for p in v]).astype(bool))
                  for k, v in pools.items()}
        plot_audit_roc(out / f"roc_{g}.png", curves, dp_envelope=res["dp"], title=f"{g} (pooled over seeds)")
        clean[g] = res
    (out / "audit.json").write_text(json.dumps({"cells": rows, "groups": clean}, indent=2, default=_default))
    probes = sorted({p for g in clean.values() for p in g["probes"]})
    plot_tpr_vs_epsilon(out / "tpr_vs_epsilon.png", clean)
    # One row per probe, one column per group (probes outnumber groups: a table that fits the page).
    header = ["probe"]
    for g in clean:
        eps = next((r["epsilon_max"] for r in rows if r["group"] == g and r.get("epsilon_max") is not None), None)
        header.append(f"{g} (ε {'∞' if eps is None or (isinstance(eps, float) and math.isinf(eps)) else f'{eps:.2f}'})")
    body = []
    for p in probes:
        cells = [p]
        for g, res in clean.items():
            r = res["probes"].get(p)
            if r is None:
                cells.append("—")
            elif p == "client_canary":
                cells.append(client_canary_cell(r))
            elif p.startswith("canary_"):
                cells.append(f"AUC {r['auc']:.3f}; ε_lb {r['epsilon_lower_bound']:.2f} (cap {r['epsilon_cap']:.2f})"
                             + (f" (accountant {r['accountant_epsilon']:.2f}"
                                + ("" if r.get("can_fail") else ": above the cap, the audit cannot fail") + ")"
                                if r.get("accountant_epsilon") else ""))
            else:
                cells.append(f"AUC {r['auc']:.3f}; TPR@1% {_tpr(r['tpr_at_1pct_fpr'])}; "
                             f"TPR@0.1% {_tpr(r['tpr_at_0.1pct_fpr'])}; {r['n_targets'] - r['n_positives']} neg.")
        body.append(cells)
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(c) + " |" for c in body]
    md = ["# Leakage audit: pFedPG", "",
          "Each probe's scores are pooled over seeds and target clients per group. AUC 0.5 = chance; TPR at a "
          "given FPR (with its 95% Clopper–Pearson interval) is `unresolved` when fewer than 10 / FPR negatives were "
          "pooled (1,000 for 1%, 10,000 for 0.1%); `neg.` = the negatives (non-members) pooled. Canary columns give the AUC and the "
          "one-run ε lower bound (Steinke et al. 2023), the cap (the most its canaries could certify, with every "
          "guess right) and the accountant's ε where DP covers that view; a lower bound above the accountant's ε "
          "would be a bug, and where the accountant's ε is above the cap no violation could have shown. "
          "client_canary: the client-level one-run audit (Andrew et al. 2024) — Gaussians fitted to the canaries' "
          "and the null's cosines, ε̂ between them with a bootstrap interval, the equal-variance (μ-GDP) reading "
          "beside it, on the final server state and on the releases the server received; the claim is the canary "
          "game's own ε (√R/z as μ-GDP), flagged when an interval lies wholly above it. An estimate, not a bound; "
          "above the cap it rests on the fitted tails.", "", *table, "",
          "![TPR at 1% and 0.1% FPR vs ε](tpr_vs_epsilon.png)", "", "## Threat models", ""]
    any_group = next(iter(clean.values()), {"probes": {}})
    for p, r in any_group["probes"].items():
        md.append(f"- **{p}**: {r.get('threat_model')}")
    md += ["", "## ROC curves (log–log; dashed: the region the accountant's (ε, δ) allows, for covered probes)", ""]
    md += [f"### {g}\n\n![ROC {g}](roc_{g}.png)\n" for g in clean]
    md += ["## Runs", "", "| cell | status | run directory |", "|---|---|---|"]
    md += [f"| {r['cell']} | {r['status']}{' — ' + r['error'] if r.get('error') else ''} | `{r['run_dir']}` |" for r in rows]
    intro = md[2]
    md[1:1] = ["", run_header(rows)]
    (out / "report.md").write_text("\n".join(md) + "\n")
    esc = html.escape
    parts = html_page("pFedPG leakage audit", "Leakage audit: pFedPG", intro, header, body, width="80em",
                      meta=run_header(rows))
    parts += [img_tag(out / "tpr_vs_epsilon.png", "TPR vs epsilon")]
    parts += [f"<h3>{esc(g)}</h3>" + img_tag(out / f"roc_{g}.png", f"ROC {g}") for g in clean]
    (out / "report.html").write_text("\n".join(parts))


def plot_tpr_vs_epsilon(path: Path, groups: dict[str, dict[str, Any]], eps_of: dict[str, float] | None = None) -> None:
    """TPR at 1% FPR (solid) and at 0.1% FPR (dashed), pooled, against ε, wherever the pooled
    negatives resolve that FPR: one panel per DP mechanism (client-level and record-level ε are not
    comparable), each with the non-private groups at its right edge; one colour per probe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evaluations.privacy import UNITS

    def points(res):
        for p, r in res["probes"].items():
            for key in ("tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr"):
                v = r.get(key, {}).get("value") if isinstance(r.get(key), dict) else None
                if isinstance(v, float):
                    yield p, key, v

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
        unit = UNITS.get(mech, "ε") if mech else "ε"
        ax.set_xlabel(f"{unit}\n(dotted line at {right:.3g}: no DP, ε = ∞)", fontsize=8)
        ax.set_title(mech or "no DP mechanism", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        if not series:
            ax.text(0.5, 0.5, "TPR at 1% and 0.1% FPR unresolved\n(pool more targets: >= 1,000 non-members)",
                    ha="center", va="center", transform=ax.transAxes, fontsize=8)
    axes[0][0].set_ylabel("TPR at 1% FPR (solid) / 0.1% FPR (dashed), pooled")
    if drawn:
        fig.legend(list(drawn.values()), list(drawn), fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def run_audit(grid, probes: dict[str, Any], base: dict[str, Any], *, out_dir=None,
              log: Callable[[str], None] = print, progress: bool = False, jobs: int = 1) -> Path:
    from evaluations.privacy import _row, cells

    out = Path(out_dir or grid.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.yaml").write_text(yaml.safe_dump({"base": base, "audit": {**grid.__dict__, "probes": probes}},
                                                   sort_keys=False))
    results = run_cells(cells(grid, with_audit_hook(base, probes)), out, log=log, progress=progress, jobs=jobs)
    rows, by_group = [], {}
    for r in results:
        row = _row(r.cell, r.run_dir, r.summary, r.error)
        row["group"] = group_key(r.cell)
        rows.append(row)
        if r.summary is not None:
            by_group.setdefault(row["group"], []).append(r.run_dir)
    groups = {g: pooled_probes(dirs) for g, dirs in by_group.items()}
    write_audit_outputs(out, rows, groups)
    failed = [r for r in rows if r["status"] == "failed"]  # errors; a diverged cell is a result
    if failed:
        (out / "FAILED").write_text("\n".join(f"{r['cell']}: {r['error']}" for r in failed) + "\n")
    return out
