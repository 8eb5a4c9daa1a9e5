"""``pfedpg-eval audit``: the leakage audit over a privacy grid (DESIGN §6).

An audit file has the privacy sweep's shape — ``base_config``, ``base`` and an ``audit:`` section
with ``seeds``, ``mechanisms``, ``target_epsilons`` / ``noise_multipliers``, ``baselines``
(``nonprivate``, ``clip_only``) and ``out_dir`` — plus ``audit.probes``, the options of the
``leakage_audit`` hook (``attacks.leakage``), which every cell runs at its end. Each cell is an
ordinary run directory (with ``audit/audit.json``); the audit pools each probe's scores over seeds
(and clients) per (mechanism, privacy level) — pooling is how low FPRs become resolvable — and
writes ``audit.json``, ``audit.tex`` (the report's table, booktabs), ``roc_<group>.png``, ``tpr_vs_epsilon.png``
(each also ``.pdf``) and ``report.md`` / ``.html``.
"""
from __future__ import annotations

import copy
import html
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from evaluations.latex import audit_table
from evaluations.leakage_pooling import auc_reading, group_key, plot_tpr_vs_epsilon, pooled_probes, unresolved_tprs
from evaluations.plugins import load_plugins
from evaluations.privacy import MECHANISMS, PrivacyCell, PrivacySweep, PrivacySweepConfig, cells
from evaluations.report import html_page, img_tag, run_header, write_grid_markdown
from evaluations.sweep import load_grid_file, run_grid
from pfedpg import jsonio
from pfedpg.config import build_dataclass
from pfedpg.errors import ConfigError
from pfedpg.hooks import HOOKS

AUDIT_BASELINES = ("nonprivate", "clip_only")


def load_audit(path, overrides=None):
    """-> (PrivacySweepConfig of the grid, leakage_audit options, base run config dict)."""
    section, cfg = load_grid_file(path, "audit", overrides, example="configs/audit_digits_shared.yaml")
    section = dict(section)
    probes = section.pop("probes", None) or {}
    client_canaries = section.pop("client_canaries", None)
    if client_canaries is not None and not isinstance(client_canaries, dict):
        raise ConfigError("audit.client_canaries must be a mapping of client_canary_audit options, e.g. {clients: 500}")
    gradient_canaries = section.pop("gradient_canaries", None)
    if gradient_canaries is not None and not isinstance(gradient_canaries, dict):
        raise ConfigError("audit.gradient_canaries must be a mapping of gradient_canary_audit options, "
                          "e.g. {canaries: 1000}")
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
    if any(s.name in (*MECHANISMS, "leakage_audit") for s in cfg.hook_specs):
        raise ConfigError("base.hooks lists a DP or leakage_audit hook; the audit adds them itself — "
                          "remove it from base")
    if cfg.method != "pfedpg":
        raise ConfigError(f"the audit evaluates pfedpg (base.method is {cfg.method!r}); set it to pfedpg")
    if cfg.engine != "inprocess":
        raise ConfigError("the audit's probes run in one process (engine: inprocess); "
                          "drop --engine flower / engine: flower")
    # Validate the probe options now, not in the first cell.
    from attacks.leakage import LeakageAudit

    try:
        LeakageAudit(**probes)
    except TypeError as e:
        raise ConfigError(f"audit.probes: {e}") from None
    for key, options, hook in (("client_canaries", client_canaries, "client_canary_audit"),
                               ("gradient_canaries", gradient_canaries, "gradient_canary_audit")):
        if options is not None:
            from pfedpg.hooks import build_hooks

            try:
                build_hooks([{"name": hook, **options}])
            except ConfigError as e:  # "hooks[0] (name): unknown option ..." -> "audit.key: unknown option ..."
                raise ConfigError(f"audit.{key}: {str(e).split('): ', 1)[-1]}") from None
            if options.get("out", "audit") != "audit":
                raise ConfigError(f"audit.{key}.out: the audit pools RUN_DIR/audit over seeds; leave out unset")
            probes = {**probes, f"_{key}": options}
    if gradient_canaries is not None and not any(record_level(m) for m in grid.mechanisms):
        raise ConfigError("audit.gradient_canaries audit DP-SGD: add dp_sgd to audit.mechanisms, or drop them")
    if client_canaries is not None and not ([m for m in grid.mechanisms if not record_level(m)] or grid.baselines):
        raise ConfigError("audit.client_canaries join the cells without DP-SGD, and this grid has none: add dp_client "
                          "to audit.mechanisms or a baseline (nonprivate), or drop them")
    return grid, probes, cfg.to_dict()


