"""Servers of the three methods that share one client implementation (DESIGN §1).

* ``pfedpg`` — Yang et al. (ICCV 2023), Algorithm 1. The server holds P_base, one descriptor d_n per
  client and the generator φ. It sends P_n = G(P_base, d_n); the client returns ΔP_n = P̃_n − P_n.
  The server treats P_n − P̃_n = −ΔP_n as the upstream gradient of P_n (pFedHN's convention),
  back-propagates it through G into φ, P_base and d_n, and takes one SGD step with lr α. Moving
  P_n *towards* P̃_n is the point; the paper's notation and two public re-implementations flip
  this sign (see ``tests/test_server.py::test_sign``).
* ``fedvpt`` — prompts averaged FedAvg-style (weighted by training-set size), heads stay local.
* ``local`` — SingleSet-VPT: each client trains alone; nothing is sent.

Robust aggregation (DESIGN §4): the server computes one gradient per client on the *shared*
parameters only, g_n = J_nᵀ(−ΔP_n), and hands the stack to the aggregation rule; the default rule
is the weighted sum, which is the plain update. Descriptor gradients stay per client.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from pfedpg.errors import ConfigError
from pfedpg.generators import GENERATORS
from pfedpg.registry import Registry, Spec
from pfedpg.seeding import Seeds

SERVERS: Registry[type["Server"]] = Registry("method")


@dataclass
class ServerConfig:
    """Server side of pFedPG (ignored by ``fedvpt`` and ``local`` except where noted)."""

    # cross_attention | mlp | adain | basis (paper Table 4), or {name: ..., **its options} (a
    # generator's options are its constructor's: cross_attention residual, mlp hidden)
    generator: str | dict[str, Any] = "cross_attention"
    residual: bool = False  # cross_attention: P_base + attention(...) instead of the literal Eq. 3
    lr: float = 1e-3  # α, the server's SGD step (paper: 1e-3)
    mlp_hidden: int | None = None  # mlp generator width (default D)
    # Initial attention-logit std for cross_attention: descriptors start N(0,1) and are rescaled so
    # the logits have this std. Near-uniform attention would give every client the same prompt.
    attention_logit_std: float = 1.0
    # The bounded step (DESIGN §1): before the SGD step, clip the aggregated shared-parameter update
    # and each descriptor gradient to this L2 norm (pFedHN's trainer clips at 50). null = the
    # paper's plain step. What lets α ≫ 1e-3 survive client-level DP noise. (Formerly
    # max_grad_norm, which in Opacus is DP-SGD's per-sample clip.)
    update_bound: float | None = None

    RENAMED: ClassVar[dict[str, str]] = {"max_grad_norm": "update_bound"}
    #: server keys that are a generator's option: key -> (generator, option)
    GENERATOR_KEYS: ClassVar[dict[str, tuple[str, str]]] = {"residual": ("cross_attention", "residual"),
                                                             "mlp_hidden": ("mlp", "hidden")}

    @property
    def generator_spec(self) -> Spec:
        """``generator`` typed: its name and its options — those of the ``generator`` mapping, and the
        server keys that name one of its options (``residual``, ``mlp_hidden``) when set away from
        their defaults."""
        spec = Spec.parse(self.generator, "server.generator")
        name, options = spec.name, dict(spec.options)
        for key, (owner, option) in self.GENERATOR_KEYS.items():
            value = getattr(self, key)
            if value == getattr(ServerConfig, key):
                continue
            if owner != name:
                raise ConfigError(f"server.{key} is an option of the {owner} generator, not of {name}; remove it")
            if option in options:
                raise ConfigError(f"server.{key} and server.generator.{option} both set; keep one")
            options[option] = value
        return Spec(name, options)

    def __post_init__(self):
        spec = self.generator_spec  # a misplaced option fails here, before the run
        GENERATORS.check(spec, where=f"server.generator {spec.name}", given=("num_prompts", "dim"))
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"server.lr={self.lr!r} must be a positive number (paper: 1e-3)")
        if not self.attention_logit_std > 0:
            raise ConfigError(f"server.attention_logit_std={self.attention_logit_std!r} must be > 0")
        if self.update_bound is not None and not (self.update_bound > 0 and math.isfinite(self.update_bound)):
            raise ConfigError(f"server.update_bound={self.update_bound!r} must be a positive number, "
                              "or null (the plain step)")


@dataclass
class ClientGradients:
    """What the server computed from one round's deltas, before aggregation."""

    clients: list[int]
    shared: torch.Tensor  # (m, P): per-client gradient on the shared parameters
    weights: torch.Tensor  # (m,): the plain update is sum_n weights[n] * shared[n]
    private: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # per-client, never aggregated


