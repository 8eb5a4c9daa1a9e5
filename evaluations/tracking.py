"""Run tracking, config section ``tracking: {tensorboard: true, mlflow: URI}`` (``pfedpg/tracking.py``;
the trackers are in ``evaluations/tracking_backends.py``, optional extra ``tracking``).

One run (:class:`RunTracker`): every round's numbers at step = round (the round record's own keys:
``acc_adapted_mean``, ``acc_adapted_worst``, ``train_loss_mean``, ``<mechanism>/epsilon_max`` where a
DP hook runs, ...), the resolved config as parameters, the summary's numbers as ``summary/...`` at the
last round, and at the end the run folder's files (report, plots, config, summary, metrics) as MLflow
artifacts. ``train`` on the in-process engine logs each round as it ends (the Trainer's ``on_round``);
rounds not yet logged — a Flower run, whose rounds run in Flower's ServerApp process, or a grid cell —
are read back from ``metrics.jsonl``. ``RUN_DIR/tracking.json`` records the MLflow run and the last
round each tracker has, so ``--resume`` continues the same MLflow run and logs no round twice.

A grid (:func:`grid_tracking`: privacy, audit, robustness) is one MLflow parent run (the grid's settings
as parameters, its tables, reports and plots as artifacts) with a child run per cell, logged by the
process that runs the grid as each cell ends — one writer to the store, whichever executor ran the
cell; with TensorBoard each cell's events are in OUT/runs/CELL/tensorboard/, so
``tensorboard --logdir OUT/runs`` shows one run per cell."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from evaluations.tracking_backends import MlflowTracker, TensorBoardTracker, flatten, numbers, require, round_metrics
from pfedpg.config import RunConfig, config_from_dict, dump_config
from pfedpg.errors import ConfigError, NonFiniteDeltaError
from pfedpg.tracking import TrackingConfig
from pfedpg.typed import build_dataclass

STATE = "tracking.json"


def check(tracking: TrackingConfig) -> None:
    """Before any work: the packages the section needs are installed (a one-line error naming the extra)."""
    if tracking.mlflow is not None:
        require("mlflow")
    if tracking.tensorboard:
        require("tensorboard")


def _read_state(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / STATE).read_text())
    except (OSError, ValueError):
        return {}


def _files(folder: Path) -> list[Path]:
    """A run's or grid's own files (top level: no checkpoints, cells, event files or earlier attempts)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != STATE and not p.name.startswith("."))


