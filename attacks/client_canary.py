"""Client-level one-run audit with canary clients (DESIGN §6, "Audits that can fail"; Andrew et al.,
ICLR 2024), for pFedPG and FedVPT.

The hook adds ``clients`` canary clients to the run (``Hook.audit_clients``): they hold no data and do
not train. Each owns a fixed random unit direction u_c in prompt-delta space and is *inserted* with
probability ½. Every training round each sends, through the run's client-side mechanism like any
client (the hook must come before ``dp_client``), the canary pair of the mechanism's adjacency
(DESIGN §6): under ``replace`` +s·u_c when inserted and −s·u_c when not (sensitivity 2C), under
``add_remove`` (and without client-level DP) s·u_c or the zero update (sensitivity C). s = 100 C under
client-level DP — the mechanism's own clipping must bring it to C, so clipping after the noise shows —
else ``norm``. The server takes the releases in like any client's.

Two views, each scored for every canary and audited by every bound of :mod:`attacks.one_run_bounds`:

* ``releases`` — what the guarantee is about (the server uses each release individually, DESIGN §5):
  ⟨Σ_r released_c,r, u_c⟩ / (R·C). Under ``dp_client`` each canary's R releases are exactly μ-GDP with
  μ = (sensitivity / C)·√R / z: the claim (``claimed_epsilon``) and the family the bounds test. The
  game is the idealised one (N(±1, z²/R) scores), so the bounds reach the claim.
* ``final_state`` — Andrew et al.'s statistic on the final shared server state θ (G's φ and P_base;
  FedVPT's prompt): cos(θ_T − θ_0, J_cᵀ u_c), J_c = ∂P_c/∂θ at the final state. Post-processing of the
  releases, so the same claim holds; the other clients' updates dilute it.

Beside the bounds, Andrew et al.'s estimate (:mod:`attacks.canary_estimate`: the inserted canaries'
cosines against never-inserted directions').
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.canary_estimate import MIN_CANARIES, compare, estimate_epsilon
from attacks.one_run_bounds import audit_bounds, check_level
from attacks.tradeoff import gdp_family
from pfedpg import jsonio
from pfedpg.context import ClientSide, RunContext, ServerSide
from pfedpg.errors import ConfigError
from pfedpg.gdp import gdp_epsilon
from pfedpg.hooks import Hook, register_hook
from pfedpg.privacy_result import PrivacyMechanism, gdp_mu, mechanism_of

CANARY_SCALE = 100.0  # a canary release's norm under client-level DP, in units of the clip C


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@register_hook("client_canary_audit")
class ClientCanaryAudit(Hook):
    """Options: ``clients`` (canary clients added to the run, default 500), ``null_directions``
    (never-inserted directions for Andrew et al.'s estimate, default 2000), ``norm`` (a canary's release
    norm; default 100 C under client-level DP, else 1.0), ``delta`` (default the DP hook's, else 1e-5),
    ``alpha`` (the bounds' level, default 0.05), ``out`` (folder in the run directory, default ``audit``)."""

    inprocess_only = "the audit reads the server state of the process that trains"

    def __init__(self, *, clients: int = 500, null_directions: int = 2000, norm: float | None = None,
                 delta: float | None = None, alpha: float = 0.05, out: str = "audit"):
        super().__init__()
        if isinstance(clients, list):
            raise ConfigError("client_canary_audit.clients is a count: the canaries are clients of their own, added to "
                              "the run (e.g. clients: 500), not training clients")
        if isinstance(clients, bool) or not isinstance(clients, int) or clients < MIN_CANARIES:
            raise ConfigError(f"client_canary_audit.clients={clients!r} must be an integer >= {MIN_CANARIES}")
        if isinstance(null_directions, bool) or not isinstance(null_directions, int) or null_directions < 10:
            raise ConfigError(f"client_canary_audit.null_directions={null_directions!r} must be an integer >= 10")
        if norm is not None and not (_number(norm) and norm > 0):
            raise ConfigError(f"client_canary_audit.norm={norm!r} must be a positive number or null")
        if delta is not None and not (_number(delta) and 0 < delta < 1):
            raise ConfigError(f"client_canary_audit.delta={delta!r} must be in (0, 1), or null for the DP hook's")
        check_level("client_canary_audit", alpha, out)
        self.audit_clients = clients
        self.null_directions, self.norm, self.delta, self.alpha, self.out = null_directions, norm, delta, alpha, out
        self.canaries: list[int] = []
        self.directions: dict[int, torch.Tensor] = {}
        self.inserted: dict[int, bool] = {}
        self.theta0: torch.Tensor | None = None
        self.released: dict[int, torch.Tensor] = {}  # per canary: the sum of its releases as the server got them
        self.rounds: dict[int, int] = {}
        self.client_dp: Hook | None = None  # the run's client-level DP hook, found at setup

    @staticmethod
    def _client_dp(ctx) -> PrivacyMechanism | None:
        """The run's client-level mechanism (attacks never import defenses: they read its face)."""
        mech = mechanism_of(ctx.hooks)
        return mech if mech is not None and mech.unit == "client" else None

    def fixes_rounds(self) -> bool:
        return True  # scored over every round's release

    def setup(self, ctx: RunContext) -> None:
        if not ctx.server.sends_prompts:
            raise ConfigError("client_canary_audit needs a method whose server state the clients' releases move "
                              "(pfedpg or fedvpt), not local")
        self.canaries = list(ctx.audit_clients[self.name])
        hooks = list(ctx.hooks)
        dp = self.client_dp = self._client_dp(ctx)
        if dp is not None and hooks.index(dp) < hooks.index(self):
            raise ConfigError(f"list client_canary_audit before {dp.name} in hooks: the canaries' releases must go "
                              "through the mechanism")
        shape = ctx.server.prompts_for([0])[0].shape
        coins = ctx.seeds.numpy("audit.client_canary.inserted").random(len(self.canaries)) < 0.5
        for c, inserted in zip(self.canaries, coins):
            u = torch.randn(shape, generator=ctx.seeds.torch("audit.client_canary", client=c), dtype=torch.float64)
            self.directions[c], self.inserted[c] = u / u.norm(), bool(inserted)
        if self.theta0 is None:  # a resumed run has it from its checkpoint (loaded before setup)
            self.theta0 = self._theta(ctx)

    @property
    def pair(self) -> str:
        dp = self.client_dp
        return "replace" if dp is not None and dp.adjacency == "replace" else "add_remove"

    def scale(self) -> float:
        """The norm of a canary's release before the mechanism."""
        dp = self.client_dp
        return self.norm if self.norm is not None else (CANARY_SCALE * float(dp.clip) if dp is not None else 1.0)

    @staticmethod
    def _theta(ctx) -> torch.Tensor:
        """The shared state θ as one float64 vector, on the CPU (where the scoring runs)."""
        return torch.cat([p.detach().reshape(-1).double().cpu() for p in ctx.server.shared_parameters()])

    def outgoing_delta(self, ctx: ClientSide, *, client, round, delta):
        if client not in self.directions:
            return delta
        sign = 1.0 if self.inserted[client] else (-1.0 if self.pair == "replace" else 0.0)
        release = sign * self.scale() * self.directions[client]
        return release.to(device=delta.device, dtype=delta.dtype).reshape(delta.shape)

    def incoming_deltas(self, ctx: ServerSide, *, round, deltas):
        for c in self.canaries:
            if c in deltas:
                d = deltas[c].detach().reshape(-1).double().cpu()
                self.released[c] = d if c not in self.released else self.released[c] + d
                self.rounds[c] = self.rounds.get(c, 0) + 1
        return deltas

    def state_dict(self):
        return {"theta0": self.theta0, "released": {str(c): v for c, v in self.released.items()},
                "rounds": {str(c): v for c, v in self.rounds.items()}}

    def load_state_dict(self, state):
        self.theta0 = state["theta0"]  # θ_0 of the run's start, not of the resumed round
        self.released = {int(c): v for c, v in state.get("released", {}).items()}
        self.rounds = {int(c): v for c, v in state.get("rounds", {}).items()}

    def _null_directions(self, ctx, component: str):
        """The never-inserted directions, each paired with a canary (round-robin) whose view scores it."""
        g = ctx.seeds.torch(component)
        shape = self.directions[self.canaries[0]].shape
        for j in range(self.null_directions):
            u = torch.randn(shape, generator=g, dtype=torch.float64)
            yield self.canaries[j % len(self.canaries)], u / u.norm()

    def views(self, ctx) -> dict[str, dict[str, Any]]:
        """Per view: every canary's score, the split of the MAP guesses, and Andrew et al.'s cosines
        (inserted canaries', never-inserted directions')."""
        move = self._theta(ctx) - self.theta0
        replace = self.pair == "replace"

        def cos(v, w):
            return float(v @ w / (v.norm() * w.norm() + 1e-300))

        final = [cos(ctx.server.pullback(c, self.directions[c]), move) for c in self.canaries]
        out = {"final_state": {"scores": final, "threshold": 0.0 if replace else None,
                               "cos_null": [cos(ctx.server.pullback(c, u), move)
                                            for c, u in self._null_directions(ctx, "audit.client_canary.null")]}}
        if all(c in self.released for c in self.canaries):
            unit = self.scale() if self.client_dp is None else float(self.client_dp.clip)
            rel = [float(self.released[c] @ self.directions[c].reshape(-1)) / (self.rounds[c] * unit)
                   for c in self.canaries]
            out["releases"] = {"scores": rel, "threshold": 0.0 if replace else 0.5,
                               "cos": [cos(self.released[c], self.directions[c].reshape(-1)) for c in self.canaries],
                               "cos_null": [cos(self.released[c], u.reshape(-1)) for c, u in
                                            self._null_directions(ctx, "audit.client_canary.null_releases")]}
        inserted = [self.inserted[c] for c in self.canaries]
        for v in out.values():
            v["inserted"] = inserted
        out["final_state"]["cos"] = final
        return out

    def claim(self, ctx, delta: float) -> float | None:
        """The mechanism's claim for a canary (None without client-level DP): the μ-GDP ε of its
        releases of the canary pair as the mechanism's record has them (the canary with the most), μ =
        (sensitivity / C)·√R / z for R equal releases."""
        dp = self.client_dp
        if dp is None:
            return None
        releases = max((dp.releases(c) for c in self.canaries), key=len, default=[])
        return gdp_epsilon(gdp_mu(releases), delta)

    def end_of_run(self, ctx: RunContext, *, summary):
        dp = self.client_dp = self._client_dp(ctx)
        delta = self.delta if self.delta is not None else (float(dp.delta) if dp is not None else 1e-5)
        claim = self.claim(ctx, delta)
        acc = max(dp.epsilon(c) for c in self.canaries) if dp is not None else None
        views = self.views(ctx)
        seed = int(ctx.seeds.sequence("audit.client_canary.bootstrap").generate_state(1)[0])
        res = canary_views_result(views, claim=claim, accountant=acc, delta=delta, alpha=self.alpha, seed=seed)
        res.update(canary_clients=len(self.canaries), inserted=int(sum(self.inserted.values())),
                   rounds=max(self.rounds.values(), default=0), pair=PAIRS[self.pair],
                   claim=CLAIM, threat_model="honest-but-curious server, or any observer of the final server state",
                   view="releases: the canary clients' releases as the server received them; final_state: the shared "
                        "server state (G's parameters and P_base; FedVPT: the global prompt)")
        out = Path(ctx.run_dir) / self.out
        out.mkdir(parents=True, exist_ok=True)
        (out / "client_canary.json").write_text(jsonio.dumps({**res, "views": views}, indent=1))
        return res


PAIRS = {"replace": "replace: +s·u when inserted, −s·u when not (sensitivity 2C)",
         "add_remove": "add/remove: s·u when inserted, the zero update when not (sensitivity C)"}
CLAIM = ("the canary game's own ε: each canary's R full-participation Gaussian releases of noise zC, the pair "
         "differing by the sensitivity, are exactly μ-GDP with μ = (sensitivity / C)·√R / z")


def canary_views_result(views: dict[str, dict[str, Any]], *, claim: float | None, accountant: float | None,
                        delta: float, alpha: float, seed: int = 0, groups: list | None = None) -> dict[str, Any]:
    """Every view's bounds (GDP family: the releases of a client-level Gaussian mechanism) and Andrew et
    al.'s estimate; the headline is the releases view's order-statistics bound (the final state's when
    the releases were not all seen). Shared by a run and the pool over seeds (``groups``: a seed id per
    canary, per null direction)."""
    out: dict[str, Any] = {"claimed_epsilon": claim, "accountant_epsilon": accountant}
    for name, v in views.items():
        inserted = np.asarray(v["inserted"], dtype=bool)
        res = audit_bounds(v["scores"], inserted, family=gdp_family(delta), claimed_epsilon=claim, delta=delta,
                           alpha=alpha, threshold=v["threshold"], continuous=True)
        cos_in = np.asarray(v["cos"])[inserted]
        est = estimate_epsilon(cos_in, np.asarray(v["cos_null"]), delta=delta, seed=seed,
                               groups=None if groups is None else np.asarray(groups[0])[inserted],
                               null_groups=None if groups is None else groups[1])
        res["estimate"] = {**est, **compare(est, claim, accountant)}
        out[name] = res
    head = out.get("releases", out["final_state"])
    out.update({k: head[k] for k in ("epsilon_lb", "epsilon_cap", "family", "can_fail", "violation")},
               headline="releases" if "releases" in out else "final_state")
    return out


__all__ = ["ClientCanaryAudit", "canary_views_result", "estimate_epsilon"]
