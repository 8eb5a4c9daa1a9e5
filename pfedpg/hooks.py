"""The plug-in points of a pFedPG round (DESIGN §4).

A hook is a small class that overrides only the points it needs; the trainer calls every point each
round, hooks in config order. Hooks are registered by name (``@register_hook("name")``) and built
from YAML (``hooks: [{name: ..., option: ...}]``); the core never names an attack or a defense —
``attacks/`` and ``defenses/`` register theirs when imported.

Points, in the order a round meets them:

====================  ======  ===============================================================
point                 side    contract
====================  ======  ===============================================================
``setup``             both    once per run (and again on resume), before round 1
``client_data``       client  ``(ctx, client, round, data) -> data``; e.g. label flips, canaries
``local_training``    client  middleware ``(ctx, job, call_next) -> LocalResult``; e.g. DP-SGD
``outgoing_delta``    client  ``(ctx, client, round, delta) -> delta``; e.g. clip + noise
``incoming_deltas``   server  ``(ctx, round, deltas) -> deltas``; may drop clients
``shared_gradients``  server  ``(ctx, round, grads) -> grads``: the per-client g_n before aggregation
``aggregate``         server  ``(ctx, round, grads) -> update``; at most one hook, default sum
``client_metrics``    client  ``(ctx, client, evaluate) -> dict``: extra numbers measured on client n's
                              model when it is evaluated (``evaluate(x, y) -> accuracy``); they
                              land in its ``client`` row as ``<hook>/<key>``, e.g. backdoor success
``end_of_round``      both    ``(ctx, round, record) -> dict`` of extra metrics for that round;
                              ``record["clients"]`` holds the round's client rows
``end_of_run``        both    ``(ctx, summary) -> dict`` merged into ``summary.json``
====================  ======  ===============================================================

A hook that ``controls_client(n)`` (a malicious client) owns client n's code: the honest-client
hooks are skipped for n at ``client_data``, ``local_training`` and ``outgoing_delta``, so its
crafted delta is what the server receives whatever honest-client hooks (e.g. DP noise) are set;
its own client-side points run for the clients it controls and no others.

New clients (``data.new_clients``, DESIGN §1) join after the last training round T. In their join
rounds (``round`` = T + j; ids ``ctx.new_clients``, after the training clients) the client-side
points run for them as for any client — ``client_data``, ``local_training`` (round T + 0 with the
prompt frozen: train ``trainable_parameters(model)``) and, for pfedpg, ``outgoing_delta`` — while
the server-side points do not: only the new client's own state is updated, and nothing is
aggregated. What the server saw of them is in ``ctx.joins`` for the probes.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from pfedpg.deprecation import take_renamed
from pfedpg.errors import ConfigError
from pfedpg.registry import Registry

HOOKS: Registry[type["Hook"]] = Registry("hook")


def register_hook(name: str):
    """Class decorator: ``@register_hook("dp_client")`` makes the hook selectable from YAML."""

    def deco(cls):
        cls.name = name
        return HOOKS.register(name)(cls)

    return deco


@dataclass
class ClientData:
    """One client's training records for a round: ``x`` uint8 images (N, 3, S, S) at their stored
    size S on the host, ``y`` int64 labels. A hook that edits pixels edits these uint8 records (a
    trigger or a canary is part of the image); the model's input pipeline resizes, normalises and
    augments per batch on the run's device."""

    x: torch.Tensor
    y: torch.Tensor


@dataclass
class LocalJob:
    """Everything local training needs; ``run_default()`` is the plain SGD loop of DESIGN §1.
    Train what ``pfedpg.client.trainable_parameters(model)`` lists: a new client's round 0 freezes
    the prompt and trains its head alone."""

    client: int
    round: int
    model: torch.nn.Module
    data: ClientData
    generator: torch.Generator  # the round's shuffling stream for this client
    run_default: Callable[["LocalJob"], "LocalResult"]
    #: the round's augmentation stream for this client (``data.augment``), None = no augmentation;
    #: pass it to ``pfedpg.client.training_batch`` / ``model.prepare``
    augment: torch.Generator | None = None


@dataclass
class LocalResult:
    loss: float
    steps: int
    samples: int
    extra: dict[str, Any] = field(default_factory=dict)


