"""What a hook may read, by side (DESIGN §4).

The trainer holds one :class:`RunContext` for the whole run. The hook chain hands each point a view
of it cut to that point's side:

=====================================================  ===========================================
points                                                 view
=====================================================  ===========================================
``client_data``, ``local_training``, ``outgoing_delta``  :class:`ClientSide`: the run's public facts
``client_metrics``                                     and the evaluating client's own test records
``incoming_deltas``, ``shared_gradients``,             :class:`ServerSide`: the run's public facts
``aggregate``                                          and the method's server, as :class:`ServerView`
``setup``, ``end_of_round``, ``end_of_run``            the whole :class:`RunContext`: audits and
                                                       probes play a stated threat model from the
                                                       simulation's side and read only what it allows
=====================================================  ===========================================

A view is read-only and always current (it reads through to the context), so a client-side point
cannot reach the server, another client's records or the shared model, and a server-side point
cannot reach any client's records — a test calls every point and checks which view it got.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch

if TYPE_CHECKING:
    from pfedpg.client import ClientState
    from pfedpg.config import RunConfig
    from pfedpg.models.prompted_vit import PromptedViT
    from pfedpg.seeding import Seeds


class ServerView(Protocol):
    """What a hook reads of the method's server, through these, not attribute probing."""

    sends_prompts: bool  # False for ``local``: nothing is exchanged
    joins_with_updates: bool  # pFedPG: a new client's join rounds update its descriptor

    def prompts_for(self, clients: list[int]) -> dict[int, torch.Tensor]: ...

    def client_descriptors(self) -> torch.Tensor | None: ...

    def shared_parameters(self) -> list[torch.nn.Parameter]: ...

    def pullback(self, client: int, u: torch.Tensor) -> torch.Tensor: ...


class PluggedHook(Protocol):
    """A hook as the run lists it (``pfedpg.hooks.Hook`` satisfies this; named here so that the
    context does not import the hook interface that imports it)."""

    name: str
    privacy_mechanism: bool


@dataclass
class RunContext:
    """The whole run as the simulation holds it: the resolved config, the seeds, the run directory
    and a logger, the public schedule facts, the server, and the simulation-side views that audits
    read. Hooks get it at ``setup``, ``end_of_round`` and ``end_of_run``; the other points get
    :attr:`client_side` or :attr:`server_side`."""

    config: RunConfig
    seeds: Seeds
    run_dir: Path | None
    num_clients: int
    log: Callable[[str], None]
    num_classes: int = 0
    server: ServerView | None = None
    #: The pre-computed participation schedule: schedule[r - 1] lists round r's clients.
    schedule: list[list[int]] = field(default_factory=list)
    #: Training-set size per client (record-level DP needs it for δ and the sampling rate).
    train_sizes: list[int] = field(default_factory=list)
    #: Each client's evaluation tensors (x, y) and ``evaluate(client, x, y) -> accuracy`` with that
    #: client's current adapted prompt and head (e.g. attack success rates on triggered images).
    eval_data: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    evaluate: Callable[[int, torch.Tensor, torch.Tensor], float] | None = None
    #: Simulation-side views for probes and audits (``attacks/``), which play a stated threat model
    #: and read only what it allows: each client's training tensors (x, y) before client hooks, the
    #: shared prompted model (load a client's state into it with ``pfedpg.client.load_into``),
    #: ``client_states() -> [ClientState]`` (adapted prompt, head) and per-client facts of the data
    #: (``domain``, ``label_counts`` of the training split, ``domain_names``).
    train_data: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    model: PromptedViT | None = None
    client_states: Callable[[], list[ClientState]] | None = None
    client_info: list[dict[str, Any]] = field(default_factory=list)
    #: The run's hooks in config order (an audit finds the DP mechanism with
    #: ``pfedpg.privacy_result.mechanism_of`` and reads its PrivacyMechanism face).
    hooks: list[PluggedHook] = field(default_factory=list)
    #: New clients (``data.new_clients``, DESIGN §1): their ids (num_clients, num_clients + 1, ...;
    #: never in ``schedule``), training-set sizes and facts, and the join rounds each will run
    #: after the last training round (rounds T + 1 .. T + R for the hooks; T + 0 trains the head
    #: alone on the received prompt and sends nothing). Client-side points run for them as for any
    #: client; the server-side points do not (only the new client's own state is updated).
    new_clients: list[int] = field(default_factory=list)
    new_train_sizes: list[int] = field(default_factory=list)
    new_client_info: list[dict[str, Any]] = field(default_factory=list)
    join_rounds: int = 0
    #: Clients that hooks added for an audit (``Hook.audit_clients``), by hook name: they take part in
    #: every training round besides ``schedule``'s clients, hold no data and are never evaluated.
    audit_clients: dict[str, list[int]] = field(default_factory=dict)
    #: Filled during the join rounds, for probes of what the server saw: per new client, one
    #: entry per join round ``{"round", "sent", "delta" (as released), "descriptor" (after the step,
    #: pfedpg), "initial_descriptor"}``.
    joins: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    @cached_property
    def facts(self) -> RunFacts:
        """The public facts alone (what ``Hook.check`` reads)."""
        return RunFacts(self)

    @cached_property
    def client_side(self) -> ClientSide:
        return ClientSide(self)

    @cached_property
    def server_side(self) -> ServerSide:
        return ServerSide(self)


