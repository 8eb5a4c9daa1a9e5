"""Where a grid's cells run: the cell body every executor calls (:func:`run_cell`), and
:class:`LocalExecutor` — one after another in this process, or ``--jobs N`` spawned worker
processes spread over the machine's GPUs. ``evaluations.ray_executor.RayExecutor`` runs the same
cell body as Ray tasks across machines (``--executor ray``).

An executor's ``run(jobs, log=, finish=)`` runs each :class:`CellJob` and hands every outcome to
``finish(job, summary, error, trace, where)``; the grid loop (``evaluations.sweep.run_cells``) writes
the rows, reuses finished cells and resumes those cut short — the same whatever the executor."""
from __future__ import annotations

import contextlib
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from evaluations.plugins import load_plugins
from pfedpg.errors import ConfigError

if TYPE_CHECKING:
    from pfedpg.config import RunConfig


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity (a key of the workers' futures)
class CellJob:
    """One cell to run: its position in the grid, its name, its typed config and its run directory."""

    index: int
    name: str
    config: RunConfig
    run_dir: Path


Finish = Callable[..., None]  # finish(job, summary, error, trace, where="")


class Executor(Protocol):
    """What :func:`evaluations.sweep.run_cells` needs of an executor."""

    name: str

    def check(self, configs: list[RunConfig]) -> None:
        """Refuse, before any cell runs, configs this executor cannot run (a one-line ConfigError)."""

    def run(self, jobs: list[CellJob], *, log: Callable[[str], None], finish: Finish, progress: bool) -> None:
        """Run every job; each outcome goes to ``finish`` (an error is an outcome, not an exception)."""


def run_training(cfg, run_dir: Path, *, log: Callable[[str], None], progress: bool = False,
                 resume: bool = False, restart: bool = False, on_round=None) -> dict[str, Any]:
    """One run on the engine ``cfg.engine`` names; returns its summary. ``on_round`` (in-process
    engine: each round record as it is written; a Flower run's rounds run in Flower's ServerApp
    process, so a tracker reads them back from metrics.jsonl afterwards — evaluations/tracking.py)."""
    if cfg.engine == "flower":
        from evaluations.flower.app import run_flower

        return run_flower(cfg, run_dir, log=log, resume=resume)
    from pfedpg.run import Trainer

    return Trainer(cfg, run_dir=run_dir, log=log, progress=progress, on_round=on_round).run(resume=resume,
                                                                                              restart=restart)


def set_threads(cfg, share: int | None) -> None:
    """torch threads for a worker: the config's ``threads``, else its share of the cores. Pretraining
    too — a worker left at torch's default (all cores) oversubscribes the machine N-fold."""
    if cfg.threads is not None or share is not None:
        import torch

        torch.set_num_threads(cfg.threads if cfg.threads is not None else share)


def run_cell(cfg: RunConfig, run_dir: str, threads: int | None, progress: bool = False) -> dict[str, Any]:
    """One cell, start to finish (also the body of a worker process or a Ray task, which gets the
    typed config as it was built once for the cell): runs, resuming a cell cut short, and writes its
    report. ``threads`` sets torch's threads when the config leaves them open."""
    from evaluations.report import write_report
    from pfedpg.run import latest_checkpoint

    load_plugins()
    set_threads(cfg, threads)
    rd = Path(run_dir)
    # A cell cut short resumes from its latest checkpoint (in-process runs).
    started = (rd / "metrics.jsonl").exists() and latest_checkpoint(rd) is not None
    if not started and rd.exists():  # cut short before its first checkpoint: nothing to resume
        shutil.rmtree(rd)
    summary = run_training(cfg, rd, log=lambda m: None, progress=progress, resume=started)
    write_report(rd)  # each cell is an ordinary run directory, report included
    return summary


def pretrain(cfg: RunConfig, threads: int | None, log: Callable[[str], None] | None = None) -> str:
    """Pretrain (or find cached) ``cfg``'s backbone; its lines (start, progress, end) go to ``log``,
    in a worker process to the grid's own log (:func:`_relayed`)."""
    from pfedpg.pretrain import pretrain_backbone

    set_threads(cfg, threads)
    return str(pretrain_backbone(cfg, log=log or _relayed))


#: a worker process's way back to the grid's log (set by :func:`_init_worker`; None elsewhere)
_RELAY = None


def _relayed(msg: str) -> None:
    if _RELAY is not None:
        _RELAY.put(msg)


def backbones_needed(configs: list[RunConfig]) -> dict[Path, RunConfig]:
    """The pretrained backbones (``weights: pretrain``) the cells need and this machine's cache lacks,
    each with one config that trains it: each is trained once, before the cells start — two cells of
    one seed must not pretrain the same cached file at the same time."""
    from pfedpg.pretrain import cached_path

    needed: dict[Path, RunConfig] = {}
    for cfg in configs:
        if cfg.model.weights == "pretrain" and not cached_path(cfg).is_file():
            needed.setdefault(cached_path(cfg), cfg)
    return needed


def gpu_slots(jobs: int, gpus: int) -> list[int]:
    """The GPU each of ``jobs`` worker processes is given, round-robin ([] without GPUs)."""
    return [w % gpus for w in range(jobs)] if gpus > 0 else []


_busy = False  # (in a worker) whether a task is running
_stopping = False  # (in a worker) told to stop: it starts no other task


def _on_worker_signal(signum, frame) -> None:
    """A worker's SIGINT / SIGTERM: interrupt its running cell (its files closed, its checkpoints kept);
    an idle worker just ends."""
    global _stopping
    _stopping = True
    if _busy:
        raise KeyboardInterrupt
    import os

    os._exit(130)


def _init_worker(slots, relay) -> None:
    """Worker initializer: SIGINT and SIGTERM stop the worker (:func:`_on_worker_signal`); with
    ``slots``, this process sees one GPU (the next slot), before anything touches CUDA — ``device:
    auto`` (or ``cuda``) then runs the cells it takes there; ``relay`` carries its pretraining lines
    back to the grid's log."""
    import os
    import signal

    global _RELAY
    _RELAY = relay

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a grid that ignores Ctrl-C (a script's background
        signal.signal(signal.SIGINT, _on_worker_signal)      # job): its workers ignore it too, not fail its cells
    signal.signal(signal.SIGTERM, _on_worker_signal)
    if slots is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slots.get())


def _in_worker(fn, *args):
    """A worker's task: ``fn(*args)``. An interrupted worker ends there: it must not take the next
    queued cell (the coordinator is stopping the grid) — nor does one whose interrupt Python dropped
    (a signal that lands inside a finalizer is only printed, "Exception ignored …")."""
    import os

    global _busy
    if _stopping:
        os._exit(130)
    _busy = True
    try:
        return fn(*args)
    except KeyboardInterrupt:
        os._exit(130)
    finally:
        _busy = False


def stop_workers(pool, log: Callable[[str], None], grace_s: float = 60.0, again_s: float = 5.0) -> None:
    """Stop a worker pool now, without running its queued cells: each worker's running cell is
    interrupted (SIGTERM, which every worker handles as Ctrl-C: it stops where it is, its checkpoints
    kept, and the worker exits). A worker still running after ``again_s`` is told again (a signal that
    lands inside a finalizer is dropped by Python); one still alive after ``grace_s`` (or at a second
    Ctrl-C) is killed."""
    import os
    import signal
    import time

    procs = [p for p in list((getattr(pool, "_processes", None) or {}).values()) if p.is_alive()]
    if procs:
        log(f"stopping {len(procs)} worker(s): their running cells stop at their next step (resumable)")

    def tell(alive) -> None:
        for p in alive:
            try:
                os.kill(p.pid, signal.SIGTERM)
            except (ProcessLookupError, OSError):
                pass

    tell(procs)
    told = time.monotonic()
    deadline = told + grace_s
    try:
        while (alive := [p for p in procs if p.is_alive()]) and time.monotonic() < deadline:
            alive[0].join(0.1)
            if time.monotonic() - told >= again_s:
                tell([p for p in alive if p.is_alive()])
                told = time.monotonic()
    except KeyboardInterrupt:
        pass
    for p in procs:
        if p.is_alive():
            p.kill()
    pool.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def _relay(mp, log: Callable[[str], None]):
    """A queue the workers put their lines on, and a thread of this process that hands each to ``log``."""
    import threading

    relay = mp.Queue()
    drain = threading.Thread(target=lambda: [log(msg) for msg in iter(relay.get, None)], daemon=True)
    drain.start()
    try:
        yield relay
    finally:
        relay.put(None)
        drain.join(timeout=10)


def outcome(e: BaseException) -> tuple[None, str, str]:
    """A cell that raised, as (summary, error, trace)."""
    return None, f"{type(e).__name__}: {e}", "".join(traceback.format_exception(e))


class LocalExecutor:
    """``--executor local`` (the default): ``jobs`` = 1 runs the cells one after another in this
    process; ``jobs`` > 1 runs that many at once in spawned worker processes, and a cell whose config
    leaves ``threads`` null then gets cores ÷ jobs torch threads. Results depend on the thread count,
    so set ``threads`` in the config for numbers that do not depend on ``jobs``. On a machine with G
    GPUs (``gpus``: None = as torch counts them) worker k sees GPU k mod G alone, so cells with
    ``device: auto`` or ``cuda`` spread over the GPUs, one GPU per cell; a cell's line and its
    ``summary.json`` (``device``) say where it ran. A grid whose cells name a GPU (``cuda:N``) is
    not spread: every worker sees every GPU."""

    name = "local"

    def __init__(self, jobs: int = 1, gpus: int | None = None):
        if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
            raise ConfigError(f"--jobs={jobs!r} must be a positive integer")
        self.jobs, self.gpus = jobs, gpus

    def concurrency(self, cells: int) -> int:
        """How many of ``cells`` run at once."""
        return 1 if self.jobs == 1 or cells <= 1 else min(self.jobs, cells)

    def check(self, configs: list[RunConfig]) -> None:
        return None

    def run(self, jobs: list[CellJob], *, log: Callable[[str], None], finish: Finish, progress: bool) -> None:
        if self.jobs == 1 or len(jobs) <= 1:
            # Backbones first, in view: inside a cell pretraining would print nothing for its whole length.
            for cfg in backbones_needed([job.config for job in jobs]).values():
                pretrain(cfg, None, log)
            for job in jobs:
                try:
                    finish(job, run_cell(job.config, str(job.run_dir), None, progress), None, None)
                except Exception as e:
                    finish(job, *outcome(e))
            return
        self._in_workers(jobs, log=log, finish=finish)

    def _in_workers(self, jobs: list[CellJob], *, log: Callable[[str], None], finish: Finish) -> None:
        import multiprocessing
        import os
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        # spawn: a fresh interpreter per worker (forking a process that has started torch's thread pools is unsafe)
        mp = multiprocessing.get_context("spawn")
        gpus = self.gpus
        if gpus is None:
            import torch

            gpus = torch.cuda.device_count()
        named = any(str(job.config.device).startswith("cuda:") for job in jobs)
        slots = None
        if gpu_slots(self.jobs, gpus) and not named:
            slots = mp.Queue()
            for gpu in gpu_slots(self.jobs, gpus):
                slots.put(gpu)
            log(f"{self.jobs} workers on {gpus} GPU(s): worker k sees GPU k mod {gpus} alone")
        elif gpus and named:
            log("the cells name a GPU (device: cuda:N): every worker sees every GPU, nothing is spread")
        with _relay(mp, log) as relay:
            pool = ProcessPoolExecutor(max_workers=self.jobs, mp_context=mp, initializer=_init_worker,
                                       initargs=(slots, relay))
            try:
                needed = backbones_needed([job.config for job in jobs])
                if needed:
                    log(f"pretraining {len(needed)} backbone(s) first")
                    for f in [pool.submit(_in_worker, pretrain, c, threads) for c in needed.values()]:
                        f.result()
                futures = {job: pool.submit(_in_worker, run_cell, job.config, str(job.run_dir), threads)
                           for job in jobs}
                done = {f: job for job, f in futures.items()}
                for f in as_completed(done):  # each cell's line as it finishes (and the estimate with it)
                    job = done[f]
                    try:
                        finish(job, f.result(), None, None)
                    except Exception as e:
                        finish(job, *outcome(e))
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the queued cells never start, the running ones stop
                stop_workers(pool, log)
                raise
            pool.shutdown(wait=True)
