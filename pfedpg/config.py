"""Typed run configuration, validated on load (STYLE: unknown keys are errors listing valid names).

``load_config(path, overrides=["client.lr=0.1", ...])`` reads YAML, applies ``--set`` overrides
(values parsed as YAML scalars), and builds nested dataclasses; every section validates itself in
``__post_init__`` and raises ``ConfigError`` with a one-line message naming the fix.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pfedpg.client import ClientConfig
from pfedpg.data.config import DataConfig
from pfedpg.errors import ConfigError
from pfedpg.models.backbone import ModelConfig
from pfedpg.server import SERVERS, ServerConfig


@dataclass
class PretrainConfig:
    """``pfedpg-eval pretrain`` / ``model.weights: pretrain``: supervised training of the whole
    backbone on the data's public split (never given to clients), cached by config hash."""

    epochs: int = 30
    lr: float = 2e-3
    weight_decay: float = 0.05
    batch_size: int = 64
    label_smoothing: float = 0.1
    cache_dir: str = "~/.cache/pfedpg-eval/backbones"
    # Train the backbone together with one prompt per domain (inserted as model.prompt_depth and
    # model.num_prompts say), so that it learns to read its prompt: a *promptable* backbone, whose
    # right prompt undoes a domain's shift. The domain prompts are discarded; clients never see them.
    # The positive control uses it (configs/positive_control.yaml); false = plain supervised training.
    domain_prompts: bool = False

    def __post_init__(self):
        for key in ("epochs", "batch_size"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"pretrain.{key}={v!r} must be a positive integer")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"pretrain.lr={self.lr!r} must be a positive number")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"pretrain.label_smoothing={self.label_smoothing!r} must be in [0, 1)")


ENGINES = ("inprocess", "flower")
FAILURE_POLICIES = ("continue", "fail")


@dataclass
class FlowerConfig:
    """``engine: flower`` (DESIGN §9): the run's server logic in a Flower ServerApp and each
    client's in a ClientApp, on Flower's simulation engine (``superlink: null``) or on a deployment
    (``superlink``: host:port of a running SuperLink's control API, one SuperNode per client started
    with ``--node-config partition-id=<client>``). Needs ``pip install '.[flower]'``."""

    superlink: str | None = None
    insecure: bool = True  # plain HTTP to the SuperLink; false needs TLS (root_certificates)
    root_certificates: str | None = None  # PEM file of the SuperLink's CA, for insecure: false
    client_cpus: float = 1.0  # simulation engine: CPUs reserved per ClientApp (Ray actor)
    node_wait_s: float = 120.0  # deployment: how long to wait for every client's SuperNode
    round_timeout_s: float = 600.0  # a client without a reply by then has failed this round
    on_client_failure: str = "continue"  # continue: the round goes on without it | fail: stop the run

    def __post_init__(self):
        if self.superlink is not None:
            host, _, port = self.superlink.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"flower.superlink={self.superlink!r} must be host:port of the SuperLink "
                                  "(e.g. 127.0.0.1:9093), or null for the simulation engine")
        for key in ("client_cpus", "node_wait_s", "round_timeout_s"):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"flower.{key}={v!r} must be a positive number")
        if self.on_client_failure not in FAILURE_POLICIES:
            raise ConfigError(f"flower.on_client_failure={self.on_client_failure!r} is not one of {', '.join(FAILURE_POLICIES)}")
        if self.root_certificates is not None and self.insecure:
            raise ConfigError("flower.root_certificates is set but flower.insecure is true; set insecure: false for TLS")


@dataclass
class RunConfig:
    seed: int = 0
    method: str = "pfedpg"  # pfedpg | fedvpt | local
    rounds: int = 20  # T (paper: 100)
    clients_per_round: int | None = None  # m; None = all N clients every round (the paper)
    eval_every: int = 1  # evaluate every client every k rounds (and always after the last)
    # test: each client's test split. val: its validation split (data.val_fraction > 0) — tune
    # hyperparameters there, never on test.
    evaluate_on: str = "test"
    checkpoint_every: int = 5  # 0 disables checkpoints
    output_dir: str = "runs"
    run_name: str | None = None
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    # Train a round's clients in one batched forward/backward (each sample with its own client's
    # prompt and head): the same updates as one after another, to float tolerance (DESIGN §9).
    # Clients with a local_training hook (dp_sgd) still train one after another.
    batched_clients: bool = False
    # inprocess: the reference runner, one process. flower: the same rounds through Flower's
    # ServerApp/ClientApp (section ``flower``); same config and seed, same numbers (DESIGN §9).
    engine: str = "inprocess"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    hooks: list[dict[str, Any]] = field(default_factory=list)
    flower: FlowerConfig = field(default_factory=FlowerConfig)

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ConfigError(f"engine={self.engine!r} is not one of {', '.join(ENGINES)}")
        if self.method not in SERVERS:
            SERVERS.get(self.method)
        for key in ("rounds", "eval_every"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{key}={v!r} must be a positive integer")
        if not isinstance(self.batched_clients, bool):
            raise ConfigError(f"batched_clients={self.batched_clients!r} must be true or false")
        if self.evaluate_on not in ("test", "val"):
            raise ConfigError(f"evaluate_on={self.evaluate_on!r} is not one of test, val")
        if self.evaluate_on == "val" and self.data.val_fraction == 0:
            raise ConfigError("evaluate_on=val needs a validation split: set data.val_fraction > 0")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every={self.checkpoint_every!r} must be an integer >= 0 (0 disables)")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r} must be a non-negative integer")
        if self.clients_per_round is not None and (not isinstance(self.clients_per_round, int) or self.clients_per_round < 1):
            raise ConfigError(f"clients_per_round={self.clients_per_round!r} must be a positive integer or null (all)")
        size = self.model.image_size()
        if size is not None and size != self.data.image_size:
            raise ConfigError(
                f"model.kwargs.img_size={size} differs from data.image_size={self.data.image_size}; set both to the same size"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Generic dataclass construction with one-line errors


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


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
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r} must be a string")
        return value
    return value


def build_dataclass(cls, values: dict[str, Any], where: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{where}." if where else ""
    unknown = [k for k in values if k not in names]
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; valid keys{' in ' + where if where else ''}: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        # Section validators name their own fields; add the section prefix when it is missing.
        if where and not msg.startswith(where) and any(msg.startswith(n) for n in names):
            msg = f"{where}.{msg}"
        raise ConfigError(msg) from None


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """``a.b=value`` with value parsed as YAML (``0.1``, ``true``, ``[1, 2]``, ``null``)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r} must look like key.sub=value")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p} is not a section")
    node[parts[-1]] = value


def config_from_dict(values: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    tree = dict(values or {})
    for o in overrides or []:
        apply_override(tree, o)
    return build_dataclass(RunConfig, tree)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found; pass --config with an existing YAML file (see configs/)")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return config_from_dict(values, overrides)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
