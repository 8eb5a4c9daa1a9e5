"""Running a grid of ordinary runs, resumably: the :class:`Grid` interface that the privacy sweep,
the robustness matrix and the leakage audit implement, :func:`run_grid` that runs one, and the cell
loop under it (:func:`run_cells`).

Every cell is checked before any runs (:func:`prepare_cells`): a cell whose config or hook options
cannot run, or whose folder holds a run of another config (after filling defaults; key order does not
count), refuses the whole grid in one line naming the cell (and the first differing key) — results
are never replaced. Each cell is one run directory ``OUT/runs/CELL``. A cell whose ``summary.json``
exists is reused; one with checkpoints but no summary resumes from them; one that raises while it
runs becomes a failed result with its error (and ``error.txt``), and the grid goes on.
KeyboardInterrupt is not swallowed.
"""
from __future__ import annotations

import dataclasses
import shutil
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import yaml

from evaluations.executors import CellJob, Executor, LocalExecutor
from evaluations.plugins import load_plugins
from evaluations.progress import GridProgress
from evaluations.tracking import grid_tracking
from pfedpg import jsonio
from pfedpg.config import RunConfig, config_from_dict, difference, load_yaml_file, saved_config, upgrade_keys
from pfedpg.errors import ConfigError
from pfedpg.yamlio import load_yaml


