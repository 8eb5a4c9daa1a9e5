"""Timing a plan the way its cells will run (``pfedpg-eval plan --jobs N``): the torch threads a cell
gets, how busy the machine was while the steps were timed, and the wall time of the grid with N
cells at once (the cells in grid order, each taken by the next free worker, as
:class:`~evaluations.executors.LocalExecutor` hands them out)."""
from __future__ import annotations

import contextlib
import heapq
import os
import time
from typing import Any, Iterator

import torch


def cell_threads(cfg, jobs: int) -> int:
    """The torch threads a cell of ``cfg`` runs with under ``--jobs jobs``: its ``threads``, else
    cores ÷ jobs in a worker (jobs > 1), else torch's default in this process (jobs = 1)."""
    if cfg.threads is not None:
        return int(cfg.threads)
    if jobs > 1:
        return max(1, (os.cpu_count() or 1) // jobs)
    return torch.get_num_threads()


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """torch uses ``n`` threads inside the block (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class CpuShare:
    """Wall and CPU time of this process over a block: ``share`` = CPU ÷ (wall × threads), about 1
    when the timed threads had their cores to themselves, well below when other work took them (the
    timings are then those of a busy machine). Meaningful for CPU work only."""

    def __enter__(self) -> CpuShare:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0

    def share(self, n_threads: int) -> float:
        return self.cpu / max(1e-9, self.wall * n_threads)


def wall_time(seconds: list[float], jobs: int) -> float:
    """The grid's wall time with ``jobs`` cells at once: the cells in order, each to the worker that
    frees first (list scheduling); one at a time it is their sum."""
    if jobs <= 1 or len(seconds) <= 1:
        return float(sum(seconds))
    free = [0.0] * min(jobs, len(seconds))
    for s in seconds:
        heapq.heappush(free, heapq.heappop(free) + s)
    return max(free)


def duration(s: float) -> str:
    """``23.6 s``, ``3.5 min``, ``2.1 h``."""
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def time_note(m: dict[str, Any], jobs: int, device: str) -> list[str]:
    """The plan's lines on how the time was measured and what it assumes."""
    out = [f"           timed with {m['threads']} torch thread(s) per cell"
           + (f" (--jobs {jobs}: cores ÷ {jobs}, or the config's threads)" if jobs > 1 else "")]
    if device == "cpu" and m.get("cpu_share") is not None and m["cpu_share"] < 0.7:
        out.append(f"           the machine was busy while timing: this process got {100 * m['cpu_share']:.0f} % of "
                   f"its {m['threads']} thread(s)' CPU time; the estimate assumes it stays that busy")
    return out


__all__ = ["CpuShare", "cell_threads", "duration", "threads", "time_note", "wall_time"]
