"""Robust aggregation of the per-client gradients on pFedPG's shared parameters (DESIGN §4, §7).

The server never averages prompts: it computes g_n = J_nᵀ(−ΔP_n) on the shared parameters (φ and
P_base) for each client and, by default, sums them (the plain update). A robust rule replaces the
sum with ``(Σ_n w_n) · AGG({g_n})``, so it matches the plain update's magnitude when all clients
agree. Descriptor gradients stay per client and are never aggregated.

Rules (each on an (m, P) stack): ``mean``, ``median`` (coordinate-wise), ``trimmed_mean``
(drop f largest and f smallest per coordinate), ``krum`` / ``multi_krum`` (Blanchard et al. 2017),
``bulyan`` (El Mhamdi et al. 2018), ``geometric_median`` (smoothed Weiszfeld; Pillutla et al. 2022),
``norm_clip`` (clip each g_n to τ, then mean), ``centered_clip`` (Karimireddy et al. 2021).
A rule whose precondition fails at the configured (m, f) — Krum needs m ≥ 2f + 3, Bulyan
m ≥ 4f + 3, trimmed mean m > 2f — is a config error, never a silent fallback.
"""
from __future__ import annotations

import math

import torch

from pfedpg.errors import ConfigError
from pfedpg.hooks import Hook, register_hook


