"""``pfedpg-eval privacy``: the accuracy–privacy trade-off sweep (DESIGN §5).

Grid: seeds × {non-private pFedPG, ``local`` (sends nothing), clip-only (client-level, z = 0)} and mechanism × privacy
level (target ε or noise multiplier). Each cell is one ordinary run directory under ``OUT/runs/``; a cell whose
``summary.json`` exists is reused, so an interrupted sweep resumes where it stopped and finished runs are never lost. A
cell that fails becomes a ``failed`` row with its error. Outputs: ``tradeoff.csv`` (one row per run), ``tradeoff.md``
(mean ± std over seeds) and ``tradeoff.tex`` (the same table, booktabs), ``accuracy_vs_epsilon.png`` (and ``.pdf``)
and ``report.md`` / ``report.html``."""
from __future__ import annotations

import copy
import csv
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from evaluations.latex import privacy_table
from evaluations.leakage_pooling import UNITS, group_key, plot_tpr_vs_epsilon, pooled_probes
from evaluations.plots import plot_tradeoff
from evaluations.report import html_page, img_tag, markdown_table, readable, run_header, write_grid_markdown
from evaluations.sweep import Cell, CellResult, Grid, divergence, load_grid_file, run_grid
from pfedpg.config import build_dataclass
from pfedpg.errors import ConfigError

MECHANISMS = {"dp_client": "client-level DP on ΔP_n", "dp_sgd": "record-level DP-SGD"}
BASELINES = ("nonprivate", "clip_only", "local")
STATEMENT_KEYS = ("privacy_unit", "adjacency", "threat_model", "mechanism", "sampling", "delta", "accountant")
COLUMNS = ["cell", "mechanism", "noise_multiplier", "target_epsilon", "epsilon_max", "epsilon_mean", "delta",
           "accuracy_mean", "accuracy_worst", "accuracy_generated_mean", "new_clients_accuracy_mean",
           "new_clients_accuracy_worst", "new_clients_epsilon_max", "seed", "status", "error", "run_dir"]


@dataclass
class PrivacySweepConfig:
    """The ``privacy:`` section of a sweep file; the ``base:`` section is an ordinary run config."""

    seeds: list[int] = field(default_factory=lambda: [0])  # every cell runs once per seed (a verdict needs 3)
    # mechanism -> its hook's options but the privacy level (dp_client: clip, adjacency, ...; dp_sgd: clip, ...)
    mechanisms: dict[str, dict[str, Any]] = field(default_factory=lambda: {"dp_client": {"clip": 0.5},
                                                                           "dp_sgd": {"clip": 1.0}})
    # the privacy levels: exactly one of target_epsilons (calibrated per cell) and noise_multipliers (z)
    target_epsilons: list[float] | None = field(default_factory=lambda: [1.0, 8.0])
    noise_multipliers: list[float] | None = None
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))  # nonprivate, clip_only, local
    out_dir: str = "runs/privacy"  # --out overrides it
    #: leakage_audit options (attacks.leakage): every private / non-private pFedPG cell then runs the
    #: probes at its end, and the table gains their AUC and TPR at 0.1% FPR; null = no probes.
    audit: dict[str, Any] | None = None

    def __post_init__(self):
        # Each message starts with the field's name: build_dataclass prefixes the section (privacy., audit.).
        if not self.seeds:
            raise ConfigError("seeds must list at least one seed, e.g. seeds: [0, 1, 2]")
        unknown = [m for m in self.mechanisms if m not in MECHANISMS]
        if unknown:
            raise ConfigError(f"mechanisms: unknown mechanism {unknown[0]!r}; choose from {', '.join(MECHANISMS)}")
        for m, opts in self.mechanisms.items():
            if "noise_multiplier" in opts or "target_epsilon" in opts:
                raise ConfigError(f"mechanisms.{m}: set the privacy level in target_epsilons or noise_multipliers, "
                                  "not per mechanism")
        if self.target_epsilons is None and self.noise_multipliers is None:
            raise ConfigError("target_epsilons and noise_multipliers are both null: set exactly one of them, the "
                              "privacy levels of the mechanisms, e.g. target_epsilons: [1.0, 8.0] (the default where "
                              "neither is given)")
        if self.target_epsilons is not None and self.noise_multipliers is not None:
            raise ConfigError("target_epsilons and noise_multipliers are both set: set exactly one of them "
                              "(the other to null)")
        key, levels = (("target_epsilons", self.target_epsilons) if self.target_epsilons is not None
                       else ("noise_multipliers", self.noise_multipliers))
        if not levels:
            raise ConfigError(f"{key} is empty: list at least one privacy level, e.g. {key}: "
                              f"{'[1.0, 8.0]' if key == 'target_epsilons' else '[0.5, 1.0]'}")
        if any(not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)) for v in levels):
            raise ConfigError(f"{key}={levels!r}: every privacy level must be a finite number > 0")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise ConfigError(f"baselines: unknown {bad[0]!r}; choose from {', '.join(BASELINES)}")
        if self.audit is not None and not isinstance(self.audit, dict):
            raise ConfigError("audit must be a mapping of leakage_audit options (or null)")
        if "clip_only" in self.baselines and "dp_client" not in self.mechanisms:
            raise ConfigError("baselines: clip_only needs a dp_client mechanism (for its clip C)")


