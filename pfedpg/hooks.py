"""The plug-in points of a pFedPG round (DESIGN §4).

A hook is a small class that overrides only the points it needs; the trainer calls every point each
round, hooks in config order. Hooks are registered by name (``@register_hook("name")``) and built
from YAML (``hooks: [{name: ..., option: ...}]``); the core never names an attack or a defense —
``attacks/`` and ``defenses/`` register theirs when imported.

Points, in the order a round meets them:

====================  ======  ===============================================================
point                 side    contract
====================  ======  ===============================================================
``check``             both    ``(facts)``: refuse options the run cannot take, from its public facts
                              alone (no side effects); a grid calls it for every cell before any
                              runs, and ``setup`` should call it first
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

``ctx`` is cut to the point's side (``pfedpg/context.py``): client-side points get a ``ClientSide``
view (the run's public facts; ``eval_data_of(client)`` at ``client_metrics``), server-side points a
``ServerSide`` view (the public facts and ``server``, a ``ServerView``), and ``setup``,
``end_of_round`` and ``end_of_run`` the whole ``RunContext``.

A hook that ``controls_client(n)`` (a malicious client) owns client n's code: the honest-client
hooks are skipped for n at ``client_data``, ``local_training`` and ``outgoing_delta``, so its
crafted delta is what the server receives whatever honest-client hooks (e.g. DP noise) are set;
its own client-side points run for the clients it controls and no others.

A hook may add clients of its own (``Hook.audit_clients``: an audit's canary clients, which hold no
data and do not train); only ``outgoing_delta`` runs for them on the client side, on the zero update,
and the server-side points see their releases with everyone's.

New clients (``data.new_clients``, DESIGN §1) join after the last training round T. In their join
rounds (``round`` = T + j; ids ``ctx.new_clients``, after the training clients) the client-side
points run for them as for any client — ``client_data``, ``local_training`` (round T + 0 with the
prompt frozen: train ``trainable_parameters(model)``) and, for pfedpg, ``outgoing_delta`` — while
the server-side points do not: only the new client's own state is updated, and nothing is
aggregated. What the server saw of them is in ``ctx.joins`` for the probes.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable

import torch

from pfedpg.context import ClientSide, RunContext, RunFacts, ServerSide
from pfedpg.deprecation import take_renamed
from pfedpg.errors import ConfigError
from pfedpg.registry import Registry, Spec, construct

if TYPE_CHECKING:
    from pfedpg.jobs import ClientData, LocalJob, LocalResult

_MOVED = ("ClientData", "LocalJob", "LocalResult")


def __getattr__(name: str):
    """The job types live in :mod:`pfedpg.jobs`; importing them from here works for this release, with
    a warning (removed in the next release)."""
    if name in _MOVED:
        warnings.warn(f"import {name} from pfedpg.jobs; pfedpg.hooks.{name} goes in the next release",
                      FutureWarning, stacklevel=2)
        from pfedpg import jobs

        return getattr(jobs, name)
    raise AttributeError(f"module 'pfedpg.hooks' has no attribute {name!r}")

HOOKS: Registry[type["Hook"]] = Registry("hook")


def register_hook(name: str):
    """Class decorator: ``@register_hook("dp_client")`` makes the hook selectable from YAML."""

    def deco(cls):
        cls.name = name
        return HOOKS.register(name)(cls)

    return deco


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
    #: How many clients this hook adds to the run (an audit's canary clients, DESIGN §6). They hold
    #: no data and do not train: each training round each sends the zero update through
    #: ``outgoing_delta`` (where the hook that added them writes its canary, and a DP mechanism
    #: releases it), and the server treats the release as any client's. They are never evaluated and
    #: count in no accuracy; their ids (after the training and new clients) are in ``ctx.audit_clients``.
    audit_clients: int = 0

    def __init__(self, **options):
        if options:
            raise ConfigError(f"hook {self.name!r} takes no options {sorted(options)}")

    # --- configuration -------------------------------------------------------------------------
    def acts_on(self, client: int) -> bool:
        return self.clients is None or client in self.clients

    def controls_client(self, client: int) -> bool:
        """True when this hook *replaces* client ``client``'s code (a malicious client)."""
        return False

    def check(self, facts: RunFacts) -> None:
        """Refuse options this run cannot take, from its public facts alone (the config, client
        counts, split sizes, the schedule, the new and audit clients): cheap and without side
        effects. A grid checks every cell this way before any runs (``evaluations/preflight.py``);
        ``setup`` calls it first (``self.check(ctx.facts)``). Raise a one-line ConfigError."""

    def fixes_rounds(self) -> bool:
        """Whether what the hook does depends on the run's number of rounds (noise calibrated to a
        target ε over them, an audit scored over them): a run with it cannot change ``rounds`` when it
        resumes (``pfedpg.run.checkpoint.load_checkpoint``)."""
        return False

    def setup(self, ctx: RunContext) -> None:
        pass

    # --- client side ---------------------------------------------------------------------------
    def client_data(self, ctx: ClientSide, *, client: int, round: int, data: ClientData) -> ClientData:
        return data

    def local_training(self, ctx: ClientSide, job: LocalJob,
                       call_next: Callable[[LocalJob], LocalResult]) -> LocalResult:
        return call_next(job)

    def outgoing_delta(self, ctx: ClientSide, *, client: int, round: int, delta: torch.Tensor) -> torch.Tensor:
        return delta

    # --- server side ---------------------------------------------------------------------------
    def incoming_deltas(self, ctx: ServerSide, *, round: int,
                        deltas: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return deltas

    def shared_gradients(self, ctx: ServerSide, *, round: int, grads):
        return grads

    def aggregate(self, ctx: ServerSide, *, round: int, grads) -> torch.Tensor:
        raise NotImplementedError  # only hooks that override this take part in aggregation

    def client_metrics(self, ctx: ClientSide, *, client: int,
                       evaluate: Callable[[torch.Tensor, torch.Tensor], float]) -> dict[str, Any] | None:
        return None

    # --- both ----------------------------------------------------------------------------------
    def end_of_round(self, ctx: RunContext, *, round: int, record: dict[str, Any]) -> dict[str, Any] | None:
        return None

    def end_of_run(self, ctx: RunContext, *, summary: dict[str, Any]) -> dict[str, Any] | None:
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

    def check(self, facts: RunFacts) -> None:
        for h in self.hooks:
            h.check(facts)

    def setup(self, ctx: RunContext) -> None:
        for h in self.hooks:
            h.setup(ctx)

    def assign_audit_clients(self, first: int) -> dict[str, list[int]]:
        """Ids for the clients hooks add (``Hook.audit_clients``), from ``first`` on, by hook name."""
        out: dict[str, list[int]] = {}
        for h in self.hooks:
            if h.audit_clients:
                out[h.name] = list(range(first, first + h.audit_clients))
                first += h.audit_clients
        return out

    def has_local_training(self, client: int) -> bool:
        """True when a hook wraps client ``client``'s local training (it cannot join a batched round)."""
        return any(_overrides(h, "local_training") for h in self._client_hooks(client))

    def client_data(self, ctx: RunContext, *, client: int, round: int, data: ClientData) -> ClientData:
        view = ctx.client_side
        for h in self._client_hooks(client):
            data = h.client_data(view, client=client, round=round, data=data)
        return data

    def local_training(self, ctx: RunContext, job: LocalJob) -> LocalResult:
        # Middleware: the first hook in config order is the outermost (Flower mods' convention).
        view = ctx.client_side
        call: Callable[[LocalJob], LocalResult] = job.run_default
        for h in reversed(self._client_hooks(job.client)):
            if _overrides(h, "local_training"):
                call = (lambda hook, nxt: (lambda j: hook.local_training(view, j, nxt)))(h, call)
        return call(job)

    def outgoing_delta(self, ctx: RunContext, *, client: int, round: int, delta: torch.Tensor) -> torch.Tensor:
        view = ctx.client_side
        for h in self._client_hooks(client):
            delta = h.outgoing_delta(view, client=client, round=round, delta=delta)
        return delta

    def incoming_deltas(self, ctx: RunContext, *, round: int,
                        deltas: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        view = ctx.server_side
        for h in self.hooks:
            deltas = h.incoming_deltas(view, round=round, deltas=deltas)
        return deltas

    def shared_gradients(self, ctx: RunContext, *, round: int, grads):
        view = ctx.server_side
        for h in self.hooks:
            grads = h.shared_gradients(view, round=round, grads=grads)
        return grads

    def aggregate(self, ctx: RunContext, *, round: int, grads, default: Callable) -> torch.Tensor:
        if self.aggregator is None:
            return default(grads)
        return self.aggregator.aggregate(ctx.server_side, round=round, grads=grads)

    def _prefixed(self, point: str, **kw) -> dict[str, Any]:
        """Every hook's dict from ``point``, keys prefixed ``<hook>/``."""
        extra: dict[str, Any] = {}
        for h in self.hooks:
            out = getattr(h, point)(**kw)
            if out:
                extra.update({f"{h.name}/{k}": v for k, v in out.items()})
        return extra

    def client_metrics(self, ctx: RunContext, *, client: int, evaluate) -> dict[str, Any]:
        """Every hook's measurements on client ``client``'s model (a measurement, not client
        behaviour: it runs for every hook, whoever controls the client)."""
        return self._prefixed("client_metrics", ctx=ctx.client_side, client=client, evaluate=evaluate)

    def end_of_round(self, ctx: RunContext, *, round: int, record: dict[str, Any]) -> dict[str, Any]:
        return self._prefixed("end_of_round", ctx=ctx, round=round, record=record)

    def end_of_run(self, ctx: RunContext, *, summary: dict[str, Any]) -> dict[str, Any]:
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


def hook_specs(entries: list[Any] | None) -> list[Spec]:
    """``hooks:`` entries (``{name: ..., **options}`` mappings, or Specs) -> typed Specs, with one-line
    errors naming the entry."""
    return [Spec.parse(e, f"hooks[{i}]", bare_name=False) for i, e in enumerate(entries or [])]


def build_hooks(specs: list[Spec | dict[str, Any]]) -> HookChain:
    """``[{name: noop}, {name: dp_client, clip: 1.0}]`` (or their Specs) -> HookChain, with one-line
    errors; a renamed option is moved to its new name with a warning (the hook's ``RENAMED``)."""
    hooks = []
    for i, spec in enumerate(hook_specs(specs)):
        cls = HOOKS.get(spec.name)
        options = take_renamed(dict(spec.options), getattr(cls, "RENAMED", {}), f"{spec.name}.")
        hooks.append(construct(cls, options, where=f"hooks[{i}] ({spec.name})"))
    return HookChain(hooks)


@register_hook("noop")
class NoopHook(Hook):
    """Implements every point as the identity. A template for new hooks, and the control of the
    'no-op hooks equal no hooks' regression test."""

    def client_data(self, ctx: ClientSide, *, client, round, data):
        return data

    def local_training(self, ctx: ClientSide, job, call_next):
        return call_next(job)

    def outgoing_delta(self, ctx: ClientSide, *, client, round, delta):
        return delta

    def incoming_deltas(self, ctx: ServerSide, *, round, deltas):
        return dict(deltas)

    def end_of_round(self, ctx: RunContext, *, round, record):
        return None
