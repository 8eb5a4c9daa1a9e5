"""The grids' typed results (`evaluations.api`): the privacy sweep's table
(`SweepResult`), the leakage audit's groups (`AuditResult`) and the robustness
matrix's rows (`MatrixResult`), built from the rows and ``audit.json`` the CLI prints from.
Accuracies are fractions in [0, 1]; see `evaluations.results` for the shared pieces."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluations.results import CellOutcome, Spread, cells_of


@dataclass(frozen=True)
class PairedDifference:
    """A row's accuracy minus ``local``'s, paired by seed, with its 95% t-interval.

    Attributes:
        mean: The mean difference (a fraction: 0.05 is 5 points).
        sd: The differences' sample standard deviation (None for one seed).
        interval: The 95% t-interval (None for one seed).
        seeds: The seeds both rows have.
    """

    mean: float
    sd: float | None
    interval: tuple[float, float] | None
    seeds: tuple[int, ...]

    @classmethod
    def of(cls, p: dict[str, Any] | None) -> PairedDifference | None:
        """From `evaluations.stats.paired`'s dict."""
        if p is None:
            return None
        return cls(mean=p["mean"], sd=p["std"], interval=tuple(p["ci"]) if p["ci"] else None, seeds=tuple(p["seeds"]))


@dataclass(frozen=True)
class SweepRow:
    """One row of the privacy sweep's table: a mechanism at one privacy level, over seeds.

    Attributes:
        mechanism: ``local``, ``nonprivate``, ``clip_only``, ``dp_client`` or ``dp_sgd``.
        privacy_unit: ``client`` or ``record`` for a mechanism, None for a baseline.
        target_epsilon: The target ε the row was calibrated to, or None (a noise-multiplier grid, a baseline).
        noise_multiplier: The noise multiplier z (mean over seeds), or None.
        epsilon_max: ε of the largest client, over seeds (inf for ``nonprivate``; None for ``local``).
        accuracy: Mean client accuracy over seeds.
        accuracy_worst: Worst client's accuracy over seeds.
        accuracy_generated: The generated prompt's mean accuracy over seeds.
        seeds: The seeds measured (diverged ones included, at their measured accuracy).
        accuracy_by_seed: Mean client accuracy per seed.
        vs_local: The difference from ``local``, paired by seed (None for ``local`` itself).
        verdict: ``dominated (below local)``, ``above local``, ``level with local`` or why there is none.
    """

    mechanism: str
    privacy_unit: str | None
    target_epsilon: float | None
    noise_multiplier: float | None
    epsilon_max: Spread
    accuracy: Spread
    accuracy_worst: Spread
    accuracy_generated: Spread
    seeds: int
    accuracy_by_seed: dict[int, float]
    vs_local: PairedDifference | None
    verdict: str


def sweep_rows(agg: list[dict[str, Any]]) -> tuple[SweepRow, ...]:
    """The privacy sweep's aggregated rows (``evaluations.privacy.aggregate``) with their paired
    difference from ``local`` and verdict, as the table computes them."""
    from evaluations.stats import paired, verdict

    local = next((a["accuracy_by_seed"] for a in agg if a["mechanism"] == "local"), None)
    out = []
    for a in agg:
        diff = paired(a["accuracy_by_seed"], local) if local is not None and a["mechanism"] != "local" else None
        out.append(SweepRow(mechanism=a["mechanism"], privacy_unit=a["unit"], target_epsilon=a["target_epsilon"],
                            noise_multiplier=a["noise_multiplier"], epsilon_max=Spread.of(a["epsilon_max"]),
                            accuracy=Spread.of(a["accuracy_mean"]), accuracy_worst=Spread.of(a["accuracy_worst"]),
                            accuracy_generated=Spread.of(a["accuracy_generated_mean"]), seeds=a["seeds"],
                            accuracy_by_seed=dict(a["accuracy_by_seed"]), vs_local=PairedDifference.of(diff),
                            verdict=verdict(diff)))
    return tuple(out)


