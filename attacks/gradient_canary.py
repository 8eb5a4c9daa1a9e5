"""Record-level one-run audit with gradient canaries (DESIGN §6, "Audits that can fail"): a white-box
audit of DP-SGD (``dp_sgd``) that costs no training.

``canaries`` canaries, each inserted into client ``client``'s data with probability ½. An inserted
canary is a record whose per-sample gradient at step t is ``scale`` · C · u_{i,t} (default C: the
mechanism's clipping leaves it alone), u_{i,t} a random unit direction over the trainable parameters
(prompt and head) drawn from the audit's stream for that step; the mechanism samples it at the records'
own Poisson rate q (``pfedpg.jobs.GradientCanaries``). The auditor sees every step's released (noised)
gradient sum g̃_t — what DP-SGD's accountant accounts for — and scores canary i by
Σ_t ⟨g̃_t, u_{i,t}⟩ / C: about scale · q · T when inserted, 0 when not, with T the client's steps;
guesses split at the midpoint scale · q · T / 2, fixed by the game.

Why a fresh direction every step rather than one fixed direction: the client's own records' clipped
gradients add up coherently over the steps. Measured on configs/audit_falsifiable.yaml with fixed
directions, the scores spread 14 where the mechanism alone gives 8 (their sum's projection on a fixed
random direction), and the audit read ε_lb 2.2 against the RDP accountant's 8 (5.8 with a new
direction per step, on that scale): a new direction each step meets them as T independent small
projections. DP-SGD's guarantee holds for any gradient sequence of norm
≤ C, so the game and its family are unchanged; canaries interfere little with each other in
P ≫ canaries dimensions (Keinan, Shenfeld & Ligett 2025).

The family is the mechanism's own: T Poisson-subsampled Gaussian steps at the client's q, by noise
multiplier σ (:func:`attacks.tradeoff.subsampled_gaussian_family`, a pessimistic privacy loss
distribution) — not a Gaussian (CLT) shortcut, which could raise a false alarm. The claim is the tight
ε of the client's own member (its σ, q and T; the canaries are its records), read from the same
distribution as every member's ε, so ``violation`` says the run's σ was rejected; the accountant's ε
(RDP or PRV, looser) is reported beside it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.one_run_bounds import audit_bounds, check_level
from attacks.tradeoff import subsampled_gaussian_family
from pfedpg import jsonio
from pfedpg.client import trainable_parameters
from pfedpg.context import ClientSide, RunContext
from pfedpg.errors import ConfigError
from pfedpg.hooks import Hook, register_hook
from pfedpg.jobs import GradientCanaries
from pfedpg.privacy_result import PrivacyMechanism, mechanism_of


@register_hook("gradient_canary_audit")
class GradientCanaryAudit(Hook):
    """Options: ``client`` (whose data holds the canaries, default 0), ``canaries`` (default 1000),
    ``scale`` (a canary gradient's norm in units of the clip C, default 1), ``alpha`` (default 0.05),
    ``out`` (folder in the run directory, default ``audit``). List it before ``dp_sgd`` in hooks."""

    inprocess_only = "the audit reads every step of the client's mechanism in the process that trains"

    def __init__(self, *, client: int = 0, canaries: int = 1000, scale: float = 1.0, alpha: float = 0.05,
                 out: str = "audit"):
        super().__init__()
        if isinstance(client, bool) or not isinstance(client, int) or client < 0:
            raise ConfigError(f"gradient_canary_audit.client={client!r} must be a client id")
        if isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < 10:
            raise ConfigError(f"gradient_canary_audit.canaries={canaries!r} must be an integer >= 10")
        if isinstance(scale, bool) or not (isinstance(scale, (int, float)) and scale > 0):
            raise ConfigError(f"gradient_canary_audit.scale={scale!r} must be a positive number (units of the clip C)")
        check_level("gradient_canary_audit", alpha, out)
        self.client, self.count, self.scale, self.alpha, self.out = client, canaries, float(scale), alpha, out
        self.inserted: np.ndarray | None = None
        self.scores: torch.Tensor | None = None  # Σ_t ⟨g̃_t, u_{i,t}⟩ per canary, float64
        self.steps = 0
        self._step: torch.Tensor | None = None  # this step's directions, every canary's

    @staticmethod
    def _record_level_dp(ctx) -> PrivacyMechanism | None:
        """The run's record-level mechanism (attacks never import defenses: they read its face)."""
        mech = mechanism_of(ctx.hooks)
        return mech if mech is not None and mech.unit == "record" else None

    def fixes_rounds(self) -> bool:
        return True  # scored over every step of the run

    def check(self, facts) -> None:
        if self.client >= facts.num_clients:
            raise ConfigError(f"gradient_canary_audit.client={self.client} is not a training client "
                              f"(0..{facts.num_clients - 1})")

    def setup(self, ctx: RunContext) -> None:
        self.check(ctx.facts)
        dp = self._record_level_dp(ctx)
        hooks = list(ctx.hooks)
        if dp is None:
            raise ConfigError("gradient_canary_audit needs a record-level mechanism to insert its canaries into: add "
                              "{name: dp_sgd, ...} after it in hooks")
        if hooks.index(dp) < hooks.index(self):
            raise ConfigError(f"list gradient_canary_audit before {dp.name} in hooks: its canaries go into the "
                              "mechanism")
        self.dim = sum(p.numel() for p in trainable_parameters(ctx.model))
        self.seeds = ctx.seeds
        self.inserted = ctx.seeds.numpy("audit.gradient_canary.inserted").random(self.count) < 0.5
        if self.scores is None:  # a resumed run has them from its checkpoint
            self.scores = torch.zeros(self.count, dtype=torch.float64, device="cpu")  # scored on the CPU, in float64

    def _directions(self, device) -> torch.Tensor:
        """Step ``self.steps``'s directions (kept for scoring); the inserted canaries' for the mechanism."""
        u = torch.randn(self.count, self.dim, generator=self.seeds.torch("audit.gradient_canary", round=self.steps),
                        dtype=torch.float64, device="cpu")  # drawn on the CPU: the same on every device
        self._step = u / u.norm(dim=1, keepdim=True)
        return self._step[torch.from_numpy(self.inserted)].to(device=device, dtype=torch.float32)

    def _observe(self, step_sum: torch.Tensor) -> None:
        self.scores += self._step @ step_sum.detach().reshape(-1).double().cpu()
        self.steps += 1

    def local_training(self, ctx: ClientSide, job, call_next):
        if job.client != self.client:
            return call_next(job)
        device = next(job.model.parameters()).device
        job.gradient_canaries = GradientCanaries(lambda: self._directions(device), self.scale, self._observe)
        before = self.steps
        result = call_next(job)
        if self.steps == before:
            raise ConfigError("gradient_canary_audit: the local training took no gradient canaries; the record-level "
                              "mechanism (dp_sgd) must come after it in hooks")
        return result

    def state_dict(self):
        return {"scores": self.scores, "steps": self.steps}

    def load_state_dict(self, state):
        self.scores, self.steps = state["scores"], state["steps"]

    def end_of_run(self, ctx: RunContext, *, summary):
        dp = self._record_level_dp(ctx)
        record = dp.releases(self.client)
        q, sigma = record[0].sample_rate, record[0].accounting_multiplier
        if any(r.sample_rate != q or r.accounting_multiplier != sigma for r in record):
            raise ValueError("gradient_canary_audit: the client's rate or noise changed between rounds; one family "
                             "cannot describe its steps")
        steps = sum(r.steps for r in record)
        if steps != self.steps:
            raise ValueError(f"gradient_canary_audit saw {self.steps} steps, the mechanism recorded {steps}")
        game = {"client": self.client, "sample_rate": q, "steps": steps, "noise_multiplier": sigma, "scale": self.scale,
                "delta": float(dp.delta), "alpha": self.alpha}
        scores = (self.scores / float(dp.clip)).numpy()
        res = gradient_canary_bounds(scores, self.inserted, game, accountant=float(dp.epsilon(self.client)))
        out = Path(ctx.run_dir) / self.out
        out.mkdir(parents=True, exist_ok=True)
        (out / "gradient_canary.json").write_text(jsonio.dumps({**res, "scores": scores.tolist(),
                                                             "inserted": self.inserted.tolist()}, indent=1))
        return res


def gradient_canary_bounds(scores, inserted, game: dict[str, Any], *, accountant: float) -> dict[str, Any]:
    """Every bound on the canaries' scores (one run's, or several runs' of the same game pooled), in
    the mechanism's own family, the guesses split at the midpoint scale · q · T / 2. Members' ε and the
    claim are both read from the family's privacy loss distribution — the tight ε of T steps at (q, σ),
    as dp_client's claim is the exact μ-GDP one; the run's accountant (RDP or PRV, looser) stands beside."""
    q, steps, delta = game["sample_rate"], game["steps"], game["delta"]
    family = subsampled_gaussian_family(sample_rate=q, steps=steps, delta=delta)
    claim_member = 1.0 / game["noise_multiplier"]
    res = audit_bounds(scores, inserted, family=family, claimed_epsilon=family.epsilon(claim_member), delta=delta,
                       alpha=game["alpha"], threshold=game["scale"] * q * steps / 2, claim_member=claim_member)
    res.update(game=game, accountant_epsilon=accountant,
               claim="the tight ε of the client's T Poisson-subsampled Gaussian steps at its rate q and noise σ (a "
                     "privacy loss distribution); the canaries are records of that client; the accountant's ε beside",
               threat_model="white-box: every step's released (noised) gradient sum of the canaries' client")
    return res


def pooled_gradient_canaries(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The gradient canaries of several runs of one game (seeds), pooled: independent draws of it."""
    game = runs[0]["game"]
    if any(r["game"] != game for r in runs):
        raise ValueError("gradient canaries of runs with different rates, steps or noise cannot be pooled")
    scores = np.concatenate([r["scores"] for r in runs])
    res = gradient_canary_bounds(scores, np.concatenate([r["inserted"] for r in runs]), game,
                                 accountant=max(r["accountant_epsilon"] for r in runs))
    res.update(runs=len(runs), epsilon_lb_per_seed=[r["epsilon_lb"] for r in runs],
               violation_per_seed=[r["violation"] for r in runs])
    return res


__all__ = ["GradientCanaryAudit", "gradient_canary_bounds", "pooled_gradient_canaries"]