def load_grid_file(path: str | Path | None, section: str, overrides: list[str] | None, *, example: str):
    """A sweep file ``{base_config, base, SECTION}`` -> (SECTION mapping, validated base RunConfig).
    ``base_config`` is an ordinary run config; ``base`` overrides it key by key (nested sections are
    merged, not replaced); ``--set`` applies last: ``--set SECTION.key=value`` (``privacy.seeds=[0,1]``,
    ``audit.probes.shadow_clients=3``) to the grid's section, any other key to the base run config
    (``privacy.release_metrics``, a run config key, stays there). A relative ``base_config`` is read
    from the sweep file's own folder, so a sweep file works from any working directory."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{section} file {str(p)!r} not found; pass --config with a file like {example}")
        tree = load_yaml_file(p, f"{section} file") or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{section} file {str(p)!r} must hold a mapping (base_config, base, {section})")
    unknown = [k for k in tree if k not in ("base", "base_config", section)]
    if unknown:
        raise ConfigError(f"unknown {section} file key {unknown[0]}; valid keys: base, base_config, {section}")
    base: dict[str, Any] = {}
    if tree.get("base_config"):
        bp = Path(tree["base_config"])
        if not bp.is_absolute() and path is not None:
            bp = Path(path).parent / bp
        if not bp.is_file():
            raise ConfigError(f"base_config {tree['base_config']!r} not found as {str(bp)!r} (a relative base_config "
                              "is read from the sweep file's folder); fix the path")
        base = load_yaml_file(bp, "base_config") or {}
    grid = tree.get(section) or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"{section} must be a mapping of the {section} grid's settings (see {example})")
    run_overrides = []
    for o in overrides or []:
        key, eq, raw = o.partition("=")
        parts = key.strip().split(".")
        if eq and parts[0] == section and len(parts) > 1 and not _run_config_key(parts[:2]):
            grid = _set_in(grid, parts[1:], load_yaml(raw) if raw.strip() else None)
        else:
            run_overrides.append(o)
    # validates; errors name the key
    cfg = config_from_dict(_deep_merge(upgrade_keys(base), upgrade_keys(tree.get("base") or {})), run_overrides)
    return grid, cfg


def _run_config_key(parts: list[str]) -> bool:
    """``[section, key]`` names a field of a run config section (``privacy.release_metrics``)."""
    cls = typing.get_type_hints(RunConfig).get(parts[0])
    return dataclasses.is_dataclass(cls) and parts[1] in {f.name for f in dataclasses.fields(cls)}


def _set_in(tree: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    """A copy of ``tree`` with ``value`` at ``path`` (``--set privacy.mechanisms.dp_sgd.clip=2``)."""
    out = dict(tree)
    node = out
    for p in path[:-1]:
        node[p] = dict(node[p]) if isinstance(node.get(p), dict) else {}
        node = node[p]
    node[path[-1]] = value
    return out


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``b`` over ``a``, section by section (``base: {server: {lr: 1e-3}}`` keeps the rest of ``server``)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _same_config(saved: Path, cfg) -> bool:
    """The saved run resolves to the same config (:func:`config_difference` finds none)."""
    return config_difference(saved, cfg) is None


def config_difference(saved: Path, cfg) -> str | None:
    """How the run config saved at ``saved`` differs from ``cfg`` — ``"KEY: OLD → NEW"`` for the
    first differing key — or None when they resolve to the same config (key order and keys added
    later with their defaults do not count; an unreadable or invalid saved config does). The
    ``flower`` section does not count for two in-process runs: it has no effect on them (so a
    changed Flower default leaves finished in-process cells valid); nor does ``tracking``, anywhere
    (where a run is logged decides none of its numbers)."""
    try:
        old = saved_config(saved.read_text())
    except (ConfigError, yaml.YAMLError) as e:
        return f"its config.yaml does not load ({' '.join(str(e).split())})"
    # (tracking: where a run is logged decides none of its numbers)
    return difference(old, cfg, ignore=("tracking", "flower") if old.engine == cfg.engine == "inprocess"
                      else ("tracking",))


@dataclass(kw_only=True)
class Cell:
    """One cell of a grid: its unique ``name`` (its run directory's), its run ``config`` in the YAML
    form that the run directory's config.yaml holds, and — for a cell that cannot run at its setting —
    why (``infeasible``: the cell is a row without a run). Each grid adds the typed fields that say
    what the cell varies (``PrivacyCell``, ``MatrixCell``)."""

    name: str
    config: dict[str, Any]
    infeasible: str | None = None


#: words for a finished cell's terminal line: (cell, run directory, summary) -> text
CellLine = Callable[["Cell", Path, dict[str, Any]], str]


@dataclass
class CellResult:
    cell: Cell
    run_dir: Path
    summary: dict[str, Any] | None
    error: str | None


def divergence(run_dir, summary, error) -> dict[str, Any] | None:
    """The record of a cell whose training diverged (``diverged.json``; a result, DESIGN §7), or None.
    ``accuracy`` is per client what the federation now delivers: with the server's prompts where it
    sends any (a broken server state gives every client a non-finite prompt), else with the clients'
    own models; non-finite outputs count wrong. A ``diverged.json`` behind another error (a config
    mismatch) is stale and ignored."""
    if summary is not None or run_dir is None or not str(error).startswith("NonFiniteDeltaError"):
        return None
    path = Path(run_dir) / "diverged.json"
    if not path.is_file():
        return None
    div = jsonio.read(path)
    div["accuracy"] = div.get("accuracy_generated_per_client") or div.get("accuracy_per_client") or []
    return div


def _where(summary: dict[str, Any] | None, where: str = "") -> str:
    dev = (summary or {}).get("device") or {}
    if not dev:
        return f" ({where})" if where else ""
    gpu = f", GPU {dev['cuda_visible_devices']} of the machine" if dev.get("cuda_visible_devices") not in (None, "") \
        and str(dev.get("device", "")).startswith("cuda") else ""
    return f" (on {dev.get('device')}{gpu}{', ' + where if where else ''})"


def run_cells(grid: list[Cell], out: Path, *, log: Callable[[str], None] = print, progress: bool = False,
              jobs: int = 1, gpus: int | None = None, executor: Executor | None = None,
              on_result: Callable[[CellResult], None] | None = None, line: CellLine | None = None) -> list[CellResult]:
    """``grid``: the cells to run (each a unique ``name`` and a run ``config``), on ``executor``
    (default: :class:`~evaluations.executors.LocalExecutor` with ``jobs`` worker processes and
    ``gpus``, which see its docstring; ``evaluations.ray_executor.RayExecutor`` for a Ray cluster).
    Every cell is checked first (:func:`prepare_cells`); then the cells run. ``on_result`` is told
    each cell's result in this process as soon as it is known (e.g. a tracker's child run). ``line``
    words a finished cell's result (default: its accuracy); each line that ends a cell run here says
    how many are done and estimates the time left (:class:`~evaluations.progress.GridProgress`)."""
    prepared = prepare_cells(grid, out, log=log, jobs=jobs, gpus=gpus, executor=executor)
    return prepared.run(log=log, progress=progress, on_result=on_result, line=line)


@dataclass
class PreparedCells:
    """A grid whose every cell has been checked: what its folder held before (``slots``: reused
    results, None where the cell runs) and the cells to run (``todo``)."""

    grid: list[Cell]
    out: Path
    executor: Executor
    slots: list[CellResult | None]
    todo: list[CellJob]

    def run(self, *, log: Callable[[str], None] = print, progress: bool = False,
            on_result: Callable[[CellResult], None] | None = None,
            line: CellLine | None = None) -> list[CellResult]:
        grid, slots, todo = self.grid, self.slots, self.todo
        (self.out / "runs").mkdir(parents=True, exist_ok=True)
        for r in slots:  # the results found in the folder
            if r is not None and on_result is not None:
                on_result(r)

        clock: GridProgress | None = None

        def finish(i: int, summary: dict[str, Any] | None, error: str | None, trace: str | None,
                   where: str = "") -> None:
            after = clock.finished() if clock is not None else None
            slots[i] = _finish_cell(grid[i], self.out / "runs" / grid[i].name, f"[{i + 1}/{len(grid)}] {grid[i].name}",
                                    summary, error, trace, lambda m: log(m + (f" — {after}" if after else "")), where,
                                    line=line)
            if on_result is not None:
                on_result(slots[i])

        if todo:
            concurrency = getattr(self.executor, "concurrency", lambda n: None)(len(todo))
            log(f"{len(todo)} cell(s) to run" + (f", {len(grid) - len(todo)} done before" if len(todo) < len(grid)
                                                else "") + (f", {concurrency} at a time" if concurrency else ""))
            clock = GridProgress(len(todo), concurrency)
        self.executor.run(todo, log=log, progress=progress,
                          finish=lambda job, summary, error, trace, where="": finish(job.index, summary, error, trace,
                                                                                     where))
        return [r for r in slots if r is not None]


def prepare_cells(grid: list[Cell], out: Path, *, log: Callable[[str], None] = print, jobs: int = 1,
                  gpus: int | None = None, executor: Executor | None = None) -> PreparedCells:
    """Check every cell before any runs, and refuse the grid in one line (a ConfigError naming the
    cell) when one cannot run: its config is invalid, its hooks' options cannot run on its clients
    (:func:`evaluations.preflight.check_cells`), the executor cannot run it, or its folder holds a run
    of another config (results are never replaced: another ``--out``, or delete the folder). Nothing
    is written before these checks pass; then earlier results are taken up (:func:`_earlier_result`)."""
    from evaluations.preflight import check_cells, refusal

    load_plugins()
    if executor is None:
        executor = LocalExecutor(jobs, gpus)
    elif jobs != 1:
        raise ConfigError(f"--jobs is for --executor local; under --executor {executor.name} the cluster's "
                          "resources decide how many cells run at once (drop --jobs)")
    configs: list[RunConfig] = []  # typed once per cell, and passed on typed (to the workers too)
    for cell in grid:
        try:
            configs.append(config_from_dict(cell.config))
        except ConfigError as e:
            raise ConfigError(refusal(cell.name, e)) from None
    executor.check(configs)
    dirs = [out / "runs" / cell.name for cell in grid]
    for cell, cfg, run_dir in zip(grid, configs, dirs):
        diff = _stale(cfg, run_dir)
        if diff is not None:  # a cell of the same name from an edited sweep file or another --set
            raise ConfigError(f"{out} holds a run of cell {cell.name} with another config ({diff}); pass another "
                              f"--out, or delete {out} to run the grid again (nothing has run)")
    check_cells([(c.name, cfg) for c, cfg, d in zip(grid, configs, dirs) if not _finished(d)])
    slots: list[CellResult | None] = []
    todo = []
    for i, (cell, cfg, run_dir) in enumerate(zip(grid, configs, dirs)):
        slots.append(_earlier_result(cell, run_dir, f"[{i + 1}/{len(grid)}] {cell.name}", log))
        if slots[i] is None:
            todo.append(CellJob(i, cell.name, cfg, run_dir))
    return PreparedCells(grid, out, executor, slots, todo)


def _finished(run_dir: Path) -> bool:
    """The cell's folder holds its result: a finished run or a divergence."""
    return (run_dir / "summary.json").is_file() or (run_dir / "diverged.json").is_file()


