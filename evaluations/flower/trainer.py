"""The Flower engine (DESIGN §9): the in-process runner's rounds, with every client in a Flower
ClientApp and the server in a ServerApp. Needs the ``flower`` extra (``pip install '.[flower]'``).

Same config and seed, same numbers: both sides build the run from the same resolved config and
derive every random stream from the same master seed, so a client's ClientApp trains exactly what
``InProcessClients.train_one`` would, and the ServerApp runs the in-process round loop — server
step, hooks, evaluation schedule, checkpoints and run directory — unchanged. Only the loop's
:class:`~pfedpg.run.clients.Clients` differ: :class:`FlowerClients` answers each verb with a round of
messages over a :class:`GridTransport` (as a Flower Strategy's verbs ride on ``grid.send_and_receive``);
the server holds no client data and learns N and the split sizes from the clients' answers to the
set-up query. :func:`flower_trainer` is the in-process ``Trainer`` holding them.

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
shard when it switches: :class:`~evaluations.flower.node.PartitionRecords`) — simulation and tests. With
``flower.num_clients: N`` (a deployment) each SuperNode brings its own records — ``--node-config
"partition-id=<client> data-path=<npz or image folder>"`` plus, optionally, ``test-path=<file or
folder>`` (its test split; else an npz ``split`` key, else ``test-fraction=<f>``, default
``data.test_fraction``) and ``backbone-path=<file>`` (where this node keeps the run's backbone) —
and trains on exactly those (:func:`~evaluations.flower.node.node_records`); nothing but the config and the backbone is
shared, and the server holds no records.

A node may keep its built client alive across messages: with ``worker=<socket path>`` in its
node config, Flower's per-message ClientApp process hands the message to a long-running worker on
the node (``evaluations.flower.worker``), which serves it with one cached
:class:`~evaluations.flower.node.ClientRuntime`.

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

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from evaluations.flower.messages import tensor_of, tensor_record, unpack
from pfedpg.config import RunConfig
from pfedpg.errors import ClientFailure, ConfigError
from pfedpg.hooks import build_hooks
from pfedpg.run import ClientFacts, ClientUpdate, ClientViews, EvalRow, Roster, RunEnv, Trainer


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


class GridTransport:
    """Messages to the clients' SuperNodes over a Flower ``Grid``: :meth:`exchange` sends a batch and
    collects the replies, a failure standing as a one-line reason instead of a reply."""

    def __init__(self, grid, *, round_timeout_s: float):
        self.grid, self.round_timeout_s = grid, round_timeout_s

    def node_ids(self) -> list[int]:
        return list(self.grid.get_node_ids())

    def exchange(self, msgs: dict[int, Message], *, timeout: float
                 ) -> tuple[dict[int, Message | str], dict[int, float]]:
        """Send ``msgs`` (keyed by whatever the caller likes); returns (reply or reason, seconds from
        sending to the reply) per key. Returns early when a pending node goes offline."""
        out: dict[int, Message | str] = {}
        alive = set(self.node_ids())
        sendable = {}
        for key, m in msgs.items():
            if m.metadata.dst_node_id in alive:
                sendable[key] = m
            else:
                out[key] = "its SuperNode is offline"
        t0 = time.perf_counter()
        ids = list(self.grid.push_messages(list(sendable.values()))) if sendable else []
        latency: dict[int, float] = {}
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
                    latency[key] = time.perf_counter() - t0
            if not pending:
                break
            alive = set(self.node_ids())
            for mid, key in list(pending.items()):
                if msgs[key].metadata.dst_node_id not in alive:
                    out[key] = "its SuperNode went offline"
                    del pending[mid]
            if time.time() > deadline:
                for key in pending.values():
                    out[key] = f"no reply within flower.round_timeout_s={self.round_timeout_s:g} s"
                break
            time.sleep(0.2)
        return out, latency


class FlowerClients:
    """The run's :class:`~pfedpg.run.clients.Clients` behind a Flower ``Grid``: each verb is a round of
    messages (the table in the module docstring); the clients' states stay on their nodes, so a
    checkpoint holds none of them. A client that fails is logged and, with
    ``flower.on_client_failure: continue``, left out of the round (an update with ``error``)."""

    def __init__(self, env: RunEnv, *, grid):
        self.cfg, self.fcfg, self.hooks, self.device, self.log = env.cfg, env.cfg.flower, env.hooks, env.device, env.log
        self.metrics_path = env.run_dir / "metrics.jsonl"
        self.transport = GridTransport(grid, round_timeout_s=self.fcfg.round_timeout_s)
        self.nodes: dict[int, int] = {}  # client id -> Flower node id
        self.roster: Roster | None = None
        self.query_seconds: list[float] | None = None

    # -- the seam ----------------------------------------------------------------------------------
    def facts(self) -> Roster:
        if self.roster is None:
            self.roster = self._connect()
        return self.roster

    def views(self) -> ClientViews:
        return ClientViews()  # the records stay on the clients

    def start(self, **_) -> None:
        """Nothing to set up here: every node builds its client from the same config."""

    def train(self, round: int, participants: list[int], sent: dict[int, torch.Tensor]) -> dict[int, ClientUpdate]:
        r, msgs = round, {}
        for n in participants:
            content = RecordDict({"task": ConfigRecord({"round": r, "client": n})})
            if n in sent:
                content.array_records["sent"] = tensor_record(prompt=sent[n])
            msgs[n] = Message(content, dst_node_id=self.nodes[n], message_type=MessageType.TRAIN)
        replies, latency = self.transport.exchange(msgs, timeout=self.fcfg.round_timeout_s)
        updates: dict[int, ClientUpdate] = {}
        for n, reply in sorted(replies.items()):
            if isinstance(reply, str):
                self._failed(f"round {r}, training", n, reply)
                updates[n] = ClientUpdate(error=reply)
                continue
            result = reply.content.config_records["result"]
            delta = tensor_of(reply.content.array_records["delta"], "delta").to(self.device) \
                if "delta" in reply.content.array_records else None
            self.hooks.merge_client_state(n, unpack(result["hooks"]))
            # Flower's cost of the message: reply time at the server minus the client's own work.
            metrics = {**json.loads(result["row"]), "message_s": latency.get(n),
                       "client_work_s": float(result["work_s"]) if "work_s" in result else None}
            updates[n] = ClientUpdate(metrics, delta)
        return updates

    def evaluate(self, round: int, generated: dict[int, torch.Tensor]) -> list[EvalRow]:
        msgs = {}
        for n in range(self.facts().num_clients):
            content = RecordDict({"task": ConfigRecord({"round": round, "client": n})})
            if n in generated:
                content.array_records["generated"] = tensor_record(prompt=generated[n])
            msgs[n] = Message(content, dst_node_id=self.nodes[n], message_type=MessageType.EVALUATE)
        rows = []
        for n, reply in sorted(self.transport.exchange(msgs, timeout=self.fcfg.round_timeout_s)[0].items()):
            if isinstance(reply, str):
                self._failed(f"round {round}, evaluation", n, reply)
                rows.append(EvalRow(client=n, error=reply))
            else:
                rows.append(EvalRow.from_record(json.loads(reply.content.config_records["result"]["row"])))
        return rows

    def state_dict(self) -> None:
        return None  # the clients' states live on their nodes

    def load_state_dict(self, states) -> None:
        raise ConfigError("--resume continues in-process runs only: Flower clients keep their state for one Flower "
                          "run; start a new run")

    def communication(self) -> dict[str, Any]:
        # The first message's reply time per node (it builds the client on the node).
        return {"flower_setup_query_s": self.query_seconds}

    # -- connecting ----------------------------------------------------------------------------------
    def _connect(self) -> Roster:
        """No data on the server: find every client's SuperNode (its ``partition-id``), waiting up
        to ``flower.node_wait_s``, and learn N, the classes and each client's split sizes from them."""
        deadline = time.time() + self.fcfg.node_wait_s
        asked: set[int] = set()
        facts: dict[int, dict[str, Any]] = {}
        total, class_names, query_s = None, [], []
        while True:
            fresh = [i for i in self.transport.node_ids() if i not in asked]
            if fresh:
                asked.update(fresh)
                msgs = {i: Message(RecordDict(), dst_node_id=i, message_type=MessageType.QUERY) for i in fresh}
                replies, latency = self.transport.exchange(msgs, timeout=max(1.0, deadline - time.time()))
                query_s.extend(latency.values())
                for node, reply in replies.items():
                    n, fact, total, class_names = self._answer(node, reply, total, class_names)
                    if n in facts:
                        raise ConfigError(f"two SuperNodes claim partition-id={n}; give each client's node its own id")
                    facts[n], self.nodes[n] = fact, node
            if total is not None and len(facts) == total[0]:
                break
            if time.time() > deadline:
                missing = ("" if total is None
                           else f" (missing partition-id {[n for n in range(total[0]) if n not in facts]})")
                raise ConfigError(f"{len(facts)} of {'?' if total is None else total[0]} clients' SuperNodes connected "
                                  f"within flower.node_wait_s={self.fcfg.node_wait_s:g} s{missing}; "
                                  "start one per client with --node-config partition-id=<client>, or raise node_wait_s")
            time.sleep(0.5)
        self.query_seconds = query_s
        self.log(f"flower: {total[0]} clients connected (set-up query answered in "
                 f"{min(query_s):.2f}–{max(query_s):.2f} s)")
        return Roster(clients=[facts[n] for n in range(total[0])], num_classes=total[1], domain_names=total[2],
                      class_names=class_names)

    def _answer(self, node: int, reply: Message | str, total, class_names: list[str]):
        """(client id, its facts, (N, classes, domain names), class names) from one node's answer to
        the set-up query, checked against the answers before it."""
        if isinstance(reply, str):
            raise ConfigError(f"SuperNode {node} did not answer the set-up query: {reply}")
        info = json.loads(reply.content.config_records["info"]["json"])
        fact = ClientFacts.from_dict(info["facts"])
        n, their = fact.client, (int(info["num_clients"]), int(info["num_classes"]), list(info["domain_names"]))
        classes = list(info.get("class_names") or [])
        if self.cfg.flower.num_clients is not None and self.cfg.data.classes is not None \
                and classes != list(self.cfg.data.classes):
            raise ConfigError(f"SuperNode {node} (client {n}) has classes {classes}, "
                              f"the run's data.classes {list(self.cfg.data.classes)}; "
                              "give it records of exactly those classes")
        if total is not None and their != total:
            raise ConfigError(f"SuperNode {node} built {their[0]} clients and {their[1]} classes "
                              f"from its config, others {total[0]} and {total[1]}; "
                              "every node must run the same config and data")
        if total is not None and classes != class_names:
            raise ConfigError(f"SuperNode {node} (client {n}) has classes {classes}, other nodes "
                              f"{class_names}; every node needs the same class list in the same order "
                              "(set data.classes in the run config)")
        return n, fact, their, classes

    def _failed(self, what: str, n: int, reason: str) -> None:
        line = f"{what}: client {n} failed ({reason})"
        if self.fcfg.on_client_failure == "fail":
            raise ClientFailure(f"{line}; flower.on_client_failure=fail stops the run here — the finished rounds "
                                f"are in {self.metrics_path}; set on_client_failure: continue to go on without it")
        self.log(line + "; continuing without it")


def flower_trainer(cfg: RunConfig, *, run_dir: str | Path, grid, backbone_path: str | None = None,
                   log: Callable[[str], None] | None = None, progress: bool = False) -> Trainer:
    """The in-process ``Trainer`` whose clients are reached through ``grid`` (:class:`FlowerClients`):
    the same round loop, server, hooks, checkpoints and run directory."""
    check_supported(cfg, build_hooks(cfg.hooks))
    if cfg.model.weights == "pretrain" and not backbone_path:
        raise ConfigError("model.weights=pretrain: pass the pretrained backbone's path (run_flower resolves it)")
    return Trainer(cfg, run_dir=run_dir, log=log, progress=progress, backbone_path=backbone_path,
                   clients=lambda env: FlowerClients(env, grid=grid))