def record_level(mechanism: str) -> bool:
    """Whether a grid mechanism is a record-level DP hook: its declared privacy unit, not its name."""
    load_plugins()
    cls = HOOKS.get(mechanism) if mechanism in HOOKS else None
    return cls is not None and cls.privacy_mechanism and cls.unit == "record"


#: which cells each one-run audit joins: client canaries test a client-level claim (and read as large
#: without one), gradient canaries go into a record-level mechanism's own steps (DP-SGD)
CANARY_HOOKS = {"_client_canaries": ("client_canary_audit", lambda mech: not record_level(mech)),
                "_gradient_canaries": ("gradient_canary_audit", record_level)}


def with_audit_hook(base: dict[str, Any], probes: dict[str, Any]) -> dict[str, Any]:
    """The base with the audit's hooks; they come before each cell's DP hook (appended later), so
    canaries go through the mechanism."""
    b = copy.deepcopy(base)
    probes = dict(probes)
    extra = [{"name": hook, **probes.pop(key)} for key, (hook, _) in CANARY_HOOKS.items() if key in probes]
    b["hooks"] = [*b["hooks"], {"name": "leakage_audit", **probes}, *extra]
    return b


def cell_hooks(cell: PrivacyCell) -> PrivacyCell:
    """The cell with only the one-run audits that apply to its mechanism."""
    drop = {hook for hook, applies in CANARY_HOOKS.values() if not applies(cell.mechanism)}
    cell.config["hooks"] = [h for h in cell.config["hooks"] if h["name"] not in drop]
    return cell


def _eps(v) -> str:
    return "∞" if v is not None and math.isinf(v) else ("—" if v is None else f"{v:.2f}")


def bound_reading(r: dict[str, Any]) -> str:
    """``ε_lb 7.21 (cap 27.3) vs claim 7.94: can fail, no violation`` of one one-run audit's headline."""
    out = f"ε_lb {_eps(r['epsilon_lb'])} (cap {_eps(r['epsilon_cap'])})"
    if r.get("claimed_epsilon") is None:
        return out + ", no claim"
    verdict = f"**VIOLATION** (p = {r['claim_p_value']:.2g} at the claim)" if r["violation"] else "no violation"
    can = "can fail, " if r["can_fail"] else "cannot fail, "
    return out + f" vs claim {_eps(r['claimed_epsilon'])} at δ {r['delta']:.2g}: " + can + verdict


def client_canary_cell(r: dict[str, Any]) -> str:
    """The report's cell for the client-level one-run audit: each view's order-statistics bound (its
    family), Steinke et al.'s beside it, Andrew et al.'s estimate, the canaries and the accountant."""
    parts = []
    for view in ("releases", "final_state"):
        if view in r:
            v = r[view]
            est = v["estimate"]
            steinke = _eps(v["bounds"]["steinke"]["epsilon_lb"])
            hat = est.get("epsilon_hat")
            above = hat is not None and hat > est["epsilon_cap"]
            beyond = f", above its cap {_eps(est['epsilon_cap'])}" if above else ""
            parts.append(f"{view.replace('_', ' ')}: {bound_reading(v)} [Steinke {steinke}; "
                         f"estimate ε̂ {_eps(hat)}{beyond}]")
    return "; ".join(parts) + (f"; {r['canary_clients']} canary clients ({r['inserted']} inserted), {r['family']}, "
                               f"accountant {_eps(r.get('accountant_epsilon'))}")


