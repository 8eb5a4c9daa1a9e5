"""Running a grid of ordinary runs, resumably: the :class:`Grid` interface that the privacy sweep,
the robustness matrix and the leakage audit implement, :func:`run_grid` that runs one, and the cell
loop under it (:func:`run_cells`).

Each cell is one run directory ``OUT/runs/CELL``. A cell whose ``summary.json`` exists is reused;
one with checkpoints but no summary resumes from them; one whose saved config differs from the
cell's (after filling defaults; key order does not count) is a failed result (stale results are
never reused); one that raises becomes a failed result with its error (and ``error.txt``), and the
grid goes on. KeyboardInterrupt is not swallowed.
"""
from __future__ import annotations

import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import yaml

from evaluations.executors import CellJob, Executor, LocalExecutor
from evaluations.plugins import load_plugins
from evaluations.progress import GridProgress
from pfedpg import jsonio
from pfedpg.config import RunConfig, config_from_dict, dump_config, load_yaml_file, saved_config, upgrade_keys
from pfedpg.errors import ConfigError


def load_grid_file(path: str | Path | None, section: str, overrides: list[str] | None, *, example: str):
    """A sweep file ``{base_config, base, SECTION}`` -> (SECTION mapping, validated base RunConfig).
    ``base_config`` is an ordinary run config; ``base`` overrides it key by key (nested sections are
    merged, not replaced); ``--set`` applies last. A relative ``base_config`` is read from the
    sweep file's own folder, so a sweep file works from any working directory."""
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
    # validates; errors name the key
    cfg = config_from_dict(_deep_merge(upgrade_keys(base), upgrade_keys(tree.get("base") or {})), overrides)
    return tree.get(section) or {}, cfg


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``b`` over ``a``, section by section (``base: {server: {lr: 1e-3}}`` keeps the rest of ``server``)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _same_config(saved: Path, cfg) -> bool:
    """The saved run resolves to the same config (key order and keys added later with their
    defaults do not count; an unreadable or invalid saved config does). The ``flower`` section
    does not count for two in-process runs: it has no effect on them (so a changed Flower default
    leaves finished in-process cells valid)."""
    try:
        old = saved_config(saved.read_text())
    except (ConfigError, yaml.YAMLError):
        return False
    a, b = yaml.safe_load(dump_config(old)), yaml.safe_load(dump_config(cfg))
    if a.get("engine") == b.get("engine") == "inprocess":
        a.pop("flower", None), b.pop("flower", None)
    return a == b


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
              line: CellLine | None = None) -> list[CellResult]:
    """``grid``: the cells to run (each a unique ``name`` and a run ``config``), on ``executor``
    (default: :class:`~evaluations.executors.LocalExecutor` with ``jobs`` worker processes and
    ``gpus``, which see its docstring; ``evaluations.ray_executor.RayExecutor`` for a Ray cluster).
    Every cell's config is typed and checked by the executor before any cell runs. ``line`` words a
    finished cell's result (default: its accuracy); each line that ends a cell run here says how
    many are done and estimates the time left (:class:`~evaluations.progress.GridProgress`)."""
    load_plugins()
    if executor is None:
        executor = LocalExecutor(jobs, gpus)
    elif jobs != 1:
        raise ConfigError(f"--jobs is for --executor local; under --executor {executor.name} the cluster's "
                          "resources decide how many cells run at once (drop --jobs)")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    slots: list[CellResult | None] = [None] * len(grid)
    clock: dict[str, GridProgress] = {}

    def finish(i: int, summary: dict[str, Any] | None, error: str | None, trace: str | None, where: str = "") -> None:
        after = clock["grid"].finished() if "grid" in clock else None
        slots[i] = _finish_cell(grid[i], out / "runs" / grid[i].name, f"[{i + 1}/{len(grid)}] {grid[i].name}",
                                summary, error, trace, lambda m: log(m + (f" — {after}" if after else "")), where,
                                line=line)

    configs: list[RunConfig | None] = []  # typed once per cell, and passed on typed (to the workers too)
    bad: dict[int, tuple[str, str]] = {}
    for cell in grid:
        try:
            configs.append(config_from_dict(cell.config))
        except ConfigError as e:  # a cell with a bad config is a failed row, as before; the grid goes on
            configs.append(None)
            bad[len(configs) - 1] = (f"ConfigError: {e}", traceback.format_exc())
    executor.check([c for c in configs if c is not None])
    todo = []
    for i, cell in enumerate(grid):
        if configs[i] is None:
            finish(i, None, *bad[i])
            continue
        tag = f"[{i + 1}/{len(grid)}] {cell.name}"
        slots[i] = _earlier_result(cell, configs[i], out / "runs" / cell.name, tag, log)
        if slots[i] is None:
            todo.append(CellJob(i, cell.name, configs[i], out / "runs" / cell.name))
    if todo:
        concurrency = getattr(executor, "concurrency", lambda n: None)(len(todo))
        log(f"{len(todo)} cell(s) to run" + (f", {len(grid) - len(todo)} done before" if len(todo) < len(grid) else "")
            + (f", {concurrency} at a time" if concurrency else ""))
        clock["grid"] = GridProgress(len(todo), concurrency)
    executor.run(todo, log=log, progress=progress,
                 finish=lambda job, summary, error, trace, where="": finish(job.index, summary, error, trace, where))
    return [r for r in slots if r is not None]


def _earlier_result(cell: Cell, cfg: RunConfig, run_dir: Path, tag: str,
                    log: Callable[[str], None]) -> CellResult | None:
    """What a cell's folder already holds: a finished run or a divergence (reused), a run of another
    config (an error row); None when the cell must run (a failed run's folder is cleared first)."""
    saved = run_dir / "config.yaml"
    if saved.is_file() and not _same_config(saved, cfg):
        # A cell of the same name from an edited sweep file: never reuse stale results silently.
        error = f"ConfigError: {run_dir} holds a run with a different config; delete it or choose another --out"
        log(f"{tag}: FAILED ({error})")
        return CellResult(cell, run_dir, None, error)
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
    """Run every feasible cell of ``grid`` (reusing finished ones), read each cell's row — in the
    grid's order, infeasible cells included — and write the grid's outputs; returns the folder."""
    out = Path(out_dir or grid.settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / grid.settings_file).write_text(yaml.safe_dump(grid.settings_record(), sort_keys=False))
    cells = grid.cells()
    done = {r.cell.name: r for r in run_cells([c for c in cells if c.infeasible is None], out, log=log,
                                                  progress=progress and grid.shows_progress, jobs=jobs,
                                                  executor=executor, line=grid.line)}
    rows = []
    for c in cells:
        r = done.get(c.name)
        rows.append(grid.row(c, r.run_dir if r else None, r.summary if r else None, r.error if r else None))
    grid.write_outputs(out, rows, [done[c.name] for c in cells if c.name in done])
    return out
