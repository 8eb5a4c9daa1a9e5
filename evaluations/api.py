"""The Python API: what the CLI's commands do, called from a script or a notebook, each returning a
typed result.

| function | CLI command | returns |
|---|---|---|
| `run` | `pfedpg-eval train` | `RunResult` |
| `privacy_sweep` | `pfedpg-eval privacy` | `SweepResult` |
| `audit` | `pfedpg-eval audit` | `AuditResult` |
| `robustness` | `pfedpg-eval robustness` | `MatrixResult` |
| `plan` | `pfedpg-eval plan` | `Plan` |
| `compare` | `pfedpg-eval compare` | `Comparison` |

Each takes a config as a file path or as a mapping (the YAML's content), and `overrides` in the
CLI's `--set` form (`["rounds=5", "client.lr=0.1"]`). They run the same functions the CLI runs
(`evaluations.executors.run_training`, `evaluations.sweep.run_grid` on the privacy sweep's, the
audit's and the matrix's grids, `evaluations.plan.plan`) and write the same run directories and
reports, so a grid started here resumes from the CLI and the other way round. Bad input raises
`pfedpg.errors.ConfigError` or `pfedpg.errors.DataError` with the one-line message the CLI prints.
Progress lines go to `log` (default: standard error; pass `log=lambda line: None` for silence).

Example:
    >>> from evaluations import api
    >>> result = api.run("configs/quickstart.yaml", ["rounds=2"], run_dir="runs/try")
    >>> result.accuracy.mean, result.accuracy.worst
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Union

import yaml

from evaluations.compare_results import Comparison
from evaluations.grid_results import (
    AuditGroup,
    AuditResult,
    MatrixResult,
    MatrixRow,
    PairedDifference,
    ProbeResult,
    Rate,
    SweepResult,
    SweepRow,
    matrix_rows,
    sweep_rows,
)
from evaluations.results import Accuracy, CellOutcome, Plan, PlannedRun, PrivacyLevel, RunResult, Spread, cells_of
from pfedpg.config import RunConfig
from pfedpg.errors import ConfigError

__all__ = ["run", "privacy_sweep", "audit", "robustness", "plan", "compare", "Config", "Log", "Comparison",
           "RunResult", "Accuracy", "PrivacyLevel", "SweepResult", "SweepRow", "PairedDifference", "Spread",
           "AuditResult", "AuditGroup", "ProbeResult", "Rate", "MatrixResult", "MatrixRow", "CellOutcome",
           "Plan", "PlannedRun"]

#: A config: a YAML file's path, or its content as a mapping (a run config may also be a RunConfig).
Config = Union[str, os.PathLike, Mapping[str, Any]]
#: Where progress lines go: called with one line at a time.
Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(config: Config | RunConfig, overrides: Sequence[str] = (), run_dir: str | os.PathLike | None = None, *,
        resume: bool = False, restart: bool = False, progress: bool = False, log: Log | None = None) -> RunResult:
    """Train one run (pFedPG or a baseline) and write its run directory and report.

    The API's ``pfedpg-eval train``: the same run, files and numbers.

    Args:
        config: A run config: a YAML path, a mapping of its content, or a `pfedpg.config.RunConfig`.
        overrides: ``--set`` assignments applied on top, e.g. ``["rounds=5", "client.lr=0.1"]``.
        run_dir: The run directory; default ``output_dir/run_name`` (or ``OUTPUT_DIR/METHOD-SOURCE-seedSEED``).
        resume: Continue the run in ``run_dir`` from its latest checkpoint with its saved config (``config`` is
            not read; ``overrides`` may change ``rounds`` and ``tracking`` alone), reading relative paths
            where the run started, as ``train --resume`` does (``evaluations/resume.py``).
        restart: Start an unfinished run in ``run_dir`` again (its files move to ``RUN_DIR/attempt-<k>/``).
        progress: Show a progress bar of the rounds.
        log: Where progress lines go (default: standard error).

    Returns:
        The run's accuracies, privacy levels and folders, read from its ``summary.json``.

    Raises:
        ConfigError: A bad config or override, or a run directory that cannot be written.
        DataError: Data that cannot be loaded or partitioned as configured.
    """
    from evaluations.paths import check_writable
    from evaluations.plugins import load_plugins
    from evaluations.resume import in_start_directory, resumed_config
    from evaluations.tracking import train_tracked
    from pfedpg.config import config_from_dict, load_config

    load_plugins()
    if resume and restart:
        raise ConfigError("resume and restart contradict each other; pass one")
    if resume:
        if run_dir is None:
            raise ConfigError("resume needs run_dir (the run to continue)")
        cfg = resumed_config(Path(run_dir), None, list(overrides))
    elif isinstance(config, RunConfig):
        cfg = config_from_dict(config.to_dict(), list(overrides))
    elif isinstance(config, Mapping):
        cfg = config_from_dict(dict(config), list(overrides))
    else:
        cfg = load_config(config, list(overrides))
    out = Path(run_dir) if run_dir is not None else \
        Path(cfg.output_dir) / (cfg.run_name or f"{cfg.method}-{cfg.data.source}-seed{cfg.seed}")
    with in_start_directory(out, log or _stderr) if resume else contextlib.nullcontext(out) as out:
        check_writable(out, "run directory")
        # (logged to MLflow / TensorBoard where the config's `tracking` section says so, as `train` is)
        summary, report = train_tracked(cfg, out, log=log or _stderr, progress=progress, resume=resume,
                                        restart=restart)
    return RunResult.from_summary(summary, out, report)


@contextlib.contextmanager
def _as_file(config: Config, what: str) -> Iterator[Path]:
    """A grid file's path: the path given, or a mapping written to a temporary YAML file (a
    relative ``base_config`` in it is read from the current directory)."""
    if not isinstance(config, Mapping):
        yield Path(config)
        return
    tree = dict(config)
    if isinstance(tree.get("base_config"), (str, os.PathLike)):
        tree["base_config"] = str(Path(tree["base_config"]).resolve())
    with tempfile.TemporaryDirectory(prefix="pfedpg-api-") as tmp:
        path = Path(tmp) / f"{what}.yaml"
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
        yield path


def _run_grid(grid, out_dir, *, jobs: int, executor: str, ray_address: str | None, log: Log | None,
              what: str) -> tuple[Path, list[dict[str, Any]]]:
    """`evaluations.sweep.run_grid` on ``grid``; also returns the rows it wrote."""
    from evaluations.paths import check_writable
    from evaluations.ray_executor import executor_for
    from evaluations.sweep import run_grid

    if executor not in ("local", "ray"):
        raise ConfigError(f"executor={executor!r}: choose local or ray")
    if ray_address and executor != "ray":
        raise ConfigError("ray_address needs executor='ray'")
    if not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs={jobs!r} must be a positive integer")
    chosen = executor_for(executor, ray_address)
    check_writable(Path(out_dir or grid.settings.out_dir), what)
    kept: list[dict[str, Any]] = []
    write = grid.write_outputs

    def write_and_keep(out, rows, results):  # this grid object only: the rows its table is made of
        kept.extend(rows)
        write(out, rows, results)

    grid.write_outputs = write_and_keep
    out = run_grid(grid, out_dir=out_dir, log=log or _stderr, jobs=jobs, executor=chosen)
    return out, kept


def privacy_sweep(config: Config, overrides: Sequence[str] = (), out_dir: str | os.PathLike | None = None, *,
                  jobs: int = 1, executor: str = "local", ray_address: str | None = None,
                  log: Log | None = None) -> SweepResult:
    """Run the accuracy–privacy trade-off sweep of a sweep file (``pfedpg-eval privacy``).

    Seeds × {non-private, ``local``, clip-only} and mechanism × privacy level, each cell an ordinary
    run under ``OUT/runs/``; finished cells are reused, so calling it again resumes.

    Args:
        config: A sweep file (``base_config``, ``base``, ``privacy``), as a path or a mapping.
        overrides: ``--set`` assignments on the base run config.
        out_dir: The sweep's folder (default: ``privacy.out_dir``).
        jobs: Cells run at once in worker processes (``--jobs``).
        executor: ``local`` (this machine, ``jobs`` workers) or ``ray`` (Ray tasks; ``pip install '.[ray]'``).
        ray_address: The Ray cluster (``HOST:PORT``); default a local Ray instance.
        log: Where each cell's line goes (default: standard error).

    Returns:
        The table (one `SweepRow` per mechanism and level, with the paired difference from
        ``local`` and its verdict) and one `CellOutcome` per run; a failed cell is an outcome,
        not an exception.
    """
    from evaluations.plugins import load_plugins
    from evaluations.privacy import PrivacySweep, aggregate, load_sweep

    load_plugins()
    with _as_file(config, "privacy") as path:
        sweep, base = load_sweep(path, list(overrides))
    out, rows = _run_grid(PrivacySweep(sweep, base), out_dir, jobs=jobs, executor=executor,
                          ray_address=ray_address, log=log, what="sweep directory")
    return SweepResult(out_dir=out, report=out / "report.md", rows=sweep_rows(aggregate(rows)), cells=cells_of(rows))


def audit(config: Config, overrides: Sequence[str] = (), out_dir: str | os.PathLike | None = None, *,
          jobs: int = 1, executor: str = "local", ray_address: str | None = None,
          log: Log | None = None) -> AuditResult:
    """Run a leakage audit file (``pfedpg-eval audit``): the privacy grid with the leakage probes.

    Each cell runs with the ``leakage_audit`` hook (``audit.probes``) and, where the file asks, the
    client or gradient canaries; every probe is pooled over the seeds of its group.

    Args:
        config: An audit file (``base_config``, ``base``, ``audit``), as a path or a mapping.
        overrides: ``--set`` assignments on the base run config.
        out_dir: The audit's folder (default: ``audit.out_dir``).
        jobs: Cells run at once in worker processes.
        executor: ``local`` or ``ray``.
        ray_address: The Ray cluster (``HOST:PORT``); default a local Ray instance.
        log: Where each cell's line goes (default: standard error).

    Returns:
        One `AuditGroup` per mechanism and level (each probe's AUC, TPR at 1% and 0.1% FPR
        with their intervals, a one-run audit's ε lower bound), read from ``audit.json``.
    """
    from evaluations.leakage_sweep import AuditGrid, load_audit
    from evaluations.plugins import load_plugins

    load_plugins()
    with _as_file(config, "audit") as path:
        grid, probes, base = load_audit(path, list(overrides))
    out, rows = _run_grid(AuditGrid(grid, base, probes), out_dir, jobs=jobs, executor=executor,
                          ray_address=ray_address, log=log, what="audit directory")
    return AuditResult.of(out, rows, json.loads((out / "audit.json").read_text())["groups"])


def robustness(config: Config, overrides: Sequence[str] = (), out_dir: str | os.PathLike | None = None, *,
               jobs: int = 1, executor: str = "local", ray_address: str | None = None,
               log: Log | None = None) -> MatrixResult:
    """Run the attack × defense matrix of a robustness file (``pfedpg-eval robustness``).

    Args:
        config: A matrix file (``base_config``, ``base``, ``robustness``), as a path or a mapping.
        overrides: ``--set`` assignments on the base run config.
        out_dir: The matrix's folder (default: ``robustness.out_dir``).
        jobs: Cells run at once in worker processes.
        executor: ``local`` or ``ray``.
        ray_address: The Ray cluster (``HOST:PORT``); default a local Ray instance.
        log: Where each cell's line goes (default: standard error).

    Returns:
        One `MatrixRow` per (attack, space, defense, fraction) with the benign clients'
        accuracy, the worst case over attacks per defense, and one `CellOutcome` per run.
    """
    from evaluations.plugins import load_plugins
    from evaluations.robustness import RobustnessMatrix, aggregate, load_matrix, worst_case

    load_plugins()
    with _as_file(config, "robustness") as path:
        matrix, base = load_matrix(path, list(overrides))
    out, rows = _run_grid(RobustnessMatrix(matrix, base), out_dir, jobs=jobs, executor=executor,
                          ray_address=ray_address, log=log, what="matrix directory")
    agg = aggregate(rows)
    worst = {(w["fraction"], w["defense"], w["attack"], w["space"]) for w in worst_case(agg)}
    return MatrixResult(out_dir=out, report=out / "report.md", rows=matrix_rows(agg),
                        worst_case=tuple(r for r in matrix_rows(agg)
                                         if (r.malicious_fraction, r.defense, r.attack, r.space) in worst),
                        cells=cells_of(rows))


def plan(config: Config, overrides: Sequence[str] = (), *, steps: int = 3, log: Log | None = None) -> Plan:
    """What a run, sweep, audit or matrix will cost, without training (``pfedpg-eval plan``).

    Builds one run for real (random weights of the configured backbone: nothing is downloaded or
    pretrained), times ``steps`` local steps and an evaluation batch, and extrapolates to every run.

    Args:
        config: A run config or a privacy, audit or robustness file, as a path or a mapping.
        overrides: ``--set`` assignments (on the base run config of a grid file).
        steps: Local steps to time, after one warm-up step.
        log: Where the progress line goes (default: standard error).

    Returns:
        The runs with their work and estimated seconds, the measured memory and the communication;
        ``text`` is what the CLI prints.
    """
    from evaluations import plan as planning
    from evaluations.plugins import load_plugins

    load_plugins()
    if steps < 1:
        raise ConfigError(f"steps={steps!r} must be a positive integer")
    with _as_file(config, "plan") as path:
        p = planning.plan(path, list(overrides), steps=steps, log=log or _stderr,
                          name="the config mapping" if isinstance(config, Mapping) else None)
    if isinstance(config, Mapping):
        p["config"] = "<mapping>"
    return Plan.from_dict(p, planning.render(p))


def compare(a: str | os.PathLike, b: str | os.PathLike) -> Comparison:
    """Compare two run folders, or two grid folders of one kind, paired by client or by seed
    (``pfedpg-eval compare A B``; nothing is trained).

    Args:
        a: A run folder (``summary.json``) or a grid folder (``sweep.yaml``, ``audit.yaml`` or
            ``matrix.yaml`` with ``runs/``).
        b: A folder of the same kind.

    Returns:
        Every config key that differs; for two runs their numbers side by side and B − A per client
        (clients paired by id where both runs hold the same clients); for two grids B − A per setting
        and metric over the seeds both hold, with its 95% t-interval and verdict, and the cells left
        unpaired. `evaluations.compare_report.text` of it is what the CLI prints.

    Raises:
        ConfigError: A folder that is missing, neither a run nor a grid, unfinished, or of another kind than the other.
    """
    from evaluations.compare import compare as compare_folders

    return compare_folders(a, b)