@dataclass(frozen=True)
class SweepResult:
    """A finished privacy sweep (``pfedpg-eval privacy``).

    Attributes:
        out_dir: The sweep's folder (tradeoff.csv, tradeoff.md, the plots, report.md / report.html, runs/).
        report: Its ``report.md``.
        rows: The table, one `SweepRow` per mechanism and privacy level.
        cells: One `CellOutcome` per run (failed cells included, with their error).
    """

    out_dir: Path
    report: Path
    rows: tuple[SweepRow, ...]
    cells: tuple[CellOutcome, ...]

    @property
    def failed(self) -> tuple[CellOutcome, ...]:
        """The cells that ended in an error (the CLI's exit status 1)."""
        return tuple(c for c in self.cells if c.status == "failed")

    def row(self, mechanism: str, target_epsilon: float | None = None) -> SweepRow:
        """The row of ``mechanism`` (at ``target_epsilon`` where the grid has several levels)."""
        found = [r for r in self.rows if r.mechanism == mechanism
                 and (target_epsilon is None or r.target_epsilon == target_epsilon)]
        if len(found) != 1:
            raise KeyError(f"{len(found)} rows for mechanism={mechanism!r}, target_epsilon={target_epsilon!r}; "
                           f"rows: {[(r.mechanism, r.target_epsilon) for r in self.rows]}")
        return found[0]


@dataclass(frozen=True)
class Rate:
    """A TPR at a fixed FPR, with its 95% bootstrap interval.

    Attributes:
        value: The TPR, or None when it is unresolved (too few negatives, or tied scores).
        interval: The 95% interval, or None.
        reason: Why there is no value (``unresolved ...``), else None.
    """

    value: float | None
    interval: tuple[float, float] | None
    reason: str | None = None

    @classmethod
    def of(cls, t: Any) -> Rate | None:
        if not isinstance(t, dict):
            return None
        v = t.get("value")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            iv = t.get("interval")
            return cls(value=float(v), interval=tuple(iv) if iv else None)
        return cls(value=None, interval=None, reason=str(v))


@dataclass(frozen=True)
class ProbeResult:
    """One probe's result in one audit group, pooled over seeds.

    Attributes:
        name: The probe (``loss``, ``lira``, ``attribute_domain``, ``client_canary``, ...).
        auc: The AUC (0.5 = chance), or None for a probe without one.
        tpr_at_1pct_fpr: TPR at 1% FPR, or None for a probe without one.
        tpr_at_01pct_fpr: TPR at 0.1% FPR, or None.
        n_targets: Records (or clients) scored, or None.
        threat_model: Who sees what the probe reads (``server``, ``observer``, ...).
        epsilon_lb: A one-run audit's 95% lower bound on ε (canary probes), else None.
        raw: The probe's whole entry in ``audit.json``.
    """

    name: str
    auc: float | None
    tpr_at_1pct_fpr: Rate | None
    tpr_at_01pct_fpr: Rate | None
    n_targets: int | None
    threat_model: str | None
    epsilon_lb: float | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def of(cls, name: str, r: dict[str, Any]) -> ProbeResult:
        eps = r.get("epsilon_lb")
        return cls(name=name, auc=r.get("auc"), tpr_at_1pct_fpr=Rate.of(r.get("tpr_at_1pct_fpr")),
                   tpr_at_01pct_fpr=Rate.of(r.get("tpr_at_0.1pct_fpr")), n_targets=r.get("n_targets"),
                   threat_model=r.get("threat_model") if isinstance(r.get("threat_model"), str) else None,
                   epsilon_lb=eps if isinstance(eps, (int, float)) and not isinstance(eps, bool) else None, raw=r)


@dataclass(frozen=True)
class AuditGroup:
    """One audit group: a mechanism at one privacy level (or a baseline), its seeds pooled.

    Attributes:
        name: The group (a cell's name without its seed, e.g. ``dp_client-eps8``).
        epsilon: The accountant's ε of the group's largest client (inf without DP), or None.
        probes: Each probe's pooled result, by probe name.
    """

    name: str
    epsilon: float | None
    probes: dict[str, ProbeResult]


