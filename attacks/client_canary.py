"""Client-level one-run audit (Andrew et al., ICLR 2024, "One-shot empirical privacy estimation for
federated learning"), for pFedPG and FedVPT (DESIGN §6).

Canary clients release, every round, their own fixed random direction u_c (unit Frobenius norm,
scaled to 100 C under client-level DP — the mechanism's clipping must bring it to C — or without it
to the norm of the honest update they replace)
instead of their ΔP_n. The release goes through the run's client-side mechanism like any other (the
hook must come before ``dp_client`` in ``hooks``). From the final server state the auditor scores
each canary by the cosine between the movement of the shared server state, Δθ = θ_T − θ_0
(G's φ and P_base; FedVPT's global prompt), and v_c = J_cᵀ u_c, the direction a release along u_c
pushes θ (J_c = ∂P_c/∂θ at the final state; the identity for FedVPT). The same score for directions
never inserted gives the null. A Gaussian is fitted to each (its own mean and spread) and ε̂ is the
ε at which the two are indistinguishable (:func:`estimate_epsilon`), with the equal-variance (μ-GDP)
reading beside it, bootstrap intervals that refit both, and the largest ε the canaries could show.
An *estimate*, not a bound. Noise off gives a large ε̂; it is compared with what the mechanism
claims for this game — a canary release adds C along its direction or not, so the μ-GDP ε of the
canary's R_c releases, μ = √R_c / z (the accountant's replace-adjacency ε is looser) — and
``flagged`` when an interval lies wholly above that claim. On the final state the other clients'
noise dilutes a canary (FedAvg over m clients: μ ≈ √R_c / (z√m)), so only few clients per round
leave a broken mechanism room to show.

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

from pfedpg.context import ClientSide, RunContext, ServerSide
from pfedpg.errors import ConfigError
from pfedpg.gdp import gaussians_epsilon, gdp_epsilon
from pfedpg.hooks import Hook, register_hook


MIN_CANARIES = 3  # a spread fitted to fewer canaries is no fit
CANARY_SCALE = 100.0  # a canary release's norm under client-level DP, in units of the clip C


def _fit(x: np.ndarray) -> tuple[float, float]:
    return float(np.mean(x)), float(np.std(x, ddof=1))


def _two_gaussians(cin: np.ndarray, c0: np.ndarray, delta: float) -> float:
    (m1, s1), (m0, s0) = _fit(cin), _fit(c0)
    return gaussians_epsilon(m1, max(s1, 1e-6 * s0), m0, s0, delta)


def epsilon_cap(canaries: int, null_directions: int, delta: float, alpha: float = 0.05) -> float:
    """The most a threshold test on these many canaries and null directions can show: the
    Clopper–Pearson bound with the canaries perfectly separated from the null,
    ln((1 − δ − FNR_hi) / FPR_hi). A two-Gaussian estimate above it rests on the fitted tails, not on
    anything the canaries were seen to do."""
    from attacks.epsilon_bounds import clopper_pearson

    fnr_hi = clopper_pearson(0, canaries, alpha)[1]
    fpr_hi = clopper_pearson(0, null_directions, alpha)[1]
    return max(0.0, math.log((1 - delta - fnr_hi) / fpr_hi)) if 1 - delta - fnr_hi > 0 else 0.0


def estimate_epsilon(cos_in, cos_null, *, delta: float, groups=None, null_groups=None, bootstrap: int = 1000,
                     seed: int = 0) -> dict[str, Any]:
    """ε̂ of the client-level one-run audit as Andrew et al. (2024) define it: a Gaussian fitted to
    the canaries' cosines and one to the null's, each with its own mean and spread, and ε̂ the
    smallest ε at which the two are (ε, δ)-indistinguishable (:func:`pfedpg.gdp.gaussians_epsilon`).
    Beside it, labelled, the equal-variance reading: μ̂ = (mean_in − mean_null) / sd_null as μ-GDP
    (right when the canaries' spread is the null's, as under isotropic Gaussian noise).

    Both readings get a 95 % bootstrap interval that refits both Gaussians every time: canaries and
    null directions resampled with replacement — with ``groups`` (a seed id per canary, and
    ``null_groups`` per null direction: pooled runs) the seeds first, then each chosen seed's
    canaries and null — so it covers both fits' uncertainty and the run-to-run spread. The
    two-Gaussian estimate is biased upwards when the canaries are few (any error in their fitted
    spread raises ε), so its interval is the basic (bias-reflecting) bootstrap interval, clipped at
    0; the equal-variance one is the percentile interval. In simulation (canaries N(1, 1) against a
    null N(0, 1), δ = 1e-5) the basic interval covered the true ε in 96–99 % of draws at 8–128
    canaries, the percentile one in 53–64 %. An interval of an estimate, not a confidence bound.
    ``epsilon_cap``: what these many canaries can show at all (:func:`epsilon_cap`)."""
    cin, c0 = np.asarray(cos_in, dtype=float), np.asarray(cos_null, dtype=float)
    k, n0 = len(cin), len(c0)
    m0, s0 = _fit(c0)
    m1 = float(cin.mean())
    out: dict[str, Any] = {
        "canaries": k, "null_directions": n0, "delta": delta, "cos_in_mean": m1,
        "cos_in_std": _fit(cin)[1] if k > 1 else None, "null_mean": m0, "null_std": s0,
        "epsilon_cap": epsilon_cap(k, n0, delta),
    }
    mu = (m1 - m0) / s0
    eq = {"mu_hat": mu, "epsilon_hat": gdp_epsilon(max(mu, 0.0), delta),
          "reading": "μ-GDP, the null's spread taken for the canaries' too"}
    if k < MIN_CANARIES:
        out.update(epsilon_hat=None, epsilon_ci=None, equal_variance={**eq, "epsilon_ci": None},
                   status=f"{k} canaries cannot fit a spread or an interval: the audit needs >= {MIN_CANARIES} "
                          "(client_canary_audit.clients)")
        return out
    out["epsilon_hat"] = _two_gaussians(cin, c0, delta)
    rng = np.random.default_rng(seed)
    g_in = np.zeros(k, dtype=int) if groups is None else np.asarray(groups)
    g_0 = np.zeros(n0, dtype=int) if null_groups is None else np.asarray(null_groups)
    ids = np.unique(g_in)
    two, mus = [], []
    for _ in range(bootstrap):
        chosen = rng.choice(ids, size=len(ids), replace=True) if len(ids) > 1 else ids
        bi = np.concatenate([rng.choice(cin[g_in == g], size=int((g_in == g).sum())) for g in chosen])
        b0 = np.concatenate([rng.choice(c0[g_0 == g], size=int((g_0 == g).sum())) for g in chosen])
        two.append(_two_gaussians(bi, b0, delta))
        mus.append((bi.mean() - b0.mean()) / b0.std(ddof=1))
    # (no interpolation between draws: an infinite draw must not turn a quantile into inf − inf)
    two = np.asarray(two, dtype=float)
    lo, hi = float(np.percentile(two, 2.5, method="lower")), float(np.percentile(two, 97.5, method="higher"))
    eps = out["epsilon_hat"]
    out["epsilon_ci"] = [max(0.0, 2 * eps - hi), max(0.0, 2 * eps - lo)] if math.isfinite(eps) and math.isfinite(hi) \
        else [lo, math.inf]
    mlo, mhi = np.percentile(mus, 2.5, method="lower"), np.percentile(mus, 97.5, method="higher")
    eq["epsilon_ci"] = [gdp_epsilon(max(mlo, 0.0), delta), gdp_epsilon(max(mhi, 0.0), delta)]
    eq["mu_ci"] = [float(mlo), float(mhi)]
    out.update(equal_variance=eq, bootstrap=bootstrap,
               resampled="seeds, then each seed's canaries and null directions" if len(ids) > 1
               else "canaries and null directions")
    return out


def compare(res: dict[str, Any], claim: float | None, accountant: float | None) -> dict[str, Any]:
    """The estimate against what the mechanism claims for this game (see :class:`ClientCanaryAudit`):
    ``flagged`` when either reading's whole interval lies above the claim."""
    known = claim is not None and math.isfinite(claim)
    above = {"two_gaussians": bool(res["epsilon_ci"] and res["epsilon_ci"][0] > claim) if known else None,
             "equal_variance": bool(res["equal_variance"].get("epsilon_ci") and res["equal_variance"]["epsilon_ci"][0] > claim)
             if known else None}
    return {"claimed_epsilon": claim, "accountant_epsilon": accountant,
            "estimate_above_claim": bool(res["epsilon_hat"] is not None and res["epsilon_hat"] > claim) if known else None,
            "interval_above_claim": above, "flagged": bool(any(above.values())) if known else None,
            "claim_within_reach": bool(claim < res["epsilon_cap"]) if known else None}