ONE_RUN_TEXT = [
    "## One-run audits: what each bound can and cannot show", "",
    "Canaries are inserted with probability ½ each in one run; a bound rejects every mechanism of its family "
    "under which guesses as good as the auditor's had probability < 5 %, and reports the ε of the least private "
    "one rejected (`ε_lb`). `can fail` means the cap lies above the claim, so a broken mechanism could have "
    "shown; `VIOLATION` means ε_lb lies above the claim — at an exactly tight claim a correct mechanism shows "
    "one in 5 % of runs (the bound's level), so read a violation with its p-value in audit.json and rerun "
    "with another seed.",
    "",
    "- **Order statistics (Xiang et al. 2025)**, the headline: every guess released, its mistakes read against the "
    "family's Bayes error. It reaches the claim when the canaries play the idealised game (the client canaries' "
    "releases, the gradient canaries); it says nothing about mechanisms outside its family.",
    "- **f-DP recursion (Mahloujifar et al. 2025)**: one-sided guesses over every threshold with a Bonferroni "
    "correction, the same family. Valid for any threshold choice; looser than the order statistics at these sizes.",
    "- **(ε, δ) family**: the order-statistics bound assuming nothing but (ε, δ)-DP at the run's δ. It cannot be "
    "wrong about the family, and it cannot reach a large ε (its cap is about ln(n) for n canaries).",
    "- **Model-based (Gaussian scores)**: a lower bound on μ if both canary groups' scores are Gaussian with one "
    "spread — exact for the client canaries' releases under a correct mechanism, unchecked elsewhere; no cap.",
    "- **Steinke et al. 2023**: the earlier one-run bound, kept for comparison; its cap, ln(n / ln(1/α)), lies "
    "below a claim of ε = 8 at any practical n, so it cannot contradict one.",
    "- **Estimate (Andrew et al. 2024)**: Gaussians fitted to the inserted canaries' cosines and to never-inserted "
    "directions'; an estimate with a bootstrap interval (audit.json), not a bound; above its cap it rests on the "
    "fitted tails, not on anything the canaries were seen to do.",
    "",
    "Claims, each at the run's δ: client canaries test the exact μ-GDP ε of a canary's releases (μ = sensitivity / C "
    "· √R / z), gradient canaries the tight ε of the client's T subsampled Gaussian steps (a privacy loss "
    "distribution); ε_lb is read on the same scale. The accountant's ε (RDP or PRV) is looser and stands beside "
    "them; the record canaries, far from the idealised game, test the accountant's (ε, δ) itself. An outcome's "
    "p-value under the claim near 1 (audit.json `claim_p_value`) says the score is far from the optimal test, "
    "not that the mechanism is more private than claimed.",
]


def gradient_canary_cell(r: dict[str, Any]) -> str:
    """The report's cell for the gradient canaries (DP-SGD): the bound in the mechanism's own family."""
    g = r["game"]
    b = r["bounds"]
    return (f"{bound_reading(r)} [Steinke {_eps(b['steinke']['epsilon_lb'])}; f-DP recursion "
            f"{_eps(b['fdp_recursion']['epsilon_lb'])}]; {r['canaries']} canaries ({r['included']} inserted) "
            f"in client {g['client']}, q {g['sample_rate']:.3g}, {g['steps']} steps, σ {g['noise_multiplier']:.3g}, "
            f"accountant {_eps(r.get('accountant_epsilon'))}")


