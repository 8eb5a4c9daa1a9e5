"""A grid's progress line: how many cells are done and an estimate of the time left, from the cells
run so far (no cell is timed in advance).

Each cell's duration is reconstructed from when the cells finished: with ``concurrency`` J the
first J cells start together and each later one starts when an earlier one finishes (a worker
takes the next queued cell), so a cell's duration is its finish time minus that start. The time
left is the mean duration × the cells left ÷ J — an estimate: cells differ (a DP-SGD cell costs
more than a plain one), and the cells in flight have already done part of their work. Where the
concurrency is not known (a Ray cluster decides it), the rate so far is used: time so far ÷ cells
done × cells left."""
from __future__ import annotations

import time
from typing import Callable

from pfedpg.progress import duration


class GridProgress:
    """``total`` cells to run, ``concurrency`` at a time (None: unknown). :meth:`finished` records a
    cell's end and returns the words to append to its line."""

    def __init__(self, total: int, concurrency: int | None, clock: Callable[[], float] = time.monotonic):
        self.total, self.clock = total, clock
        self.concurrency = None if concurrency is None else max(1, min(concurrency, total))
        self.start = clock()
        self.finish_times: list[float] = []

    def finished(self) -> str:
        now = self.clock()
        self.finish_times.append(now)
        done, left = len(self.finish_times), self.total - len(self.finish_times)
        if left <= 0:
            return f"{done}/{self.total} run, {duration(now - self.start)} in all"
        if self.concurrency is None:
            est = (now - self.start) / done * left
            how = f"the rate of the {done} cell{'s' if done != 1 else ''} run so far"
        else:
            j = self.concurrency
            starts = [self.start] * min(j, done) + self.finish_times[:max(0, done - j)]
            mean = sum(f - s for f, s in zip(self.finish_times, starts)) / done
            est = mean * left / j
            how = (f"{duration(mean)} per cell over the {done} cell{'s' if done != 1 else ''} run so far"
                   + (f", {j} at a time" if j > 1 else ""))
        return f"{done}/{self.total} run; about {duration(est)} left (estimate: {how})"


__all__ = ["GridProgress", "duration"]
