"""The typed results of the Python API (`evaluations.api`): what each command computed, as
frozen dataclasses built from the same rows, summaries and ``audit.json`` the CLI prints from. This
module holds the shared pieces, a run's result and a plan; the grids' results are in
`evaluations.grid_results`.

Accuracies are fractions in [0, 1] (the CLI's terminal lines and CSVs; the reports print them as
percentages). A spread over seeds is a `Spread` (mean and sample standard deviation, ``sd``
None for one seed: one run has no spread). ε is in its mechanism's own privacy unit
(``privacy_unit``: ``client`` or ``record``); the two units' ε are not comparable numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Spread:
    """A mean over seeds with its sample standard deviation (n − 1).

    Attributes:
        mean: The mean, or None when no seed measured it.
        sd: The sample standard deviation, or None for one seed (or an infinite mean).
    """

    mean: float | None
    sd: float | None = None

    @classmethod
    def of(cls, pair: tuple[float | None, float | None]) -> Spread:
        """A ``(mean, sd)`` pair as the grids' ``aggregate`` functions return it."""
        return cls(*pair)


@dataclass(frozen=True)
class Accuracy:
    """Per-client accuracy after the last round (never the best round), as fractions in [0, 1].

    Attributes:
        mean: The mean over clients.
        worst: The lowest client's accuracy.
        per_client: Each client's accuracy, in client order.
    """

    mean: float
    worst: float
    per_client: tuple[float, ...]

    @classmethod
    def from_summary(cls, block: dict[str, Any] | None) -> Accuracy | None:
        """The ``accuracy`` (or ``accuracy_generated``) block of a ``summary.json``; None if absent."""
        if not block:
            return None
        return cls(mean=block["mean"], worst=block["worst"], per_client=tuple(block.get("per_client") or ()))


@dataclass(frozen=True)
class PrivacyLevel:
    """What one DP mechanism of a run reports (its ``PrivacyResult``).

    Attributes:
        mechanism: The hook's name (``dp_client``, ``dp_sgd``, or a registered one).
        privacy_unit: ``client`` (a client's whole data set) or ``record`` (one training record).
        epsilon_max: The largest ε over clients (new clients included).
        delta: δ of the statement.
        noise_multiplier: The noise multiplier z per training client.
        statement: The privacy statement (unit, adjacency, threat model, mechanism, sampling, δ, accountant).
    """

    mechanism: str
    privacy_unit: str
    epsilon_max: float
    delta: float
    noise_multiplier: tuple[float, ...]
    statement: dict[str, Any] = field(repr=False)


def privacy_levels(hook_results: dict[str, Any] | None) -> tuple[PrivacyLevel, ...]:
    """The DP mechanisms among a summary's ``hook_results`` (each entry with a privacy ``unit``)."""
    out = []
    for name, res in (hook_results or {}).items():
        if isinstance(res, dict) and res.get("unit") in ("client", "record") and "epsilon_max" in res:
            out.append(PrivacyLevel(mechanism=name, privacy_unit=res["unit"], epsilon_max=res["epsilon_max"],
                                    delta=res["delta"], noise_multiplier=tuple(res.get("noise_multiplier") or ()),
                                    statement={k: v for k, v in res.items() if not k.startswith("epsilon")}))
    return tuple(out)


@dataclass(frozen=True)
class RunResult:
    """One finished run (``pfedpg-eval train``).

    Attributes:
        run_dir: The run directory (config.yaml, metrics.jsonl, summary.json, checkpoints).
        report: Its ``report.md``.
        method: ``pfedpg``, ``fedvpt`` or ``local``.
        seed: The master seed.
        rounds: Rounds trained.
        accuracy: The adapted prompt's accuracy (what the terminal line prints); None where the
            clients kept their accuracies (a Flower deployment, DESIGN §5).
        accuracy_generated: The server-generated prompt's accuracy (pFedPG), or None.
        privacy: The run's DP mechanisms, empty without one.
        summary: The whole ``summary.json``.
    """

    run_dir: Path
    report: Path
    method: str
    seed: int
    rounds: int
    accuracy: Accuracy | None
    accuracy_generated: Accuracy | None
    privacy: tuple[PrivacyLevel, ...]
    summary: dict[str, Any] = field(repr=False)

    @property
    def epsilon(self) -> float | None:
        """The largest ε over the run's DP mechanisms (None without one)."""
        return max((p.epsilon_max for p in self.privacy), default=None)

    @classmethod
    def from_summary(cls, summary: dict[str, Any], run_dir: Path, report: Path) -> RunResult:
        """A run's result from its ``summary.json`` (as a dict)."""
        return cls(run_dir=Path(run_dir), report=Path(report), method=summary["method"], seed=summary["seed"],
                   rounds=summary["rounds"], accuracy=Accuracy.from_summary(summary.get("accuracy")),
                   accuracy_generated=Accuracy.from_summary(summary.get("accuracy_generated")),
                   privacy=privacy_levels(summary.get("hook_results")), summary=summary)


