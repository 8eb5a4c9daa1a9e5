"""Output directories: refused with one line naming the fix before anything is built in them."""
from __future__ import annotations

import os
from pathlib import Path

from pfedpg.errors import ConfigError


def check_writable(d: str | Path, what: str) -> None:
    """Refuse an output directory that cannot be written, before any data or backbone is built."""
    d = Path(d)
    if d.exists() and not d.is_dir():
        raise ConfigError(f"{what} {str(d)!r} is a file; choose a directory")
    parent = d
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{what} {str(d)!r} lies under the file {str(parent)!r}; choose another directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {str(d)!r}: no permission to write in {str(parent)!r}; choose another directory")
