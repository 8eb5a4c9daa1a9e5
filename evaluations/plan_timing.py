"""Timing a plan the way its cells will run (``pfedpg-eval plan --jobs N``): the torch threads a cell
gets, how busy the machine was while the steps were timed and is before the grid (other work shares
the cores), and the wall time of the grid with N cells at once (the cells in grid order, each taken
by the next free worker, as :class:`~evaluations.executors.LocalExecutor` hands them out); and the
plan's number formats."""
from __future__ import annotations

import contextlib
import heapq
import os
import statistics
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


def machine_load(load: float, jobs: int, n_threads: int) -> dict[str, float]:
    """How much slower the cells run on this machine as busy as it is now: ``load`` (the load average
    when the plan started, the plan itself taken out) plus the grid's own jobs × threads, over the
    cores; 1 on an otherwise idle machine. Other work comes and goes: an estimate of the moment."""
    cores = os.cpu_count() or 1
    others = max(0.0, load - 1.0)
    return {"load_average": load, "cores": cores, "slowdown": max(1.0, (others + jobs * n_threads) / cores)}


def size(b: float) -> str:
    """``953 B``, ``240.62 KiB``, ``1.58 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024 or unit == "TiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.2f} {unit}"
        b /= 1024
    return f"{b:.2f} TiB"


def spread(v: list[int]) -> str:
    """``73–80 (median 74, total 876)``."""
    return f"{min(v)}–{max(v)} (median {statistics.median(v):g}, total {sum(v)})" if v else "-"


def duration(s: float) -> str:
    """``23.6 s``, ``3.5 min``, ``2.1 h``."""
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def time_note(m: dict[str, Any], jobs: int, device: str) -> list[str]:
    """The plan's lines on how the time was measured and what it assumes."""
    out = [f"           timed with {m['threads']} torch thread(s) per cell"
           + (f" (--jobs {jobs}: cores ÷ {jobs}, or the config's threads)" if jobs > 1 else "")]
    if device == "cpu" and m.get("slowdown", 1.0) > 1.1:
        out.append(f"           this machine is busy (load average {m['load_average']:.1f} on {m['cores']} cores "
                   f"before the plan): with the grid's own {jobs} cell(s) at once its cells would run about "
                   f"{m['slowdown']:.1f}× slower than timed, while that other work lasts")
    if device == "cpu" and m.get("cpu_share") is not None and m["cpu_share"] < 0.7:
        out.append(f"           the machine was busy while timing: this process got {100 * m['cpu_share']:.0f} % of "
                   f"its {m['threads']} thread(s)' CPU time; the estimate assumes it stays that busy")
    return out


__all__ = ["CpuShare", "cell_threads", "duration", "machine_load", "size", "spread", "threads", "time_note",
           "wall_time"]