class Server(nn.Module):
    """A method's server: ``prompts_for`` the round's clients, then ``client_gradients`` from their
    deltas and ``apply`` of the aggregated update."""

    sends_prompts: bool = True

    def __init__(self, cfg: ServerConfig, *, num_clients: int, num_prompts: int, dim: int,
                 init_bound: float, seeds: Seeds, train_sizes: list[int], audit_clients: list[int] = ()):
        super().__init__()
        self.cfg, self.num_clients = cfg, num_clients
        self.num_prompts, self.dim = num_prompts, dim
        #: An audit's clients (DESIGN §6: canary clients that hold no data): ids after the training and
        #: new clients, served like any client; ``rows`` maps every served client to its index.
        self.audit_clients = list(audit_clients)
        self.rows = {**{n: n for n in range(num_clients)},
                     **{c: num_clients + k for k, c in enumerate(self.audit_clients)}}

    def prompts_for(self, clients: list[int]) -> dict[int, torch.Tensor]:
        raise NotImplementedError

    def shared_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def client_gradients(self, deltas: dict[int, torch.Tensor]) -> ClientGradients:
        raise NotImplementedError

    def apply(self, shared_update: torch.Tensor, grads: ClientGradients) -> dict[str, float]:
        """Take the step; returns the step's norms for the round record."""
        raise NotImplementedError

    def bound(self, update: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``update`` clipped to ``server.update_bound`` (unchanged when null), and its norm before."""
        norm = float(update.norm())
        c = self.cfg.update_bound
        if c is not None and norm > c:
            update = update * (c / norm)
        return update, norm

    def client_descriptors(self) -> torch.Tensor | None:
        """The clients' descriptors d_n (N, D) for a method that learns them (pFedPG), else None."""
        return None

    def pullback(self, client: int, u: torch.Tensor) -> torch.Tensor:
        """J_cᵀ u as one float64 vector on the CPU: how a release along ``u`` from client ``client``
        moves the shared state, to first order. Here the shared state is the prompt itself (FedVPT)."""
        return u.reshape(-1).double()

    def num_shared(self) -> int:
        return sum(p.numel() for p in self.shared_parameters())

    # --- new clients (DESIGN §1, "New clients"): the server's state stays frozen ---------------
    #: True when a new client sends ΔP_new each join round and the server updates its own state for it.
    joins_with_updates: bool = False
    #: What a new client starts from (summary.json and the report say it).
    join_description: str = "the VPT uniform init, then local training (nothing is sent)"

    def join_state(self) -> dict[str, torch.Tensor] | None:
        """What the server keeps for a new client (None: the client starts alone from the VPT init)."""
        return None

    def join_prompt(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The prompt the server sends a new client (for ``joins_with_updates``: every join round)."""
        raise NotImplementedError

    def join_step(self, state: dict[str, torch.Tensor], delta: torch.Tensor) -> dict[str, float]:
        """Update the new client's own state from its released ΔP_new; nothing shared changes."""
        return {}


def _flatten(tensors: list[torch.Tensor | None], like: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1) for t, p in zip(tensors, like)])


