"""Robust aggregation of the per-client gradients on pFedPG's shared parameters (DESIGN §4, §7).

The server never averages prompts: it computes g_n = J_nᵀ(−ΔP_n) on the shared parameters (φ and
P_base) for each client and, by default, sums them (the plain update). A robust rule replaces the
sum with ``(Σ_n w_n) · AGG({g_n})``, so it matches the plain update's magnitude when all clients
agree. Descriptor gradients stay per client and are never aggregated.

Rules, one registered class each in :data:`AGGREGATION_RULES` (each on an (m, P) stack):
``mean``, ``median`` (coordinate-wise), ``trimmed_mean`` (drop f largest and f smallest per
coordinate), ``krum`` / ``multi_krum`` (Blanchard et al. 2017), ``bulyan`` (El Mhamdi et al. 2018),
``geometric_median`` (smoothed Weiszfeld; Pillutla et al. 2022), ``norm_clip`` (clip each g_n to
the radius τ, then mean), ``centered_clip`` (Karimireddy et al. 2021).
A rule whose precondition fails at the configured (m, f) — Krum needs m ≥ 2f + 3, Bulyan
m ≥ 4f + 3, trimmed mean m > 2f — is a config error, never a silent fallback.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch

from pfedpg.context import RunContext, ServerSide
from pfedpg.errors import ConfigError
from pfedpg.hooks import Hook, register_hook
from pfedpg.registry import Registry


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
        scores = (krum_scores(g[remaining], f) if len(remaining) > f + 2
                  else torch.zeros(len(remaining), device=g.device))
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


class Rule:
    """One aggregation rule: ``combine`` maps an (m, P) stack to a mean-like aggregate and the rows it
    kept. ``min_clients(f)`` is the smallest m at which it tolerates f malicious clients. A rule owns
    its options: they are its constructor's keyword arguments (after ``f``), checked against its
    signature when the hook builds it (a config option no rule of that name takes is an error)."""

    def __init__(self, *, f: int):
        self.f = f

    @staticmethod
    def min_clients(f: int) -> int:
        return 1

    def combine(self, g: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


#: rule name -> its class
AGGREGATION_RULES: Registry[type[Rule]] = Registry("robust aggregation rule")


@AGGREGATION_RULES.register("mean")
class Mean(Rule):
    def combine(self, g):
        return g.mean(0), list(range(g.shape[0]))


@AGGREGATION_RULES.register("median")
class Median(Rule):
    """Coordinate-wise median."""

    @staticmethod
    def min_clients(f):
        return 2 * f + 1

    def combine(self, g):
        return coordinate_median(g), list(range(g.shape[0]))


@AGGREGATION_RULES.register("trimmed_mean")
class TrimmedMean(Rule):
    """Drop the f largest and f smallest values per coordinate."""

    @staticmethod
    def min_clients(f):
        return 2 * f + 1

    def combine(self, g):
        return trimmed_mean(g, self.f), list(range(g.shape[0]))


@AGGREGATION_RULES.register("krum")
class Krum(Rule):
    """Blanchard et al. 2017: the one vector with the lowest Krum score."""

    @staticmethod
    def min_clients(f):
        return 2 * f + 3

    def combine(self, g):
        (i,) = multi_krum_select(g, self.f, 1)
        return g[i], [i]


@AGGREGATION_RULES.register("multi_krum")
class MultiKrum(Rule):
    """The mean of the m − f vectors with the lowest Krum scores."""

    @staticmethod
    def min_clients(f):
        return 2 * f + 3

    def combine(self, g):
        chosen = multi_krum_select(g, self.f, g.shape[0] - self.f)
        return g[chosen].mean(0), chosen


@AGGREGATION_RULES.register("bulyan")
class Bulyan(Rule):
    """El Mhamdi et al. 2018: recursive Krum, then a trimmed mean around the median."""

    @staticmethod
    def min_clients(f):
        return 4 * f + 3

    def combine(self, g):
        agg, chosen = bulyan(g, self.f)
        return agg, sorted(chosen)


@AGGREGATION_RULES.register("geometric_median")
class GeometricMedian(Rule):
    """Smoothed Weiszfeld (Pillutla et al. 2022)."""

    @staticmethod
    def min_clients(f):
        return 2 * f + 1

    def combine(self, g):
        return geometric_median(g), list(range(g.shape[0]))


class ClippingRule(Rule):
    """A rule that clips to a radius τ: a positive number, or ``auto`` (the median client norm of the
    round)."""

    def __init__(self, *, f: int, radius: float | str = "auto"):
        super().__init__(f=f)
        if radius != "auto" and not (isinstance(radius, (int, float)) and not isinstance(radius, bool)
                                     and math.isfinite(radius) and radius > 0):
            raise ConfigError(f"robust_aggregation.radius={radius!r} must be a positive number or 'auto'")
        self.radius = radius

    def tau(self, g: torch.Tensor) -> float:
        return float(g.norm(dim=1).median()) if self.radius == "auto" else float(self.radius)


@AGGREGATION_RULES.register("norm_clip")
class NormClip(ClippingRule):
    """Clip each g_n to the radius τ, then the mean."""

    def combine(self, g):
        return clip_rows(g, self.tau(g)).mean(0), list(range(g.shape[0]))


@AGGREGATION_RULES.register("centered_clip")
class CenteredClip(ClippingRule):
    """Karimireddy et al. 2021: v ← v + mean(clip(g_n − v, τ)), ``iters`` times from last round's centre."""

    def __init__(self, *, f: int, radius: float | str = "auto", iters: int = 3):
        super().__init__(f=f, radius=radius)
        if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
            raise ConfigError(f"robust_aggregation.iters={iters!r} must be an integer >= 1")
        self.iters = iters
        self.center: torch.Tensor | None = None

    def combine(self, g):
        v = torch.zeros_like(g[0]) if self.center is None or self.center.shape != g[0].shape else self.center.to(g)
        tau = self.tau(g - v)
        for _ in range(self.iters):
            v = v + clip_rows(g - v, tau).mean(0)
        self.center = v.detach().clone()
        return v, list(range(g.shape[0]))

    def state_dict(self):
        return {"center": self.center}

    def load_state_dict(self, state):
        self.center = state["center"]


