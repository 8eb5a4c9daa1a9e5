"""Name registries: a YAML string becomes an object in one place (timm's ``register_model`` pattern).

Every check reads the live registry, so a plug-in registered after import (a script or notebook
that calls the Python API, a test) is a valid choice at once; ``override`` swaps an entry for the length of a
``with`` block (tests); ``construct`` builds a registered class from a config mapping, checking the
options against its constructor's signature, so each class owns its options."""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

from pfedpg.errors import ConfigError

T = TypeVar("T")
_MISSING = object()


@dataclass(frozen=True)
class Spec:
    """A registered thing as a config names it — ``name`` or ``{name: ..., **options}`` in YAML —
    typed: the hooks' entries, the leakage probes, the server's generator. ``to_config`` gives the
    YAML form back."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: Any, where: str, *, bare_name: bool = True) -> Spec:
        if isinstance(value, Spec):
            return value
        if bare_name and isinstance(value, str):
            return cls(value)
        if not (isinstance(value, Mapping) and isinstance(value.get("name"), str)):
            raise ConfigError(f"{where} must be {'a name or ' if bare_name else ''}a mapping with a `name` key, "
                              f"got {value!r}")
        return cls(value["name"], {k: v for k, v in value.items() if k != "name"})

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, **self.options}


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

    def check(self, spec: Spec, *, where: str, given: tuple[str, ...] = ()) -> None:
        """The one-line errors ``build`` would raise for an unknown name or option, without building."""
        check_options(self.get(spec.name), spec.options, where=where, given=given)

    def build(self, spec: Spec, *, where: str, **given: Any) -> Any:
        """The registered class ``spec`` names, built with its options (and ``given``)."""
        return self.construct(spec.name, spec.options, where=where, **given)


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


def check_options(cls: type, options: Mapping[str, Any], *, where: str, given=()) -> list[str]:
    """A one-line error naming ``where`` and the options ``cls`` takes if ``options`` holds another;
    returns those options (``given``: what the caller supplies itself, not config options)."""
    valid, takes_any = option_names(cls)
    choices = [p for p in valid if p not in given]
    unknown = [k for k in options if k not in choices]
    if unknown and not takes_any:
        raise ConfigError(f"{where}: unknown option {unknown[0]!r}; its options are {', '.join(choices) or '(none)'}")
    return choices


def construct(cls: type, options: dict[str, Any], *, where: str, **given: Any) -> Any:
    """``cls(**given, **options)`` with one-line errors naming ``where`` and the options ``cls`` takes."""
    choices = check_options(cls, options, where=where, given=given)
    try:
        return cls(**given, **options)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}; its options are {', '.join(choices) or '(none)'}") from None
