"""``pfedpg-eval train --resume``: which config a resumed run continues with, and from where.

A resumed run keeps its own ``config.yaml``: ``--config`` is refused, and ``--set`` may change
``tracking`` (where the run is logged) and ``rounds`` — the run continues from its latest
checkpoint to round N, to the numbers an uninterrupted run of N rounds gives
(``pfedpg.run.checkpoint.check_new_rounds`` says when it cannot); any other changed key is refused
in one line naming it (old → new).

Relative paths in the config (``data.path``, ``model.checkpoint``, ``pretrain.cache_dir`` ...) mean
what they meant when the run started: the resume runs in the directory the run started in
(``env.json``'s ``cwd``), and says so, whatever directory the command is given in."""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pfedpg.config import RunConfig, config_from_dict, difference, saved_config
from pfedpg.errors import ConfigError


def resumed_config(run_dir: Path, config: str | None, overrides: list[str]) -> RunConfig:
    """The config ``--resume`` continues ``run_dir`` with (see the module docstring)."""
    if config is not None:
        raise ConfigError(f"--resume continues the run in {str(run_dir)!r} with its own config.yaml: drop --config "
                          "(--set rounds=N continues it to N rounds)")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"no run in {str(run_dir)!r} to resume (no config.yaml); drop --resume to start one there")
    saved = saved_config((run_dir / "config.yaml").read_text())
    cfg = config_from_dict(saved.to_dict(), overrides)
    diff = difference(saved, cfg, ignore=("rounds", "tracking"))
    if diff is not None:
        raise ConfigError(f"--resume: --set changes {diff}, and a resumed run keeps its config (only rounds and "
                          "tracking may change); drop that --set, or start a new run with it (another --run-dir)")
    return cfg


@contextmanager
def in_start_directory(run_dir: Path, log: Callable[[str], None]) -> Iterator[Path]:
    """Within the block the process works in the directory ``run_dir``'s run started in, so relative
    paths in its config read what they read then; yields ``run_dir`` as an absolute path. A start
    directory that does not exist here (another machine) leaves the current one, and says so."""
    env = run_dir / "env.json"
    start = json.loads(env.read_text()).get("cwd") if env.is_file() else None
    here = Path.cwd()
    if start is None or Path(start) == here:
        yield run_dir
        return
    if not Path(start).is_dir():
        log(f"--resume: the run started in {start}, which is not on this machine: relative paths in its config "
            f"are read from the current directory, {here}")
        yield run_dir
        return
    log(f"--resume: relative paths in the run's config are read from {start}, where it started")
    absolute = run_dir.resolve()
    os.chdir(start)
    try:
        yield absolute
    finally:
        os.chdir(here)
