"""Name registries: a YAML string becomes an object in one place (timm's ``register_model`` pattern).

Every check reads the live registry, so a plug-in registered after import (a script or notebook
that calls the Python API, a test) is a valid choice at once; ``override`` swaps an entry for the length of a
``with`` block (tests); ``construct`` builds a registered class from a config mapping, checking the
options against its constructor's signature, so each class owns its options."""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

from pfedpg.errors import ConfigError

T = TypeVar("T")
_MISSING = object()


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    @contextmanager
    def override(self, name: str, obj: T) -> Iterator[T]:
        """``name`` means ``obj`` inside the block (registered anew, or replacing the entry), and what
        it meant before afterwards."""
        before = self._items.get(name, _MISSING)
        self._items[name] = obj
        try:
            yield obj
        finally:
            if before is _MISSING:
                self._items.pop(name, None)
            else:
                self._items[name] = before

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._items)) or '(none registered)'}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def in_order(self) -> list[str]:
        """The names in the order they were registered (where the order means something: the
        leakage probes run in it)."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._items
        except TypeError:  # an unhashable config value is no name
            return False

    def construct(self, name: str, options: Mapping[str, Any], *, where: str, **given: Any) -> Any:
        """``get(name)(**given, **options)``, the options checked against its signature first."""
        return construct(self.get(name), dict(options), where=where, **given)


def option_names(cls: type) -> tuple[list[str], bool]:
    """The keyword options ``cls(...)`` takes — its own and, where an ``__init__`` passes ``**kwargs``
    on, its bases' — and whether it takes any (``**kwargs`` all the way up)."""
    valid: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        params = inspect.signature(init).parameters
        valid += [p for p, v in params.items()
                  if p != "self" and v.kind in (v.KEYWORD_ONLY, v.POSITIONAL_OR_KEYWORD) and p not in valid]
        if not any(v.kind == v.VAR_KEYWORD for v in params.values()):
            return valid, False
    return valid, True


def construct(cls: type, options: dict[str, Any], *, where: str, **given: Any) -> Any:
    """``cls(**given, **options)`` with one-line errors naming ``where`` and the options ``cls`` takes;
    ``given`` are what the caller supplies itself (not config options)."""
    valid, takes_any = option_names(cls)
    choices = [p for p in valid if p not in given]
    unknown = [k for k in options if k not in choices]
    if unknown and not takes_any:
        raise ConfigError(f"{where}: unknown option {unknown[0]!r}; its options are {', '.join(choices) or '(none)'}")
    try:
        return cls(**given, **options)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}; its options are {', '.join(choices) or '(none)'}") from None