def _stale(cfg: RunConfig, run_dir: Path) -> str | None:
    """How the run in a cell's folder differs from the cell's config (None: the same, or no run, or a
    run that failed — an error, not a result, which runs again from scratch)."""
    saved = run_dir / "config.yaml"
    if not saved.is_file() or (run_dir / "error.txt").is_file():
        return None
    return config_difference(saved, cfg)


def _earlier_result(cell: Cell, run_dir: Path, tag: str, log: Callable[[str], None]) -> CellResult | None:
    """What a cell's folder already holds (its config checked equal by :func:`prepare_cells`): a
    finished run or a divergence (reused); None when the cell must run (a failed run's folder is
    cleared first)."""
    if (run_dir / "summary.json").is_file():
        log(f"{tag}: done before, reused")
        return CellResult(cell, run_dir, jsonio.read(run_dir / "summary.json"), None)
    if (run_dir / "diverged.json").is_file():  # a divergence is a result: the same one again
        error = jsonio.read(run_dir / "diverged.json")["error"]
        log(f"{tag}: diverged before, reused")
        return CellResult(cell, run_dir, None, error)
    if (run_dir / "error.txt").is_file():  # failed before (an error, not a result): start clean
        log(f"{tag}: failed before; running it again from scratch")
        shutil.rmtree(run_dir)
    return None