@register_hook("client_canary_audit")
class ClientCanaryAudit(Hook):
    """Options: ``clients`` (a count k — clients 0 … k−1 — or a list of ids; default 2),
    ``null_directions`` (default 2000), ``norm`` (the canary release's norm; default 100 C under
    client-level DP, which its clipping brings to C, else the norm of the replaced honest update), ``delta`` (default the DP
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
        self.released: dict[int, torch.Tensor] = {}  # per canary: the sum of its releases as the server got them
        self.client_dp: Hook | None = None  # the run's client-level DP hook, found at setup

    def _client_dp(self, ctx):
        # Duck typing (attacks never import defenses): a client-level mechanism has a clip C and a
        # client adjacency; its statement() is only complete after its own setup.
        for h in ctx.hooks:
            if hasattr(h, "statement") and hasattr(h, "epsilon") and hasattr(h, "clip") and hasattr(h, "adjacency"):
                return h
        return None

    def setup(self, ctx: RunContext) -> None:
        if not ctx.server.sends_prompts:
            raise ConfigError("client_canary_audit needs a method whose server state the clients' releases move "
                              "(pfedpg or fedvpt), not local")
        n = ctx.num_clients
        self.canaries = list(range(self.clients_opt)) if isinstance(self.clients_opt, int) else sorted(self.clients_opt)
        if max(self.canaries) >= n or len(self.canaries) >= n:
            raise ConfigError(f"client_canary_audit.clients={self.clients_opt!r} needs fewer than the run's {n} clients")
        hooks = list(ctx.hooks)
        dp = self.client_dp = self._client_dp(ctx)
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

    def outgoing_delta(self, ctx: ClientSide, *, client, round, delta):
        if client not in self.canaries:
            return delta
        dp = self.client_dp
        # Under client-level DP far above C (Andrew et al.'s canaries are ×10⁴): the mechanism's own clipping must
        # bound it, so a mechanism that clips after adding its noise shows up as a canary the noise cannot hide.
        scale = self.norm if self.norm is not None else (CANARY_SCALE * float(dp.clip) if dp is not None
                                                         else float(delta.norm()))
        return (scale * self.directions[client]).to(device=delta.device, dtype=delta.dtype).reshape(delta.shape)

    def game_epsilon(self, ctx, dp, delta: float) -> float | None:
        """What the mechanism claims for the canaries' game (None without client-level DP): the
        largest over canaries of the μ-GDP ε of its releases, μ = √R_c / z."""
        if dp is None:
            return None
        z = float(dp.noise_multiplier or 0.0)
        releases = max(sum(c in r for r in ctx.schedule) for c in self.canaries)
        return math.inf if z == 0 else gdp_epsilon(math.sqrt(releases) / z, delta)

    def incoming_deltas(self, ctx: ServerSide, *, round, deltas):
        for c in self.canaries:
            if c in deltas:
                d = deltas[c].detach().reshape(-1).double().cpu()
                self.released[c] = d if c not in self.released else self.released[c] + d
        return deltas

    def state_dict(self):
        return {"theta0": self.theta0, "released": {str(c): v for c, v in self.released.items()}}

    def load_state_dict(self, state):
        self.theta0 = state["theta0"]  # θ_0 of the run's start, not of the resumed round
        self.released = {int(c): v for c, v in state.get("released", {}).items()}

    def _null_directions(self, ctx, component: str):
        """The never-inserted directions, each paired with a canary (round-robin) whose view scores it."""
        g = ctx.seeds.torch(component)
        shape = self.directions[self.canaries[0]].shape
        for j in range(self.null_directions):
            u = torch.randn(shape, generator=g, dtype=torch.float64)
            yield self.canaries[j % len(self.canaries)], u / u.norm()

    def views(self, ctx) -> dict[str, tuple[list[float], list[float]]]:
        """(canaries' cosines, null cosines) per view. ``final_state``: Andrew et al.'s final-model
        statistic, cos(θ_T − θ_0, J_cᵀ u). ``releases``: the server's own view of what each canary
        client released, cos(Σ_r released ΔP_c,r, u) — DESIGN §5: the server uses each release
        individually, so this is the view the client-level guarantee is about."""
        move = self._theta(ctx) - self.theta0

        def cos(v, w):
            return float(v @ w / (v.norm() * w.norm() + 1e-300))

        out = {"final_state": ([cos(ctx.server.pullback(c, self.directions[c]), move) for c in self.canaries],
                               [cos(ctx.server.pullback(c, u), move) for c, u in self._null_directions(ctx, "audit.client_canary.null")])}
        if all(c in self.released for c in self.canaries):
            out["releases"] = ([cos(self.released[c], self.directions[c].reshape(-1)) for c in self.canaries],
                               [cos(self.released[c], u.reshape(-1))
                                for c, u in self._null_directions(ctx, "audit.client_canary.null_releases")])
        return out

    def end_of_run(self, ctx: RunContext, *, summary):
        dp = self._client_dp(ctx)
        delta = self.delta if self.delta is not None else (float(dp.statement()["delta"]) if dp is not None else 1e-5)
        acc = max(dp.epsilon(c) for c in self.canaries) if dp is not None else None
        claim = self.game_epsilon(ctx, dp, delta)
        seed = int(ctx.seeds.sequence("audit.client_canary.bootstrap").generate_state(1)[0])
        views = self.views(ctx)
        results = {}
        for name, (cos_in, cos_null) in views.items():
            est = estimate_epsilon(np.array(cos_in), np.array(cos_null), delta=delta, seed=seed)
            results[name] = {**est, **compare(est, claim, acc), "cos_in": cos_in}
        res = dict(results["final_state"])
        if "releases" in results:
            res["releases"] = {k: v for k, v in results["releases"].items()}
        res.update(canary_clients=self.canaries, claimed_epsilon=claim, accountant_epsilon=acc,
                   claim=("the canary game's own ε: each canary release adds C along its direction or not "
                          "(add/remove, sensitivity C), R_c full-participation Gaussian releases of noise zC, exact "
                          "μ-GDP with μ = √R_c / z; the accountant's ε (replace, sensitivity 2C) is looser"),
                   threat_model="honest-but-curious server, or any observer of the final server state",
                   view="final_state: the shared server state (G's parameters and P_base; FedVPT: the global prompt); "
                        "releases: the canary clients' released ΔP as the server received them",
                   note="an estimate (Gaussians fitted to the canaries' cosines and to never-inserted directions'), "
                        "not a lower bound")
        out = Path(ctx.run_dir) / self.out
        out.mkdir(parents=True, exist_ok=True)
        written = {**res, "cos_null": views["final_state"][1]}
        if "releases" in res:
            written["releases"] = {**res["releases"], "cos_null": views["releases"][1]}
        (out / "client_canary.json").write_text(json.dumps(written, indent=1))
        return res


__all__ = ["ClientCanaryAudit", "estimate_epsilon"]
