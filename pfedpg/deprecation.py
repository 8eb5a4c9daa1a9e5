"""Renamed config keys and hook options: the old name keeps working for one release, with a warning.

:func:`take_renamed` moves each old key of a mapping to its new name and warns once per name with a
:class:`RenamedKeyWarning` (a ``FutureWarning``: shown by default, meant for the people who write
configs; ``-W error::FutureWarning`` turns it into an error). Giving both names is a ConfigError.
The CLI prints the warning as one ``warning:`` line.
"""
from __future__ import annotations

import sys
import warnings
from typing import Any, Mapping

from pfedpg.errors import ConfigError


class RenamedKeyWarning(FutureWarning):
    """An old config key or option name, still accepted in this release."""


def renamed(old: str, new: str) -> None:
    warnings.warn(f"{old} is renamed {new}; the old name works in this release only — write {new}",
                  RenamedKeyWarning, stacklevel=3)


def take_renamed(values: Mapping[str, Any], renames: Mapping[str, str], where: str = "") -> dict[str, Any]:
    """``values`` with each key in ``renames`` (old -> new) under its new name; ``where`` prefixes
    the names in messages (``server.``)."""
    out = dict(values)
    for old, new in renames.items():
        if old not in out:
            continue
        if new in out:
            raise ConfigError(f"{where}{old} and {where}{new} are the same setting under its old and new name; "
                              f"keep only {where}{new}")
        renamed(f"{where}{old}", f"{where}{new}")
        out[new] = out.pop(old)
    return out


def show_renamed_keys_as_one_line() -> None:
    """Print each :class:`RenamedKeyWarning` as one ``warning: ...`` line on stderr (shown even where
    other FutureWarnings are silenced); other warnings keep Python's display."""
    warnings.filterwarnings("default", category=RenamedKeyWarning)
    show = warnings.showwarning
    if getattr(show, "renamed_keys_one_line", False):
        return

    def one_line(message, category, *args, **kwargs):
        if issubclass(category, RenamedKeyWarning):
            print(f"warning: {message}", file=sys.stderr, flush=True)
        else:
            show(message, category, *args, **kwargs)

    one_line.renamed_keys_one_line = True
    warnings.showwarning = one_line
