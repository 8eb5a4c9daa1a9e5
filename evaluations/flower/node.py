"""A Flower node's side of a run: where its records come from (the run's partition,
:class:`PartitionRecords`, or its own files in a deployment, :func:`node_records`), the run it builds
around them (:func:`client_run`: the in-process clients of the client it serves) and
:class:`ClientRuntime`, what it runs for one message. The message table
and the data rules are in :mod:`evaluations.flower.trainer`'s docstring."""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from evaluations.flower.messages import pack, settings_from, tensor_of, tensor_record, unpack
from pfedpg.client import ClientState
from pfedpg.config import RunConfig
from pfedpg.errors import ConfigError, DataError
from pfedpg.run import ClientFacts, ClientRecords, EvalRow, InProcessClients, Roster, RoundLoop, run_env
from pfedpg.run.assembly import assemble, backbone_for
from pfedpg.run.data import as_tensors, client_tensors, partition_run, roster_of

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


def node_backbone(cfg: RunConfig, node_config: dict[str, Any], backbone_path: str | None) -> str | None:
    """The checks of a deployment node with its own data, before anything is built; returns the
    backbone file it uses (its ``backbone-path``, else the run's)."""
    backbone_path = node_config.get("backbone-path") or backbone_path
    if cfg.model.weights == "pretrain":
        if not backbone_path or not Path(backbone_path).is_file():
            raise ConfigError(f"this node has no backbone file {backbone_path!r}; copy the run's backbone here and "
                              "start the SuperNode with --node-config \"... backbone-path=<file>\"")
    if cfg.evaluate_on != "test":
        raise ConfigError("evaluate_on: val is not available with node-local data (a node has a test split only); "
                          "set evaluate_on: test")
    sgd = [s for s in cfg.hook_specs if s.name == "dp_sgd"]
    if sgd and sgd[0].options.get("delta") is None:
        raise ConfigError("dp_sgd.delta must be set with node-local data: its default 1/(10·min_n |D_n|) needs "
                          "every client's size, which no node knows")
    return backbone_path


def _node_split(cfg: RunConfig, n: int, node_config: dict[str, Any]):
    """(data set, training indices, test data set, test indices) of node ``n``'s own files."""
    import numpy as np

    from pfedpg.data.partition import stratified_choice
    from pfedpg.seeding import Seeds

    ds = node_dataset(cfg, str(node_config["data-path"]), "data-path")
    if node_config.get("test-path"):
        test_ds = node_dataset(cfg, str(node_config["test-path"]), "test-path")
        if list(test_ds.class_names) != list(ds.class_names):
            raise DataError(f"node-config test-path has classes {list(test_ds.class_names)}, data-path "
                            f"{list(ds.class_names)}; they must be the same list (or set data.classes)")
        return ds, np.arange(len(ds)), test_ds, np.arange(len(test_ds))
    if ds.split is not None:
        return ds, np.flatnonzero(ds.split == 0), ds, np.flatnonzero(ds.split == 1)
    frac = float(node_config.get("test-fraction", cfg.data.test_fraction))
    if not 0 < frac < 1:
        raise ConfigError(f"node-config test-fraction={frac} must be in (0, 1)")
    k = max(1, round(frac * len(ds)))
    if len(ds) - k < 1:
        raise DataError(f"this node's {len(ds)} records are too few for a train/test split; bring more or pass "
                        "test-path")
    test_pos = stratified_choice(ds.labels, total=k, rng=Seeds(cfg.seed).numpy("node.split", client=n))
    return ds, np.delete(np.arange(len(ds)), test_pos), ds, test_pos


