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

import json
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import yaml

from evaluations.plugins import load_plugins
from evaluations.report import write_report
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


@dataclass
class CellResult:
    cell: Cell
    run_dir: Path
    summary: dict[str, Any] | None
    error: str | None


def run_training(cfg, run_dir: Path, *, log: Callable[[str], None], progress: bool = False,
                 resume: bool = False, restart: bool = False) -> dict[str, Any]:
    """One run on the engine ``cfg.engine`` names; returns its summary."""
    if cfg.engine == "flower":
        from evaluations.flower.app import run_flower

        return run_flower(cfg, run_dir, log=log, resume=resume)
    from pfedpg.run import Trainer

    return Trainer(cfg, run_dir=run_dir, log=log, progress=progress).run(resume=resume, restart=restart)


def _set_threads(cfg, share: int | None) -> None:
    """torch threads for a worker: the config's ``threads``, else its share of the cores. Pretraining
    too — a worker left at torch's default (all cores) oversubscribes the machine N-fold."""
    if cfg.threads is not None or share is not None:
        import torch

        torch.set_num_threads(cfg.threads if cfg.threads is not None else share)


def _run_cell(cfg: RunConfig, run_dir: str, threads: int | None, progress: bool = False) -> dict[str, Any]:
    """One cell, start to finish (also the body of a parallel worker, which gets the typed config
    as it was built once for the cell): runs, resuming a cell cut short, and writes its report.
    ``threads`` sets torch's threads when the config leaves them open."""
    from pfedpg.run import latest_checkpoint

    load_plugins()
    _set_threads(cfg, threads)
    rd = Path(run_dir)
    # A cell cut short resumes from its latest checkpoint (in-process runs).
    started = (rd / "metrics.jsonl").exists() and latest_checkpoint(rd) is not None
    if not started and rd.exists():  # cut short before its first checkpoint: nothing to resume
        shutil.rmtree(rd)
    summary = run_training(cfg, rd, log=lambda m: None, progress=progress, resume=started)
    write_report(rd)  # each cell is an ordinary run directory, report included
    return summary


def _pretrain(cfg: RunConfig, threads: int | None) -> str:
    from pfedpg.pretrain import pretrain_backbone

    _set_threads(cfg, threads)
    return str(pretrain_backbone(cfg, log=lambda m: None))


def _pretrain_first(todo: list[RunConfig], pool, threads: int | None, log) -> None:
    """Backbones the cells need (``weights: pretrain``), each trained once before the cells start —
    two cells of one seed must not pretrain the same cached file at the same time."""
    from pfedpg.pretrain import cached_path

    needed: dict[Path, RunConfig] = {}
    for cfg in todo:
        if cfg.model.weights == "pretrain" and not cached_path(cfg).is_file():
            needed.setdefault(cached_path(cfg), cfg)
    if needed:
        log(f"pretraining {len(needed)} backbone(s) first")
        for f in [pool.submit(_pretrain, c, threads) for c in needed.values()]:
            f.result()


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
    div = json.loads(path.read_text())
    div["accuracy"] = div.get("accuracy_generated_per_client") or div.get("accuracy_per_client") or []
    return div


def gpu_slots(jobs: int, gpus: int) -> list[int]:
    """The GPU each of ``jobs`` worker processes is given, round-robin ([] without GPUs)."""
    return [w % gpus for w in range(jobs)] if gpus > 0 else []


def _pin_worker(slots) -> None:
    """Worker initializer: this process sees one GPU (the next slot), before anything touches CUDA;
    ``device: auto`` (or ``cuda``) then runs the cells it takes there."""
    import os

    os.environ["CUDA_VISIBLE_DEVICES"] = str(slots.get())


def _where(summary: dict[str, Any] | None) -> str:
    dev = (summary or {}).get("device") or {}
    if not dev:
        return ""
    gpu = f", GPU {dev['cuda_visible_devices']} of the machine" if dev.get("cuda_visible_devices") not in (None, "") \
        and str(dev.get("device", "")).startswith("cuda") else ""
    return f" (on {dev.get('device')}{gpu})"


