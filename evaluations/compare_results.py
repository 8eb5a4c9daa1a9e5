"""The typed result of ``pfedpg-eval compare A B`` (`evaluations.api.compare`): what differs
between two runs or two grids, and B − A paired by client or by seed. Accuracies and their
differences are fractions (0.05 is 5 points); the terminal and the Markdown and LaTeX tables print
them in percent, ``compare.csv`` and ``compare.json`` keep the fractions."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ConfigChange:
    """One config key whose value differs: ``key`` (``client.lr``, ``base.server.lr``,
    ``privacy.seeds``, ``hooks[0].clip``) and its value in A and in B (``"(absent)"`` where missing)."""

    key: str
    a: Any
    b: Any

    def __str__(self) -> str:
        from pfedpg.typed import short_value

        return f"{self.key}: {short_value(self.a)} → {short_value(self.b)}"


@dataclass(frozen=True)
class SideBySide:
    """One number of two runs, side by side (no interval: one run each).

    Attributes:
        metric: What it is (``accuracy mean``, ``ε dp_client (client)``, ``up bytes per client per round``).
        unit: ``fraction`` (an accuracy, in [0, 1]), ``epsilon``, ``bytes`` or ``count``.
        a: A's value, or None where A has none (ε of a run without that mechanism).
        b: B's value, or None.
    """

    metric: str
    unit: str
    a: float | None
    b: float | None


@dataclass(frozen=True)
class Difference:
    """B − A over paired units (seeds of a grid setting, or clients of two runs), with its 95% t-interval.

    Attributes:
        paired: The seeds (or client ids) both sides hold, in order.
        values: B − A for each of them.
        mean: The mean difference.
        sd: The sample standard deviation (None for one unit).
        interval: The 95% t-interval of the mean (None for one unit).
    """

    paired: tuple[int, ...]
    values: tuple[float, ...]
    mean: float
    sd: float | None
    interval: tuple[float, float] | None


@dataclass(frozen=True)
class PairedRow:
    """One metric of one setting, A and B paired.

    Attributes:
        setting: The grid setting (a cell's name without ``-s<seed>``), or ``clients`` for two runs.
        metric: ``accuracy``, ``generated accuracy``, ``benign accuracy``, ``ASR`` or ``<probe> AUC``.
        unit: ``fraction`` or ``auc``.
        a: A's mean over the paired units.
        b: B's mean over the paired units.
        difference: B − A paired, or None where no unit is paired.
        verdict: In words: ``identical`` (every difference 0, up to 1e-12 of floating-point rounding),
            ``B higher``, ``B lower``, ``level (interval holds 0)``,
            ``too few seeds ...``, ``no spread ...``.
        note: What else the row needs said (diverged cells, seeds only one side holds).
        epsilon_a: The largest ε of A's paired cells (privacy sweep and audit), or None.
        epsilon_b: The same of B.
        pooled_a: The audit's pooled AUC of A's group with its 95% interval ``(auc, low, high)``, or None.
        pooled_b: The same of B.
    """

    setting: str
    metric: str
    unit: str
    a: float | None
    b: float | None
    difference: Difference | None
    verdict: str
    note: str = ""
    epsilon_a: float | None = None
    epsilon_b: float | None = None
    pooled_a: tuple[float, float | None, float | None] | None = None
    pooled_b: tuple[float, float | None, float | None] | None = None


@dataclass(frozen=True)
class Unpaired:
    """A grid cell left out of the paired rows: only one side holds it, or one side's is not a result.

    Attributes:
        cell: The cell's name.
        a: A's status (``ok``, ``diverged``, ``failed``, ``infeasible``, ``withheld``), None if A has no such cell.
        b: B's status, or None.
        error: The failed (or infeasible) side's error, first line.
    """

    cell: str
    a: str | None
    b: str | None
    error: str | None = None

    def __str__(self) -> str:
        side = (f"only in A ({self.a})" if self.b is None else f"only in B ({self.b})" if self.a is None
                else f"A {self.a}, B {self.b}")
        return f"{self.cell}: {side}" + (f" — {self.error}" if self.error else "")


@dataclass(frozen=True)
class Comparison:
    """What ``pfedpg-eval compare A B`` computes and prints (`evaluations.api.compare`).

    Attributes:
        kind: ``run``, ``privacy sweep``, ``audit`` or ``robustness matrix``.
        a: Folder A.
        b: Folder B.
        changes: Every config key whose value differs (empty: the same config).
        side_by_side: Two runs: their numbers side by side (empty for grids).
        rows: B − A paired: per client for two runs, per setting and metric for two grids.
        unpaired: Grid cells not in the paired rows, with why.
        notes: What else a reader must know (why clients are not paired, environments that differ).
    """

    kind: str
    a: Path
    b: Path
    changes: tuple[ConfigChange, ...]
    side_by_side: tuple[SideBySide, ...] = ()
    rows: tuple[PairedRow, ...] = ()
    unpaired: tuple[Unpaired, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def identical(self) -> bool:
        """No config key differs, no cell is unpaired and every paired row reads ``identical``."""
        return (not self.changes and any(r.difference for r in self.rows) and not self.unpaired
                and all(r.difference is None or r.verdict == "identical" for r in self.rows))
