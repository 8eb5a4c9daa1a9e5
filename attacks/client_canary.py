"""Client-level one-run audit (Andrew et al., ICLR 2024, "One-shot empirical privacy estimation for
federated learning"), for pFedPG and FedVPT (DESIGN §6).

Canary clients release, every round, their own fixed random direction u_c (unit Frobenius norm,
scaled to the DP clip C, or without client-level DP to the norm of the honest update they replace)
instead of their ΔP_n. The release goes through the run's client-side mechanism like any other (the
hook must come before ``dp_client`` in ``hooks``). From the final server state the auditor scores
each canary by the cosine between the movement of the shared server state, Δθ = θ_T − θ_0
(G's φ and P_base; FedVPT's global prompt), and v_c = J_cᵀ u_c, the direction a release along u_c
pushes θ (J_c = ∂P_c/∂θ at the final state; the identity for FedVPT). The same score for directions
never inserted gives the null. With the null's spread σ_0, μ̂ = mean(cos_in) / σ_0 is read as a
Gaussian-DP parameter and ε̂ = ε_μ̂(δ) — an *estimate* with a 95% interval over the canaries, not a
bound. Noise off gives a large ε̂; a correct mechanism should give one below its accountant's ε.

The canary clients' own updates are lost (they are the auditor's clients), and the score reads the
shared state only, not the canaries' descriptors.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pfedpg.errors import ConfigError
from pfedpg.hooks import Hook, register_hook


def _gdp_epsilon(mu: float, delta: float) -> float:
    """ε(δ) of μ-GDP (Dong, Roth & Su 2019): δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2), solved for ε."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    if mu <= 0:
        return 0.0

    def d(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(min(eps, 700.0)) * norm.cdf(-eps / mu - mu / 2) - delta

    if d(0.0) <= 0:
        return 0.0
    hi = 1.0
    while d(hi) > 0:
        hi *= 2
        if hi > 1e4:
            return math.inf
    return float(brentq(d, 0.0, hi, xtol=1e-6))


def estimate_epsilon(cos_in: np.ndarray, cos_null: np.ndarray, *, delta: float) -> dict[str, Any]:
    """ε̂ with a 95% interval from the inserted canaries' cosines and the null's."""
    from scipy.stats import t

    cin, c0 = np.asarray(cos_in, dtype=float), np.asarray(cos_null, dtype=float)
    sigma0 = float(c0.std(ddof=1))
    k = len(cin)
    m = float(cin.mean())
    # The canaries' own spread where there are several, else the null's (one canary: no spread).
    sd = float(cin.std(ddof=1)) if k > 1 else sigma0
    half = (float(t.ppf(0.975, k - 1)) if k > 1 else 1.96) * sd / math.sqrt(k)
    mu, lo, hi = (m - float(c0.mean())) / sigma0, (m - half - float(c0.mean())) / sigma0, (m + half - float(c0.mean())) / sigma0
    return {"canaries": k, "null_directions": int(len(c0)), "cos_in_mean": m, "null_mean": float(c0.mean()),
            "null_std": sigma0, "mu_hat": mu, "mu_ci": [lo, hi], "delta": delta,
            "epsilon_hat": _gdp_epsilon(mu, delta),
            "epsilon_ci": [_gdp_epsilon(max(lo, 0.0), delta), _gdp_epsilon(max(hi, 0.0), delta)]}


@register_hook("client_canary_audit")
class ClientCanaryAudit(Hook):
    """Options: ``clients`` (a count k — clients 0 … k−1 — or a list of ids; default 2),
    ``null_directions`` (default 2000), ``norm`` (the canary release's norm; default the DP clip C
    under client-level DP, else the norm of the replaced honest update), ``delta`` (default the DP
    hook's, else 1e-5), ``out`` (folder in the run directory, default ``audit``)."""

    inprocess_only = "the audit reads the server state of the process that trains"

    def __init__(self, *, clients: int | list[int] = 2, null_directions: int = 2000, norm: float | None = None,
                 delta: float | None = None, out: str = "audit"):
        super().__init__()
        if isinstance(clients, bool) or not (isinstance(clients, int) and clients >= 1
                                             or isinstance(clients, list) and clients
                                             and all(isinstance(c, int) and c >= 0 for c in clients)):
            raise ConfigError(f"client_canary_audit.clients={clients!r} must be a count >= 1 or a list of client ids")
        if not isinstance(null_directions, int) or null_directions < 10:
            raise ConfigError(f"client_canary_audit.null_directions={null_directions!r} must be an integer >= 10")
        if norm is not None and not (isinstance(norm, (int, float)) and norm > 0):
            raise ConfigError(f"client_canary_audit.norm={norm!r} must be a positive number or null")
        self.clients_opt, self.null_directions, self.norm, self.delta, self.out = clients, null_directions, norm, delta, out
        self.canaries: list[int] = []
        self.directions: dict[int, torch.Tensor] = {}
        self.theta0: torch.Tensor | None = None

    def _client_dp(self, ctx):
        # Duck typing (attacks never import defenses): a client-level mechanism has a clip C and a
        # client adjacency; its statement() is only complete after its own setup.
        for h in ctx.hooks:
            if hasattr(h, "statement") and hasattr(h, "epsilon") and hasattr(h, "clip") and hasattr(h, "adjacency"):
                return h
        return None

    def setup(self, ctx) -> None:
        if not ctx.server.sends_prompts:
            raise ConfigError("client_canary_audit needs a method whose server state the clients' releases move "
                              "(pfedpg or fedvpt), not local")
        n = ctx.num_clients
        self.canaries = list(range(self.clients_opt)) if isinstance(self.clients_opt, int) else sorted(self.clients_opt)
        if max(self.canaries) >= n or len(self.canaries) >= n:
            raise ConfigError(f"client_canary_audit.clients={self.clients_opt!r} needs fewer than the run's {n} clients")
        hooks = list(ctx.hooks)
        dp = self._client_dp(ctx)
        if dp is not None and hooks.index(dp) < hooks.index(self):
            raise ConfigError(f"list client_canary_audit before {dp.name} in hooks: the canaries' releases must go "
                              "through the mechanism")
        shape = ctx.server.prompts_for([0])[0].shape
        for c in self.canaries:
            u = torch.randn(shape, generator=ctx.seeds.torch("audit.client_canary", client=c), dtype=torch.float64)
            self.directions[c] = u / u.norm()
        if self.theta0 is None:  # a resumed run has it from its checkpoint (loaded before setup)
            self.theta0 = self._theta(ctx)

    @staticmethod
    def _theta(ctx) -> torch.Tensor:
        """The shared state θ as one float64 vector, on the CPU (where the scoring runs)."""
        return torch.cat([p.detach().reshape(-1).double().cpu() for p in ctx.server.shared_parameters()])

    def replaces_release(self, client: int) -> bool:
        """Read by other audits (e.g. leakage_audit leaves these clients out); valid before setup."""
        opt = self.clients_opt
        return client < opt if isinstance(opt, int) else client in opt

    def outgoing_delta(self, ctx, *, client, round, delta):
        if client not in self.canaries:
            return delta
        dp = self._client_dp(ctx)
        scale = self.norm if self.norm is not None else (float(dp.clip) if dp is not None else float(delta.norm()))
        return (scale * self.directions[client]).to(device=delta.device, dtype=delta.dtype).reshape(delta.shape)

    def _push(self, ctx, client: int, u: torch.Tensor) -> torch.Tensor:
        """v = J_cᵀ u: how a release along u from client c moves the shared state (first order)."""
        server = ctx.server
        params = server.shared_parameters()
        if not hasattr(server, "generate"):  # FedVPT: the shared state is the prompt itself
            return u.reshape(-1).double()
        p = server.generate(client)
        grads = torch.autograd.grad((p * u.to(p)).sum(), params, allow_unused=True)
        return torch.cat([(torch.zeros_like(q) if g is None else g).reshape(-1).double().cpu()
                          for q, g in zip(params, grads)])

    def state_dict(self):
        return {"theta0": self.theta0}

    def load_state_dict(self, state):
        self.theta0 = state["theta0"]  # θ_0 of the run's start, not of the resumed round

    def end_of_run(self, ctx, *, summary):
        move = self._theta(ctx) - self.theta0

        def cos(v):
            return float(v @ move / (v.norm() * move.norm() + 1e-300))

        cos_in = [cos(self._push(ctx, c, self.directions[c])) for c in self.canaries]
        g = ctx.seeds.torch("audit.client_canary.null")
        shape = self.directions[self.canaries[0]].shape
        cos_null = []
        for j in range(self.null_directions):
            u = torch.randn(shape, generator=g, dtype=torch.float64)
            cos_null.append(cos(self._push(ctx, self.canaries[j % len(self.canaries)], u / u.norm())))
        dp = self._client_dp(ctx)
        delta = self.delta if self.delta is not None else (float(dp.statement()["delta"]) if dp is not None else 1e-5)
        res = estimate_epsilon(np.array(cos_in), np.array(cos_null), delta=delta)
        acc = None
        if dp is not None:
            acc = max(dp.epsilon(c) for c in self.canaries)
        known = acc is not None and math.isfinite(acc)  # no finite accountant ε: nothing to compare with
        res.update(canary_clients=self.canaries, cos_in=cos_in, accountant_epsilon=acc,
                   estimate_above_accountant=bool(res["epsilon_hat"] > acc) if known else None,
                   interval_above_accountant=bool(res["epsilon_ci"][0] > acc) if known else None,
                   threat_model="honest-but-curious server, or any observer of the final server state",
                   view="shared server state (G's parameters and P_base; FedVPT: the global prompt)",
                   note="an estimate (Gaussian fit of the canaries' cosines against never-inserted directions), "
                        "not a lower bound")
        out = Path(ctx.run_dir) / self.out
        out.mkdir(parents=True, exist_ok=True)
        (out / "client_canary.json").write_text(json.dumps({**res, "cos_null": cos_null}, indent=1))
        return res


__all__ = ["ClientCanaryAudit", "estimate_epsilon"]
