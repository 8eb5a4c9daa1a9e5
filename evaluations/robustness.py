"""``pfedpg-eval robustness``: attacks × defenses × malicious fractions × seeds (DESIGN §4, §7).

Each cell is an ordinary run (``evaluations.sweep.run_cells``): an attack hook makes
round(fraction · N) clients malicious, and the defense is a ``robust_aggregation`` rule on the
per-client shared-parameter gradients (``sum`` = the plain update, no hook). The defender is
assumed to know f, the number of malicious clients. A cell whose rule cannot run at (m, f) — Krum
m ≥ 2f + 3, Bulyan m ≥ 4f + 3, trimmed mean / median m ≥ 2f + 1 — is recorded as ``infeasible``
without running. Benign accuracy is over the non-malicious clients only; the attack success rate
(backdoor) is measured on each benign client's own model. Delta-space ALIE / IPM / Min-Max act
through the attacker's own Jacobian, so only grad space reproduces the published attacks.
Outputs: ``robustness.csv``, ``robustness.md`` and ``robustness.tex`` (the same table, booktabs), ``heatmap.png``
and ``worst_case.png`` (each also ``.pdf``), ``report.md``/``.html``.
"""
from __future__ import annotations

import copy
import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from defenses.robust import AGGREGATION_RULES, min_clients
from evaluations.latex import robustness_table
from evaluations.plots import save_figure
from evaluations.plugins import load_plugins
from evaluations.report import html_page, img_tag, run_header
from evaluations.sweep import Cell, CellResult, Grid, divergence, load_grid_file, run_grid
from pfedpg import jsonio
from pfedpg.config import build_dataclass, config_from_dict
from pfedpg.errors import ConfigError

COLUMNS = ["cell", "attack", "space", "defense", "malicious_fraction", "num_malicious", "seed", "status",
           "diverged_round", "benign_accuracy_mean", "benign_accuracy_worst", "asr", "excluded_malicious_updates",
           "malicious_updates", "excluded_benign_updates", "benign_updates", "aggregation_ms",
           "new_clients_accuracy_mean", "new_clients_accuracy_worst", "error", "run_dir"]


@dataclass
class RobustnessConfig:
    seeds: list[int] = field(default_factory=lambda: [0])
    # attack hook -> its options but fraction / clients (space: delta | grad); a fraction that rounds to 0
    # clients runs without an attack (attack none)
    attacks: dict[str, dict[str, Any]] = field(default_factory=lambda: {"sign_flip": {"space": "grad"}})
    # sum (the plain update) or a robust rule -> its options (f is set from the fraction)
    defenses: dict[str, dict[str, Any]] = field(default_factory=lambda: {"sum": {}, "median": {}})
    malicious_fractions: list[float] = field(default_factory=lambda: [0.0, 0.25])  # of N, rounded; in [0, 1)
    out_dir: str = "runs/robustness"  # --out overrides it

    def __post_init__(self):
        from pfedpg.hooks import HOOKS

        load_plugins()
        for a in self.attacks:
            HOOKS.get(a)  # one-line error listing the registered hooks
            if "fraction" in self.attacks[a] or "clients" in self.attacks[a]:
                raise ConfigError(f"robustness.attacks.{a}: set malicious_fractions, not per-attack fraction/clients")
        bad = [d for d in self.defenses if d != "sum" and d not in AGGREGATION_RULES]
        if bad:
            raise ConfigError(f"robustness.defenses: unknown {bad[0]!r}; choose from sum, "
                              f"{', '.join(AGGREGATION_RULES.names())}")
        if any(not (isinstance(f, (int, float)) and 0 <= f < 1) for f in self.malicious_fractions):
            raise ConfigError(f"robustness.malicious_fractions={self.malicious_fractions!r} must lie in [0, 1)")
        if not self.seeds:
            raise ConfigError("robustness.seeds must list at least one seed")


