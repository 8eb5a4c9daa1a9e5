"""Strict JSON for every file a run or a grid writes (summary.json, metrics.jsonl, env.json,
diverged.json, audit.json, ...): RFC 8259 has no infinity or NaN, and strict parsers (JavaScript's
``JSON.parse``, ``jq``, Go, Rust's serde) reject the bare ``Infinity`` / ``NaN`` that Python's
``json`` writes by default. A non-finite float is written as the *string* ``"Infinity"``,
``"-Infinity"`` or ``"NaN"`` — what ``float()`` in Python and ``Number()`` in JavaScript read back
— and :func:`loads` / :func:`read` turn those three strings back into floats (a string field never
holds exactly one of them). NumPy scalars and arrays are written as numbers and lists."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

#: how a non-finite float is written (and read back)
NONFINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}
_BACK = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def strict(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by its marker string, NumPy values by Python ones
    (tuples become lists, as json writes them)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else ("NaN" if math.isnan(obj) else NONFINITE[obj])
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if type(obj).__module__ == "numpy":
        return strict(obj.tolist()) if hasattr(obj, "tolist") else obj
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps(obj: Any, **kw) -> str:
    """``json.dumps`` that can only write strict JSON (``allow_nan=False`` after :func:`strict`)."""
    return json.dumps(strict(obj), allow_nan=False, **kw)


def _back(obj: Any) -> Any:
    if isinstance(obj, str):
        return _BACK.get(obj, obj)
    if isinstance(obj, dict):
        return {k: _back(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_back(v) for v in obj]
    return obj


def loads(s: str) -> Any:
    """Parse JSON written by :func:`dumps` (or by an older version with bare ``Infinity``), with the
    marker strings turned back into floats."""
    return _back(json.loads(s))


def read(path: str | Path) -> Any:
    """:func:`loads` of a file."""
    return loads(Path(path).read_text())


def read_lines(path: str | Path) -> list[Any]:
    """:func:`loads` of each non-empty line of a JSON-lines file (metrics.jsonl)."""
    return [loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


__all__ = ["NONFINITE", "dumps", "loads", "read", "read_lines", "strict"]