def load_sweep(path: str | Path | None,
               overrides: list[str] | None = None) -> tuple[PrivacySweepConfig, dict[str, Any]]:
    """-> (sweep settings, base run config as a dict with --set overrides applied and validated)."""
    section, cfg = load_grid_file(path, "privacy", overrides, example="configs/privacy.yaml")
    dp = [s.name for s in cfg.hook_specs if s.name in MECHANISMS]
    if dp:
        raise ConfigError(f"base.hooks lists {dp[0]}; the privacy sweep adds the DP hooks itself — remove it from base")
    if cfg.method != "pfedpg":
        raise ConfigError(f"the privacy sweep evaluates pfedpg (base.method is {cfg.method!r}); set it to pfedpg")
    return build_dataclass(PrivacySweepConfig, section, "privacy"), cfg.to_dict()


@dataclass(kw_only=True)
class PrivacyCell(Cell):
    """A run of the privacy sweep: its mechanism (or baseline), seed and privacy level."""

    mechanism: str
    seed: int
    target_epsilon: float | None = None
    noise_multiplier: float | None = None


def cells(sweep: PrivacySweepConfig, base: dict[str, Any]) -> list[PrivacyCell]:
    """Every run of the grid."""
    out = []
    by_eps = sweep.target_epsilons is not None
    levels = sweep.target_epsilons if by_eps else sweep.noise_multipliers
    for seed in sweep.seeds:
        def cfg_with(hooks=None, method="pfedpg"):
            c = copy.deepcopy(base)
            # Other base hooks (e.g. reject_nonfinite) stay, before the cell's DP hook.
            audit = [{"name": "leakage_audit", **sweep.audit}] if sweep.audit is not None and method != "local" else []
            c.update(seed=seed, method=method, hooks=[*base["hooks"], *audit, *(hooks or [])], run_name=None)
            return c

        if "nonprivate" in sweep.baselines:
            out.append(PrivacyCell(name=f"nonprivate-s{seed}", mechanism="nonprivate", seed=seed, config=cfg_with()))
        if "local" in sweep.baselines:
            out.append(PrivacyCell(name=f"local-s{seed}", mechanism="local", seed=seed,
                                   config=cfg_with(method="local")))
        if "clip_only" in sweep.baselines:
            opts = {"name": "dp_client", **sweep.mechanisms["dp_client"], "noise_multiplier": 0.0}
            out.append(PrivacyCell(name=f"clip_only-s{seed}", mechanism="clip_only", seed=seed, noise_multiplier=0.0,
                                   config=cfg_with([opts])))
        for mech, opts in sweep.mechanisms.items():
            for level in levels:
                key = "target_epsilon" if by_eps else "noise_multiplier"
                hook = {"name": mech, **opts, key: float(level)}
                out.append(PrivacyCell(name=f"{mech}-{'eps' if by_eps else 'z'}{level:g}-s{seed}", mechanism=mech,
                                       seed=seed, **{key: float(level)}, config=cfg_with([hook])))
    return out