def load_matrix(path: str | Path | None, overrides: list[str] | None = None) -> tuple[RobustnessConfig, dict[str, Any]]:
    section, cfg = load_grid_file(path, "robustness", overrides, example="configs/robustness.yaml")
    if cfg.hooks:
        raise ConfigError("the robustness matrix adds its own attack and defense hooks; leave base.hooks empty")
    return build_dataclass(RobustnessConfig, section, "robustness"), cfg.to_dict()


def _clients(base: dict[str, Any]) -> tuple[int, int]:
    """(N, m) for the base config."""
    from pfedpg.data import load_dataset, new_client_ids, partition_clients

    cfg = config_from_dict(base)
    total = len(partition_clients(load_dataset(cfg.data, seed=cfg.seed), cfg.data, seed=cfg.seed))
    n = total - len(new_client_ids(total, cfg.data, seed=cfg.seed))  # new clients never train (nor attack)
    return n, cfg.clients_per_round or n


@dataclass(kw_only=True)
class MatrixCell(Cell):
    """A run of the matrix: its attack (``none`` without malicious clients) and the space it crafts in,
    its defense (``sum``: the plain update), the malicious fraction and count, and the seed."""

    attack: str
    space: str | None
    defense: str
    malicious_fraction: float
    num_malicious: int
    seed: int


def cells(matrix: RobustnessConfig, base: dict[str, Any], n: int, m: int) -> list[MatrixCell]:
    out = []
    for seed in matrix.seeds:
        for frac in matrix.malicious_fractions:
            k = int(round(frac * n))
            attacks = matrix.attacks.items() if k > 0 else [("none", {})]
            for attack, opts in attacks:
                for defense, dopts in matrix.defenses.items():
                    hooks = []
                    if k > 0:
                        hooks.append({"name": attack, **opts, "fraction": float(frac)})
                    if defense != "sum":
                        hooks.append({"name": "robust_aggregation", "rule": defense, "f": k, **dopts})
                    c = copy.deepcopy(base)
                    c.update(seed=seed, hooks=hooks, run_name=None)
                    why = (f"{defense} with f={k} needs m >= {min_clients(defense, k)}, the run has m={m}"
                           if defense != "sum" and m < min_clients(defense, k) else None)
                    out.append(MatrixCell(name=f"{attack}-{defense}-frac{frac:g}-s{seed}", attack=attack,
                                          space=opts.get("space", "delta") if k > 0 else None, defense=defense,
                                          malicious_fraction=float(frac), num_malicious=k, seed=seed, config=c,
                                          infeasible=why))
    return out


def _row(cell: MatrixCell, run_dir: Path | None, summary, error) -> dict[str, Any]:
    row = {k: None for k in COLUMNS}
    row.update(cell=cell.name, attack=cell.attack, space=cell.space, defense=cell.defense,
               malicious_fraction=cell.malicious_fraction, num_malicious=cell.num_malicious, seed=cell.seed)
    row["run_dir"] = str(run_dir) if run_dir else None
    if cell.infeasible is not None:
        row.update(status="infeasible", error=cell.infeasible)
        return row
    div = divergence(run_dir, summary, error)
    if div is not None:  # the attack made training diverge: it succeeded (DESIGN §7)
        malicious = set((div.get("hook_state", {}).get(cell.attack) or {}).get("malicious", []))
        row.update(status="diverged", diverged_round=div["round"], error=div["error"])
        benign = [a for c, a in enumerate(div["accuracy"]) if c not in malicious]
        if benign:
            row.update(benign_accuracy_mean=float(np.mean(benign)), benign_accuracy_worst=float(np.min(benign)))
        return row
    if summary is None:
        row.update(status="failed", error=error)
        return row
    results = summary.get("hook_results") or {}
    malicious = set(results.get(cell.attack, {}).get("malicious", []))
    per_client = summary["accuracy"]["per_client"]
    benign = [a for c, a in enumerate(per_client) if c not in malicious]
    row.update(status="ok", benign_accuracy_mean=float(np.mean(benign)), benign_accuracy_worst=float(np.min(benign)))
    final = (summary.get("new_clients") or {}).get("final")
    if final:  # data.new_clients: what the (possibly poisoned) server gives a client that joins afterwards
        row.update(new_clients_accuracy_mean=final["mean"], new_clients_accuracy_worst=final["worst"])
    if "asr" in results.get(cell.attack, {}):
        row["asr"] = results[cell.attack]["asr"]
    rounds = [r for r in jsonio.read_lines(run_dir / "metrics.jsonl") if r["type"] == "round"]
    if "robust_aggregation" in results:  # updates the rule left out, of those sent (counts over all rounds)
        flat = [c for per in results["robust_aggregation"].get("excluded_per_round", {}).values() for c in per]
        sent = [c for r in rounds for c in r.get("participants", [])]
        row.update(excluded_malicious_updates=sum(c in malicious for c in flat),
                   malicious_updates=sum(c in malicious for c in sent),
                   excluded_benign_updates=sum(c not in malicious for c in flat),
                   benign_updates=sum(c not in malicious for c in sent))
    row["aggregation_ms"] = float(np.mean([r["aggregation_ms"] for r in rounds])) if rounds else None
    return row