def accuracy_line(cell: Cell, run_dir: Path, summary: dict[str, Any]) -> str:
    """The default words for a finished cell: its mean accuracy over the clients, in percent."""
    return (f"accuracy {100 * summary['accuracy']['mean']:.2f} %" if summary.get("accuracy")
            else "accuracy kept by the clients")


def _finish_cell(cell: Cell, run_dir: Path, tag: str, summary: dict[str, Any] | None, error: str | None,
                 trace: str | None, log: Callable[[str], None], where: str = "", *,
                 line: CellLine | None = None) -> CellResult:
    """A cell's outcome as its row and its line; ``where``: the executor's word on where it ran."""
    if error is None:
        log(f"{tag}: {(line or accuracy_line)(cell, run_dir, summary)}{_where(summary, where)}")
    elif (run_dir / "diverged.json").is_file():  # the run's own record of where it diverged
        log(f"{tag}: diverged ({error}){where and f' ({where})'}")
    else:  # a failed cell is a row, not the end of the grid
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(trace or error)
        log(f"{tag}: FAILED ({error}){where and f' ({where})'}")
    return CellResult(cell, run_dir, summary, error)


class Grid:
    """One sweep over ordinary runs. A grid says what its cells are (``cells``: :class:`Cell` s of
    its own type, each a unique name, a run config and the grid's typed fields; ``infeasible``: a
    reason, and the cell is a row without a run), what one cell reads as a table row (``row``), how
    rows combine over seeds (``aggregate``) and what it writes (``write_outputs``). :func:`run_grid` does the rest — the
    settings file, resumable cells, ``--jobs`` — the same for every grid."""

    #: the file in the output folder that records the grid's settings and base config
    settings_file: ClassVar[str] = "sweep.yaml"
    #: whether a cell's rounds show a progress bar when the caller asks for one
    shows_progress: ClassVar[bool] = True

    def __init__(self, settings: Any, base: dict[str, Any]):
        self.settings, self.base = settings, base

    def settings_record(self) -> dict[str, Any]:
        raise NotImplementedError

    def cells(self) -> list[Cell]:
        raise NotImplementedError

    def row(self, cell: Cell, run_dir: Path | None, summary: dict[str, Any] | None,
            error: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def aggregate(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def write_outputs(self, out: Path, rows: list[dict[str, Any]], results: list[CellResult]) -> None:
        raise NotImplementedError

    def line(self, cell: Cell, run_dir: Path, summary: dict[str, Any]) -> str:
        """The words for a finished cell on the terminal: what its row in the grid's table shows
        (default: the mean accuracy over the clients, in percent)."""
        return accuracy_line(cell, run_dir, summary)


def run_grid(grid: Grid, *, out_dir: str | Path | None = None, log: Callable[[str], None] = print,
             progress: bool = False, jobs: int = 1, executor: Executor | None = None) -> Path:
    """Check every feasible cell of ``grid`` (:func:`prepare_cells`: a bad cell refuses the grid before
    anything is written), run those not finished before, read each cell's row — in the grid's order,
    infeasible cells included — and write the grid's outputs; returns the folder."""
    out = Path(out_dir or grid.settings.out_dir)
    cells = grid.cells()
    prepared = prepare_cells([c for c in cells if c.infeasible is None], out, log=log, jobs=jobs, executor=executor)
    out.mkdir(parents=True, exist_ok=True)
    (out / grid.settings_file).write_text(yaml.safe_dump(grid.settings_record(), sort_keys=False))
    with grid_tracking(grid, out, log) as tracked:  # the base config's `tracking`: a parent run, a child per cell
        done = {r.cell.name: r for r in prepared.run(log=log, progress=progress and grid.shows_progress,
                                                     on_result=tracked, line=grid.line)}
        rows = []
        for c in cells:
            r = done.get(c.name)
            rows.append(grid.row(c, r.run_dir if r else None, r.summary if r else None, r.error if r else None))
        grid.write_outputs(out, rows, [done[c.name] for c in cells if c.name in done])
    failed = [r for r in rows if r.get("status") == "failed"]  # errors; a diverged cell is a result
    if failed:
        (out / "FAILED").write_text("".join(f"{r['cell']}: {r['error']}\n" for r in failed))
    else:  # a rerun that ran them again: nothing failed now
        (out / "FAILED").unlink(missing_ok=True)
    return out


def failed_cells(out: Path) -> list[str]:
    """``CELL: ERROR`` of each cell of the grid in ``out`` that failed in its last run (``OUT/FAILED``,
    written by :func:`run_grid`; none when every cell gave a result)."""
    path = Path(out) / "FAILED"
    return [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
