"""Typed run configuration, validated on load (STYLE: unknown keys are errors listing valid names).

``load_config(path, overrides=["client.lr=0.1", ...])`` reads YAML, applies ``--set`` overrides
(values parsed as YAML scalars), and builds nested dataclasses; every section validates itself in
``__post_init__`` and raises ``ConfigError`` with a one-line message naming the fix.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from pfedpg import typed
from pfedpg.client import ClientConfig
from pfedpg.data.config import DataConfig
from pfedpg.deprecation import RenamedKeyWarning, renamed
from pfedpg.errors import ConfigError
from pfedpg.models.backbone import ModelConfig
from pfedpg.models.device import check_amp, check_device_spec
from pfedpg.registry import Spec
from pfedpg.server import SERVERS, ServerConfig
from pfedpg.tracking import TrackingConfig
from pfedpg.typed import _default_of, _field_type, build_dataclass, first_difference, short_value
from pfedpg.yamlio import load_yaml, load_yaml_file  # noqa: F401  (load_yaml_file re-exported)

AUGMENTS = ("shift", "crop_flip")


@dataclass
class PretrainDataConfig:
    """``pretrain.data``: an external public data set to pretrain on instead of the run's own public
    split (e.g. Tiny-ImageNet-200). ``path`` is an ``.npz`` file in the toolkit's format or an image
    folder (``root/<class>/*`` or ``root/<domain>/<class>/*``); images are centre-cropped and resized
    to ``data.image_size``. Validation: ``val_path`` (same formats) if given, else the file's
    ``split == 1`` records if it has a split, else ``val_fraction`` of it (stratified by class), else
    none. Its SHA-256 (a folder: the names and sizes of its files) is part of the cache key."""

    path: str | None = None  # the training records: an .npz file or an image folder
    val_path: str | None = None  # the validation records, same formats
    val_fraction: float = 0.0  # without val_path or a split: this stratified fraction of path validates
    max_records: int | None = None  # a stratified subset of the training records (quick runs)

    def __post_init__(self):
        if not (isinstance(self.val_fraction, (int, float)) and 0 <= self.val_fraction < 1):
            raise ConfigError(f"pretrain.data.val_fraction={self.val_fraction!r} must be in [0, 1)")
        if self.max_records is not None and (not isinstance(self.max_records, int) or self.max_records < 1):
            raise ConfigError(f"pretrain.data.max_records={self.max_records!r} must be a positive integer or null")
        if self.val_path is not None and self.val_fraction:
            raise ConfigError("pretrain.data.val_fraction is set but val_path gives the validation set; "
                              "drop one of them")
        if self.path is None and (self.val_path is not None or self.val_fraction or self.max_records is not None):
            raise ConfigError("pretrain.data.val_path / val_fraction / max_records need pretrain.data.path "
                              "(the data set to pretrain on)")


@dataclass
class PretrainConfig:
    """``pfedpg-eval pretrain`` / ``model.weights: pretrain``: supervised training of the whole
    backbone on the data's public split (never given to clients), cached by config hash."""

    epochs: int = 30
    lr: float = 2e-3  # AdamW
    weight_decay: float = 0.05  # AdamW
    batch_size: int = 64
    label_smoothing: float = 0.1
    cache_dir: str = "~/.cache/pfedpg-eval/backbones"  # <model.name>-<key>.safetensors, its .json and log
    # Train the backbone together with one prompt per domain (inserted as model.prompt_depth and
    # model.num_prompts say), so that it learns to read its prompt: a *promptable* backbone, whose
    # right prompt undoes a domain's shift. The domain prompts are discarded; clients never see them.
    # The positive control uses it (configs/positive_control.yaml); false = plain supervised training.
    domain_prompts: bool = False
    # ``data.composite: overlay`` only: draw every public image's distractor channels afresh each
    # epoch, from the label channels of other *public* records (the label channel is kept). The
    # public split is small (~540 records for the embedded digits); fixed distractor pairs let the
    # backbone memorise them, re-drawn ones make it read the channel its prompt points to.
    remix: bool = False
    # With domain_prompts and remix: the backbone is also trained so that under a fresh initial
    # prompt (what a client starts from) it predicts the even mixture of all channels' digits. The
    # unprompted backbone then reads every channel at once and only a learned prompt selects one,
    # whichever the seed (without it, each pretraining settles on a default channel of its own).
    mixed_default: bool = False
    # The recipe (DESIGN §3). shift: random translation by up to S/8 pixels (reflect padding);
    # crop_flip: the same random crop plus a horizontal flip (natural images, not digits).
    augment: str = "shift"
    warmup_epochs: int = 1  # linear warm-up, then cosine decay to 0 over the remaining steps
    # Start from these weights instead of a random init (e.g. continue a backbone on new data).
    init: str | None = None
    # Save the whole training state every this many epochs beside the cache entry
    # (<name>-<key>.partial.pt); an interrupted pretraining resumes there, bit for bit. 0 = never.
    checkpoint_every: int = 1
    # null: the run's `device`; or auto | cpu | cuda | cuda:N (the cached weights are the same format)
    device: str | None = None
    amp: bool = False    # bfloat16 autocast, CUDA only
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)

    def __post_init__(self):
        for key in ("epochs", "batch_size"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"pretrain.{key}={v!r} must be a positive integer")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"pretrain.lr={self.lr!r} must be a positive number")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"pretrain.label_smoothing={self.label_smoothing!r} must be in [0, 1)")
        if not isinstance(self.remix, bool):
            raise ConfigError(f"pretrain.remix={self.remix!r} must be true or false")
        if not isinstance(self.mixed_default, bool):
            raise ConfigError(f"pretrain.mixed_default={self.mixed_default!r} must be true or false")
        if self.mixed_default and not (self.remix and self.domain_prompts):
            raise ConfigError("pretrain.mixed_default needs pretrain.remix and pretrain.domain_prompts (set both true)")
        if self.augment not in AUGMENTS:
            raise ConfigError(f"pretrain.augment={self.augment!r} is not one of {', '.join(AUGMENTS)}")
        for key in ("warmup_epochs", "checkpoint_every"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"pretrain.{key}={v!r} must be an integer >= 0")
        if self.device is not None:
            check_device_spec(self.device, "pretrain.device")
        if self.amp and self.device == "cpu":
            raise ConfigError("pretrain.amp (bfloat16 autocast) needs a CUDA device; drop amp on pretrain.device: cpu")
        if self.data.path is not None and self.remix:
            raise ConfigError("pretrain.remix re-draws the run's own overlay split; "
                              "it cannot apply to pretrain.data.path")


@dataclass
class PrivacyConfig:
    """What leaves a client besides its DP release (DESIGN §5). Under a DP mechanism (``dp_client``,
    ``dp_sgd``) a client sends the release and what the privacy statement names as public (split
    sizes, the number of local steps, the accountant's state); its training losses, clipped
    fractions, evaluation accuracies and losses and hook measurements stay with it — in a Flower run
    each client writes them to its own metrics file, which the simulation driver merges for the study
    after the run. ``release_metrics: true`` sends them to the server as well, and the statement then
    lists them as released outside the guarantee. The in-process runner stands for both sides and
    always keeps them."""

    release_metrics: bool = False  # true: send them to the server too (named outside the guarantee)


ENGINES = ("inprocess", "flower")
FAILURE_POLICIES = ("continue", "fail")


@dataclass
class FlowerConfig:
    """``engine: flower`` (DESIGN §9): the run's server logic in a Flower ServerApp and each
    client's in a ClientApp, on Flower's simulation engine (``superlink: null``) or on a deployment
    (``superlink``: host:port of a running SuperLink's control API, one SuperNode per client started
    with ``--node-config partition-id=<client>``). Needs ``pip install '.[flower]'``."""

    superlink: str | None = None  # null: the simulation engine; host:port: a deployment's SuperLink
    # A deployment uses TLS: root_certificates is the SuperLink's CA certificate (PEM; make a test CA
    # with `pfedpg-eval flower-certs DIR`). insecure: true = plaintext, explicit and logged as a warning.
    insecure: bool = False
    root_certificates: str | None = None
    client_cpus: int = 1  # simulation engine: whole CPUs reserved per ClientApp (Ray actor)
    # simulation engine: the share of a GPU reserved per ClientApp actor (e.g. 0.25: four actors per
    # GPU; Ray then shows each actor its GPU and `device: auto` uses it). 0 = CPU actors.
    client_gpus: float = 0.0
    node_wait_s: float = 120.0  # deployment: how long to wait for every client's SuperNode
    round_timeout_s: float = 600.0  # a client without a reply by then has failed this round
    on_client_failure: str = "continue"  # continue: the round goes on without it | fail: stop the run
    # Deployment with node-local data: the run's number of clients. Each SuperNode brings its own
    # records (--node-config "partition-id=<client> data-path=<npz or image folder>") and the server
    # holds none. null: every node partitions the run's data file and keeps its partition-id's share.
    num_clients: int | None = None

    def __post_init__(self):
        if self.superlink is not None:
            host, _, port = self.superlink.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"flower.superlink={self.superlink!r} must be host:port of the SuperLink "
                                  "(e.g. 127.0.0.1:9093), or null for the simulation engine")
        if self.client_cpus < 1:  # (an integer: the config's types are checked first)
            raise ConfigError(f"flower.client_cpus={self.client_cpus!r} must be a whole number of CPUs ≥ 1 (Flower "
                              "1.42's simulation reserves whole CPUs per ClientApp actor)")
        if not (math.isfinite(self.client_gpus) and 0 <= self.client_gpus):
            raise ConfigError(f"flower.client_gpus={self.client_gpus!r} must be a number >= 0 "
                              "(a GPU share per ClientApp actor, e.g. 0.25; 0 = CPU only)")
        for key in ("node_wait_s", "round_timeout_s"):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"flower.{key}={v!r} must be a positive number")
        if self.on_client_failure not in FAILURE_POLICIES:
            raise ConfigError(f"flower.on_client_failure={self.on_client_failure!r} is not one of "
                              f"{', '.join(FAILURE_POLICIES)}")
        if self.num_clients is not None:
            if not isinstance(self.num_clients, int) or isinstance(self.num_clients, bool) or self.num_clients < 1:
                raise ConfigError(f"flower.num_clients={self.num_clients!r} must be a positive integer (or null)")
            if self.superlink is None:
                raise ConfigError("flower.num_clients (node-local data) needs a deployment: set flower.superlink "
                                  "to the SuperLink's host:port, or drop num_clients for the simulation engine")
        if self.root_certificates is not None and self.insecure:
            raise ConfigError("flower.root_certificates is set but flower.insecure is true; "
                              "set insecure: false for TLS")
        if self.superlink is not None and not self.insecure and self.root_certificates is None:
            raise ConfigError("flower.superlink connects with TLS by default: set flower.root_certificates to the "
                              "SuperLink's CA certificate (make a CA and certificates with "
                              "`pfedpg-eval flower-certs DIR`), "
                              "or set flower.insecure: true for plaintext on a trusted network")


@dataclass
class RunConfig:
    seed: int = 0  # the master seed: every random stream is spawned from it, keyed by component
    method: str = "pfedpg"  # pfedpg | fedvpt | local
    rounds: int = 20  # T (paper: 100)
    clients_per_round: int | None = None  # m; None = all N clients every round (the paper)
    eval_every: int = 1  # evaluate every client every k rounds (and always after the last)
    # test: each client's test split. val: its validation split (data.val_fraction > 0) — tune
    # hyperparameters there, never on test.
    evaluate_on: str = "test"
    # every k rounds; 0 = none in between. The final round is always saved (the trained state)
    checkpoint_every: int = 5
    output_dir: str = "runs"  # `train` without --run-dir writes output_dir/run_name
    run_name: str | None = None  # null: METHOD-SOURCE-seedSEED
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    # One device for the whole run (DESIGN §9): auto = the first GPU when torch sees one, else the
    # CPU; cpu; cuda; cuda:N. Backbone, clients, server, DP mechanisms, attacks and probes run on it.
    device: str = "auto"
    # bf16: bfloat16 autocast of the frozen backbone's forward and backward (CUDA only); prompts,
    # heads, the server step, clipping and DP noise stay float32. null: float32 throughout.
    amp: str | None = None
    # On a GPU: deterministic kernels (same device, config and seed -> same numbers), no TF32.
    # false: cuDNN autotuning (faster, not bit-reproducible). No effect on the CPU.
    deterministic: bool = True
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
    # {name: ..., **options} per hook (docs: plug-in reference), called in this order at every hook point
    hooks: list[dict[str, Any]] = field(default_factory=list)
    flower: FlowerConfig = field(default_factory=FlowerConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow / TensorBoard (pfedpg/tracking.py)

    RENAMED: ClassVar[dict[str, str]] = {"new_client_rounds": "data.new_client_rounds"}

    def __post_init__(self):
        check_device_spec(self.device, "device")
        check_amp(self.amp, self.device)
        self.hook_specs  # every entry a mapping with a name, or a one-line error now
        if self.engine not in ENGINES:
            raise ConfigError(f"engine={self.engine!r} is not one of {', '.join(ENGINES)}")
        if self.method not in SERVERS:
            SERVERS.get(self.method)
        for key in ("rounds", "eval_every"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{key}={v!r} must be a positive integer")
        if self.data.new_clients is not None and self.engine != "inprocess":
            raise ConfigError("data.new_clients runs on engine: inprocess only (the Flower engine has no join rounds "
                              "yet); drop data.new_clients or use engine: inprocess")
        if not isinstance(self.batched_clients, bool):
            raise ConfigError(f"batched_clients={self.batched_clients!r} must be true or false")
        if self.evaluate_on not in ("test", "val"):
            raise ConfigError(f"evaluate_on={self.evaluate_on!r} is not one of test, val")
        if self.evaluate_on == "val" and self.data.val_fraction == 0:
            raise ConfigError("evaluate_on=val needs a validation split: set data.val_fraction > 0")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every={self.checkpoint_every!r} must be an integer >= 0 "
                              "(0 = only the final round)")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r} must be a non-negative integer")
        if self.clients_per_round is not None and (not isinstance(self.clients_per_round, int)
                                                   or self.clients_per_round < 1):
            raise ConfigError(f"clients_per_round={self.clients_per_round!r} must be a positive integer or null (all)")
        if self.pretrain.remix and self.data.composite != "overlay":
            raise ConfigError("pretrain.remix re-draws overlay distractors: it needs data.composite: overlay "
                              "(set it, or drop pretrain.remix)")
        size = self.model.image_size()
        if size is not None and size != self.data.image_size:
            raise ConfigError(
                f"model.kwargs.img_size={size} differs from data.image_size={self.data.image_size}; "
                "set both to the same size"
            )

    @property
    def hook_specs(self) -> list[Spec]:
        """``hooks`` typed, one Spec per entry (``hooks`` keeps the YAML form that config.yaml writes)."""
        return [Spec.parse(e, f"hooks[{i}]", bare_name=False) for i, e in enumerate(self.hooks)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """``a.b=value`` with value parsed as YAML (``0.1``, ``true``, ``[1, 2]``, ``null``)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r} must look like key.sub=value")
    key, raw = assignment.split("=", 1)
    try:
        value = load_yaml(raw)
    except yaml.YAMLError:
        value = raw
    parts = _upgrade_path(key.strip().split("."))
    node = tree
    cls: Any = RunConfig
    for p in parts[:-1]:
        if p not in node:
            # A mapping-valued field (model.kwargs) starts from its default, so that one --set key
            # changes one entry instead of replacing the whole mapping.
            default = _default_of(cls, p)
            node[p] = copy.deepcopy(default) if isinstance(default, dict) else {}
        node = node[p]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p} is not a section")
        cls = _field_type(cls, p)
    node[parts[-1]] = value


def _upgrade_path(parts: list[str]) -> list[str]:
    """A ``--set`` key's parts with renamed keys under their new names (one warning each)."""
    out: list[str] = []
    cls: Any = RunConfig
    for i, p in enumerate(parts):
        new = getattr(cls, "RENAMED", {}).get(p) if dataclasses.is_dataclass(cls) else None
        if new is not None:
            renamed(".".join(out + [p]), ".".join(out + [new]))
            return _upgrade_path(out + new.split(".") + parts[i + 1:])
        out.append(p)
        cls = _field_type(cls, p)
    return out


def upgrade_keys(tree: Any, cls: Any = None, where: str = "") -> Any:
    """:func:`pfedpg.typed.upgrade_keys` from the top of a run config (``cls``: RunConfig)."""
    return typed.upgrade_keys(tree, RunConfig if cls is None else cls, where)


def config_from_dict(values: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    tree = upgrade_keys(dict(values or {}))
    for o in overrides or []:
        apply_override(tree, o)
    return build_dataclass(RunConfig, tree)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found; pass --config with an existing YAML file "
                              "(see configs/)")
        values = load_yaml_file(p) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return config_from_dict(values, overrides)


def saved_config(text: str) -> RunConfig:
    """A config this toolkit wrote (a run's config.yaml, a checkpoint's copy), resolved under
    today's key names without warnings: a run saved before a rename stays the same run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RenamedKeyWarning)
        return config_from_dict(load_yaml(text) or {})


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def difference(old: RunConfig, new: RunConfig, *, ignore: tuple[str, ...] = ()) -> str | None:
    """``"KEY: OLD → NEW"`` for the first key (``client.lr``, ``hooks[1].delta``) where two configs
    differ, top-level keys in ``ignore`` left out; None when they are the same."""
    a, b = yaml.safe_load(dump_config(old)), yaml.safe_load(dump_config(new))
    for k in ignore:
        a.pop(k, None), b.pop(k, None)
    diff = first_difference(a, b)
    return None if diff is None else f"{diff[0]}: {short_value(diff[1])} → {short_value(diff[2])}"