class RobustnessMatrix(Grid):
    """The accuracy–robustness grid: seeds × malicious fractions × attacks × defenses."""

    settings_file = "matrix.yaml"
    shows_progress = False

    def __init__(self, settings: RobustnessConfig, base: dict[str, Any]):
        super().__init__(settings, base)
        self.n, self.m = _clients(base)

    def settings_record(self) -> dict[str, Any]:
        return {"base": self.base, "robustness": self.settings.__dict__}

    def cells(self) -> list[MatrixCell]:
        return cells(self.settings, self.base, self.n, self.m)

    def row(self, cell, run_dir, summary, error) -> dict[str, Any]:
        return _row(cell, run_dir, summary, error)

    def aggregate(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return aggregate(rows)

    def write_outputs(self, out: Path, rows: list[dict[str, Any]], results: list[CellResult]) -> None:
        write_outputs(out, rows)

    def line(self, cell: MatrixCell, run_dir: Path, summary: dict[str, Any]) -> str:
        """What the cell's row shows: benign clients' accuracy (not all clients'), ASR, exclusions."""
        if not summary.get("accuracy"):
            return "accuracy kept by the clients"
        row = _row(cell, run_dir, summary, None)
        exc = _excluded({k: (row[k], None) for k in row if k.endswith("_updates")})
        return (f"benign accuracy {100 * row['benign_accuracy_mean']:.2f} % "
                f"(worst {100 * row['benign_accuracy_worst']:.2f} %)"
                + (f", ASR {100 * row['asr']:.1f} %" if row["asr"] is not None else "")
                + (f", updates excluded {exc} (malicious / benign)" if exc != "—" else ""))


def run_matrix(matrix: RobustnessConfig, base: dict[str, Any], *, out_dir: str | Path | None = None,
               log: Callable[[str], None] = print, jobs: int = 1, executor=None) -> Path:
    return run_grid(RobustnessMatrix(matrix, base), out_dir=out_dir, log=log, jobs=jobs, executor=executor)


def _ms(vals):
    """(mean, sample std with n − 1); the std is None for one seed — one run has no spread."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def aggregate(rows):
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["attack"], r["space"], r["defense"], r["malicious_fraction"]), []).append(r)
    out = []
    for (attack, space, defense, frac), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        div = [r for r in rs if r["status"] == "diverged"]
        # Diverged seeds are measured too (their accuracy at the round they diverged): an attack that
        # breaks training is its most successful outcome, not a gap.
        measured = [r for r in ok + div if r["benign_accuracy_mean"] is not None]
        if div:
            rounds = sorted({r["diverged_round"] for r in div})
            status = f"diverged {len(div)}/{len(rs)} (round {', '.join(map(str, rounds))})"
        elif ok:
            status = "ok"
        else:
            status = rs[0]["status"]
        out.append({"attack": attack, "space": space, "defense": defense, "fraction": frac, "status": status,
                    "benign_mean": _ms([r["benign_accuracy_mean"] for r in measured]),
                    "benign_worst": _ms([r["benign_accuracy_worst"] for r in measured]),
                    "asr": _ms([r["asr"] for r in ok]),
                    **{k: _ms([r[k] for r in ok]) for k in ("excluded_malicious_updates", "malicious_updates",
                                                             "excluded_benign_updates", "benign_updates")},
                    "aggregation_ms": _ms([r["aggregation_ms"] for r in ok]), "seeds": len(measured),
                    "new_mean": _ms([r["new_clients_accuracy_mean"] for r in ok])})
    out.sort(key=lambda a: (a["fraction"], a["attack"], a["defense"]))
    return out


def worst_case(agg) -> list[dict]:
    """Per (fraction > 0, defense): the attack with the lowest benign mean accuracy (diverged cells
    included at their measured accuracy)."""
    out = []
    for frac in sorted({a["fraction"] for a in agg if a["fraction"] > 0}):
        for defense in sorted({a["defense"] for a in agg}):
            cands = [a for a in agg if a["fraction"] == frac and a["defense"] == defense
                     and a["attack"] != "none" and a["benign_mean"][0] is not None]
            if cands:
                w = min(cands, key=lambda a: a["benign_mean"][0])
                out.append({"fraction": frac, "defense": defense, "attack": w["attack"], "space": w["space"],
                            "benign_mean": w["benign_mean"], "benign_worst": w["benign_worst"], "status": w["status"],
                            "seeds": w["seeds"]})
    return out


def _pct(p):
    if p[0] is None:
        return "—"
    return f"{100 * p[0]:.1f}" if p[1] is None else f"{100 * p[0]:.1f} ± {100 * p[1]:.1f}"


def _count(v: float) -> str:
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}"


def _excluded(a: dict[str, Any]) -> str:
    """``3 of 20 / 1 of 60``: updates the rule left out of those sent, malicious and benign (mean
    over seeds, all rounds) — counts, not percentages; ``—`` without a robust rule."""
    if a["excluded_malicious_updates"][0] is None:
        return "—"
    return " / ".join(f"{_count(a[f'excluded_{k}_updates'][0])} of {_count(a[f'{k}_updates'][0])}"
                      for k in ("malicious", "benign"))


def write_outputs(out: Path, rows: list[dict[str, Any]]) -> None:
    with open(out / "robustness.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})
    agg = aggregate(rows)
    with_new = any(a["new_mean"][0] is not None for a in agg)  # data.new_clients
    header = ["fraction", "attack", "space", "defense", "status", "benign acc % (mean)", "benign worst %", "ASR %",
              "updates excluded, count: malicious / benign", "aggregation ms", "seeds"] \
        + (["new clients %"] if with_new else [])
    body = []
    for a in agg:
        if a["benign_mean"][0] is None:  # failed or infeasible: nothing measured
            body.append([f"{a['fraction']:g}", a["attack"], a["space"] or "—", a["defense"], a["status"],
                         "", "", "", "", "", "0"] + ([""] if with_new else []))
            continue
        exc = _excluded(a)
        body.append([f"{a['fraction']:g}", a["attack"], a["space"] or "—", a["defense"], a["status"],
                     _pct(a["benign_mean"]), _pct(a["benign_worst"]), _pct(a["asr"]), exc,
                     "—" if a["aggregation_ms"][0] is None else f"{a['aggregation_ms'][0]:.2f}", str(a["seeds"])]
                    + ([_pct(a["new_mean"])] if with_new else []))
    for w in worst_case(agg):
        body.append([f"{w['fraction']:g}", f"**worst case** ({w['attack']})", w["space"] or "—", w["defense"],
                     w["status"], _pct(w["benign_mean"]), _pct(w["benign_worst"]), "", "", "", str(w["seeds"])]
                    + ([""] if with_new else []))
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                      + ["| " + " | ".join(r) + " |" for r in body])
    (out / "robustness.md").write_text(table + "\n")
    robustness_table(out / "robustness.tex", header, body, rows)  # the same cells, booktabs, for a paper
    _plots(out, agg)
    md = ["# Robustness matrix: pFedPG", "",
          "Benign accuracy: mean over the non-malicious clients of their own test accuracy after the last round, "
          "mean ± sample std over seeds (one seed: no spread). *Updates excluded*: how many of the updates the "
          "malicious (and the benign) clients sent over all rounds the robust rule left out — counts, e.g. `3 of 20`, "
          "mean over seeds. The defender knows f. `diverged`: the attack drove "
          "training to non-finite values — it succeeded; its accuracy is as measured in that round, non-finite "
          "outputs counted wrong. `failed` is kept for errors. The worst-case rows give, per defense and fraction, "
          "the attack with the lowest benign accuracy. `infeasible`: the rule cannot run at this (m, f). "
          "Delta-space ALIE / IPM / Min-Max act through the attacker's own Jacobian; only grad space reproduces "
          "the published attacks." + (" *New clients %*: clients held out of training (data.new_clients, never "
                                       "malicious) after their join rounds from the final server state — what a "
                                       "poisoned generator costs a client that joins afterwards." if with_new else ""),
          "", table, "", "![heat map](heatmap.png)", "", "![worst case](worst_case.png)", ""]
    intro = md[2]
    md[1:1] = ["", run_header(rows)]
    (out / "report.md").write_text("\n".join(md))
    parts = html_page("pFedPG robustness", "Robustness matrix: pFedPG", intro, header, body, meta=run_header(rows))
    parts += [img_tag(out / "heatmap.png", "heat map"), img_tag(out / "worst_case.png", "worst case")]
    (out / "report.html").write_text("\n".join(parts))


def _plots(out: Path, agg) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [a for a in agg if a["benign_mean"][0] is not None]  # measured: ok or diverged
    defenses = sorted({a["defense"] for a in agg})
    attacks = sorted({a["attack"] for a in agg if a["attack"] != "none"})
    top = max((a["fraction"] for a in agg), default=0.0)
    grid = np.full((len(defenses), max(1, len(attacks))), np.nan)
    for a in ok:
        if a["fraction"] == top and a["attack"] in attacks:
            grid[defenses.index(a["defense"]), attacks.index(a["attack"])] = a["benign_mean"][0]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * max(1, len(attacks)), 1.0 + 0.5 * len(defenses)), dpi=120)
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(defenses)), defenses, fontsize=8)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, "n/a" if math.isnan(grid[i, j]) else f"{100 * grid[i, j]:.0f}", ha="center", va="center",
                    color="w", fontsize=7)
    ax.set_title(f"benign accuracy % at malicious fraction {top:g}", fontsize=9)
    ax.set_xlabel("attack", fontsize=8)
    ax.set_ylabel("defense", fontsize=8)
    bar = fig.colorbar(im, ax=ax, fraction=0.04)
    bar.set_ticks([0, 0.25, 0.5, 0.75, 1.0], labels=["0", "25", "50", "75", "100"])
    bar.set_label("benign accuracy %", fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "heatmap.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for i, d in enumerate(defenses):
        pts = {}
        for a in ok:
            if a["defense"] == d:
                v = a["benign_mean"][0]
                pts[a["fraction"]] = min(pts.get(a["fraction"], v), v)
        if pts:
            xs = sorted(pts)
            ax.plot(xs, [pts[x] for x in xs], "-o", ms=4, color=f"C{i}", label=d)
    ax.set_xlabel("malicious fraction")
    ax.set_ylabel("benign accuracy (worst case over attacks)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "worst_case.png")
    plt.close(fig)