def run_cells(grid: list[Cell], out: Path, *, log: Callable[[str], None] = print,
              progress: bool = False, jobs: int = 1, gpus: int | None = None) -> list[CellResult]:
    """``grid``: the cells to run (each a unique ``name`` and a run ``config``).

    ``jobs`` > 1 runs that many cells at once in worker processes; a cell whose config leaves
    ``threads`` null then gets cores ÷ jobs torch threads. Results depend on the thread count, so set
    ``threads`` in the config for numbers that do not depend on ``jobs``. On a machine with G GPUs
    (``gpus``: None = as torch counts them) worker k sees GPU k mod G alone, so cells with
    ``device: auto`` or ``cuda`` spread over the GPUs, one GPU per cell; a cell's line and its
    ``summary.json`` (``device``) say where it ran. A grid whose cells name a GPU (``cuda:N``) is
    not spread: every worker sees every GPU."""
    load_plugins()
    if not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs={jobs!r} must be a positive integer")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    slots: list[CellResult | None] = [None] * len(grid)

    def finish(i: int, summary: dict[str, Any] | None, error: str | None, trace: str | None) -> None:
        slots[i] = _finish_cell(grid[i], out / "runs" / grid[i].name, f"[{i + 1}/{len(grid)}] {grid[i].name}",
                                summary, error, trace, log)

    configs: list[RunConfig | None] = []  # typed once per cell, and passed on typed (to the workers too)
    todo = []
    for i, cell in enumerate(grid):
        try:
            configs.append(config_from_dict(cell.config))
        except ConfigError as e:  # a cell with a bad config is a failed row, as before; the grid goes on
            configs.append(None)
            finish(i, None, f"ConfigError: {e}", traceback.format_exc())
            continue
        tag = f"[{i + 1}/{len(grid)}] {cell.name}"
        slots[i] = _earlier_result(cell, configs[i], out / "runs" / cell.name, tag, log)
        if slots[i] is None:
            todo.append(i)

    if jobs == 1 or len(todo) <= 1:
        for i in todo:
            try:
                finish(i, _run_cell(configs[i], str(out / "runs" / grid[i].name), None, progress), None, None)
            except Exception as e:
                finish(i, None, f"{type(e).__name__}: {e}", traceback.format_exc())
    else:
        _run_in_workers(grid, configs, todo, out, jobs=jobs, gpus=gpus, log=log, finish=finish)
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
        return CellResult(cell, run_dir, json.loads((run_dir / "summary.json").read_text()), None)
    if (run_dir / "diverged.json").is_file():  # a divergence is a result: the same one again
        error = json.loads((run_dir / "diverged.json").read_text())["error"]
        log(f"{tag}: diverged before, reused")
        return CellResult(cell, run_dir, None, error)
    if (run_dir / "error.txt").is_file():  # failed before (an error, not a result): start clean
        log(f"{tag}: failed before; running it again from scratch")
        shutil.rmtree(run_dir)
    return None


def _finish_cell(cell: Cell, run_dir: Path, tag: str, summary: dict[str, Any] | None, error: str | None,
                 trace: str | None, log: Callable[[str], None]) -> CellResult:
    if error is None:
        acc = (f"accuracy {summary['accuracy']['mean']:.4f}" if summary.get("accuracy")
               else "accuracy kept by the clients")
        log(f"{tag}: {acc}{_where(summary)}")
    elif (run_dir / "diverged.json").is_file():  # the run's own record of where it diverged
        log(f"{tag}: diverged ({error})")
    else:  # a failed cell is a row, not the end of the grid
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(trace or error)
        log(f"{tag}: FAILED ({error})")
    return CellResult(cell, run_dir, summary, error)


def _run_in_workers(grid: list[Cell], configs: list[RunConfig], todo: list[int], out: Path, *, jobs: int,
                    gpus: int | None, log: Callable[[str], None], finish: Callable) -> None:
    """The cells ``todo`` in ``jobs`` spawned worker processes (spread over the GPUs where there are)."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // jobs)
    # spawn: a fresh interpreter per worker (forking a process that has started torch's thread pools is unsafe)
    mp = multiprocessing.get_context("spawn")
    pin = {}
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    named = any(str(configs[i].device).startswith("cuda:") for i in todo)
    if gpu_slots(jobs, gpus) and not named:
        given = mp.Queue()
        for gpu in gpu_slots(jobs, gpus):
            given.put(gpu)
        pin = {"initializer": _pin_worker, "initargs": (given,)}
        log(f"{jobs} workers on {gpus} GPU(s): worker k sees GPU k mod {gpus} alone")
    elif gpus and named:
        log("the cells name a GPU (device: cuda:N): every worker sees every GPU, nothing is spread")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp, **pin) as pool:
        _pretrain_first([configs[i] for i in todo], pool, threads, log)
        futures = {i: pool.submit(_run_cell, configs[i], str(out / "runs" / grid[i].name), threads)
                   for i in todo}
        for i, f in futures.items():
            try:
                finish(i, f.result(), None, None)
            except Exception as e:
                finish(i, None, f"{type(e).__name__}: {e}", "".join(traceback.format_exception(e)))


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


def run_grid(grid: Grid, *, out_dir: str | Path | None = None, log: Callable[[str], None] = print,
             progress: bool = False, jobs: int = 1) -> Path:
    """Run every feasible cell of ``grid`` (reusing finished ones), read each cell's row — in the
    grid's order, infeasible cells included — and write the grid's outputs; returns the folder."""
    out = Path(out_dir or grid.settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / grid.settings_file).write_text(yaml.safe_dump(grid.settings_record(), sort_keys=False))
    cells = grid.cells()
    done = {r.cell.name: r for r in run_cells([c for c in cells if c.infeasible is None], out, log=log,
                                                  progress=progress and grid.shows_progress, jobs=jobs)}
    rows = []
    for c in cells:
        r = done.get(c.name)
        rows.append(grid.row(c, r.run_dir if r else None, r.summary if r else None, r.error if r else None))
    grid.write_outputs(out, rows, [done[c.name] for c in cells if c.name in done])
    return out