def min_clients(rule: str, f: int) -> int:
    """The smallest m at which ``rule`` tolerates f malicious clients."""
    return AGGREGATION_RULES.get(rule).min_clients(f)


@register_hook("robust_aggregation")
class RobustAggregation(Hook):
    """Options: ``rule`` (a name in AGGREGATION_RULES); ``f`` malicious clients tolerated (default 0);
    the rule's own options, e.g. ``radius`` τ for norm_clip / centered_clip (``auto`` = the median
    client norm of the round; the old option name ``clip`` works in configs for one release) and
    ``iters`` for centered_clip (default 3); ``multi_krum`` keeps m − f."""

    RENAMED: ClassVar[dict[str, str]] = {"clip": "radius"}

    def __init__(self, *, rule: str, f: int = 0, **options):
        super().__init__()
        if rule not in AGGREGATION_RULES:
            raise ConfigError(f"robust_aggregation.rule={rule!r} is not one of {', '.join(AGGREGATION_RULES.names())}")
        if not isinstance(f, int) or isinstance(f, bool) or f < 0:
            raise ConfigError(f"robust_aggregation.f={f!r} must be an integer >= 0")
        self.rule_name, self.f = rule, f
        self.rule = AGGREGATION_RULES.construct(rule, options, where=f"robust_aggregation rule {rule}", f=f)
        self.excluded: dict[int, list[int]] = {}

    def setup(self, ctx: RunContext) -> None:
        self.check(ctx.facts)

    def check(self, facts) -> None:
        m = min(len(r) for r in facts.schedule) if facts.schedule else facts.num_clients
        need = self.rule.min_clients(self.f)
        if m < need:
            raise ConfigError(f"robust_aggregation rule {self.rule_name} with f={self.f} needs at least {need} clients "
                              f"per round, the schedule has {m}; lower f or raise clients_per_round")

    def combine(self, g: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(mean-like aggregate, indices of the rows it kept)."""
        return self.rule.combine(g)

    def aggregate(self, ctx: ServerSide, *, round, grads):
        g = grads.shared
        if g.shape[0] == 0:
            return torch.zeros(g.shape[1], dtype=g.dtype, device=g.device)
        need = self.rule.min_clients(self.f)
        if g.shape[0] < need:
            raise ConfigError(f"round {round}: {g.shape[0]} clients reached aggregation, rule {self.rule_name} with "
                              f"f={self.f} needs {need}")
        agg, kept = self.combine(g)
        self.excluded[round] = [grads.clients[i] for i in range(g.shape[0]) if i not in kept]
        return grads.weights.sum() * agg

    def end_of_round(self, ctx: RunContext, *, round, record):
        return {"excluded": self.excluded.get(round, [])}

    def end_of_run(self, ctx: RunContext, *, summary):
        return {"rule": self.rule_name, "f": self.f,
                "excluded_per_round": {str(k): v for k, v in self.excluded.items()}}

    def state_dict(self):
        return {"center": self.rule.state_dict().get("center"),
                "excluded": {str(k): v for k, v in self.excluded.items()}}

    def load_state_dict(self, state):
        self.rule.load_state_dict(state)
        self.excluded = {int(k): v for k, v in state["excluded"].items()}
