"""Running a grid of ordinary runs, resumably (shared by the privacy and robustness sweeps).

Each cell is one run directory ``OUT/runs/CELL``. A cell whose ``summary.json`` exists is reused;
one with checkpoints but no summary resumes from them; one whose saved config differs from the
cell's (after filling defaults; key order does not count) is a failed result (stale results are never reused); one that raises becomes a failed result
with its error (and ``error.txt``), and the grid goes on. KeyboardInterrupt is not swallowed.
"""
from __future__ import annotations

import json
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from evaluations.plugins import load_plugins
from evaluations.report import write_report
import yaml

from pfedpg.config import config_from_dict, dump_config
from pfedpg.errors import ConfigError


def load_grid_file(path: str | Path | None, section: str, overrides: list[str] | None, *, example: str):
    """A sweep file ``{base_config, base, SECTION}`` -> (SECTION mapping, validated base RunConfig).
    ``base_config`` is an ordinary run config; ``base`` overrides it key by key (nested sections are
    merged, not replaced); ``--set`` applies last."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{section} file {str(p)!r} not found; pass --config with a file like {example}")
        tree = yaml.safe_load(p.read_text()) or {}
    unknown = [k for k in tree if k not in ("base", "base_config", section)]
    if unknown:
        raise ConfigError(f"unknown {section} file key {unknown[0]}; valid keys: base, base_config, {section}")
    base: dict[str, Any] = {}
    if tree.get("base_config"):
        bp = Path(tree["base_config"])
        if not bp.is_file():
            raise ConfigError(f"base_config {str(bp)!r} not found (paths are relative to the working directory)")
        base = yaml.safe_load(bp.read_text()) or {}
    cfg = config_from_dict(_deep_merge(base, tree.get("base") or {}), overrides)  # validates; errors name the key
    return tree.get(section) or {}, cfg


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``b`` over ``a``, section by section (``base: {server: {lr: 1e-3}}`` keeps the rest of ``server``)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _same_config(saved: Path, cfg) -> bool:
    """The saved run resolves to the same config (key order and keys added later with their
    defaults do not count; an unreadable or invalid saved config does)."""
    try:
        old = config_from_dict(yaml.safe_load(saved.read_text()) or {})
    except (ConfigError, yaml.YAMLError):
        return False
    return yaml.safe_load(dump_config(old)) == yaml.safe_load(dump_config(cfg))


@dataclass
class CellResult:
    cell: dict[str, Any]
    run_dir: Path
    summary: dict[str, Any] | None
    error: str | None


def run_training(cfg, run_dir: Path, *, log: Callable[[str], None], progress: bool = False,
                 resume: bool = False) -> dict[str, Any]:
    """One run on the engine ``cfg.engine`` names; returns its summary."""
    if cfg.engine == "flower":
        from evaluations.flower_app import run_flower

        return run_flower(cfg, run_dir, log=log, resume=resume)
    from pfedpg.runner import Trainer

    return Trainer(cfg, run_dir=run_dir, log=log, progress=progress).run(resume=resume)


def run_cells(grid: list[dict[str, Any]], out: Path, *, log: Callable[[str], None] = print,
              progress: bool = False) -> list[CellResult]:
    """``grid``: dicts with at least ``cell`` (a unique name) and ``config`` (a run-config dict)."""
    from pfedpg.runner import latest_checkpoint

    load_plugins()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    results = []
    for i, cell in enumerate(grid, 1):
        run_dir = out / "runs" / cell["cell"]
        summary_path = run_dir / "summary.json"
        summary, error = None, None
        cfg = config_from_dict(cell["config"])
        saved = run_dir / "config.yaml"
        if saved.is_file() and not _same_config(saved, cfg):
            # A cell of the same name from an edited sweep file: never reuse stale results silently.
            error = f"ConfigError: {run_dir} holds a run with a different config; delete it or choose another --out"
            log(f"[{i}/{len(grid)}] {cell['cell']}: FAILED ({error})")
        elif summary_path.is_file():
            summary = json.loads(summary_path.read_text())
            log(f"[{i}/{len(grid)}] {cell['cell']}: done before, reused")
        else:
            try:
                # A cell cut short resumes from its latest checkpoint (in-process runs).
                started = (run_dir / "metrics.jsonl").exists() and latest_checkpoint(run_dir) is not None
                summary = run_training(cfg, run_dir, log=lambda m: None, progress=progress, resume=started)
                write_report(run_dir)  # each cell is an ordinary run directory, report included
                log(f"[{i}/{len(grid)}] {cell['cell']}: accuracy {summary['accuracy']['mean']:.4f}")
            except Exception as e:  # a failed cell is a row, not the end of the grid
                error = f"{type(e).__name__}: {e}"
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "error.txt").write_text(traceback.format_exc())
                log(f"[{i}/{len(grid)}] {cell['cell']}: FAILED ({error})")
        results.append(CellResult(cell, run_dir, summary, error))
    return results
