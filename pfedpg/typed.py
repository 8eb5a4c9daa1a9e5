"""Typed config sections from plain values: :func:`build_dataclass` coerces and validates a mapping
into a dataclass with one-line errors naming the key, after :func:`upgrade_keys` has moved every
renamed key (a section's ``RENAMED``) to its new name."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from pfedpg.deprecation import take_renamed
from pfedpg.errors import ConfigError


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


#: scalar field types: (accepts, what the message says it must be); bool is not an int here
_SCALARS = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _coerce(value: Any, tp, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}={value!r} has the wrong type")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}")
        return build_dataclass(tp, value, where)
    if tp is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r} must be a list")
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r} must be a mapping")
        return dict(value)
    if tp in _SCALARS:
        ok, what = _SCALARS[tp]
        if not ok(value):
            raise ConfigError(f"{where}={value!r} must be {what}")
        return float(value) if tp is float else value
    return value


def build_dataclass(cls, values: dict[str, Any], where: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{where}." if where else ""
    values = upgrade_keys(values, cls, where)
    unknown = [k for k in values if k not in names]
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; "
                          f"valid keys{' in ' + where if where else ''}: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        # Section validators name their own fields; add the section prefix when it is missing.
        if where and not msg.startswith(where) and any(msg.startswith(n) for n in names):
            msg = f"{where}.{msg}"
        raise ConfigError(msg) from None


def _field_type(cls: Any, name: str) -> Any:
    """The dataclass type of field ``name`` of ``cls`` (None when it is not a dataclass field)."""
    if not dataclasses.is_dataclass(cls):
        return None
    hints = typing.get_type_hints(cls)
    tp = hints.get(name)
    return tp if dataclasses.is_dataclass(tp) else None


def _default_of(cls: Any, name: str) -> Any:
    if not dataclasses.is_dataclass(cls):
        return None
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            return None if f.default is dataclasses.MISSING else f.default
    return None


def upgrade_keys(tree: Any, cls: Any, where: str = "") -> Any:
    """``tree`` with every renamed key (a section's ``RENAMED``, old -> new) under its new name,
    section by section, one :class:`~pfedpg.deprecation.RenamedKeyWarning` per key. Apply it to each
    layer before layers are merged, so that an old key in one layer and the new key in another
    do not read as both given."""
    if not isinstance(tree, dict) or not dataclasses.is_dataclass(cls):
        return tree
    prefix = f"{where}." if where else ""
    out = take_renamed(tree, getattr(cls, "RENAMED", {}), prefix)
    for key in [k for k in out if "." in k]:  # moved into a section
        section, name = key.split(".", 1)
        inner = out.get(section) if isinstance(out.get(section), dict) else {}
        if name in inner:
            raise ConfigError(f"{prefix}{key} is given twice (once under its old name); keep only {prefix}{key}")
        out[section] = {**inner, name: out.pop(key)}
    for name, value in out.items():
        sub = _field_type(cls, name)
        if sub is not None:
            out[name] = upgrade_keys(value, sub, f"{prefix}{name}")
    return out


def first_difference(a: Any, b: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """The first key path where two YAML trees differ, with both values (``(absent)`` for a missing
    key), or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in [*a, *(k for k in b if k not in a)]:
            sub = f"{key}.{k}" if key else str(k)
            if k not in a or k not in b:
                return sub, a.get(k, "(absent)"), b.get(k, "(absent)")
            diff = first_difference(a[k], b[k], sub)
            if diff is not None:
                return diff
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            diff = first_difference(x, y, f"{key}[{i}]")
            if diff is not None:
                return diff
        return None
    return None if a == b else (key, a, b)


def short_value(v: Any) -> str:
    """A config value for a one-line message (JSON, at most 60 characters)."""
    import json

    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
