"""What every part of a run is built with (DESIGN §8, §9): the resolved config, the run directory,
the one device, the master seed's streams, the hook chain and the log — chosen once, before any
data, model or server exists, and handed to each part rather than read off a shared object."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

import torch

from pfedpg.config import RunConfig
from pfedpg.hooks import HookChain, build_hooks
from pfedpg.models.device import configure, resolve_device
from pfedpg.seeding import Seeds


class RunLog:
    """The run's log lines: to the caller's ``sink`` (if any) and, while the run directory is open,
    to its ``log.txt``. Called like the function it replaces: ``log("line")``."""

    def __init__(self, sink: Callable[[str], None] | None = None):
        self._sink = sink
        self._file: IO[str] | None = None

    def __call__(self, msg: str) -> None:
        if self._sink is not None:
            self._sink(msg)
        if self._file is not None:
            self._file.write(msg + "\n")
            self._file.flush()

    def open(self, path: Path) -> None:
        self._file = open(path, "a")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass(frozen=True)
class RunEnv:
    """The run's fixed surroundings (see the module docstring)."""

    cfg: RunConfig
    run_dir: Path
    device: torch.device
    seeds: Seeds
    hooks: HookChain
    log: Callable[[str], None]


def run_env(cfg: RunConfig, *, run_dir: str | Path, hooks: HookChain | None = None,
            log: Callable[[str], None] | None = None) -> RunEnv:
    """Sets torch's threads (``cfg.threads``), resolves and configures the run's one device (DESIGN
    §9), and builds the hooks from the config unless ``hooks`` are given (tests pass instances)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device, amp=cfg.amp)
    configure(device, deterministic=cfg.deterministic)
    return RunEnv(cfg=cfg, run_dir=Path(run_dir), device=device, seeds=Seeds(cfg.seed),
                  hooks=hooks if hooks is not None else build_hooks(cfg.hooks),
                  log=log if log is not None else RunLog())