def group_line(group: str, res: dict[str, Any]) -> str:
    """The console's line for one group: the probes' AUC with its interval (and an attribute probe's
    permutation p-value against its null's mean AUC), then each one-run audit's headline."""
    probes = res["probes"]
    cells = ", ".join(f"{p} {auc_reading(r)}" for p, r in probes.items() if "auc" in r)
    parts = [f"AUC {cells}"] if cells else []
    if "client_canary" in probes:
        parts.append(f"client canaries: {client_canary_cell(probes['client_canary'])}")
    if "gradient_canary" in probes:
        parts.append(f"gradient canaries: {gradient_canary_cell(probes['gradient_canary'])}")
    return f"{group}: " + "; ".join(parts)


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

    clean, roc = {}, []  # roc: the groups with probe scores to draw (a file of one-run audits alone has none)
    for g, res in groups.items():
        pools = res.pop("_pools")
        curves = {k: (np.concatenate([p[0] for p in v]), np.concatenate([p[1] for p in v]).astype(bool))
                  for k, v in pools.items()}
        if curves:
            plot_audit_roc(out / f"roc_{g}.png", curves, dp_envelope=res["dp"], title=f"{g} (pooled over seeds)")
            roc.append(g)
        clean[g] = res
    cells = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]  # "_": read by the reports only
    (out / "audit.json").write_text(jsonio.dumps({"cells": cells, "groups": clean}, indent=2))
    probes = sorted({p for g in clean.values() for p in g["probes"]})
    tpr_plot = bool(roc) and plot_tpr_vs_epsilon(out / "tpr_vs_epsilon.png", clean)
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
            elif p == "gradient_canary":
                cells.append(gradient_canary_cell(r))
            elif p.startswith("canary_"):
                steinke = _eps(r["bounds"]["steinke"]["epsilon_lb"])
                cells.append(f"AUC {auc_reading(r)}; {bound_reading(r)} [Steinke {steinke}]")
            elif "auc" not in r:  # a probe that broke down in every run
                cells.append(str(r.get("status", "—")))
            else:
                cells.append(f"AUC {auc_reading(r)}; TPR@1% {_tpr(r['tpr_at_1pct_fpr'])}; "
                             f"TPR@0.1% {_tpr(r['tpr_at_0.1pct_fpr'])}; {r['n_targets'] - r['n_positives']} neg.")
        body.append(cells)
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(c) + " |" for c in body]
    audit_table(out / "audit.tex", header, body, rows)  # the same cells, booktabs, for a paper
    md = ["# Leakage audit: pFedPG", "",
          "Each probe's scores are pooled over seeds and target clients per group. AUC 0.5 = chance; each AUC has "
          "its 95% bootstrap interval in brackets (over seeds when pooled, over records within one run), and an "
          "attribute probe its permutation test: `null` is the mean AUC with the property shuffled across clients "
          "(grouped cross-validation over few clients reads below 0.5 under no signal: compare with the null, not "
          "with 0.5) and `p` the p-value against it (one per seed). TPR at a "
          "given FPR (with its 95% bootstrap interval that refits the threshold: over seeds when pooled, over records "
          "within one run; `interval_method` in audit.json) is `unresolved` when fewer than 10 / FPR negatives were "
          "pooled (1,000 for 1%, 10,000 for 0.1%) or tied scores leave no threshold near that FPR; `neg.` = the "
          "negatives (non-members) pooled. The one-run audits (canary rows, `client_canary`, `gradient_canary`) give "
          "a 95% lower bound ε_lb on the mechanism's ε, its cap (the bound with every guess right) and the claim it "
          "tests; they are explained below the table.", "", *table, "", *ONE_RUN_TEXT, "",
          *(["![TPR at 1% and 0.1% FPR vs ε](tpr_vs_epsilon.png)", ""] if tpr_plot else []),
          *[f"{line}\n" for line in unresolved_tprs(clean)], "## Threat models", ""]
    threats = {p: r.get("threat_model") for g in clean.values() for p, r in g["probes"].items()}
    md += [f"- **{p}**: {t}" for p, t in threats.items()]
    if roc:
        md += ["", "## ROC curves (log–log; dashed: the region the accountant's (ε, δ) allows, for covered probes)", ""]
        md += [f"### {g}\n\n![ROC {g}](roc_{g}.png)\n" for g in roc]
    intro = write_grid_markdown(out / "report.md", md, rows)
    esc = html.escape
    parts = html_page("pFedPG leakage audit", "Leakage audit: pFedPG", intro, header, body, width="80em",
                      meta=run_header(rows))
    parts += [f"<p>{esc(line)}</p>" for line in unresolved_tprs(clean)]
    if tpr_plot:
        parts += [img_tag(out / "tpr_vs_epsilon.png", "TPR vs epsilon")]
    parts += [f"<h3>{esc(g)}</h3>" + img_tag(out / f"roc_{g}.png", f"ROC {g}") for g in roc]
    (out / "report.html").write_text("\n".join(parts))


def run_audit(grid, probes: dict[str, Any], base: dict[str, Any], *, out_dir=None,
              log: Callable[[str], None] = print, progress: bool = False, jobs: int = 1, executor=None) -> Path:
    return run_grid(AuditGrid(grid, base, probes), out_dir=out_dir, log=log, progress=progress, jobs=jobs,
                    executor=executor)


class AuditGrid(PrivacySweep):
    """The audit's grid: the privacy sweep's cells, each run with the leakage audit hook, its probes
    pooled per group of seeds."""

    settings_file = "audit.yaml"

    def __init__(self, settings, base: dict[str, Any], probes: dict[str, Any]):
        super().__init__(settings, base)
        self.probes = probes

    def settings_record(self) -> dict[str, Any]:
        return {"base": self.base, "audit": {**self.settings.__dict__, "probes": self.probes}}

    def cells(self) -> list[PrivacyCell]:
        return [cell_hooks(c) for c in cells(self.settings, with_audit_hook(self.base, self.probes))]

    def row(self, cell, run_dir, summary, error) -> dict[str, Any]:
        return {**super().row(cell, run_dir, summary, error), "group": group_key(cell)}

    def write_outputs(self, out: Path, rows: list[dict[str, Any]], results) -> None:
        by_group: dict[str, list[Path]] = {}
        for row, r in zip(rows, results):
            if r.summary is not None:
                by_group.setdefault(row["group"], []).append(r.run_dir)
        groups = {g: pooled_probes(dirs) for g, dirs in by_group.items()}
        write_audit_outputs(out, rows, groups)
