"""Malicious clients against pFedPG (DESIGN §7).

A malicious client controls its own client-side code (``controls_client``), so whatever honest
hooks are configured (e.g. DP noise), its crafted update is what the server receives. Two injection
spaces: ``delta`` — it returns a crafted ΔP_n (realistic); ``grad`` — its per-client gradient g_n on
the shared parameters is replaced (worst case). Attacks that need the benign clients' statistics
(ALIE, IPM, Min-Max, Min-Sum) assume omniscient colluders that see the round's benign updates; in
delta space they act on the benign deltas and reach the shared parameters only through the
attacker's own Jacobian, so only grad space reproduces the published attacks (reports say so).

The malicious set is drawn once from ``fraction`` of the N clients with the stream
("attack.clients"), or given as ``clients``.
"""
from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
from scipy.stats import norm

from pfedpg.context import ClientSide, RunContext, ServerSide
from pfedpg.errors import ConfigError
from pfedpg.hooks import Hook, register_hook
from pfedpg.jobs import ClientData
from pfedpg.seeding import normal_like
from pfedpg.server import ClientGradients

SPACES = ("delta", "grad")


class MaliciousClients(Hook):
    """Base: chooses the malicious clients and routes crafting to the right hook point."""

    #: attacks that need the round's benign updates
    needs_benign = False
    #: attacks that only poison the training data (label flip, backdoor): space is irrelevant
    data_poisoning = False

    def __init__(self, *, fraction: float = 0.2, clients: list[int] | None = None, space: str = "delta"):
        super().__init__()
        if space not in SPACES:
            raise ConfigError(f"{self.name}.space={space!r} is not one of {', '.join(SPACES)}")
        if clients is None and not (isinstance(fraction, (int, float)) and 0 <= fraction < 1):
            raise ConfigError(f"{self.name}.fraction={fraction!r} must be in [0, 1)")
        self.fraction, self.fixed, self.space = float(fraction), clients, space
        self.malicious: list[int] = []

    def check(self, facts) -> None:
        n = facts.num_clients
        bad = [c for c in self.fixed or [] if not 0 <= c < n]
        if bad:
            raise ConfigError(f"{self.name}.clients: {bad} are not client ids 0..{n - 1}")

    def setup(self, ctx: RunContext) -> None:
        self.check(ctx.facts)
        n = ctx.num_clients
        if self.fixed is not None:
            self.malicious = sorted(set(self.fixed))
        else:
            k = int(round(self.fraction * n))
            self.malicious = sorted(int(c) for c in ctx.seeds.numpy("attack.clients").choice(n, k, replace=False))
        ctx.log(f"{self.name}: malicious clients {self.malicious} ({self.space} space)")

    def controls_client(self, client: int) -> bool:
        return client in self.malicious

    # ---- crafting: override one of these -------------------------------------------------------
    def craft_one(self, update: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A crafted update from the attacker's own honest update (simple attacks)."""
        return update

    def craft_from_benign(self, benign: torch.Tensor, k: int) -> torch.Tensor:
        """(k, P) crafted updates from the (b, P) benign updates of the round (collusion attacks)."""
        raise NotImplementedError

    # ---- delta space -------------------------------------------------------------------------
    def outgoing_delta(self, ctx: ClientSide, *, client, round, delta):
        if self.space != "delta" or self.needs_benign or self.data_poisoning:
            return delta
        return self.craft_one(delta, ctx.seeds.torch("attack.craft", client=client, round=round))

    def incoming_deltas(self, ctx: ServerSide, *, round, deltas):
        bad = [c for c in sorted(deltas) if c in self.malicious]
        if self.space != "delta" or not self.needs_benign or not bad:
            return deltas
        benign = [deltas[c].reshape(-1) for c in sorted(deltas) if c not in self.malicious]
        if not benign:
            return deltas
        crafted = self.craft_from_benign(torch.stack(benign), len(bad))
        out = dict(deltas)
        for c, row in zip(bad, crafted):
            out[c] = row.view_as(deltas[c])
        return out

    # ---- grad space --------------------------------------------------------------------------
    def shared_gradients(self, ctx: ServerSide, *, round, grads: ClientGradients):
        if self.space != "grad" or self.data_poisoning:
            return grads
        rows = [i for i, c in enumerate(grads.clients) if c in self.malicious]
        if not rows:
            return grads
        shared = grads.shared.clone()
        if self.needs_benign:
            benign = shared[[i for i in range(len(grads.clients)) if i not in rows]]
            if benign.shape[0] == 0:
                return grads
            shared[rows] = self.craft_from_benign(benign, len(rows)).to(shared.dtype)
        else:
            for i in rows:
                shared[i] = self.craft_one(shared[i],
                                           ctx.seeds.torch("attack.craft", client=grads.clients[i], round=round))
        return ClientGradients(grads.clients, shared, grads.weights, grads.private)

    def end_of_run(self, ctx: RunContext, *, summary):
        return {"malicious": self.malicious, "space": self.space}

    def state_dict(self):
        return {"malicious": self.malicious}

    def load_state_dict(self, state):
        self.malicious = list(state["malicious"])


@register_hook("sign_flip")
class SignFlip(MaliciousClients):
    def __init__(self, *, scale: float = 1.0, **kw):
        super().__init__(**kw)
        self.scale = float(scale)

    def craft_one(self, update, generator):
        return -self.scale * update


@register_hook("gaussian")
class GaussianAttack(MaliciousClients):
    def __init__(self, *, sigma: float = 1.0, **kw):
        super().__init__(**kw)
        self.sigma = float(sigma)

    def craft_one(self, update, generator):
        return normal_like(update, generator) * self.sigma


@register_hook("scaling")
class Scaling(MaliciousClients):
    """Model replacement / boosting: the honest update times λ (default: the number of clients)."""

    def __init__(self, *, factor: float | None = None, **kw):
        super().__init__(**kw)
        self.factor = factor

    def setup(self, ctx: RunContext):
        super().setup(ctx)
        if self.factor is None:
            self.factor = float(ctx.num_clients)

    def craft_one(self, update, generator):
        return self.factor * update


@register_hook("free_rider")
class FreeRider(MaliciousClients):
    """Contributes nothing: a zero update, or (``disguise`` > 0) small Gaussian noise of that std."""

    def __init__(self, *, disguise: float = 0.0, **kw):
        super().__init__(**kw)
        self.disguise = float(disguise)

    def craft_one(self, update, generator):
        if self.disguise == 0:
            return torch.zeros_like(update)
        return normal_like(update, generator) * self.disguise


@register_hook("alie")
class ALIE(MaliciousClients):
    """A Little Is Enough (Baruch et al. 2019): μ − k·σ per coordinate over the benign updates, k =
    ``num_std`` standard deviations (the paper's z_max; renamed from ``z``, which is DP's noise
    multiplier). ``auto`` uses z_max = Φ⁻¹((n − s) / n), s = ⌊n/2 + 1⌋ − f."""

    needs_benign = True
    RENAMED: ClassVar[dict[str, str]] = {"z": "num_std"}

    def __init__(self, *, num_std: float | str = "auto", **kw):
        super().__init__(**kw)
        self.num_std = num_std

    def z_value(self, n: int, f: int) -> float:
        if self.num_std != "auto":
            return float(self.num_std)
        s = math.floor(n / 2 + 1) - f
        return float(norm.ppf((n - s) / n))

    def craft_from_benign(self, benign, k):
        n = benign.shape[0] + k
        z = self.z_value(n, k)
        mu = benign.mean(0)
        sd = benign.std(0) if benign.shape[0] > 1 else torch.zeros_like(mu)
        return (mu - z * sd).expand(k, -1).clone()


@register_hook("ipm")
class IPM(MaliciousClients):
    """Inner-product manipulation (Xie et al. 2020): −magnitude · mean(benign); small (0.1) or large
    (100). The paper's ε, renamed from ``epsilon`` so it is not read as a privacy budget."""

    needs_benign = True
    RENAMED: ClassVar[dict[str, str]] = {"epsilon": "magnitude"}

    def __init__(self, *, magnitude: float = 0.1, **kw):
        super().__init__(**kw)
        self.magnitude = float(magnitude)

    def craft_from_benign(self, benign, k):
        return (-self.magnitude * benign.mean(0)).expand(k, -1).clone()


class _OptimizedPerturbation(MaliciousClients):
    """Min-Max / Min-Sum (Shejwalkar & Houmansadr 2021): μ + γ·p with p = −std direction and the
    largest γ (binary search) that keeps the crafted update inside the benign spread."""

    needs_benign = True

    def __init__(self, *, gamma_init: float = 10.0, steps: int = 30, **kw):
        super().__init__(**kw)
        self.gamma_init, self.steps = float(gamma_init), int(steps)

    def accept(self, m: torch.Tensor, benign: torch.Tensor, d: torch.Tensor) -> bool:
        raise NotImplementedError

    def craft_from_benign(self, benign, k):
        mu = benign.mean(0)
        sd = benign.std(0, unbiased=False)
        p = -sd / sd.norm().clamp_min(1e-12)
        d = torch.cdist(benign, benign)
        lo, hi = 0.0, self.gamma_init
        while self.accept(mu + hi * p, benign, d) and hi < 1e6:
            lo, hi = hi, 2 * hi
        for _ in range(self.steps):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if self.accept(mu + mid * p, benign, d) else (lo, mid)
        return (mu + lo * p).expand(k, -1).clone()


@register_hook("min_max")
class MinMax(_OptimizedPerturbation):
    def accept(self, m, benign, d):
        return float((benign - m).norm(dim=1).max()) <= float(d.max())


@register_hook("min_sum")
class MinSum(_OptimizedPerturbation):
    def accept(self, m, benign, d):
        return float((benign - m).norm(dim=1).pow(2).sum()) <= float(d.pow(2).sum(1).max())


@register_hook("label_flip")
class LabelFlip(MaliciousClients):
    """Malicious clients train honestly on labels y -> C − 1 − y."""

    data_poisoning = True

    def client_data(self, ctx: ClientSide, *, client, round, data):
        return ClientData(data.x, (ctx.num_classes - 1) - data.y)


def add_trigger(x: torch.Tensor, size: int, value: float, *, mean, std) -> torch.Tensor:
    """A size×size checkerboard stamped into the bottom-right corner of uint8 records (N, 3, S, S),
    BadNets-style: the trigger is part of the image, before any resize or augmentation. Its "on"
    cells are ``value`` in the model's normalised units (pixel mean + value·std, clipped to the pixel
    range: the default 2.5 is white), its "off" cells the normalised 0 (the mean colour)."""
    m = torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(3, 1, 1)
    on = ((m + value * s).clamp(0, 1) * 255).round()
    off = (m.clamp(0, 1) * 255).round()
    board = torch.tensor([[(i + j) % 2 == 1 for j in range(size)] for i in range(size)])
    out = x.clone()
    out[..., -size:, -size:] = torch.where(board, on, off).to(x.dtype)
    return out


@register_hook("backdoor")
class PixelBackdoor(MaliciousClients):
    """Pixel-pattern backdoor: malicious clients stamp the trigger (:func:`add_trigger`;
    ``trigger_size`` in stored pixels, ``trigger_value`` in normalised units, clipped to the pixel
    range) into ``poison_fraction`` of their images and relabel them ``target``. The attack
    success rate is measured on each benign client's own model (adapted prompt and head), on its
    triggered test images whose true label is not the target."""

    data_poisoning = True

    def __init__(self, *, target: int = 0, poison_fraction: float = 0.5, trigger_size: int = 3,
                 trigger_value: float = 2.5, **kw):
        super().__init__(**kw)
        if not 0 < poison_fraction <= 1:
            raise ConfigError(f"backdoor.poison_fraction={poison_fraction!r} must be in (0, 1]")
        self.target, self.poison_fraction = int(target), float(poison_fraction)
        self.trigger_size, self.trigger_value = int(trigger_size), float(trigger_value)
        self.last: dict = {"asr": None, "asr_per_client": {}}

    def client_data(self, ctx: ClientSide, *, client, round, data):
        g = ctx.seeds.numpy("attack.poison", client=client, round=round)
        n = data.x.shape[0]
        idx = torch.from_numpy(np.sort(g.choice(n, int(round_half(self.poison_fraction * n)), replace=False)))
        x, y = data.x.clone(), data.y.clone()
        x[idx] = add_trigger(x[idx], self.trigger_size, self.trigger_value, mean=ctx.config.model.mean,
                             std=ctx.config.model.std)
        y[idx] = self.target
        return ClientData(x, y)

    def client_metrics(self, ctx: ClientSide, *, client, evaluate):
        """ASR on a benign client's own model: its triggered test images whose true label is not
        the target (images that already carry it do not count). Runs where the client's model is:
        in-process, or in the client's Flower ClientApp."""
        if client in self.malicious:
            return None
        x, y = ctx.eval_data_of(client)
        keep = y != self.target
        count = int(keep.sum())
        if count == 0:
            return None
        xt = add_trigger(x[keep], self.trigger_size, self.trigger_value, mean=ctx.config.model.mean,
                         std=ctx.config.model.std)
        return {"asr": evaluate(xt, torch.full((count,), self.target, dtype=y.dtype)), "asr_images": count}

    def end_of_round(self, ctx: RunContext, *, round, record):
        if "acc_adapted_mean" not in record:  # evaluation rounds only
            return None
        per_client = {row["client"]: (row[f"{self.name}/asr"], row[f"{self.name}/asr_images"])
                      for row in record["clients"] if f"{self.name}/asr" in row}
        total = sum(k for _, k in per_client.values())
        self.last = {"asr": sum(a * k for a, k in per_client.values()) / total if total else None,
                     "asr_per_client": {c: a for c, (a, _) in sorted(per_client.items())}}
        return {"asr": self.last["asr"]}

    def end_of_run(self, ctx: RunContext, *, summary):
        # The last round always evaluates, so its ASR is the final models'.
        return {**super().end_of_run(ctx, summary=summary), **self.last, "target": self.target}

    def state_dict(self):
        return {**super().state_dict(), "last": self.last}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.last = state.get("last", {"asr": None, "asr_per_client": {}})


def round_half(v: float) -> int:
    return int(math.floor(v + 0.5))
