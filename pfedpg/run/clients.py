"""The client seam of a run: what the round loop asks of its clients (:class:`Clients`) and the
typed records that cross it.

The round loop holds one :class:`Clients` and never reaches past it — as a Flower ``Strategy`` talks
to its clients only through its few verbs and leaves the messages to a transport. Two implement it:

* :class:`pfedpg.run.inprocess.InProcessClients` — every client in this process: their records, the
  shared prompted model, the batched path (the reference, DESIGN §9);
* ``evaluations.flower.trainer.FlowerClients`` — every client behind a Flower ``Grid``: each verb is a
  round of messages; a Flower node answers them with an ``InProcessClients`` of its one client.

A verb's contract is the same on both sides: the same rows, deltas and errors for the same config
and seed, whichever implementation answers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch

if TYPE_CHECKING:
    from pfedpg.client import ClientState
    from pfedpg.context import RunContext, ServerView
    from pfedpg.models.prompted_vit import PromptedViT


@dataclass
class ClientUpdate:
    """One participant's answer to a round's training (Algorithm 1, step 2).

    ``metrics``: its training row as the run records it (``train_loss``, ``local_steps``, a hook's
    extras; a Flower reply's ``message_s`` / ``client_work_s``) — under a DP mechanism only what the
    client releases. ``delta``: ΔP_n after its client-side hooks, the release the server steps on
    (None for methods that send nothing, or when it failed). ``error``: why it failed (the Flower
    engine: the round goes on without it, ``flower.on_client_failure: continue``)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    delta: torch.Tensor | None = None
    error: str | None = None

    def row(self) -> dict[str, Any]:
        """The client's part of its ``metrics.jsonl`` row: its metrics, the failure, and the norm of
        its release as sent (before any server-side hook)."""
        row = dict(self.metrics)
        if self.error is not None:
            row["error"] = self.error
        if self.delta is not None:
            row["delta_norm"] = float(self.delta.norm())
        return row


@dataclass
class EvalRow:
    """A client's evaluation in a round, as its ``Clients`` answer: accuracy and loss with its adapted
    prompt and its head, and with the generated prompt where the server sends one; the hooks'
    ``client_metrics``; or why there are none (``error``: it could not be evaluated; ``withheld``: it
    keeps its metrics, DESIGN §5). ``to_record`` is its metrics.jsonl form, the keys and their order
    as that file has always had them (``loss_generated`` only where a generated prompt was evaluated)."""

    client: int
    acc_adapted: float | None = None
    loss_adapted: float | None = None
    acc_generated: float | None = None
    loss_generated: float | None = None
    hook_metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    withheld: bool = False

    def to_record(self) -> dict[str, Any]:
        if self.withheld:
            return {"client": self.client, "withheld": True}
        if self.error is not None:
            return {"client": self.client, "acc_adapted": None, "acc_generated": None, "error": self.error}
        out = {"client": self.client, "acc_adapted": self.acc_adapted, "loss_adapted": self.loss_adapted,
               "acc_generated": self.acc_generated, **self.hook_metrics}
        if self.loss_generated is not None:
            out["loss_generated"] = self.loss_generated
        return out

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> EvalRow:
        """The row back from its metrics.jsonl form (a Flower client's answer travels in it)."""
        known = {f for f in cls.__dataclass_fields__ if f != "hook_metrics"}
        return cls(**{k: v for k, v in d.items() if k in known},
                   hook_metrics={k: v for k, v in d.items() if k not in known})


@dataclass(frozen=True)
class ClientFacts:
    """One client as its server may know it: its id, its split sizes (``evaluated``: the split it is
    evaluated on), its id in the partition, and — where the client shares them — its domain and its
    training split's label counts (None where it keeps them, as a Flower client does)."""

    client: int
    train: int
    test: int
    val: int
    evaluated: int
    domain: int | None = None
    label_counts: list[int] | None = None
    partition_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClientFacts:
        return cls(**d)


@dataclass
class Roster:
    """Who takes part in a run, as its server may know them: the training clients' facts, the new
    clients' (``data.new_clients``), the number of classes and the data set's domain and class names."""

    clients: list[ClientFacts]
    num_classes: int
    domain_names: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    new: list[ClientFacts] = field(default_factory=list)

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def info(self, facts: list[ClientFacts] | None = None) -> list[dict[str, Any]]:
        """Per client the data facts the hooks' context lists (``RunContext.client_info``)."""
        return [{"client": f.client, "domain": f.domain, "label_counts": f.label_counts,
                 "domain_names": self.domain_names} for f in (self.clients if facts is None else facts)]

    def names(self, partition: str, facts: list[ClientFacts] | None = None) -> list[str]:
        """A reader's name per client: its domain, and for label-skew partitions (``partition`` is not
        ``domain``) its dominant classes (those holding half of its training records, at most three)."""
        out, classes = [], self.class_names
        for f in self.clients if facts is None else facts:
            parts = []
            if f.domain is not None and self.domain_names:
                parts.append(self.domain_names[f.domain])
            counts = f.label_counts
            if counts and partition != "domain" and sum(counts):
                top, acc = [], 0
                for c in sorted(range(len(counts)), key=lambda c: -counts[c])[:3]:
                    top.append(classes[c] if c < len(classes) else str(c))
                    acc += counts[c]
                    if acc >= sum(counts) / 2:
                        break
                parts.append("mostly " + "/".join(top))
            out.append(" ".join(parts) or f"client {f.client}")
        return out


@dataclass(frozen=True)
class ModelShape:
    """The prompted model's numbers that the server, the clients and the summary need: the prompt
    tokens a client trains and sends (K shallow, L·K deep), the embedding width D, VPT's init bound,
    the classes, and the frozen backbone's size (for the communication ratio)."""

    prompt_tokens: int
    dim: int
    init_bound: float
    num_classes: int
    backbone_numbers: int


@dataclass
class ClientViews:
    """The simulation-side views of the clients that audits and probes read through the hooks'
    context (``RunContext``: ``train_data``, ``eval_data``, ``evaluate``, ``client_states``) — empty
    where the clients live in other processes (Flower)."""

    train_data: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    eval_data: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    evaluate: Callable[[int, torch.Tensor, torch.Tensor], float] | None = None
    client_states: Callable[[], list[ClientState]] | None = None


class Clients(Protocol):
    """What the round loop asks of its clients.

    ``facts()`` — the :class:`Roster` (a Flower implementation learns it from its clients' answers).
    ``views()`` — what the hooks' context may show of them (:class:`ClientViews`).
    ``start(...)`` — the run is assembled: the shared model, its shape, the server (for the clients'
    first prompts) and the hooks' context their hook points receive.
    ``train(round, participants, sent)`` — the round's local training: one :class:`ClientUpdate` per
    participant; ``sent`` holds the prompts the server sent (empty for methods that send nothing).
    ``evaluate(round, generated)`` — every client's :data:`EvalRow`, by client id, with its adapted
    prompt and with ``generated[n]`` (if any) on its own head.
    ``state_dict()`` / ``load_state_dict()`` — what a checkpoint holds of the clients (None: their
    states live elsewhere and a checkpoint cannot hold them).
    ``communication()`` — entries the implementation adds to summary.json's ``communication``."""

    def facts(self) -> Roster: ...

    def views(self) -> ClientViews: ...

    def start(self, *, model: PromptedViT, shape: ModelShape, server: ServerView, ctx: RunContext) -> None: ...

    def train(self, round: int, participants: list[int],
              sent: dict[int, torch.Tensor]) -> dict[int, ClientUpdate]: ...

    def evaluate(self, round: int, generated: dict[int, torch.Tensor]) -> list[EvalRow]: ...

    def state_dict(self) -> list[dict[str, Any]] | None: ...

    def load_state_dict(self, states: list[dict[str, Any]]) -> None: ...

    def communication(self) -> dict[str, Any]: ...