def _row(cell: PrivacyCell, run_dir: Path, summary: dict[str, Any] | None, error: str | None) -> dict[str, Any]:
    row = {k: None for k in COLUMNS}
    row.update(cell=cell.name, mechanism=cell.mechanism, seed=cell.seed, run_dir=str(run_dir),
               target_epsilon=cell.target_epsilon, noise_multiplier=cell.noise_multiplier)
    div = divergence(run_dir, summary, error)
    if div is not None:  # training diverged under this mechanism: a result, measured in that round
        accs = div["accuracy"]
        row.update(status="diverged", error=div["error"],
                   accuracy_mean=float(np.mean(accs)) if accs else None, accuracy_worst=min(accs) if accs else None)
        return row
    if summary is None:
        row.update(status="failed", error=error)
        return row
    if summary.get("accuracy") is None:  # a deployment whose clients kept their accuracies (DESIGN §5)
        row.update(status="withheld", error=summary.get("client_metrics"))
        return row
    row.update(status="ok", accuracy_mean=summary["accuracy"]["mean"], accuracy_worst=summary["accuracy"]["worst"],
               accuracy_generated_mean=(summary.get("accuracy_generated") or {}).get("mean"))
    final = (summary.get("new_clients") or {}).get("final")
    if final:  # data.new_clients: what this mechanism's server (or none, for local) gives a newcomer
        row.update(new_clients_accuracy_mean=final["mean"], new_clients_accuracy_worst=final["worst"])
    results = summary.get("hook_results") or {}
    hook = results.get("dp_client" if cell.mechanism == "clip_only" else cell.mechanism)
    for probe, head in ((results.get("leakage_audit") or {}).get("probes") or {}).items():
        if "auc" in head:
            row[f"{probe}_auc"] = head["auc"]
            row[f"{probe}_tpr_at_0.1pct_fpr"] = head["tpr_at_0.1pct_fpr"]
        for side, v in head.items():  # the canary probe: one entry per view
            if isinstance(v, dict) and "epsilon_lb" in v:
                row[f"{probe}_{side}_auc"] = v["auc"]
                row[f"{probe}_{side}_epsilon_lb"] = v["epsilon_lb"]
                row[f"{probe}_{side}_epsilon_cap"] = v.get("epsilon_cap")
    if hook is not None:
        zs = hook["noise_multiplier"]  # one z per client (PrivacyResult): the z, or their mean when they differ
        row.update(noise_multiplier=zs[0] if len(set(zs)) == 1 else float(np.mean(zs)), delta=hook["delta"],
                   epsilon_max=hook["epsilon_max"], epsilon_mean=hook["epsilon_mean"], _unit=hook["unit"],
                   _statement={k: hook[k] for k in STATEMENT_KEYS})
        if hook.get("new_clients"):  # (the hook's epsilon_max is already over every client, these included)
            row["new_clients_epsilon_max"] = hook["new_clients"]["epsilon_max"]
    elif cell.mechanism == "nonprivate":
        row.update(epsilon_max=math.inf, epsilon_mean=math.inf)
    return row


