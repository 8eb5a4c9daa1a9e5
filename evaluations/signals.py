"""SIGTERM — what batch schedulers (Slurm, Kubernetes) send before they kill a job — handled as
Ctrl-C: it raises :class:`Terminated`, a KeyboardInterrupt, so a run or a grid stops the same way
(checkpoints kept, workers stopped, the command that resumes printed). ``pfedpg-eval`` then exits
with 143 (128 + SIGTERM) where Ctrl-C exits with 130."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (elsewhere signals
    cannot be handled: nothing changes); the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