def node_records(cfg: RunConfig, *, client: int, node_config: dict[str, Any]) -> ClientRecords:
    """The client side of a deployment with node-local data: client ``client``'s records from this
    node's own files only (capped as the partition caps them). The other clients exist as ids; their
    data is nowhere here, and their facts are this client's (the server learns the true ones)."""
    import numpy as np

    from pfedpg.data.partition import cap_records
    from pfedpg.seeding import Seeds

    n = client
    ds, train_idx, test_ds, test_idx = _node_split(cfg, n, node_config)
    # The partition's own caps: stratified, one seeded stream per cap and client.
    seeds = Seeds(cfg.seed)
    train_idx = cap_records(ds, train_idx, cfg.data.max_train_per_client,
                            seeds.numpy("data.subsample.train", client=n))
    test_idx = cap_records(test_ds, test_idx, cfg.data.max_test_per_client,
                           seeds.numpy("data.subsample.test", client=n))
    if len(train_idx) == 0 or len(test_idx) == 0:
        raise DataError(f"this node has {len(train_idx)} training and {len(test_idx)} test records; "
                        "both must be > 0")
    num_clients = int(cfg.flower.num_clients)
    if not 0 <= n < num_clients:
        raise ConfigError(f"partition-id={n}, but the run has flower.num_clients={num_clients} clients "
                          f"(0..{num_clients - 1})")
    empty = (torch.empty(0), torch.empty(0, dtype=torch.long))
    train_data, test_data = [empty] * num_clients, [empty] * num_clients
    train_data[n] = as_tensors(ds.images[train_idx], ds.labels[train_idx])
    test_data[n] = as_tensors(test_ds.images[test_idx], test_ds.labels[test_idx])
    own = ClientFacts(client=n, train=int(len(train_idx)), test=int(len(test_idx)), val=0, domain=None,
                      evaluated=int(len(test_idx)),
                      label_counts=np.bincount(ds.labels[train_idx], minlength=ds.num_classes).tolist())
    roster = Roster(clients=[dataclasses.replace(own, client=i) for i in range(num_clients)],
                    num_classes=ds.num_classes, class_names=list(ds.class_names))
    return ClientRecords(roster=roster, train_data=train_data, test_data=test_data)


def write_client_shards(cfg: RunConfig, out: Path) -> int:
    """The simulation's per-client record files: ``out/client_<n>.npz`` (uncompressed) with client
    n's training and evaluated images (uint8, as the data set holds them) and labels, so that a Ray
    actor switching clients reads one small file, never the whole data set. Returns N."""
    import numpy as np

    from pfedpg.run import client_indices, partition_run

    dataset, splits, _ = partition_run(cfg)
    out.mkdir(parents=True, exist_ok=True)
    for n, split in enumerate(splits):
        tr, ev = client_indices(cfg, split)
        np.savez(out / f"client_{n}.npz", train_images=dataset.images[tr], train_labels=dataset.labels[tr],
                 eval_images=dataset.images[ev], eval_labels=dataset.labels[ev])
    return len(splits)


class PartitionRecords:
    """The client side's records when every node partitions the run's one data file
    (``flower.num_clients: null``: the simulation engine, and deployments that share a file): every
    client's facts, but only one client's records in memory — the client of the message being served
    (:meth:`hold`). A simulation actor serves many virtual clients in turn: it reads the client's
    shard (``shards``, from :func:`write_client_shards`), or without shards re-partitions the data
    file, when it switches. It never holds another client's records, nor the whole data set, between
    messages."""

    EMPTY = (torch.empty(0), torch.empty(0, dtype=torch.long))

    def __init__(self, cfg: RunConfig, *, shards: str | None = None):
        self.cfg, self.shards = cfg, Path(shards) if shards else None
        dataset, splits, new = partition_run(cfg)
        self.roster = roster_of(cfg, dataset, splits, new)
        # The lists stay the same objects (the hooks' RunContext holds them); hold() fills one slot.
        self.train_data = [self.EMPTY] * len(splits)
        self.test_data = [self.EMPTY] * len(splits)
        self.new_train_data, self.new_test_data = [], []  # (no join rounds on Flower)
        self.held: int | None = None

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
                self.train_data[n] = as_tensors(z["train_images"], z["train_labels"])
                self.test_data[n] = as_tensors(z["eval_images"], z["eval_labels"])
            if [len(self.train_data[n][1]), len(self.test_data[n][1])] != \
                    [self.roster.clients[n].train, self.roster.clients[n].evaluated]:
                raise DataError(f"client {n}'s simulation shard {str(f)!r} does not match the run's partition; it "
                                "belongs to another run — start the run again")
        else:
            dataset, splits, _ = partition_run(self.cfg)
            self.train_data[n], self.test_data[n] = client_tensors(self.cfg, dataset, splits[n])
        self.held = n