class RunFacts:
    """What every point may read: the config, the seeds, the run folder, the logger and the public
    facts of the run (client counts, the participation schedule, split sizes, the new clients)."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: RunContext):
        self._ctx = ctx

    def __getattr__(self, name: str):
        # Only reached for what the view does not hold: say where it can be read.
        if name in RunContext.__dataclass_fields__:
            side = "client" if isinstance(self, ClientSide) else "server"
            where = "a server-side point (ctx.server) or " if name == "server" else ""
            raise AttributeError(f"a {side}-side hook point may not read ctx.{name}; read it at {where}setup, "
                                 "end_of_round or end_of_run, which get the whole RunContext (pfedpg/context.py)")
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def config(self) -> RunConfig:
        return self._ctx.config

    @property
    def seeds(self) -> Seeds:
        return self._ctx.seeds

    @property
    def run_dir(self) -> Path | None:
        return self._ctx.run_dir

    def log(self, line: str) -> None:
        self._ctx.log(line)

    @property
    def num_clients(self) -> int:
        return self._ctx.num_clients

    @property
    def num_classes(self) -> int:
        return self._ctx.num_classes

    @property
    def schedule(self) -> list[list[int]]:
        return self._ctx.schedule

    @property
    def train_sizes(self) -> list[int]:
        return self._ctx.train_sizes

    @property
    def new_clients(self) -> list[int]:
        return self._ctx.new_clients

    @property
    def new_train_sizes(self) -> list[int]:
        return self._ctx.new_train_sizes

    @property
    def join_rounds(self) -> int:
        return self._ctx.join_rounds

    @property
    def audit_clients(self) -> dict[str, list[int]]:
        return self._ctx.audit_clients


class ClientSide(RunFacts):
    """A client-side point's view: the public facts, and at ``client_metrics`` the evaluating
    client's own test records. The client's training records and model come in the point's own
    arguments (``data``, ``job``)."""

    __slots__ = ()

    def eval_data_of(self, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client ``client``'s evaluation records (x uint8, y), as its own side holds them."""
        return self._ctx.eval_data[client]


class ServerSide(RunFacts):
    """A server-side point's view: the public facts and the method's server."""

    __slots__ = ()

    @property
    def server(self) -> ServerView:
        if self._ctx.server is None:
            raise RuntimeError("the run's server is not built yet")
        return self._ctx.server