class PrivacySweep(Grid):
    """The accuracy–privacy grid: seeds × (baselines + mechanisms × ε or z)."""

    settings_file = "sweep.yaml"

    def settings_record(self) -> dict[str, Any]:
        return {"base": self.base, "privacy": self.settings.__dict__}

    def cells(self) -> list[PrivacyCell]:
        return cells(self.settings, self.base)

    def row(self, cell, run_dir, summary, error) -> dict[str, Any]:
        return _row(cell, run_dir, summary, error)

    def aggregate(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return aggregate(rows)

    def write_outputs(self, out: Path, rows: list[dict[str, Any]], results: list[CellResult]) -> None:
        if self.settings.audit is not None:
            by_group: dict[str, list[Path]] = {}
            for r in results:
                if r.summary is not None and (r.run_dir / "audit" / "audit.json").is_file():
                    by_group.setdefault(group_key(r.cell), []).append(r.run_dir)
            groups = {g: pooled_probes(d) for g, d in by_group.items()}
            plot_tpr_vs_epsilon(out / "tpr_vs_epsilon.png", groups)
        write_outputs(out, rows, self.settings)


def run_sweep(sweep: PrivacySweepConfig, base: dict[str, Any], *, out_dir: str | Path | None = None,
              log: Callable[[str], None] = print, progress: bool = False, jobs: int = 1, executor=None) -> Path:
    return run_grid(PrivacySweep(sweep, base), out_dir=out_dir, log=log, progress=progress, jobs=jobs,
                    executor=executor)


# ------------------------------------------------------------------------------------------------
# Aggregation, plot, reports


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    extra = sorted({k for r in rows for k in r if k not in COLUMNS and k != "group" and not k.startswith("_")})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + extra)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in COLUMNS + extra})


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds per (mechanism, level)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r["status"] not in ("ok", "diverged") or r["accuracy_mean"] is None:
            continue
        key = (r["mechanism"], r["target_epsilon"], r["noise_multiplier"] if r["target_epsilon"] is None else None)
        groups.setdefault(key, []).append(r)

    def ms(vals):
        # (mean, sample std with n − 1; None for one seed: one run has no spread)
        vals = [v for v in vals if v is not None]
        if not vals:
            return None, None
        if any(math.isinf(v) for v in vals):
            return math.inf, None
        return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)

    out = []
    for (mech, eps, z), rs in groups.items():
        unit = next((r["_unit"] for r in rs if "_unit" in r), None)  # the PrivacyResult's, not read off the name
        out.append({"mechanism": mech, "target_epsilon": eps, "unit": unit,
                    "noise_multiplier": ms([r["noise_multiplier"] for r in rs])[0],
                    "epsilon_max": ms([r["epsilon_max"] for r in rs]),
                    "accuracy_mean": ms([r["accuracy_mean"] for r in rs]),
                    "accuracy_worst": ms([r["accuracy_worst"] for r in rs]),
                    "accuracy_generated_mean": ms([r["accuracy_generated_mean"] for r in rs]), "seeds": len(rs),
                    "accuracy_by_seed": {r["seed"]: r["accuracy_mean"] for r in rs},
                    "new_clients_accuracy": ms([r.get("new_clients_accuracy_mean") for r in rs]),
                    "new_clients_by_seed": {r["seed"]: r["new_clients_accuracy_mean"] for r in rs
                                            if r.get("new_clients_accuracy_mean") is not None}})
    order = {m: i for i, m in enumerate(["local", "nonprivate", "clip_only", *MECHANISMS])}
    out.sort(key=lambda a: (order.get(a["mechanism"], 99),
                            -(a["epsilon_max"][0] or 0) if a["epsilon_max"][0] is not None else 0))
    return out


def _fmt(pair, pct=True) -> str:
    m, s = pair
    if m is None:
        return "—"
    if math.isinf(m):
        return "∞"
    k = 100 if pct else 1
    d = 1 if pct else 2
    return f"{k * m:.{d}f}" if s is None else f"{k * m:.{d}f} ± {k * s:.{d}f}"


