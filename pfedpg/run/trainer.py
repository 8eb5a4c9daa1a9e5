"""One pFedPG (or baseline) run into one run directory (DESIGN §1, §8): :class:`Trainer`, a thin
façade that assembles the run's parts and drives them.

Run directory::

    config.yaml        resolved config (every default filled in)
    seeds.json         master seed, participation schedule, data split sizes
    env.json           versions, platform, threads
    metrics.jsonl      one ``round`` record per round and one ``client`` record per client/eval round
    summary.json       final accuracies (adapted and generated prompts), communication, timings
    checkpoints/       round_XXXX.pt every ``checkpoint_every`` rounds and after the last; ``--resume``
                       continues exactly
    log.txt

Evaluation uses the final round only (no best-round selection on test data)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from pfedpg import jsonio
from pfedpg.config import RunConfig
from pfedpg.context import RunContext
from pfedpg.errors import NonFiniteDeltaError
from pfedpg.hooks import HookChain
from pfedpg.models.device import out_of_memory_as_error
from pfedpg.run.assembly import assemble, backbone_for
from pfedpg.run.checkpoint import save_checkpoint, set_aside
from pfedpg.run.clients import Clients
from pfedpg.run.data import load_records
from pfedpg.run.env import RunEnv, RunLog, run_env
from pfedpg.run.inprocess import InProcessClients
from pfedpg.run.joins import JoinRounds
from pfedpg.run.rundir import log_start, open_run_dir
from pfedpg.run.summary import summarize
from pfedpg.seeding import Seeds
from pfedpg.server import Server
from pfedpg.tracking import RoundObserver


class Trainer:
    """Builds a run from a ``RunConfig`` and runs its rounds: the parts are the :class:`RoundLoop`
    (``loop``: server, schedule, seeds, device, hooks and their context) and its
    :class:`~pfedpg.run.clients.Clients` (``clients``).

    ``hooks`` overrides ``cfg.hooks`` (tests pass instances); ``backbone_path`` skips the
    pretraining lookup for ``weights: pretrain``; ``clients`` builds the run's clients from its
    :class:`~pfedpg.run.env.RunEnv` (default: every client in this process from the config's data —
    the Flower engine passes its own); ``on_round`` is told each round's record once it is in
    metrics.jsonl (:data:`pfedpg.tracking.RoundObserver`: e.g. a tracker from ``evaluations.tracking``)."""

    def __init__(self, cfg: RunConfig, *, run_dir: str | Path, hooks: HookChain | None = None,
                 log: Callable[[str], None] | None = None, progress: bool = False,
                 backbone_path: str | Path | None = None, clients: Callable[[RunEnv], Clients] | None = None,
                 on_round: RoundObserver | None = None):
        self.log, self.progress, self.on_round = RunLog(log), progress, on_round
        env = run_env(cfg, run_dir=run_dir, hooks=hooks, log=self.log)
        t0 = time.time()
        if clients is None:
            records, dataset = load_records(cfg)
            backbone_path = backbone_for(cfg, backbone_path, dataset=dataset, log=self.log, progress=progress)
            del dataset  # every client holds its own records now: the pool is not kept twice
            made: Clients = InProcessClients(env, records)
        else:
            made = clients(env)
            backbone_path = backbone_for(cfg, backbone_path, log=self.log, progress=progress)
        # Which backbone file this run used (a pretraining cache entry or a checkpoint), for the record.
        self.backbone_file = str(backbone_path) if backbone_path is not None else (
            cfg.model.checkpoint if cfg.model.weights == "checkpoint" else None)
        self.clients = made
        self.loop = assemble(env, made, backbone_path=backbone_path)
        self.setup_seconds = time.time() - t0

    # The run's state, read through to the loop (benchmarks and tests read these).
    @property
    def cfg(self) -> RunConfig:
        return self.loop.cfg

    @property
    def device(self) -> torch.device:
        return self.loop.device

    @property
    def seeds(self) -> Seeds:
        return self.loop.seeds

    @property
    def hooks(self) -> HookChain:
        return self.loop.hooks

    @property
    def server(self) -> Server:
        return self.loop.server

    @property
    def schedule(self) -> list[list[int]]:
        return self.loop.schedule

    @property
    def ctx(self) -> RunContext:
        return self.loop.ctx

    @property
    def num_clients(self) -> int:
        return self.loop.num_clients

    def run(self, *, resume: bool = False, stop_after: int | None = None,
            restart: bool = False) -> dict[str, Any] | None:
        """Run to ``cfg.rounds`` (or stop after round ``stop_after``, leaving a checkpoint).

        A run directory holding an unfinished run (no summary.json): without a checkpoint there is
        nothing to resume, so the run starts again (its files moved to RUN_DIR/attempt-<k>/); with a
        checkpoint, ``resume`` continues it and ``restart`` starts it again the same way."""
        loop = self.loop
        loop.run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = loop.run_dir / "metrics.jsonl"
        start = open_run_dir(loop, metrics_path, resume=resume, restart=restart)
        self.log.open(loop.run_dir / "log.txt")
        loop.hooks.setup(loop.ctx)
        log_start(loop, start)
        try:
            # Out of memory: one line naming the knobs, and nothing left behind that blocks the re-run
            # with a smaller setting (the unfinished run's files move to RUN_DIR/attempt-<k>/).
            with out_of_memory_as_error(str(loop.device), on_error=self._set_aside_unfinished):
                if not self._train_rounds(start, metrics_path, stop_after):
                    return None
                # (data.new_clients: in-process clients only — the config refuses them elsewhere)
                join_s = JoinRounds(loop, self.clients).run(metrics_path) if loop.roster.new else 0.0
                summary = summarize(loop, metrics_path, setup_seconds=self.setup_seconds, join_seconds=join_s,
                                    backbone_file=self.backbone_file)
                (loop.run_dir / "summary.json").write_text(jsonio.dumps(summary, indent=2))
                acc = summary["accuracy"]
                self.log(f"done: adapted mean {100 * acc['mean']:.2f} %, worst {100 * acc['worst']:.2f} %" if acc else
                         f"done: the clients kept their accuracies ({summary.get('client_metrics')})")
                return summary
        finally:
            self.log.close()

    def _train_rounds(self, start: int, metrics_path: Path, stop_after: int | None) -> bool:
        """Rounds ``start + 1 ..`` with their records and checkpoints; False when stopped after
        ``stop_after`` (a checkpoint left there), True when every round ran."""
        loop, cfg = self.loop, self.loop.cfg
        rounds = range(start + 1, cfg.rounds + 1)
        bar = self.progress and sys.stderr.isatty()  # a bar on a terminal; lines wherever else the output goes
        if bar:
            from tqdm import tqdm

            rounds = tqdm(rounds, desc=cfg.method, unit="round", initial=start, total=cfg.rounds, file=sys.stderr)
        lines = RoundLines(start, cfg.rounds) if self.progress and not bar else None
        for r in rounds:
            try:
                record = loop.run_round(r)
            except NonFiniteDeltaError as e:
                loop.record_divergence(r, e)
                raise
            with open(metrics_path, "a") as f:
                for row in record.pop("clients"):
                    f.write(jsonio.dumps(row) + "\n")
                f.write(jsonio.dumps(record) + "\n")
            if bar and "acc_adapted_mean" in record:
                rounds.set_postfix(acc=f"{100 * record['acc_adapted_mean']:.1f}%")
            elif lines is not None and (line := lines.after(r, record.get("acc_adapted_mean"))):
                self.log(line)
            checkpointed = bool(cfg.checkpoint_every) and r % cfg.checkpoint_every == 0
            if checkpointed or r == cfg.rounds:
                save_checkpoint(loop, r)
            if self.on_round is not None:  # once the round's record (and any checkpoint) is written
                self.on_round(record)
            if stop_after is not None and r >= stop_after and r < cfg.rounds:
                if not checkpointed:
                    save_checkpoint(loop, r)
                return False
        return True

    def _set_aside_unfinished(self) -> str:
        self.log.close()
        return f"this run's files were moved to {set_aside(self.loop.run_dir)}"


class RoundLines:
    """Progress as lines, where no bar can be drawn (the output is a file or a pipe: a batch job's
    log): the first round, then a round at least every ``ANNOUNCE_EVERY_S`` and the last, each with
    the latest accuracy measured and an estimate of the time left."""

    def __init__(self, start: int, total: int, clock: Callable[[], float] = time.monotonic):
        self.start, self.total, self.clock = start, total, clock
        self.t0, self.said, self.acc = clock(), None, None

    def after(self, r: int, acc: float | None) -> str | None:
        """The line to print after round ``r`` (``acc``: its accuracy, None where it was not measured), or None."""
        from pfedpg.progress import ANNOUNCE_EVERY_S, duration

        self.acc = (acc, r) if acc is not None else self.acc
        now = self.clock()
        if self.said is not None and now - self.said < ANNOUNCE_EVERY_S and r < self.total:
            return None
        self.said, left = now, (now - self.t0) / (r - self.start) * (self.total - r)
        measured = "" if self.acc is None else f": accuracy {100 * self.acc[0]:.2f} %" + (
            f" (measured after round {self.acc[1]})" if self.acc[1] != r else "")
        return f"round {r}/{self.total}{measured}" + (f"; about {duration(left)} left (estimate)" if r < self.total
                                                      else "")
