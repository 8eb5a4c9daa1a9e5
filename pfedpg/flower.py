"""The Flower engine (DESIGN §9): the in-process runner's rounds, with every client in a Flower
ClientApp and the server in a ServerApp. Needs the ``flower`` extra (``pip install '.[flower]'``).

Same config and seed, same numbers: both sides build the run from the same resolved config and
derive every random stream from the same master seed, so a client's ClientApp trains exactly what
``Trainer.train_client`` would, and the ServerApp runs the in-process server step, hooks,
evaluation schedule, checkpoints and run directory unchanged (``FlowerTrainer`` overrides only how
the clients are reached; the server holds no client data and learns N and the split sizes from the
clients' answers to the set-up query).

Messages (one client per SuperNode; the node's ``partition-id`` is the client id):

=========  =====================================  =============================================
type       server -> client                       client -> server
=========  =====================================  =============================================
query      nothing                                N, the classes, its client id and split sizes
                                                  (not its domain or label counts)
train      round, P_n (methods that send one)     ΔP_n after its client-side hooks, the training
                                                  row, and its hooks' ``client_state`` (e.g. the
                                                  client's privacy accountant)
evaluate   round, P_n of the updated server       its evaluation row (adapted and generated)
=========  =====================================  =============================================

Where a client's data comes from: with ``flower.num_clients: null`` every node partitions the run's
data set from the config and keeps only the share of the client it is serving (its
``partition-id``; a simulation actor, which serves many virtual clients, reads the next client's
shard when it switches: :class:`PartitionNodeTrainer`) — simulation and tests. With
``flower.num_clients: N`` (a deployment) each SuperNode brings its own records — ``--node-config
"partition-id=<client> data-path=<npz or image folder>"`` plus, optionally, ``test-path=<file or
folder>`` (its test split; else an npz ``split`` key, else ``test-fraction=<f>``, default
``data.test_fraction``) and ``backbone-path=<file>`` (where this node keeps the run's backbone) —
and trains on exactly those (:class:`NodeTrainer`); nothing but the config and the backbone is
shared, and the server holds no records.

A node may keep its built client alive across messages: with ``worker=<socket path>`` in its
node config, Flower's per-message ClientApp process hands the message to a long-running worker on
the node (``evaluations.flower_worker``), which serves it with one cached :class:`ClientRuntime`.

What stays on the client: its data, adapted prompt P̃_n and head H_n (in the node's Flower
``context.state`` between rounds), and its side of the hooks. The ServerApp holds the server, the
server-side hooks and the run directory. Client-side hooks run in the ClientApp, server-side ones
in the ServerApp; a hook that reads clients' models from the server side (``inprocess_only``) is
refused with the reason.

Failures: a client whose ClientApp raises, whose SuperNode goes offline, or that has not replied
within ``flower.round_timeout_s`` is logged and recorded in the round (``failed_clients``); with
``flower.on_client_failure: continue`` the round goes on without its delta (as a dropped client),
with ``fail`` the run stops with a one-line error. Finished rounds are already in metrics.jsonl.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from pfedpg.client import ClientState
from pfedpg.config import RunConfig, config_from_dict
from pfedpg.errors import ClientFailure, ConfigError, DataError
from pfedpg.hooks import build_hooks
from pfedpg.runner import Trainer


def check_supported(cfg: RunConfig, hooks, *, resume: bool = False) -> None:
    """One-line errors for what the Flower engine cannot run (``hooks``: the run's HookChain)."""
    if resume:
        raise ConfigError("--resume continues in-process runs only: Flower clients keep their state for one Flower "
                          "run; start a new run")
    if cfg.batched_clients:
        raise ConfigError("batched_clients trains clients of one process together; with engine=flower each client "
                          "trains in its own ClientApp: set batched_clients: false")
    refused = hooks.inprocess_only()
    if refused:
        raise ConfigError(f"hook {refused[0]} — it runs only with engine: inprocess")


def _pack(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _tensor_record(**tensors: torch.Tensor) -> ArrayRecord:
    """Tensors as a message's arrays (from the CPU: a message carries host bytes)."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def _tensor(record: ArrayRecord, key: str) -> torch.Tensor:
    return record.to_torch_state_dict()[key]


def settings_from(values: dict[str, Any]) -> tuple[RunConfig, str, str | None]:
    """(config, run_dir, backbone_path) from the run settings the driver hands both apps."""
    import yaml

    for key in ("config-yaml", "run-dir"):
        if key not in values:
            raise ConfigError(f"the Flower run config lacks {key!r}; start Flower runs with "
                              "`pfedpg-eval train --set engine=flower` (it writes the app's config)")
    cfg = config_from_dict(yaml.safe_load(values["config-yaml"]))
    return cfg, str(values["run-dir"]), (str(values.get("backbone-path")) or None)


# ------------------------------------------------------------------------------------------------
# Client side

#: what a SuperNode's --node-config may hold
NODE_KEYS = ("partition-id", "data-path", "test-path", "test-fraction", "backbone-path", "worker", "device",
             "metrics-dir", "num-partitions")  # (the simulation engine sets num-partitions)

#: What a training reply may carry besides the release under a DP mechanism: public by the privacy
#: statement (a function of the client's split size and the schedule). Everything else in a client's
#: rows stays with it unless privacy.release_metrics (DESIGN §5, "What leaves a client").
PUBLIC_ROW_KEYS = ("local_steps",)


def node_dataset(cfg: RunConfig, path: str, key: str):
    """One node's own records from an npz file or an image folder, with the run's image size and
    class list (``data.classes``) and no public split."""
    from pfedpg.data import load_dataset

    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"node-config {key}={str(p)!r} not found on this node; point it at this node's npz file or "
                        "image folder (root/<class>/*.png or root/<domain>/<class>/*.png)")
    if p.is_file() and p.suffix == ".npz":
        source = "npz"
    elif p.is_dir():
        source = "folder"
    else:
        raise DataError(f"node-config {key}={str(p)!r} must be an .npz file or an image folder")
    dcfg = dataclasses.replace(cfg.data, source=source, path=str(p), public_fraction=0.0, domains=None, composite=None,
                               private_domains=None, public_domains=None)
    return load_dataset(dcfg, seed=cfg.seed)


class NodeTrainer(Trainer):
    """The client side of a deployment with node-local data: the run (model, server state for the
    initial prompts, hooks, seeds) built from the config, and client ``client``'s data from this
    node's own files only. The other clients exist as ids; their data is nowhere here."""

    def __init__(self, cfg: RunConfig, *, client: int, node_config: dict[str, Any], backbone_path: str | None):
        self.client, self.node_config = client, node_config
        backbone_path = node_config.get("backbone-path") or backbone_path
        if cfg.model.weights == "pretrain":
            if not backbone_path or not Path(backbone_path).is_file():
                raise ConfigError(f"this node has no backbone file {backbone_path!r}; copy the run's backbone here and "
                                  "start the SuperNode with --node-config \"... backbone-path=<file>\"")
        if cfg.evaluate_on != "test":
            raise ConfigError("evaluate_on: val is not available with node-local data (a node has a test split only); "
                              "set evaluate_on: test")
        sgd = [h for h in cfg.hooks if h.get("name") == "dp_sgd"]
        if sgd and sgd[0].get("delta") is None:
            raise ConfigError("dp_sgd.delta must be set with node-local data: its default 1/(10·min_n |D_n|) needs every "
                              "client's size, which no node knows")
        super().__init__(cfg, run_dir=Path("."), backbone_path=backbone_path)

    def load_clients(self) -> None:
        import numpy as np

        from pfedpg.data.partition import _cap, stratified_choice
        from pfedpg.seeding import Seeds

        cfg, n, nc = self.cfg, self.client, self.node_config
        ds = node_dataset(cfg, str(nc["data-path"]), "data-path")
        if nc.get("test-path"):
            test_ds = node_dataset(cfg, str(nc["test-path"]), "test-path")
            if list(test_ds.class_names) != list(ds.class_names):
                raise DataError(f"node-config test-path has classes {list(test_ds.class_names)}, data-path "
                                f"{list(ds.class_names)}; they must be the same list (or set data.classes)")
            train_idx, test_idx = np.arange(len(ds)), None
        elif ds.split is not None:
            train_idx, test_idx, test_ds = np.flatnonzero(ds.split == 0), np.flatnonzero(ds.split == 1), ds
        else:
            frac = float(nc.get("test-fraction", cfg.data.test_fraction))
            if not 0 < frac < 1:
                raise ConfigError(f"node-config test-fraction={frac} must be in (0, 1)")
            k = max(1, round(frac * len(ds)))
            if len(ds) - k < 1:
                raise DataError(f"this node's {len(ds)} records are too few for a train/test split; bring more or pass "
                                "test-path")
            test_pos = stratified_choice(ds.labels, total=k, rng=Seeds(cfg.seed).numpy("node.split", client=n))
            train_idx, test_idx, test_ds = np.delete(np.arange(len(ds)), test_pos), test_pos, ds
        if test_idx is None:
            test_idx = np.arange(len(test_ds))
        # The partition's own caps: stratified, one seeded stream per cap and client.
        seeds = Seeds(cfg.seed)
        train_idx = _cap(ds, train_idx, cfg.data.max_train_per_client, seeds.numpy("data.subsample.train", client=n))
        test_idx = _cap(test_ds, test_idx, cfg.data.max_test_per_client, seeds.numpy("data.subsample.test", client=n))
        if len(train_idx) == 0 or len(test_idx) == 0:
            raise DataError(f"this node has {len(train_idx)} training and {len(test_idx)} test records; both must be > 0")

        self.num_clients = int(cfg.flower.num_clients)
        if not 0 <= n < self.num_clients:
            raise ConfigError(f"partition-id={n}, but the run has flower.num_clients={self.num_clients} clients "
                              f"(0..{self.num_clients - 1})")
        self.num_classes = ds.num_classes
        self.class_names, self.domain_names = list(ds.class_names), []
        empty = (torch.empty(0), torch.empty(0, dtype=torch.long))
        self.train_data = [empty] * self.num_clients
        self.test_data = [empty] * self.num_clients
        self.train_data[n] = self.as_tensors(ds.images[train_idx], ds.labels[train_idx])
        self.test_data[n] = self.as_tensors(test_ds.images[test_idx], test_ds.labels[test_idx])
        own = {"client": n, "train": int(len(train_idx)), "test": int(len(test_idx)), "val": 0, "domain": None,
               "evaluated": int(len(test_idx)),
               "label_counts": np.bincount(ds.labels[train_idx], minlength=self.num_classes).tolist()}
        # Other clients' sizes are unknown here; the server learns the true ones from their nodes.
        self.client_facts = [{**own, "client": i} for i in range(self.num_clients)]

    def hold(self, n: int) -> None:
        """The node's own records are always in memory (``client_id`` checked that n is its client)."""


def write_client_shards(cfg: RunConfig, out: Path) -> int:
    """The simulation's per-client record files: ``out/client_<n>.npz`` (uncompressed) with client
    n's training and evaluated images (uint8, as the data set holds them) and labels, so that a Ray
    actor switching clients reads one small file, never the whole data set. Returns N."""
    import numpy as np

    from pfedpg.runner import client_indices, partition_run

    dataset, splits, _ = partition_run(cfg)
    out.mkdir(parents=True, exist_ok=True)
    for n, split in enumerate(splits):
        tr, ev = client_indices(cfg, split)
        np.savez(out / f"client_{n}.npz", train_images=dataset.images[tr], train_labels=dataset.labels[tr],
                 eval_images=dataset.images[ev], eval_labels=dataset.labels[ev])
    return len(splits)


class PartitionNodeTrainer(Trainer):
    """The client side when every node partitions the run's one data file (``flower.num_clients:
    null``: the simulation engine, and deployments that share a file): the run built from the
    config, with every client's split sizes but only one client's records in memory — the client
    of the message being served (:meth:`hold`). A simulation actor serves many virtual clients in
    turn: it reads the client's shard (``shards``, from :func:`write_client_shards`), or without
    shards re-partitions the data file, when it switches. It never holds another client's records,
    nor the whole data set, between messages."""

    EMPTY = (torch.empty(0), torch.empty(0, dtype=torch.long))

    def __init__(self, cfg: RunConfig, *, shards: str | None = None, **kw):
        self.shards = Path(shards) if shards else None
        super().__init__(cfg, **kw)

    def load_clients(self) -> None:
        dataset, splits, new = self.partition()
        self.num_clients, self.num_classes = len(splits), dataset.num_classes
        self.client_facts = [self.client_fact(dataset, i, s) for i, s in enumerate(splits)]
        self.new_facts = [self.client_fact(dataset, len(splits) + j, s) for j, s in enumerate(new)]
        self.domain_names = list(getattr(dataset, "domain_names", []) or [])
        self.class_names = list(getattr(dataset, "class_names", []) or [])
        # The lists stay the same objects (the hooks' RunContext holds them); hold() fills one slot.
        self.train_data = [self.EMPTY] * self.num_clients
        self.test_data = [self.EMPTY] * self.num_clients
        self.held: int | None = None
        self.dataset = None

    def hold(self, n: int) -> None:
        """Keep client ``n``'s records (and no one else's) in memory."""
        import numpy as np

        if self.held == n:
            return
        if self.held is not None:
            self.train_data[self.held] = self.test_data[self.held] = self.EMPTY
            self.held = None
        if self.shards is not None:
            f = self.shards / f"client_{n}.npz"
            if not f.is_file():
                raise DataError(f"client {n}'s simulation shard {str(f)!r} is missing; the driver writes the shards "
                                "(start simulations with `pfedpg-eval train --engine flower`)")
            with np.load(f) as z:
                self.train_data[n] = self.as_tensors(z["train_images"], z["train_labels"])
                self.test_data[n] = self.as_tensors(z["eval_images"], z["eval_labels"])
            if [len(self.train_data[n][1]), len(self.test_data[n][1])] != \
                    [self.client_facts[n]["train"], self.client_facts[n]["evaluated"]]:
                raise DataError(f"client {n}'s simulation shard {str(f)!r} does not match the run's partition; it "
                                "belongs to another run — start the run again")
        else:
            dataset, splits, _ = self.partition()
            self.train_data[n], self.test_data[n] = self.client_tensors(dataset, splits[n])
        self.held = n


class ClientRuntime:
    """One run's client logic in a ClientApp process: the run built from its config (cached per
    process, so a simulation actor builds it once), with client n's state loaded from and saved
    to the node's ``context.state`` around every message."""

    _cache: dict[str, "ClientRuntime"] = {}

    def __init__(self, cfg: RunConfig, backbone_path: str | None, node_config: dict[str, Any] | None = None,
                 shards: str | None = None, metrics_dir: str | None = None):
        node_config = dict(node_config or {})
        unknown = sorted(set(node_config) - set(NODE_KEYS))
        if unknown:
            raise ConfigError(f"--node-config has unknown key {unknown[0]!r}; valid: {', '.join(NODE_KEYS)}")
        if "device" in node_config:  # this node's own device (e.g. --node-config "... device=cuda:0")
            from pfedpg.models.device import check_device_spec

            spec = check_device_spec(str(node_config["device"]), "--node-config device")
            cfg = dataclasses.replace(cfg, device=spec)  # (re-validated: amp on a CPU node is refused)
        local = cfg.flower.num_clients is not None
        if local and "data-path" not in node_config:
            raise ConfigError("this run expects node-local data (flower.num_clients is set): start the SuperNode with "
                              "--node-config \"partition-id=<client> data-path=<this node's npz or image folder>\"")
        if not local and "data-path" in node_config:
            raise ConfigError("this SuperNode has a data-path, but the run partitions one data file (flower.num_clients "
                              "is null): set flower.num_clients to the number of nodes, or drop data-path")
        if local:
            if "partition-id" not in node_config:
                raise ConfigError("this SuperNode has no partition-id; start it with --node-config "
                                  "\"partition-id=<client> data-path=...\"")
            self.trainer = NodeTrainer(cfg, client=int(node_config["partition-id"]), node_config=node_config,
                                       backbone_path=backbone_path)
        else:
            self.trainer = PartitionNodeTrainer(cfg, run_dir=Path("."), backbone_path=backbone_path, shards=shards)
        self.trainer.hooks.setup(self.trainer.ctx)
        # Under a DP mechanism the client keeps its own rows (its metrics file), the server gets the release.
        self.withhold = bool(self.trainer.hooks.privacy_mechanisms()) and not cfg.privacy.release_metrics
        self.metrics_dir = Path(node_config.get("metrics-dir") or metrics_dir or "pfedpg-client-metrics")
        # Hooks and states as set up, before any client touched them: a client's first message
        # starts from these (the cached runtime serves several clients in one simulation actor).
        self.initial_hooks = copy.deepcopy(self.trainer.hooks.state_dict())
        self.initial_states = [copy.deepcopy(s) for s in self.trainer.states]

    @classmethod
    def get(cls, values: dict[str, Any], node_config: dict[str, Any] | None = None) -> "ClientRuntime":
        """The runtime of this run (and, with node-local data, of this node's files), built once per process."""
        cfg, _, backbone = settings_from(values)
        local = {k: str(v) for k, v in (node_config or {}).items()} if cfg.flower.num_clients is not None else {}
        key = json.dumps({**{k: values.get(k) for k in ("config-yaml", "backbone-path", "client-shards", "client-metrics-dir")},
                          "node": local,
                          "device": str((node_config or {}).get("device"))}, sort_keys=True)
        if key not in cls._cache:
            cls._cache.clear()  # one run per process at a time
            cls._cache[key] = cls(cfg, backbone, dict(node_config or {}), shards=values.get("client-shards") or None,
                                  metrics_dir=values.get("client-metrics-dir") or None)
        return cls._cache[key]

    def client_id(self, context: Context) -> int:
        parts = context.node_config.get("num-partitions")  # (set by Flower's simulation engine)
        if parts is not None and int(parts) != self.trainer.num_clients:
            raise ConfigError(f"this simulation has {int(parts)} SuperNodes but the run has {self.trainer.num_clients} "
                              f"clients; start it with --federation-config \"num_supernodes={self.trainer.num_clients}\"")
        if "partition-id" not in context.node_config:
            raise ConfigError("this SuperNode has no partition-id; start it with --node-config partition-id=<client>")
        n = int(context.node_config["partition-id"])
        if not 0 <= n < self.trainer.num_clients:
            raise ConfigError(f"partition-id={n}, but the run has {self.trainer.num_clients} clients (0..{self.trainer.num_clients - 1})")
        return n


    def _load(self, n: int, context: Context) -> None:
        st = context.state
        if "pfedpg.client" in st.array_records:
            t = st.array_records["pfedpg.client"].to_torch_state_dict()
            meta = st.config_records["pfedpg.meta"]
            self.trainer.states[n] = ClientState(t["prompt"], t["head_weight"], t["head_bias"],
                                                 int(meta["rounds_joined"])).to(self.trainer.device)
            self.trainer.hooks.load_state_dict(_unpack(meta["hooks"]))
        else:
            self.trainer.states[n] = copy.deepcopy(self.initial_states[n])
            self.trainer.hooks.load_state_dict(copy.deepcopy(self.initial_hooks))

    def _save(self, n: int, context: Context) -> None:
        s = self.trainer.states[n]
        context.state.array_records["pfedpg.client"] = _tensor_record(
            prompt=s.prompt, head_weight=s.head_weight, head_bias=s.head_bias)
        context.state.config_records["pfedpg.meta"] = ConfigRecord(
            {"rounds_joined": s.rounds_joined, "hooks": _pack(self.trainer.hooks.state_dict())})

    # The handlers read ``msg.content`` and ``context.node_config`` / ``context.state`` only and
    # return the reply's content: the ClientApp wraps it in a Message, and a node's long-running
    # worker (evaluations.flower_worker) can serve them for short-lived ClientApp processes.
    def query(self, msg: Message, context: Context) -> RecordDict:
        n = self.client_id(context)
        t = self.trainer
        info = {"num_clients": t.num_clients, "num_classes": t.num_classes, "domain_names": t.domain_names,
                "class_names": t.class_names,
                # Split sizes only: its domain and label counts stay private to the client.
                "facts": {**t.client_facts[n], "domain": None, "label_counts": None}}
        return RecordDict({"info": ConfigRecord({"json": json.dumps(info)})})

    def train(self, msg: Message, context: Context) -> RecordDict:
        n = self.client_id(context)
        task = msg.content.config_records["task"]
        if int(task["client"]) != n:
            raise ConfigError(f"a message for client {task['client']} reached the SuperNode of client {n}")
        r = int(task["round"])
        self.trainer.hold(n)
        self._load(n, context)
        start = _tensor(msg.content.array_records["sent"], "prompt").to(self.trainer.device) \
            if "sent" in msg.content.array_records else self.trainer.states[n].prompt
        t0 = time.perf_counter()
        row, delta = self.trainer.train_client(n, r, start)
        work = time.perf_counter() - t0
        self._save(n, context)
        result = {"row": json.dumps(row), "work_s": work}
        if self.withhold:  # the release and the public step count only (its compute time is no less private)
            self._keep(n, "train", r, row)
            result = {"row": json.dumps({k: row[k] for k in PUBLIC_ROW_KEYS if k in row})}
        content = RecordDict({"result": ConfigRecord({**result, "hooks": _pack(self.trainer.hooks.client_state(n))})})
        if delta is not None:
            content.array_records["delta"] = _tensor_record(delta=delta)
        return content

    def evaluate(self, msg: Message, context: Context) -> RecordDict:
        n = self.client_id(context)
        self.trainer.hold(n)
        self._load(n, context)
        generated = _tensor(msg.content.array_records["generated"], "prompt").to(self.trainer.device) \
            if "generated" in msg.content.array_records else None
        row = self.trainer.evaluate_one(n, generated)
        if self.withhold:  # evaluated where the data is, kept there
            self._keep(n, "eval", int(msg.content.config_records["task"]["round"]), row)
            row = {"client": n, "withheld": True}
        return RecordDict({"result": ConfigRecord({"row": json.dumps(row)})})

    def _keep(self, n: int, kind: str, r: int, row: dict[str, Any]) -> None:
        """The client side's own record of a row it does not send: RUN_DIR/client_metrics/client_<n>.jsonl
        in a simulation (the driver merges them after the run), the node's ``metrics-dir`` in a deployment."""
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_dir / f"client_{n}.jsonl", "a") as fh:
            fh.write(json.dumps({"kind": kind, "round": r, "client": n, **row}) + "\n")


# ------------------------------------------------------------------------------------------------
# Server side


class FlowerTrainer(Trainer):
    """The in-process ``Trainer`` with its clients behind a Flower ``Grid``: only
    ``train_participants`` and ``evaluate_clients`` differ (they send messages)."""

    def __init__(self, cfg: RunConfig, *, run_dir: str | Path, grid, backbone_path: str | None = None,
                 log: Callable[[str], None] | None = None, progress: bool = False):
        check_supported(cfg, build_hooks(cfg.hooks))
        if cfg.model.weights == "pretrain" and not backbone_path:
            raise ConfigError("model.weights=pretrain: pass the pretrained backbone's path (run_flower resolves it)")
        self.grid = grid
        self.fcfg = cfg.flower
        self.nodes: dict[int, int] = {}  # client id -> Flower node id
        super().__init__(cfg, run_dir=run_dir, log=log, progress=progress, backbone_path=backbone_path)

    # -- connecting ------------------------------------------------------------------------------
    def load_clients(self) -> None:
        """No data on the server: find every client's SuperNode (its ``partition-id``), waiting up
        to ``flower.node_wait_s``, and learn N, the classes and each client's split sizes from them."""
        deadline = time.time() + self.fcfg.node_wait_s
        asked: set[int] = set()
        facts: dict[int, dict[str, Any]] = {}
        total = None
        query_s: list[float] = []
        while True:
            fresh = [i for i in self.grid.get_node_ids() if i not in asked]
            if fresh:
                asked.update(fresh)
                msgs = {i: Message(RecordDict(), dst_node_id=i, message_type=MessageType.QUERY) for i in fresh}
                replies = self._exchange(msgs, timeout=max(1.0, deadline - time.time()))
                query_s.extend(self.latency.values())
                for node, reply in replies.items():
                    if isinstance(reply, str):
                        raise ConfigError(f"SuperNode {node} did not answer the set-up query: {reply}")
                    info = json.loads(reply.content.config_records["info"]["json"])
                    fact = info["facts"]
                    n, their = fact["client"], (int(info["num_clients"]), int(info["num_classes"]), list(info["domain_names"]))
                    classes = list(info.get("class_names") or [])
                    if self.cfg.flower.num_clients is not None and self.cfg.data.classes is not None \
                            and classes != list(self.cfg.data.classes):
                        raise ConfigError(f"SuperNode {node} (client {n}) has classes {classes}, the run's data.classes "
                                          f"{list(self.cfg.data.classes)}; give it records of exactly those classes")
                    if total is not None and their != total:
                        raise ConfigError(f"SuperNode {node} built {their[0]} clients and {their[1]} classes from its config, "
                                          f"others {total[0]} and {total[1]}; every node must run the same config and data")
                    if total is not None and classes != self.class_names:
                        raise ConfigError(f"SuperNode {node} (client {n}) has classes {classes}, other nodes "
                                          f"{self.class_names}; every node needs the same class list in the same order "
                                          "(set data.classes in the run config)")
                    total, self.class_names = their, classes
                    if n in facts:
                        raise ConfigError(f"two SuperNodes claim partition-id={n}; give each client's node its own id")
                    facts[n], self.nodes[n] = fact, node
            if total is not None and len(facts) == total[0]:
                break
            if time.time() > deadline:
                missing = "" if total is None else f" (missing partition-id {[n for n in range(total[0]) if n not in facts]})"
                raise ConfigError(f"{len(facts)} of {'?' if total is None else total[0]} clients' SuperNodes connected within "
                                  f"flower.node_wait_s={self.fcfg.node_wait_s:g} s{missing}; start one per client with "
                                  "--node-config partition-id=<client>, or raise node_wait_s")
            time.sleep(0.5)
        self.num_clients, self.num_classes, self.domain_names = total
        self.client_facts = [facts[n] for n in range(self.num_clients)]
        self.train_data, self.test_data = [], []  # they stay on the clients
        self.query_seconds = query_s
        self.log(f"flower: {self.num_clients} clients connected (set-up query answered in "
                 f"{min(query_s):.2f}–{max(query_s):.2f} s)")

    def _exchange(self, msgs: dict[int, Message], *, timeout: float) -> dict[int, Message | str]:
        """Send ``msgs`` (keyed by whatever the caller likes) and collect replies; a failure is a
        one-line reason instead of a reply. Returns early when a pending node goes offline."""
        out: dict[int, Message | str] = {}
        alive = set(self.grid.get_node_ids())
        sendable = {}
        for key, m in msgs.items():
            if m.metadata.dst_node_id in alive:
                sendable[key] = m
            else:
                out[key] = "its SuperNode is offline"
        t0 = time.perf_counter()
        ids = list(self.grid.push_messages(list(sendable.values()))) if sendable else []
        self.latency: dict[int, float] = {}  # seconds from sending to the reply, per key
        pending = {}
        for key, mid in zip(sendable, ids):
            if mid is None:
                out[key] = "the SuperLink refused the message"
            else:
                pending[mid] = key
        deadline = time.time() + timeout
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                key = pending.pop(reply.metadata.reply_to_message_id, None)
                if key is not None:
                    out[key] = f"its ClientApp failed: {reply.error.reason}" if reply.has_error() else reply
                    self.latency[key] = time.perf_counter() - t0
            if not pending:
                break
            alive = set(self.grid.get_node_ids())
            for mid, key in list(pending.items()):
                if msgs[key].metadata.dst_node_id not in alive:
                    out[key] = "its SuperNode went offline"
                    del pending[mid]
            if time.time() > deadline:
                for key in pending.values():
                    out[key] = f"no reply within flower.round_timeout_s={self.fcfg.round_timeout_s:g} s"
                break
            time.sleep(0.2)
        return out

    def _failed(self, what: str, n: int, reason: str) -> None:
        line = f"{what}: client {n} failed ({reason})"
        if self.fcfg.on_client_failure == "fail":
            raise ClientFailure(f"{line}; flower.on_client_failure=fail stops the run here — the finished rounds "
                                f"are in {self.run_dir / 'metrics.jsonl'}; set on_client_failure: continue to go on without it")
        self.log(line + "; continuing without it")

    # -- a round ---------------------------------------------------------------------------------
    def train_participants(self, r: int, participants: list[int], sent: dict[int, torch.Tensor]) -> dict[int, dict[str, Any]]:
        msgs = {}
        for n in participants:
            content = RecordDict({"task": ConfigRecord({"round": r, "client": n})})
            if n in sent:
                content.array_records["sent"] = _tensor_record(prompt=sent[n])
            msgs[n] = Message(content, dst_node_id=self.nodes[n], message_type=MessageType.TRAIN)
        rows: dict[int, dict[str, Any]] = {}
        for n, reply in sorted(self._exchange(msgs, timeout=self.fcfg.round_timeout_s).items()):
            if isinstance(reply, str):
                self._failed(f"round {r}, training", n, reply)
                rows[n] = {"error": reply}
                continue
            result = reply.content.config_records["result"]
            row = json.loads(result["row"])
            if "delta" in reply.content.array_records:
                row["_delta"] = _tensor(reply.content.array_records["delta"], "delta").to(self.device)
            self.hooks.merge_client_state(n, _unpack(result["hooks"]))
            # Flower's cost of the message: reply time at the server minus the client's own work.
            row["message_s"] = self.latency.get(n)
            row["client_work_s"] = float(result["work_s"]) if "work_s" in result else None
            rows[n] = row
        return rows

    def evaluate_clients(self, generated: dict[int, torch.Tensor]) -> list[dict[str, Any]]:
        msgs = {}
        for n in range(self.num_clients):
            content = RecordDict({"task": ConfigRecord({"round": self.current_round, "client": n})})
            if n in generated:
                content.array_records["generated"] = _tensor_record(prompt=generated[n])
            msgs[n] = Message(content, dst_node_id=self.nodes[n], message_type=MessageType.EVALUATE)
        rows = []
        for n, reply in sorted(self._exchange(msgs, timeout=self.fcfg.round_timeout_s).items()):
            if isinstance(reply, str):
                self._failed(f"round {self.current_round}, evaluation", n, reply)
                rows.append({"client": n, "acc_adapted": None, "acc_generated": None, "error": reply})
            else:
                rows.append(json.loads(reply.content.config_records["result"]["row"]))
        return rows

    def checkpoint_clients(self) -> list[dict] | None:
        return None  # the clients' states live on their nodes

    def communication(self) -> dict[str, Any]:
        # The first message's reply time per node (it builds the client on the node).
        return {**super().communication(), "flower_setup_query_s": getattr(self, "query_seconds", None)}

    def run(self, *, resume: bool = False, stop_after: int | None = None):
        check_supported(self.cfg, self.hooks, resume=resume)
        return super().run(stop_after=stop_after)