def table_rows(agg: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    from evaluations.stats import fmt_paired, paired, verdict

    local = next((a["accuracy_by_seed"] for a in agg if a["mechanism"] == "local"), None)
    local_new = next((a["new_clients_by_seed"] for a in agg if a["mechanism"] == "local"), None)
    with_new = any(a["new_clients_by_seed"] for a in agg)
    header = ["mechanism", "privacy unit", "target ε", "z", "ε (max client)", "accuracy % (mean)", "worst client %",
              "generated P_n %", "seeds", "− local (points, paired; 95% CI)", "vs local"]
    if with_new:  # data.new_clients: the newcomers' accuracy after the last join round
        header += ["new clients %", "new clients − local (paired)"]
    body = []
    for a in agg:
        eps = "0 (sends nothing)" if a["mechanism"] == "local" else _fmt(a["epsilon_max"], pct=False)
        diff = paired(a["accuracy_by_seed"], local) if local is not None and a["mechanism"] != "local" else None
        body.append([a["mechanism"], a["unit"] or "—",
                     "—" if a["target_epsilon"] is None else f"{a['target_epsilon']:g}",
                     "—" if a["noise_multiplier"] is None else f"{a['noise_multiplier']:.3g}", eps,
                     _fmt(a["accuracy_mean"]), _fmt(a["accuracy_worst"]), _fmt(a["accuracy_generated_mean"]),
                     str(a["seeds"]), fmt_paired(diff) if diff else "", verdict(diff)])
        if with_new:
            nd = paired(a["new_clients_by_seed"], local_new) if local_new and a["mechanism"] != "local" else None
            body[-1] += [_fmt(a["new_clients_accuracy"]), fmt_paired(nd) if nd else ""]
    return header, body


def privacy_statements(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each mechanism's statement, as its first finished run's PrivacyResult gave it (read with the row)."""
    out = {}
    for r in rows:
        if r["status"] == "ok" and r["mechanism"] in MECHANISMS and r["mechanism"] not in out and "_statement" in r:
            out[r["mechanism"]] = r["_statement"]
    return out


def write_outputs(out: Path, rows: list[dict[str, Any]], sweep: PrivacySweepConfig) -> None:
    write_csv(out / "tradeoff.csv", rows)
    agg = aggregate(rows)
    header, body = table_rows(agg)
    table = markdown_table(header, body)
    (out / "tradeoff.md").write_text(table + "\n")
    privacy_table(out / "tradeoff.tex", header, body, rows)  # the same cells, booktabs, for a paper
    plot_tradeoff(out / "accuracy_vs_epsilon.png", agg, MECHANISMS, UNITS)
    statements = privacy_statements(rows)
    md = ["# Privacy trade-off: pFedPG", "",
          "Accuracy is per client on its own test split after the last round (adapted prompt and local head), "
          "mean ± sample std over seeds (a single seed has no spread). ε is per client; the table gives the largest. "
          "`local` sends nothing and is the floor a private run must beat. Each row's difference from `local` is "
          "paired by seed, with a 95% t-interval: *dominated* only when the whole interval is below zero, "
          "*above local* when it is above, otherwise *level with local*. A run that diverged counts with the "
          "accuracy measured in the round it diverged (non-finite outputs wrong); the Runs table names it."
          + (" *New clients* (data.new_clients): clients held out of training that join after the last round; their "
             "accuracy after the last join round, the same budget in every row (`local`: they train alone from the "
             "VPT init), with ε over every client, the new ones' join rounds included."
             if any(r.get("new_clients_accuracy_mean") is not None for r in rows) else ""),
          "", table, "", "![accuracy vs epsilon](accuracy_vs_epsilon.png)", ""]
    if sweep.audit is not None:
        md += ["Leakage probes (`leakage_audit`, pooled over seeds; per-run AUC and TPR at 0.1% FPR are columns of "
               "`tradeoff.csv`; `pfedpg-eval audit` gives the full report):", "",
               "![TPR at 0.1% FPR vs epsilon](tpr_vs_epsilon.png)" if (out / "tpr_vs_epsilon.png").is_file() else
               "No TPR at 1% or 0.1% FPR resolved in any group (too few non-members pooled), so there is no TPR-vs-ε "
               "plot; `pfedpg-eval audit` reports what each pool holds.", ""]
    md += ["## Privacy statements", ""]
    for mech, st in statements.items():
        md += ([f"### {MECHANISMS[mech]} (`{mech}`)", ""]
               + [f"- **{k.replace('_', ' ')}**: {readable(v)}" for k, v in st.items()] + [""])
    if "dp_client" in statements:
        md += ["Client-level DP protects what leaves the client (ΔP_n and all server state derived from it), "
               "not the client's own adapted prompt or head: probes on those get no ε under `dp_client`.", ""]
    intro = write_grid_markdown(out / "report.md", md, rows)
    # HTML: the same content, self-contained apart from the PNG beside it.
    esc = html.escape
    parts = html_page("pFedPG privacy trade-off", "Privacy trade-off: pFedPG", intro, header, body, width="70em",
                      extra_css=";text-align:right}td:first-child{text-align:left", meta=run_header(rows))
    parts += [img_tag(out / "accuracy_vs_epsilon.png", "accuracy vs epsilon"), "<h2>Privacy statements</h2>"]
    for mech, st in statements.items():
        parts.append(f"<h3>{esc(MECHANISMS[mech])}</h3><ul>"
                     + "".join(f"<li><b>{esc(k.replace('_', ' '))}</b>: {esc(readable(v))}</li>"
                               for k, v in st.items()) + "</ul>")
    parts.append("<h2>Runs</h2><table><tr><th>cell</th><th>status</th><th>run directory</th></tr>"
                 + "".join(f"<tr><td>{esc(r['cell'])}</td>"
                           f"<td>{esc(r['status'] + (' — ' + r['error'] if r['error'] else ''))}</td>"
                           f"<td>{esc(r['run_dir'])}</td></tr>" for r in rows) + "</table>")
    (out / "report.html").write_text("\n".join(parts))