class Hook:
    """Base class: every point passes through unchanged. Override only what the hook needs."""

    name = "hook"
    #: Clients this hook acts for on the client side; None means every client.
    clients: list[int] | None = None
    #: Why this hook cannot run on the Flower engine (it reads, from the server side, what only
    #: the clients hold); None when it can. Under Flower the client-side points run in each
    #: client's ClientApp and the server-side points in the ServerApp.
    inprocess_only: str | None = None
    #: A DP mechanism on what clients send (DESIGN §5, "What leaves a client"): with one in the run,
    #: a client sends its DP release and what the statement names public, and keeps its losses,
    #: accuracies and other measurements (unless ``privacy.release_metrics``).
    privacy_mechanism: bool = False

    def __init__(self, **options):
        if options:
            raise ConfigError(f"hook {self.name!r} takes no options {sorted(options)}")

    # --- configuration -------------------------------------------------------------------------
    def acts_on(self, client: int) -> bool:
        return self.clients is None or client in self.clients

    def controls_client(self, client: int) -> bool:
        """True when this hook *replaces* client ``client``'s code (a malicious client)."""
        return False

    def setup(self, ctx: "RunContext") -> None:
        pass

    # --- client side ---------------------------------------------------------------------------
    def client_data(self, ctx: "RunContext", *, client: int, round: int, data: ClientData) -> ClientData:
        return data

    def local_training(self, ctx: "RunContext", job: LocalJob, call_next: Callable[[LocalJob], LocalResult]) -> LocalResult:
        return call_next(job)

    def outgoing_delta(self, ctx: "RunContext", *, client: int, round: int, delta: torch.Tensor) -> torch.Tensor:
        return delta

    # --- server side ---------------------------------------------------------------------------
    def incoming_deltas(self, ctx: "RunContext", *, round: int, deltas: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return deltas

    def shared_gradients(self, ctx: "RunContext", *, round: int, grads):
        return grads

    def aggregate(self, ctx: "RunContext", *, round: int, grads) -> torch.Tensor:
        raise NotImplementedError  # only hooks that override this take part in aggregation

    def client_metrics(self, ctx: "RunContext", *, client: int,
                       evaluate: Callable[[torch.Tensor, torch.Tensor], float]) -> dict[str, Any] | None:
        return None

    # --- both ----------------------------------------------------------------------------------
    def end_of_round(self, ctx: "RunContext", *, round: int, record: dict[str, Any]) -> dict[str, Any] | None:
        return None

    def end_of_run(self, ctx: "RunContext", *, summary: dict[str, Any]) -> dict[str, Any] | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # --- engines with clients in other processes (Flower) ---------------------------------------
    def client_state(self, client: int) -> dict[str, Any]:
        """What client ``client``'s side of this hook changed this round (e.g. its privacy
        accountant); the Flower engine sends it back with the client's reply."""
        return {}

    def merge_client_state(self, client: int, state: dict[str, Any]) -> None:
        """Take ``client_state(client)`` from the client's process into this (server-side) hook."""


def _overrides(hook: Hook, point: str) -> bool:
    return getattr(type(hook), point) is not getattr(Hook, point)


class ServerView(Protocol):
    """What a hook reads of the method's server (``ctx.server``), through these, not attribute probing."""

    sends_prompts: bool  # False for ``local``: nothing is exchanged
    joins_with_updates: bool  # pFedPG: a new client's join rounds update its descriptor

    def prompts_for(self, clients: list[int]) -> dict[int, torch.Tensor]: ...

    def client_descriptors(self) -> torch.Tensor | None: ...

    def shared_parameters(self) -> list[torch.nn.Parameter]: ...


@dataclass
class RunContext:
    """What hooks may read: the resolved config, the seeds, the run directory and a logger.
    ``server`` is the method's server (server-side hooks only may look at it)."""

    config: Any
    seeds: Any
    run_dir: Any
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
    eval_data: list = field(default_factory=list)
    evaluate: Callable[[int, torch.Tensor, torch.Tensor], float] | None = None
    #: Simulation-side views for probes and audits (``attacks/``), which play a stated threat model
    #: and read only what it allows: each client's training tensors (x, y) before client hooks, the
    #: shared prompted model (load a client's state into it with ``pfedpg.client.load_into``),
    #: ``client_states() -> [ClientState]`` (adapted prompt, head) and per-client facts of the data
    #: (``domain``, ``label_counts`` of the training split, ``domain_names``).
    train_data: list = field(default_factory=list)
    model: Any = None
    client_states: Callable[[], list] | None = None
    client_info: list[dict[str, Any]] = field(default_factory=list)
    #: The run's hooks in config order (an audit reads a DP hook's ``statement()`` / ``epsilon(n)``).
    hooks: list = field(default_factory=list)
    #: New clients (``data.new_clients``, DESIGN §1): their ids (num_clients, num_clients + 1, ...;
    #: never in ``schedule``), training-set sizes and facts, and the join rounds each will run
    #: after the last training round (rounds T + 1 .. T + R for the hooks; T + 0 trains the head
    #: alone on the received prompt and sends nothing). Client-side points run for them as for any
    #: client; the server-side points do not (only the new client's own state is updated).
    new_clients: list[int] = field(default_factory=list)
    new_train_sizes: list[int] = field(default_factory=list)
    new_client_info: list[dict[str, Any]] = field(default_factory=list)
    join_rounds: int = 0
    #: Filled during the join rounds, for probes of what the server saw: per new client, one
    #: entry per join round ``{"round", "sent", "delta" (as released), "descriptor" (after the step,
    #: pfedpg), "initial_descriptor"}``.
    joins: dict[int, list[dict[str, Any]]] = field(default_factory=dict)


class HookChain:
    """Calls hooks in config order at each point; the trainer talks only to the chain."""

    def __init__(self, hooks: list[Hook] | None = None):
        self.hooks = list(hooks or [])
        aggregators = [h for h in self.hooks if _overrides(h, "aggregate")]
        if len(aggregators) > 1:
            raise ConfigError(
                f"hooks {[h.name for h in aggregators]} all replace the server aggregation; keep one"
            )
        self.aggregator = aggregators[0] if aggregators else None
        names = [h.name for h in self.hooks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"hook(s) {dupes} listed twice; merge their options into one entry")

    def __len__(self) -> int:
        return len(self.hooks)

    def _client_hooks(self, client: int) -> list[Hook]:
        controllers = [h for h in self.hooks if h.controls_client(client)]
        if len(controllers) > 1:
            raise ConfigError(f"client {client} is controlled by two attack hooks {[h.name for h in controllers]}")
        if controllers:
            return controllers
        # A hook that controls some clients (an attack) runs client-side code for those alone.
        return [h for h in self.hooks if h.acts_on(client) and not _overrides(h, "controls_client")]

    def setup(self, ctx: RunContext) -> None:
        for h in self.hooks:
            h.setup(ctx)

    def has_local_training(self, client: int) -> bool:
        """True when a hook wraps client ``client``'s local training (it cannot join a batched round)."""
        return any(_overrides(h, "local_training") for h in self._client_hooks(client))

    def client_data(self, ctx, *, client: int, round: int, data: ClientData) -> ClientData:
        for h in self._client_hooks(client):
            data = h.client_data(ctx, client=client, round=round, data=data)
        return data

    def local_training(self, ctx, job: LocalJob) -> LocalResult:
        # Middleware: the first hook in config order is the outermost (Flower mods' convention).
        call: Callable[[LocalJob], LocalResult] = job.run_default
        for h in reversed(self._client_hooks(job.client)):
            if _overrides(h, "local_training"):
                call = (lambda hook, nxt: (lambda j: hook.local_training(ctx, j, nxt)))(h, call)
        return call(job)

    def outgoing_delta(self, ctx, *, client: int, round: int, delta: torch.Tensor) -> torch.Tensor:
        for h in self._client_hooks(client):
            delta = h.outgoing_delta(ctx, client=client, round=round, delta=delta)
        return delta

    def incoming_deltas(self, ctx, *, round: int, deltas: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        for h in self.hooks:
            deltas = h.incoming_deltas(ctx, round=round, deltas=deltas)
        return deltas

    def shared_gradients(self, ctx, *, round: int, grads):
        for h in self.hooks:
            grads = h.shared_gradients(ctx, round=round, grads=grads)
        return grads

    def aggregate(self, ctx, *, round: int, grads, default: Callable) -> torch.Tensor:
        if self.aggregator is None:
            return default(grads)
        return self.aggregator.aggregate(ctx, round=round, grads=grads)

    def _prefixed(self, point: str, **kw) -> dict[str, Any]:
        """Every hook's dict from ``point``, keys prefixed ``<hook>/``."""
        extra: dict[str, Any] = {}
        for h in self.hooks:
            out = getattr(h, point)(**kw)
            if out:
                extra.update({f"{h.name}/{k}": v for k, v in out.items()})
        return extra

    def client_metrics(self, ctx, *, client: int, evaluate) -> dict[str, Any]:
        """Every hook's measurements on client ``client``'s model (a measurement, not client
        behaviour: it runs for every hook, whoever controls the client)."""
        return self._prefixed("client_metrics", ctx=ctx, client=client, evaluate=evaluate)

    def end_of_round(self, ctx, *, round: int, record: dict[str, Any]) -> dict[str, Any]:
        return self._prefixed("end_of_round", ctx=ctx, round=round, record=record)

    def end_of_run(self, ctx, *, summary: dict[str, Any]) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        for h in self.hooks:
            out = h.end_of_run(ctx, summary=summary)
            if out:
                extra[h.name] = out
        return extra

    def state_dict(self) -> dict[str, Any]:
        return {h.name: h.state_dict() for h in self.hooks}

    def client_state(self, client: int) -> dict[str, Any]:
        return {h.name: st for h in self.hooks if (st := h.client_state(client))}

    def merge_client_state(self, client: int, state: dict[str, Any]) -> None:
        for h in self.hooks:
            if h.name in state:
                h.merge_client_state(client, state[h.name])

    def privacy_mechanisms(self) -> list[str]:
        return [h.name for h in self.hooks if h.privacy_mechanism]

    def inprocess_only(self) -> list[str]:
        """One line per hook that cannot run on the Flower engine, with the reason."""
        return [f"{h.name}: {h.inprocess_only}" for h in self.hooks if h.inprocess_only]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for h in self.hooks:
            if h.name in state:
                h.load_state_dict(state[h.name])


def build_hooks(specs: list[dict[str, Any]]) -> HookChain:
    """``[{name: noop}, {name: dp_client, clip: 1.0}]`` -> HookChain, with one-line errors."""
    hooks = []
    for i, spec in enumerate(specs or []):
        if not isinstance(spec, dict) or "name" not in spec:
            raise ConfigError(f"hooks[{i}] must be a mapping with a `name` key, got {spec!r}")
        cls = HOOKS.get(spec["name"])
        options = take_renamed({k: v for k, v in spec.items() if k != "name"}, getattr(cls, "RENAMED", {}),
                               f"{spec['name']}.")
        params = inspect.signature(cls.__init__).parameters
        valid = [p for p, v in params.items() if p != "self" and v.kind in (v.KEYWORD_ONLY, v.POSITIONAL_OR_KEYWORD)]
        takes_any = any(v.kind == v.VAR_KEYWORD for v in params.values())
        unknown = [k for k in options if k not in valid]
        if unknown and not takes_any:
            raise ConfigError(f"hooks[{i}] ({spec['name']}): unknown option {unknown[0]!r}; its options are "
                              f"{', '.join(valid) or '(none)'}")
        try:
            hooks.append(cls(**options))
        except TypeError as e:
            raise ConfigError(f"hooks[{i}] ({spec['name']}): {e}; its options are {', '.join(valid) or '(none)'}") from None
    return HookChain(hooks)


@register_hook("noop")
class NoopHook(Hook):
    """Implements every point as the identity. A template for new hooks, and the control of the
    'no-op hooks equal no hooks' regression test."""

    def client_data(self, ctx, *, client, round, data):
        return data

    def local_training(self, ctx, job, call_next):
        return call_next(job)

    def outgoing_delta(self, ctx, *, client, round, delta):
        return delta

    def incoming_deltas(self, ctx, *, round, deltas):
        return dict(deltas)

    def end_of_round(self, ctx, *, round, record):
        return None