@dataclass(frozen=True)
class AuditResult:
    """A finished leakage audit (``pfedpg-eval audit``).

    Attributes:
        out_dir: The audit's folder (audit.json, the ROC plots, report.md / report.html, runs/).
        report: Its ``report.md``.
        groups: One `AuditGroup` per mechanism and level, by name.
        cells: One `CellOutcome` per run.
    """

    out_dir: Path
    report: Path
    groups: dict[str, AuditGroup]
    cells: tuple[CellOutcome, ...]

    @property
    def failed(self) -> tuple[CellOutcome, ...]:
        """The cells that ended in an error."""
        return tuple(c for c in self.cells if c.status == "failed")

    @classmethod
    def of(cls, out_dir: Path, rows: list[dict[str, Any]], groups: dict[str, Any]) -> AuditResult:
        """From the grid's rows (one per cell, each with its ``group``) and the pooled ``groups`` of the
        ``audit.json`` the audit writes."""
        audit_groups = {}
        for g, res in groups.items():
            eps = [r["epsilon_max"] for r in rows if r.get("group") == g and isinstance(r.get("epsilon_max"), float)]
            audit_groups[g] = AuditGroup(name=g, epsilon=max(eps) if eps else None,
                                         probes={p: ProbeResult.of(p, r) for p, r in res["probes"].items()})
        return cls(out_dir=Path(out_dir), report=Path(out_dir) / "report.md", groups=audit_groups,
                   cells=cells_of(rows))


@dataclass(frozen=True)
class MatrixRow:
    """One row of the robustness matrix: an attack against a defense at one malicious fraction, over seeds.

    Attributes:
        attack: The attack hook (``none`` without one).
        space: ``delta`` or ``grad`` (where the attack acts), None without an attack.
        defense: The aggregation rule (``sum``: pFedPG's plain sum).
        malicious_fraction: The fraction of clients that are malicious.
        status: ``ok``, ``diverged k/n (round r)``, ``failed`` or ``infeasible``.
        benign_accuracy: Mean accuracy of the benign clients, over seeds (diverged seeds at their measured accuracy).
        benign_worst: Worst benign client's accuracy, over seeds.
        asr: A backdoor's attack success rate, over seeds (None for other attacks).
        excluded_malicious: Malicious clients' updates the rule excluded, over all rounds (a count), over seeds.
        malicious_updates: Malicious clients' updates sent, over all rounds (a count), over seeds.
        excluded_benign: Benign clients' updates the rule excluded, over all rounds (a count), over seeds.
        benign_updates: Benign clients' updates sent, over all rounds (a count), over seeds.
        aggregation_ms: Mean aggregation time per round, over seeds.
        seeds: Seeds measured.
    """

    attack: str
    space: str | None
    defense: str
    malicious_fraction: float
    status: str
    benign_accuracy: Spread
    benign_worst: Spread
    asr: Spread
    excluded_malicious: Spread
    malicious_updates: Spread
    excluded_benign: Spread
    benign_updates: Spread
    aggregation_ms: Spread
    seeds: int


def matrix_rows(agg: list[dict[str, Any]]) -> tuple[MatrixRow, ...]:
    """The matrix's aggregated rows (``evaluations.robustness.aggregate``), typed."""
    return tuple(MatrixRow(attack=a["attack"], space=a["space"], defense=a["defense"], malicious_fraction=a["fraction"],
                           status=a["status"], benign_accuracy=Spread.of(a["benign_mean"]),
                           benign_worst=Spread.of(a["benign_worst"]), asr=Spread.of(a["asr"]),
                           excluded_malicious=Spread.of(a["excluded_malicious_updates"]),
                           malicious_updates=Spread.of(a["malicious_updates"]),
                           excluded_benign=Spread.of(a["excluded_benign_updates"]),
                           benign_updates=Spread.of(a["benign_updates"]),
                           aggregation_ms=Spread.of(a["aggregation_ms"]), seeds=a["seeds"]) for a in agg)


@dataclass(frozen=True)
class MatrixResult:
    """A finished robustness matrix (``pfedpg-eval robustness``).

    Attributes:
        out_dir: The matrix's folder (robustness.csv, robustness.md, the plots, report.md / report.html, runs/).
        report: Its ``report.md``.
        rows: One `MatrixRow` per (attack, space, defense, fraction).
        worst_case: Per fraction and defense, the row of the attack with the lowest benign accuracy.
        cells: One `CellOutcome` per run (infeasible cells included).
    """

    out_dir: Path
    report: Path
    rows: tuple[MatrixRow, ...]
    worst_case: tuple[MatrixRow, ...]
    cells: tuple[CellOutcome, ...]

    @property
    def failed(self) -> tuple[CellOutcome, ...]:
        """The cells that ended in an error."""
        return tuple(c for c in self.cells if c.status == "failed")