def _rounds(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = (json.loads(ln) for ln in path.read_text().splitlines() if ln.strip())
    return [r for r in rows if r.get("type") == "round"]


class RunTracker:
    """Logs one run directory to the trackers ``cfg.tracking`` names. Call it with each round record
    (it is a :data:`pfedpg.tracking.RoundObserver`), then :meth:`finish` once. It opens the trackers at
    the first round or at the end, once the run directory is settled (a run set aside, a resume cut
    back); connecting to the MLflow store happens at once, so a bad URI fails before training does.
    ``parent``: the MLflow run of the grid the run is a cell of."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, *, log: Callable[[str], None],
                 parent: str | None = None, mlflow: MlflowTracker | None = None):
        check(cfg.tracking)
        self.cfg, self.run_dir, self.log, self.parent = cfg, Path(run_dir), log, parent
        self._mlflow = mlflow if mlflow is not None else (
            MlflowTracker(cfg.tracking.mlflow, cfg.tracking.experiment) if cfg.tracking.mlflow is not None else None)
        self.trackers: list[Any] = []
        self.opened = False
        if parent is None:  # (a grid's cells: the grid says it once)
            where = [f"MLflow (experiment {cfg.tracking.experiment} in {self._mlflow.uri})"] if self._mlflow else []
            where += [f"TensorBoard ({self.run_dir / 'tensorboard'})"] if cfg.tracking.tensorboard else []
            log(f"tracking: to {' and '.join(where)}")

    def _open(self) -> None:
        state = _read_state(self.run_dir)
        self.trackers = [t for t in (self._mlflow,) if t is not None]
        if self.cfg.tracking.tensorboard:
            self.trackers.append(TensorBoardTracker(self.run_dir / "tensorboard"))
        params = flatten(yaml.safe_load(dump_config(self.cfg)))
        tags = {"pfedpg.run_dir": str(self.run_dir.resolve()), "pfedpg.method": self.cfg.method,
                "pfedpg.seed": str(self.cfg.seed), "pfedpg.engine": self.cfg.engine}
        for t in self.trackers:
            note = t.open(state.get(t.name), name=self.run_dir.name, params=params, tags=tags, parent=self.parent)
            if note:
                self.log(note)
        self.opened = True
        self._save()

    def _save(self) -> None:
        state = {t.name: t.state() for t in self.trackers}
        (self.run_dir / STATE).write_text(json.dumps(state, indent=1))

    def __call__(self, record: dict[str, Any]) -> None:
        """The Trainer's ``on_round``: round ``record['round']``'s numbers (and any round before it
        that metrics.jsonl holds and a tracker lacks: tracking turned on at a resume)."""
        if not self.opened:
            self._open()
        r = int(record["round"])
        self._catch_up(r - 1)
        for t in self.trackers:
            if not t.ended and r > t.logged_round:
                t.log_round(r, round_metrics(record))
        self._save()

    def _catch_up(self, upto: int | None = None) -> None:
        """Rounds up to ``upto`` (None: all) that metrics.jsonl holds and a tracker has not logged."""
        behind = [t for t in self.trackers if not t.ended and (upto is None or t.logged_round < upto)]
        if not behind:
            return
        for rec in _rounds(self.run_dir):
            r = int(rec["round"])
            for t in behind:
                if t.logged_round < r and (upto is None or r <= upto):
                    t.log_round(r, round_metrics(rec))

    def finish(self, outcome: str, error: BaseException | str | None = None, *, always: bool = False) -> list[Any]:
        """The run's end: rounds not yet logged, the summary's numbers, the outcome (``ok``,
        ``diverged``, ``failed``, ``interrupted``) and the run's files; returns the trackers that
        logged it (none when every one had logged this run to its end before). A run that stopped
        before any round was logged here is not tracked (nothing of it ran in this process: a
        refused command, a Flower run that failed) unless ``always`` (a grid's cell)."""
        if not self.opened:
            if outcome != "ok" and not always:
                return []
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._open()
        self._catch_up()
        step = max([t.logged_round for t in self.trackers] + [0])
        summary = _read_json(self.run_dir / "summary.json")
        final = numbers(summary, "summary") if summary else {}
        diverged = _read_json(self.run_dir / "diverged.json")
        if diverged:
            final["diverged_round"] = float(diverged["round"])
        tags = {"pfedpg.outcome": outcome}
        if error is not None:
            tags["pfedpg.error"] = " ".join(str(error).split())
        logged = [t for t in self.trackers if not t.ended]
        for t in logged:
            if final:
                t.log(step, final)
            if final and isinstance(t, TensorBoardTracker):
                t.hparams(final)
            t.tag(tags)
            t.artifacts(_files(self.run_dir))
            t.end(outcome)
        self._save()
        return logged


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def train_tracked(cfg: RunConfig, run_dir: str | Path, *, log: Callable[[str], None], progress: bool = False,
                  resume: bool = False, restart: bool = False) -> tuple[dict[str, Any], Path]:
    """One run and its report (``evaluations.executors.run_training``, ``evaluations.report.write_report``),
    logged to the trackers ``cfg.tracking`` names; returns (summary, report path)."""
    from evaluations.executors import run_training
    from evaluations.report import write_report

    tracker = RunTracker(cfg, run_dir, log=log) if cfg.tracking.enabled else None
    try:
        summary = run_training(cfg, Path(run_dir), log=log, progress=progress, resume=resume, restart=restart,
                               on_round=tracker)
        report = write_report(run_dir)
    except BaseException as e:
        if tracker is not None:
            _end_quietly(tracker, e, log)
        raise
    if tracker is not None:
        logged = tracker.finish("ok")
        files = " and the run's files" if cfg.tracking.mlflow else ""
        log(f"tracking: logged {max(t.logged_round for t in logged)} rounds, the summary{files} to "
            + "; ".join(t.where() for t in logged) if logged else
            "tracking: this run was logged to its end before (" + "; ".join(t.where() for t in tracker.trackers) + ")")
    return summary, report


def _outcome(e: BaseException | str) -> str:
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return "diverged" if isinstance(e, NonFiniteDeltaError) or str(e).startswith("NonFiniteDeltaError") else "failed"


def _end_quietly(tracker: RunTracker, e: BaseException, log: Callable[[str], None]) -> None:
    """Mark the tracked run as ended by ``e``; a tracker failing then is a line, never hides ``e``."""
    try:
        tracker.finish(_outcome(e), e)
    except Exception as t:  # the run's own error is the one to see
        log(f"tracking: could not record how the run ended ({type(t).__name__}: {t})")


class GridTracker:
    """A grid's MLflow parent run (``grid_tracking``) and its cells' child runs; TensorBoard needs no
    parent: each cell's events sit in its own run folder."""

    def __init__(self, grid: Any, out: Path, tracking: TrackingConfig, log: Callable[[str], None]):
        check(tracking)
        self.out, self.log, self.tracking = out, log, tracking
        self.mlflow = MlflowTracker(tracking.mlflow, tracking.experiment) if tracking.mlflow is not None else None
        if self.mlflow is not None:
            kind = Path(grid.settings_file).stem
            note = self.mlflow.open(_read_state(out).get("mlflow"), name=out.name,
                                    params=flatten(grid.settings_record()), reopen_ended=True,
                                    tags={"pfedpg.grid": kind, "pfedpg.out": str(out.resolve())})
            if note:
                log(note)
            (out / STATE).write_text(json.dumps({"mlflow": self.mlflow.state()}, indent=1))
            log(f"tracking: the grid is {self.mlflow.where()}, one child run per cell")
        if tracking.tensorboard:
            log(f"tracking: TensorBoard event files per cell in {out / 'runs'}/CELL/tensorboard "
                f"(tensorboard --logdir {out / 'runs'})")

    def cell(self, result: Any) -> None:
        """A finished (or failed, or reused) cell as a child run."""
        outcome = "ok" if result.error is None else _outcome(result.error)
        try:
            cfg = config_from_dict(result.cell.config)
        except ConfigError:  # a cell whose config is invalid: a failed row with no run
            cfg = None
        # No run of this cell's config to read: an invalid config, or a folder holding another config's run.
        if cfg is None or not result.run_dir.is_dir() or str(result.error or "").startswith("ConfigError"):
            if self.mlflow is not None:
                child = MlflowTracker(self.tracking.mlflow, self.tracking.experiment)
                child.open(None, name=result.cell.name, params={}, tags={"pfedpg.outcome": outcome,
                                                                        "pfedpg.error": str(result.error)},
                           parent=self.mlflow.run_id)
                child.end(outcome)
            return
        mlflow = MlflowTracker(self.tracking.mlflow, self.tracking.experiment) if self.mlflow is not None else None
        RunTracker(cfg, result.run_dir, log=self.log, parent=self.mlflow.run_id if self.mlflow else None,
                   mlflow=mlflow).finish(outcome, result.error, always=True)

    def end(self, outcome: str) -> None:
        if self.mlflow is not None:
            self.mlflow.tag({"pfedpg.outcome": outcome})
            if outcome != "interrupted":
                self.mlflow.artifacts(_files(self.out))
            self.mlflow.end(outcome)


@contextlib.contextmanager
def grid_tracking(grid: Any, out: Path, log: Callable[[str], None]) -> Iterator[Callable[[Any], None] | None]:
    """Around a grid's run: yields the callback each :class:`~evaluations.sweep.CellResult` goes to
    (None when the grid's base config tracks nothing); at the end the grid's files go to its parent run."""
    tracking = build_dataclass(TrackingConfig, dict(grid.base.get("tracking") or {}), "tracking")
    if not tracking.enabled:
        yield None
        return
    tracker = GridTracker(grid, out, tracking, log)
    try:
        yield tracker.cell
    except BaseException as e:
        try:
            tracker.end(_outcome(e))
        except Exception as t:
            log(f"tracking: could not record how the grid ended ({type(t).__name__}: {t})")
        raise
    tracker.end("ok")