def _unflatten(vec: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for p in like:
        out.append(vec[i:i + p.numel()].view_as(p))
        i += p.numel()
    return out


@SERVERS.register("pfedpg")
class PFedPGServer(Server):
    def __init__(self, cfg: ServerConfig, *, num_clients: int, num_prompts: int, dim: int,
                 init_bound: float, seeds: Seeds, train_sizes: list[int], audit_clients: list[int] = ()):
        super().__init__(cfg, num_clients=num_clients, num_prompts=num_prompts, dim=dim,
                         init_bound=init_bound, seeds=seeds, train_sizes=train_sizes, audit_clients=audit_clients)
        spec = cfg.generator_spec
        self.generator = GENERATORS.build(spec, where=f"server.generator {spec.name}", num_prompts=num_prompts, dim=dim)
        self.generator.reset_parameters(seeds.torch("init.generator"))
        g = seeds.torch("init.p_base")
        self.p_base = nn.Parameter(torch.empty(num_prompts, dim).uniform_(-init_bound, init_bound, generator=g))
        # One K×D descriptor per client, each from its own stream: adding clients never changes the others
        # (an audit's clients get rows after the training clients', scaled as theirs).
        d = self.generator.init_descriptors(lambda n: seeds.torch("init.descriptor", client=n), list(self.rows),
                                            p_base=self.p_base, init_bound=init_bound,
                                            logit_std=cfg.attention_logit_std, num_clients=num_clients)
        self.descriptors = nn.Parameter(d)

    def client_descriptors(self) -> torch.Tensor:
        """The training clients' descriptors (an audit's clients are not probed)."""
        return self.descriptors[:self.num_clients] if self.audit_clients else self.descriptors

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.p_base, *self.generator.parameters()]

    def generate(self, client: int) -> torch.Tensor:
        """P_n with its autograd graph (rows of ``descriptors`` are read one client at a time)."""
        return self.generator(self.p_base, self.descriptors[self.rows[client]])

    def prompts_for(self, clients: list[int]) -> dict[int, torch.Tensor]:
        with torch.no_grad():
            return {n: self.generate(n).detach().clone() for n in clients}

    def pullback(self, client: int, u: torch.Tensor) -> torch.Tensor:
        params = self.shared_parameters()
        p = self.generate(client)
        grads = torch.autograd.grad((p * u.to(p)).sum(), params, allow_unused=True)
        return torch.cat([(torch.zeros_like(q) if g is None else g).reshape(-1).double().cpu()
                          for q, g in zip(params, grads)])

    def client_gradients(self, deltas: dict[int, torch.Tensor]) -> ClientGradients:
        shared = self.shared_parameters()
        rows, private, clients = [], {}, sorted(deltas)
        for n in clients:
            # The gradient of client n's own row (not of every row: an audit's hundreds of canary clients
            # would make the step quadratic in the clients); the same numbers.
            d_n = self.descriptors[self.rows[n]]
            p_n = self.generator(self.p_base, d_n)
            grads = torch.autograd.grad(p_n, shared + [d_n], grad_outputs=-deltas[n].to(p_n.dtype), allow_unused=True)
            rows.append(_flatten(list(grads[:-1]), shared))
            private[n] = [torch.zeros_like(d_n) if grads[-1] is None else grads[-1]]
        stack = torch.stack(rows) if rows else torch.zeros(0, self.num_shared(), device=self.p_base.device)
        return ClientGradients(clients, stack, torch.ones(len(clients), dtype=stack.dtype, device=stack.device),
                               private)

    joins_with_updates = True
    join_description = ("G(P_base, d_new) with d_new = the mean of the trained descriptors; each join round the client "
                        "trains from the prompt generated from its current d_new and returns ΔP_new, and the server "
                        "updates d_new only")

    def join_state(self) -> dict[str, torch.Tensor]:
        """A fresh descriptor for a new client: the mean of the trained descriptors."""
        return {"descriptor": self.descriptors.detach()[:self.num_clients].mean(0).clone()}

    @torch.no_grad()
    def join_prompt(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.generator(self.p_base, state["descriptor"]).detach().clone()

    def join_step(self, state: dict[str, torch.Tensor], delta: torch.Tensor) -> dict[str, float]:
        """Algorithm 1's step restricted to d_new: −ΔP_new back-propagated through the frozen G into
        d_new only (same sign, α and bound as a training round); G and P_base are not touched."""
        d = state["descriptor"].detach().clone().requires_grad_(True)
        p_new = self.generator(self.p_base, d)
        (grad,) = torch.autograd.grad(p_new, [d], grad_outputs=-delta.to(p_new.dtype), allow_unused=True)
        grad, norm = self.bound(torch.zeros_like(d) if grad is None else grad)
        state["descriptor"] = (d - self.cfg.lr * grad).detach()
        return {"descriptor_grad_norm": norm}

    @torch.no_grad()
    def apply(self, shared_update: torch.Tensor, grads: ClientGradients) -> dict[str, float]:
        lr = self.cfg.lr
        shared = self.shared_parameters()
        shared_update, norm = self.bound(shared_update)
        for p, u in zip(shared, _unflatten(shared_update, shared)):
            p.sub_(lr * u)
        d_norms = []
        for n, (d_grad,) in grads.private.items():
            d_grad, d_norm = self.bound(d_grad)
            d_norms.append(d_norm)
            self.descriptors[self.rows[n]].sub_(lr * d_grad)
        return {"server_update_norm": norm, "descriptor_grad_norm_max": max(d_norms, default=0.0)}


@SERVERS.register("fedvpt")
class FedVPTServer(Server):
    """FedAvg on the prompt: P ← P + Σ_n (|D_n| / Σ|D|) ΔP_n, i.e. an SGD step of lr 1 on the
    weighted sum of the per-client gradients −ΔP_n."""

    def __init__(self, cfg: ServerConfig, *, num_clients: int, num_prompts: int, dim: int,
                 init_bound: float, seeds: Seeds, train_sizes: list[int], audit_clients: list[int] = ()):
        super().__init__(cfg, num_clients=num_clients, num_prompts=num_prompts, dim=dim,
                         init_bound=init_bound, seeds=seeds, train_sizes=train_sizes, audit_clients=audit_clients)
        g = seeds.torch("init.prompt")
        self.prompt = nn.Parameter(torch.empty(num_prompts, dim).uniform_(-init_bound, init_bound, generator=g))
        # FedAvg weights by row; an audit's client weighs as the mean training client (Andrew et al.'s canary clients).
        sizes = list(train_sizes) + [sum(train_sizes) / len(train_sizes)] * len(self.audit_clients)
        self.register_buffer("train_sizes", torch.tensor(sizes, dtype=torch.float64))

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.prompt]

    def prompts_for(self, clients: list[int]) -> dict[int, torch.Tensor]:
        return {n: self.prompt.detach().clone() for n in clients}

    join_description = "FedVPT's final global prompt, then local training (nothing is sent)"

    def join_state(self) -> dict[str, torch.Tensor]:
        """A new client gets the final global prompt and then trains locally (it sends nothing)."""
        return {"prompt": self.prompt.detach().clone()}

    def join_prompt(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return state["prompt"].clone()

    def client_gradients(self, deltas: dict[int, torch.Tensor]) -> ClientGradients:
        clients = sorted(deltas)
        stack = torch.stack([-deltas[n].reshape(-1).to(self.prompt.dtype) for n in clients]) if clients \
            else torch.zeros(0, self.prompt.numel(), device=self.prompt.device)
        sizes = self.train_sizes[[self.rows[n] for n in clients]] if clients else self.train_sizes[:0]
        weights = (sizes / sizes.sum()).to(stack.dtype) if clients else torch.zeros(0, device=stack.device)
        return ClientGradients(clients, stack, weights, {})

    @torch.no_grad()
    def apply(self, shared_update: torch.Tensor, grads: ClientGradients) -> dict[str, float]:
        shared_update, norm = self.bound(shared_update)
        self.prompt.sub_(shared_update.view_as(self.prompt))
        return {"server_update_norm": norm}


@SERVERS.register("local")
class LocalServer(Server):
    """SingleSet-VPT: no server state, nothing sent; each client keeps and trains its own prompt."""

    sends_prompts = False

    def shared_parameters(self) -> list[nn.Parameter]:
        return []

    def prompts_for(self, clients: list[int]) -> dict[int, torch.Tensor]:
        return {}

    def client_gradients(self, deltas: dict[int, torch.Tensor]) -> ClientGradients:
        device = next(iter(deltas.values())).device if deltas else None
        return ClientGradients(sorted(deltas), torch.zeros(len(deltas), 0, device=device),
                               torch.ones(len(deltas), device=device), {})

    def apply(self, shared_update: torch.Tensor, grads: ClientGradients) -> dict[str, float]:
        return {}


def plain_aggregate(grads: ClientGradients) -> torch.Tensor:
    """The default rule: Σ_n w_n g_n (pfedpg: w_n = 1, the plain update; fedvpt: FedAvg weights)."""
    if grads.shared.shape[0] == 0:
        return torch.zeros(grads.shared.shape[1], dtype=grads.shared.dtype, device=grads.shared.device)
    # A left-to-right sum over clients, so it equals the same per-client VJPs summed one by one.
    out = grads.weights[0] * grads.shared[0]
    for w, g in zip(grads.weights[1:], grads.shared[1:]):
        out = out + w * g
    return out