def client_run(cfg: RunConfig, node_config: dict[str, Any], *, backbone_path: str | None,
               shards: str | None) -> RoundLoop:
    """The run as a node builds it from the config, around :class:`InProcessClients` of its records:
    the node's own files (``flower.num_clients`` set: a deployment), or the run's partition
    (:class:`PartitionRecords`: simulation, and deployments that share a file)."""
    local = cfg.flower.num_clients is not None
    if local:
        backbone_path = node_backbone(cfg, node_config, backbone_path)
    env = run_env(cfg, run_dir=Path("."))
    if local:
        records = node_records(cfg, client=int(node_config["partition-id"]), node_config=node_config)
    else:
        records = PartitionRecords(cfg, shards=shards)
    backbone_path = backbone_for(cfg, backbone_path, log=env.log)
    return assemble(env, InProcessClients(env, records), backbone_path=backbone_path)


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
            raise ConfigError("this SuperNode has a data-path, but the run partitions one data file "
                              "(flower.num_clients is null): set flower.num_clients to the number of nodes, "
                              "or drop data-path")
        if local and "partition-id" not in node_config:
            raise ConfigError("this SuperNode has no partition-id; start it with --node-config "
                              "\"partition-id=<client> data-path=...\"")
        #: the run as this node builds it (server and schedule included: the clients' first prompts
        #: come from the server's init), with the in-process clients of the client(s) it serves
        self.run = client_run(cfg, node_config, backbone_path=backbone_path, shards=shards)
        self.clients: InProcessClients = self.run.clients
        self.run.hooks.setup(self.run.ctx)
        # Under a DP mechanism the client keeps its own rows (its metrics file), the server gets the release.
        self.withhold = bool(self.run.hooks.privacy_mechanisms()) and not cfg.privacy.release_metrics
        self.metrics_dir = Path(node_config.get("metrics-dir") or metrics_dir or "pfedpg-client-metrics")
        # Hooks and states as set up, before any client touched them: a client's first message
        # starts from these (the cached runtime serves several clients in one simulation actor).
        self.initial_hooks = copy.deepcopy(self.run.hooks.state_dict())
        self.initial_states = [copy.deepcopy(s) for s in self.clients.states]

    @classmethod
    def get(cls, values: dict[str, Any], node_config: dict[str, Any] | None = None) -> "ClientRuntime":
        """The runtime of this run (and, with node-local data, of this node's files), built once per process."""
        cfg, _, backbone = settings_from(values)
        local = {k: str(v) for k, v in (node_config or {}).items()} if cfg.flower.num_clients is not None else {}
        key = json.dumps({**{k: values.get(k)
                             for k in ("config-yaml", "backbone-path", "client-shards", "client-metrics-dir")},
                          "node": local,
                          "device": str((node_config or {}).get("device"))}, sort_keys=True)
        if key not in cls._cache:
            cls._cache.clear()  # one run per process at a time
            cls._cache[key] = cls(cfg, backbone, dict(node_config or {}), shards=values.get("client-shards") or None,
                                  metrics_dir=values.get("client-metrics-dir") or None)
        return cls._cache[key]

    def client_id(self, context: Context) -> int:
        parts = context.node_config.get("num-partitions")  # (set by Flower's simulation engine)
        if parts is not None and int(parts) != self.run.num_clients:
            raise ConfigError(f"this simulation has {int(parts)} SuperNodes but the run has {self.run.num_clients} "
                              "clients; start it with --federation-config "
                              f"\"num_supernodes={self.run.num_clients}\"")
        if "partition-id" not in context.node_config:
            raise ConfigError("this SuperNode has no partition-id; start it with --node-config partition-id=<client>")
        n = int(context.node_config["partition-id"])
        if not 0 <= n < self.run.num_clients:
            raise ConfigError(f"partition-id={n}, but the run has {self.run.num_clients} clients "
                              f"(0..{self.run.num_clients - 1})")
        return n


    def _load(self, n: int, context: Context) -> None:
        st = context.state
        if "pfedpg.client" in st.array_records:
            t = st.array_records["pfedpg.client"].to_torch_state_dict()
            meta = st.config_records["pfedpg.meta"]
            self.clients.states[n] = ClientState(t["prompt"], t["head_weight"], t["head_bias"],
                                                 int(meta["rounds_joined"])).to(self.run.device)
            self.run.hooks.load_state_dict(unpack(meta["hooks"]))
        else:
            self.clients.states[n] = copy.deepcopy(self.initial_states[n])
            self.run.hooks.load_state_dict(copy.deepcopy(self.initial_hooks))

    def _save(self, n: int, context: Context) -> None:
        s = self.clients.states[n]
        context.state.array_records["pfedpg.client"] = tensor_record(
            prompt=s.prompt, head_weight=s.head_weight, head_bias=s.head_bias)
        context.state.config_records["pfedpg.meta"] = ConfigRecord(
            {"rounds_joined": s.rounds_joined, "hooks": pack(self.run.hooks.state_dict())})

    # The handlers read ``msg.content`` and ``context.node_config`` / ``context.state`` only and
    # return the reply's content: the ClientApp wraps it in a Message, and a node's long-running
    # worker (evaluations.flower.worker) can serve them for short-lived ClientApp processes.
    def query(self, msg: Message, context: Context) -> RecordDict:
        n = self.client_id(context)
        roster = self.run.roster
        info = {"num_clients": roster.num_clients, "num_classes": roster.num_classes,
                "domain_names": roster.domain_names, "class_names": roster.class_names,
                # Split sizes only: its domain and label counts stay private to the client.
                "facts": dataclasses.replace(roster.clients[n], domain=None, label_counts=None).to_dict()}
        return RecordDict({"info": ConfigRecord({"json": json.dumps(info)})})

    def train(self, msg: Message, context: Context) -> RecordDict:
        n = self.client_id(context)
        task = msg.content.config_records["task"]
        if int(task["client"]) != n:
            raise ConfigError(f"a message for client {task['client']} reached the SuperNode of client {n}")
        r = int(task["round"])
        self.clients.hold(n)
        self._load(n, context)
        start = tensor_of(msg.content.array_records["sent"], "prompt").to(self.run.device) \
            if "sent" in msg.content.array_records else self.clients.states[n].prompt
        t0 = time.perf_counter()
        update = self.clients.train_one(n, r, start)
        row, delta = update.metrics, update.delta
        work = time.perf_counter() - t0
        self._save(n, context)
        result = {"row": json.dumps(row), "work_s": work}
        if self.withhold:  # the release and the public step count only (its compute time is no less private)
            self._keep(n, "train", r, row)
            result = {"row": json.dumps({k: row[k] for k in PUBLIC_ROW_KEYS if k in row})}
        content = RecordDict({"result": ConfigRecord({**result, "hooks": pack(self.run.hooks.client_state(n))})})
        if delta is not None:
            content.array_records["delta"] = tensor_record(delta=delta)
        return content

    def evaluate(self, msg: Message, context: Context) -> RecordDict:
        n = self.client_id(context)
        self.clients.hold(n)
        self._load(n, context)
        generated = tensor_of(msg.content.array_records["generated"], "prompt").to(self.run.device) \
            if "generated" in msg.content.array_records else None
        row = self.clients.evaluate_one(n, generated).to_record()
        if self.withhold:  # evaluated where the data is, kept there
            self._keep(n, "eval", int(msg.content.config_records["task"]["round"]), row)
            row = EvalRow(client=n, withheld=True).to_record()
        return RecordDict({"result": ConfigRecord({"row": json.dumps(row)})})

    def _keep(self, n: int, kind: str, r: int, row: dict[str, Any]) -> None:
        """The client side's own record of a row it does not send: RUN_DIR/client_metrics/client_<n>.jsonl
        in a simulation (the driver merges them after the run), the node's ``metrics-dir`` in a deployment."""
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_dir / f"client_{n}.jsonl", "a") as fh:
            fh.write(json.dumps({"kind": kind, "round": r, "client": n, **row}) + "\n")
