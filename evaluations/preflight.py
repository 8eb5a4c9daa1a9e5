"""Checking a grid's cells before any of them runs (issue 32): every cell's hooks are built (their
options checked) and checked against the public facts of the cell's run (``Hook.check``: client
counts, split sizes, the schedule), so a bad option refuses the grid at once, in one line naming the
cell, instead of failing that cell minutes into the grid.

The facts come from partitioning the cell's data as the run will (no model, no training), once per
seed and data config, and only when a hook reads them."""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from pfedpg.context import RunFacts
from pfedpg.errors import ConfigError

if TYPE_CHECKING:
    from pfedpg.config import RunConfig


class _CellFacts:
    """The public facts of one cell's run, read lazily (what ``RunFacts`` reads off a RunContext)."""

    def __init__(self, cfg: RunConfig, hooks, cache: dict[str, Any]):
        from pfedpg.seeding import Seeds

        self.config, self.seeds, self.run_dir = cfg, Seeds(cfg.seed), None
        self._hooks, self._cache = hooks, cache

    @staticmethod
    def log(line: str) -> None:
        """A check logs nothing."""

    def __getattr__(self, name: str):  # the partition's facts, on first use
        if name.startswith("_"):
            raise AttributeError(name)
        from pfedpg.run import participation_schedule, partition_run

        cfg = self.config
        key = json.dumps([cfg.seed, asdict(cfg.data)], sort_keys=True, default=str)
        if key not in self._cache:
            dataset, splits, new = partition_run(cfg)
            self._cache[key] = ([len(s.train) for s in splits], [len(s.train) for s in new], dataset.num_classes)
        train, new, classes = self._cache[key]
        n = len(train)
        facts = {"num_clients": n, "num_classes": classes, "train_sizes": train, "new_train_sizes": new,
                 "new_clients": list(range(n, n + len(new))),
                 "join_rounds": cfg.data.new_client_rounds if new else 0,
                 "schedule": participation_schedule(num_clients=n, per_round=cfg.clients_per_round,
                                                    rounds=cfg.rounds, seeds=self.seeds, held_out=len(new)),
                 "audit_clients": self._hooks.assign_audit_clients(n + len(new))}
        self.__dict__.update(facts)
        return facts[name]


def check_cells(cells: list[tuple[str, RunConfig]]) -> None:
    """Refuse the grid (a one-line ConfigError naming the first bad cell, and that nothing has run)
    when a cell's hooks cannot be built or cannot run on that cell's clients."""
    from evaluations.plugins import load_plugins
    from pfedpg.hooks import build_hooks

    load_plugins()
    cache: dict[str, Any] = {}
    for name, cfg in cells:
        try:
            hooks = build_hooks(cfg.hooks)
            hooks.check(RunFacts(_CellFacts(cfg, hooks, cache)))
        except ConfigError as e:
            raise ConfigError(refusal(name, e)) from None


def refusal(cell: str, error: ConfigError | str) -> str:
    """The line that refuses a grid for one cell's config, before any cell runs."""
    return f"cell {cell}: {error} (every cell is checked before the first runs: none has run)"
