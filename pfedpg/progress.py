"""Progress words shared by the core's long steps (pretraining epochs, a run's rounds) and the grid's
lines (``evaluations.progress``): how often a step that prints lines instead of a bar speaks, and
how a duration reads."""
from __future__ import annotations

#: where no progress bar can be drawn (a file, a pipe), a long step says where it is at least this often
ANNOUNCE_EVERY_S = 30.0


def duration(seconds: float) -> str:
    """``45 s``, ``3.5 min``, ``2.1 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