def coordinate_median(g: torch.Tensor) -> torch.Tensor:
    s = g.sort(dim=0).values
    m = g.shape[0]
    return 0.5 * (s[(m - 1) // 2] + s[m // 2])


def trimmed_mean(g: torch.Tensor, f: int) -> torch.Tensor:
    s = g.sort(dim=0).values
    return s[f:g.shape[0] - f].mean(dim=0)


def krum_scores(g: torch.Tensor, f: int) -> torch.Tensor:
    """Sum of squared distances to the m − f − 2 nearest other vectors."""
    d = torch.cdist(g, g).pow(2)
    d.fill_diagonal_(float("inf"))
    k = g.shape[0] - f - 2
    return d.sort(dim=1).values[:, :k].sum(dim=1)


def multi_krum_select(g: torch.Tensor, f: int, count: int) -> list[int]:
    """The ``count`` vectors with the lowest Krum scores (Blanchard et al. 2017; count = 1 is Krum)."""
    return sorted(int(i) for i in krum_scores(g, f).argsort()[:count])


def krum_select(g: torch.Tensor, f: int, count: int) -> list[int]:
    """Indices chosen by Krum applied recursively to the remaining vectors (Bulyan's first stage)."""
    remaining = list(range(g.shape[0]))
    chosen = []
    for _ in range(count):
        scores = krum_scores(g[remaining], f) if len(remaining) > f + 2 else torch.zeros(len(remaining), device=g.device)
        best = remaining[int(scores.argmin())]
        chosen.append(best)
        remaining.remove(best)
    return chosen


def bulyan(g: torch.Tensor, f: int) -> tuple[torch.Tensor, list[int]]:
    m = g.shape[0]
    selected = krum_select(g, f, m - 2 * f)
    s = g[selected]
    beta = len(selected) - 2 * f
    med = coordinate_median(s)
    # per coordinate: the beta values closest to the median, averaged
    idx = (s - med).abs().argsort(dim=0)[:beta]
    return s.gather(0, idx).mean(dim=0), selected


def geometric_median(g: torch.Tensor, *, iters: int = 100, eps: float = 1e-8, tol: float = 1e-10) -> torch.Tensor:
    z = g.mean(dim=0)
    for _ in range(iters):
        w = 1.0 / (g - z).norm(dim=1).clamp_min(eps)
        new = (w[:, None] * g).sum(0) / w.sum()
        if (new - z).norm() <= tol * max(1.0, float(z.norm())):
            return new
        z = new
    return z


def clip_rows(g: torch.Tensor, tau: float) -> torch.Tensor:
    norms = g.norm(dim=1, keepdim=True)
    return g * (tau / norms.clamp_min(1e-12)).clamp(max=1.0)


RULES = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "geometric_median", "norm_clip",
         "centered_clip")


def min_clients(rule: str, f: int) -> int:
    """The smallest m at which ``rule`` tolerates f malicious clients."""
    return {"krum": 2 * f + 3, "multi_krum": 2 * f + 3, "bulyan": 4 * f + 3, "trimmed_mean": 2 * f + 1,
            "median": 2 * f + 1, "geometric_median": 2 * f + 1}.get(rule, 1)


@register_hook("robust_aggregation")
class RobustAggregation(Hook):
    """Options: ``rule`` (one of RULES); ``f`` malicious clients tolerated (default 0); ``clip`` τ
    for norm_clip / centered_clip (``auto`` = the median client norm of the round); ``iters`` for
    centered_clip (default 3); ``multi_krum`` keeps m − f."""

    def __init__(self, *, rule: str, f: int = 0, clip: float | str = "auto", iters: int = 3):
        super().__init__()
        if rule not in RULES:
            raise ConfigError(f"robust_aggregation.rule={rule!r} is not one of {', '.join(RULES)}")
        if not isinstance(f, int) or isinstance(f, bool) or f < 0:
            raise ConfigError(f"robust_aggregation.f={f!r} must be an integer >= 0")
        if clip != "auto" and not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
            raise ConfigError(f"robust_aggregation.clip={clip!r} must be a positive number or 'auto'")
        self.rule, self.f, self.clip, self.iters = rule, f, clip, int(iters)
        self.center: torch.Tensor | None = None  # centered_clip's running centre
        self.excluded: dict[int, list[int]] = {}

    def setup(self, ctx) -> None:
        m = min(len(r) for r in ctx.schedule) if ctx.schedule else ctx.num_clients
        need = min_clients(self.rule, self.f)
        if m < need:
            raise ConfigError(f"robust_aggregation rule {self.rule} with f={self.f} needs at least {need} clients per "
                              f"round, the schedule has {m}; lower f or raise clients_per_round")

    def _tau(self, g: torch.Tensor) -> float:
        return float(g.norm(dim=1).median()) if self.clip == "auto" else float(self.clip)

    def combine(self, g: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(mean-like aggregate, indices of the rows it kept)."""
        m, f = g.shape[0], self.f
        keep = list(range(m))
        if self.rule == "mean":
            return g.mean(0), keep
        if self.rule == "median":
            return coordinate_median(g), keep
        if self.rule == "trimmed_mean":
            return trimmed_mean(g, f), keep
        if self.rule == "krum":
            (i,) = multi_krum_select(g, f, 1)
            return g[i], [i]
        if self.rule == "multi_krum":
            chosen = multi_krum_select(g, f, m - f)
            return g[chosen].mean(0), chosen
        if self.rule == "bulyan":
            agg, chosen = bulyan(g, f)
            return agg, sorted(chosen)
        if self.rule == "geometric_median":
            return geometric_median(g), keep
        if self.rule == "norm_clip":
            return clip_rows(g, self._tau(g)).mean(0), keep
        # centered_clip: v <- v + mean(clip(g_i - v, τ)), a few iterations from the last round's centre
        v = torch.zeros_like(g[0]) if self.center is None or self.center.shape != g[0].shape else self.center.to(g)
        tau = self._tau(g - v)
        for _ in range(self.iters):
            v = v + clip_rows(g - v, tau).mean(0)
        self.center = v.detach().clone()
        return v, keep

    def aggregate(self, ctx, *, round, grads):
        g = grads.shared
        if g.shape[0] == 0:
            return torch.zeros(g.shape[1], dtype=g.dtype, device=g.device)
        if g.shape[0] < min_clients(self.rule, self.f):
            raise ConfigError(f"round {round}: {g.shape[0]} clients reached aggregation, rule {self.rule} with "
                              f"f={self.f} needs {min_clients(self.rule, self.f)}")
        agg, kept = self.combine(g)
        self.excluded[round] = [grads.clients[i] for i in range(g.shape[0]) if i not in kept]
        return grads.weights.sum() * agg

    def end_of_round(self, ctx, *, round, record):
        return {"excluded": self.excluded.get(round, [])}

    def end_of_run(self, ctx, *, summary):
        return {"rule": self.rule, "f": self.f, "excluded_per_round": {str(k): v for k, v in self.excluded.items()}}

    def state_dict(self):
        return {"center": self.center, "excluded": {str(k): v for k, v in self.excluded.items()}}

    def load_state_dict(self, state):
        self.center = state["center"]
        self.excluded = {int(k): v for k, v in state["excluded"].items()}
