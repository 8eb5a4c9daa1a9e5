"""YAML as configs are written today: the YAML 1.2 core schema for numbers and booleans
(:class:`YAMLLoader`), and a file's syntax error as one ConfigError line with its line and column."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from pfedpg.errors import ConfigError


class YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader with the YAML 1.2 core schema for booleans and numbers: ``1e-3``,
    ``1E5``, ``.5``, ``-2e-4`` are floats (YAML 1.1, PyYAML's default, reads the first two as
    strings); ``010`` is ten, ``0o17`` and ``0x10`` are octal and hex; ``1_000``, ``yes``, ``on`` and
    ``1:30`` stay strings (YAML 1.1 reads them as 1000, True, True and 90)."""


# Drop the YAML 1.1 resolvers for bool / int / float, then add the YAML 1.2 core ones.
YAMLLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int",
                                                  "tag:yaml.org,2002:float")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                                 list("-+0123456789"))
YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _construct_int(loader, node) -> int:
    v = loader.construct_scalar(node)
    if v.startswith("0o"):
        return int(v[2:], 8)
    if v.startswith("0x"):
        return int(v[2:], 16)
    return int(v, 10)


def _construct_bool(loader, node) -> bool:
    return loader.construct_scalar(node).lower() == "true"


YAMLLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
YAMLLoader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)


def load_yaml(text: str):
    """YAML text -> Python values, with YAML 1.2 numbers (:class:`YAMLLoader`)."""
    return yaml.load(text, Loader=YAMLLoader)


def load_yaml_file(path: str | Path, what: str = "config file"):
    """A YAML file's values; a syntax error is one ConfigError line with the line and column."""
    p = Path(path)
    try:
        return load_yaml(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context = getattr(e, "context", None)
        raise ConfigError(f"{what} {str(p)!r} is not valid YAML{where}: {problem}"
                          + (f" ({context})" if context else "") + "; fix the file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {str(p)!r} is not a text file; pass a YAML file") from None