@dataclass(frozen=True)
class CellOutcome:
    """One cell of a grid: one run directory and its table row (a line of the grid's CSV).

    Attributes:
        name: The cell's name (its run directory's, ``OUT/runs/NAME``).
        seed: The cell's seed.
        status: ``ok``, ``diverged`` (a result), ``failed`` (an error), ``infeasible`` or ``withheld``.
        error: Why it failed, diverged or could not run; None for ``ok``.
        run_dir: Its run directory (None for an infeasible cell).
        columns: The whole row, as the CSV holds it (the grid's own columns).
    """

    name: str
    seed: int
    status: str
    error: str | None
    run_dir: Path | None
    columns: dict[str, Any] = field(repr=False)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> CellOutcome:
        return cls(name=row["cell"], seed=row["seed"], status=row["status"], error=row.get("error"),
                   run_dir=Path(row["run_dir"]) if row.get("run_dir") else None,
                   columns={k: v for k, v in row.items() if not k.startswith("_")})


def cells_of(rows: list[dict[str, Any]]) -> tuple[CellOutcome, ...]:
    return tuple(CellOutcome.from_row(r) for r in rows)


@dataclass(frozen=True)
class PlannedRun:
    """One run of a plan: its work and its estimated time.

    Attributes:
        cell: The cell's name (a run config: its run name or method).
        method: The run's method.
        seed: Its seed.
        rounds: Its rounds.
        clients: Its training clients.
        train_steps: Plain local SGD steps over the run (shadow trainings included).
        dp_steps: DP-SGD steps over the run.
        eval_records: Records evaluated over the run.
        seconds: The estimated time of the run.
    """

    cell: str
    method: str
    seed: int
    rounds: int
    clients: int
    train_steps: int
    dp_steps: int
    eval_records: int
    seconds: float


@dataclass(frozen=True)
class Plan:
    """What a config will cost, before it runs (``pfedpg-eval plan``).

    Attributes:
        kind: ``train``, ``privacy``, ``audit`` or ``robustness``.
        config: The config file planned.
        runs: One `PlannedRun` per run of the grid.
        total_seconds: The estimated time of every run, one after another.
        device: Where the run was measured.
        host_peak_bytes: The resident memory measured while building the run and taking the steps.
        device_peak_bytes: The peak GPU memory measured, None on the CPU.
        bytes_per_client_round: What each client sends per round.
        pretrain_steps: Steps of backbone pretraining not cached yet (counted, not timed).
        text: The plan as ``pfedpg-eval plan`` prints it.
        raw: The whole plan (``pfedpg-eval plan --json``).
    """

    kind: str
    config: str
    runs: tuple[PlannedRun, ...]
    total_seconds: float
    device: str
    host_peak_bytes: int
    device_peak_bytes: int | None
    bytes_per_client_round: int
    pretrain_steps: int
    text: str = field(repr=False)
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_dict(cls, p: dict[str, Any], text: str) -> Plan:
        """From `evaluations.plan.plan`'s dict and `evaluations.plan.render`'s text."""
        m = p["measured"]
        runs = tuple(PlannedRun(**{k: r[k] for k in PlannedRun.__dataclass_fields__}) for r in p["runs"])
        return cls(kind=p["kind"], config=p["config"], runs=runs, total_seconds=p["total_seconds"],
                   device=m["device"], host_peak_bytes=m["host_peak_bytes"],
                   device_peak_bytes=m.get("device_peak_bytes"),
                   bytes_per_client_round=p["communication"]["bytes_per_client_round"],
                   pretrain_steps=p["pretrain_steps"], text=text, raw=p)
