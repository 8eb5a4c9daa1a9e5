"""Privacy accounting helpers around Opacus' accountants (DESIGN §5).

Accountants by name (:data:`ACCOUNTANT_TYPES`, the one registry: calibration builds its accountant
from it too, so one registration serves accounting and ``target_epsilon``); one per client for the
whole run, checkpointed through ``state_dict`` so a resumed run keeps its ε. An accountant is any
class with Opacus' ``IAccountant`` face: ``step(noise_multiplier=, sample_rate=)``, ``history`` (a
list of (z, q, steps)) and ``get_epsilon(delta)``. The exact μ-GDP closed form the tests hold
the accountants against lives in the core, :mod:`pfedpg.gdp`.
"""
from __future__ import annotations

import math
import secrets

import torch

from pfedpg.errors import ConfigError
from pfedpg.privacy_result import Release
from pfedpg.registry import Registry

#: accountant name -> a factory of a fresh accountant (Opacus' IAccountant face)
ACCOUNTANT_TYPES: Registry = Registry("accountant")
#: Calibration's search (Opacus' get_noise_multiplier, over this registry): the largest z tried.
MAX_SIGMA = 1e6


@ACCOUNTANT_TYPES.register("rdp")
def _rdp():
    from opacus.accountants import RDPAccountant

    return RDPAccountant()


@ACCOUNTANT_TYPES.register("prv")
def _prv():
    from opacus.accountants import PRVAccountant

    return PRVAccountant()


def make_accountant(name: str):
    return ACCOUNTANT_TYPES.get(name)()


def accountant_epsilon(accountant, delta: float) -> float:
    if not accountant.history:
        return 0.0
    return float(accountant.get_epsilon(delta=delta))


def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
                    epsilon_tolerance: float = 0.005) -> float:
    """The noise multiplier (per unit sensitivity) that reaches ``target_epsilon`` after ``steps``:
    the smallest z found by bisection whose ε is within ``epsilon_tolerance`` below the target (the
    search of Opacus' ``get_noise_multiplier``, step for step, on an accountant from this registry)."""
    if steps < 1:
        raise ConfigError("target_epsilon needs at least one planned release; check rounds and clients_per_round")
    acc = make_accountant(accountant)

    def eps(sigma: float) -> float:
        acc.history = [(sigma, sample_rate, steps)]
        return float(acc.get_epsilon(delta=delta))

    eps_high, sigma_low, sigma_high = math.inf, 0.0, 10.0
    while eps_high > target_epsilon:
        sigma_high = 2 * sigma_high
        eps_high = eps(sigma_high)
        if sigma_high > MAX_SIGMA:
            raise ConfigError(f"target_epsilon={target_epsilon} at delta={delta} needs noise_multiplier > "
                              f"{MAX_SIGMA:g}; raise target_epsilon or delta")
    while target_epsilon - eps_high > epsilon_tolerance:
        sigma = (sigma_low + sigma_high) / 2
        e = eps(sigma)
        if e < target_epsilon:
            sigma_high, eps_high = sigma, e
        else:
            sigma_low = sigma
    return float(sigma_high)


def check_accountant(name: str, where: str = "accountant") -> None:
    """A one-line error unless ``name`` is in the live registry."""
    if name not in ACCOUNTANT_TYPES:
        raise ConfigError(f"{where}={name!r} is not one of {', '.join(ACCOUNTANT_TYPES.names())}")


class ClientAccountants:
    """One Opacus accountant per client for the whole run, checkpointable (a fresh accountant per
    round would silently reset ε). ``mark_unbounded`` records a release without noise: ε = ∞."""

    def __init__(self, name: str, delta: float | None = None):
        check_accountant(name)
        self.name, self.delta = name, delta
        self._acc: dict[int, object] = {}
        self._unbounded: set[int] = set()

    def step(self, client: int, *, noise_multiplier: float, sample_rate: float) -> None:
        if client not in self._acc:
            self._acc[client] = make_accountant(self.name)
        self._acc[client].step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def account(self, client: int, release: Release) -> None:
        """Compose one entry of a mechanism's record: its ``steps`` Gaussian compositions at its
        accounting multiplier and sample rate; a noise-free release makes ε infinite."""
        if release.noise_multiplier == 0:
            self.mark_unbounded(client)  # clip only: no privacy guarantee
            return
        for _ in range(release.steps):
            self.step(client, noise_multiplier=release.accounting_multiplier, sample_rate=release.sample_rate)

    def mark_unbounded(self, client: int) -> None:
        self._unbounded.add(client)

    def epsilon(self, client: int) -> float:
        if client in self._unbounded:
            return math.inf
        acc = self._acc.get(client)
        return 0.0 if acc is None else accountant_epsilon(acc, self.delta)

    def summary(self, num_clients: int | list[int]) -> dict:
        """ε of clients 0..num_clients−1 (or of the listed client ids): max, mean and per client."""
        ids = range(num_clients) if isinstance(num_clients, int) else num_clients
        eps = [self.epsilon(c) for c in ids]
        return {"epsilon_max": max(eps), "epsilon_mean": sum(eps) / len(eps), "epsilon_per_client": eps}

    def state_dict(self) -> dict:
        return {"history": {str(c): [list(h) for h in a.history] for c, a in self._acc.items()},
                "unbounded": sorted(self._unbounded)}

    def client_state(self, client: int) -> dict:
        acc = self._acc.get(client)
        return {"history": [list(h) for h in acc.history] if acc is not None else [],
                "unbounded": client in self._unbounded}

    def merge_client_state(self, client: int, state: dict) -> None:
        """Replace client ``client``'s accountant with the one its own process kept."""
        if state["history"]:
            acc = make_accountant(self.name)
            acc.history = [tuple(h) for h in state["history"]]
            self._acc[client] = acc
        else:
            self._acc.pop(client, None)
        if state["unbounded"]:
            self._unbounded.add(client)
        else:
            self._unbounded.discard(client)

    def load_state_dict(self, state: dict) -> None:
        self._acc = {}
        for c, hist in state["history"].items():
            acc = make_accountant(self.name)
            acc.history = [tuple(h) for h in hist]
            self._acc[int(c)] = acc
        self._unbounded = set(state.get("unbounded", []))


# A DP hook's mechanism record ({client: [Release per local training or release]}) in checkpoints and
# between a Flower client's process and the server: string keys and plain dicts, so that it survives
# JSON as well. Entries of checkpoints from before the Release type carry the hook's own C, adjacency
# and sensitivity (``defaults``).
def record_state(record: dict[int, list[Release]]) -> dict[str, list[dict]]:
    return {str(c): [e.to_dict() for e in entries] for c, entries in record.items()}


def load_record(state: dict[str, list[dict]], **defaults) -> dict[int, list[Release]]:
    return {int(c): [as_release(e, defaults) for e in entries] for c, entries in state.items()}


def as_release(entry: dict | Release, defaults: dict) -> Release:
    if isinstance(entry, Release):
        return entry
    e = {**defaults, **entry}
    e.setdefault("accounting_multiplier", e["noise_multiplier"] / e["sensitivity"])
    return Release.from_dict(e)


def merge_record(record: dict[int, list[Release]], client: int, entries: list[dict], **defaults) -> None:
    """Replace client ``client``'s record with the one its own process kept (as its accountant)."""
    if entries:
        record[client] = [as_release(e, defaults) for e in entries]
    else:
        record.pop(client, None)


def check_dp_options(hook: str, *, clip, noise_multiplier, target_epsilon, accountant: str,
                     allow_zero_noise: bool) -> None:
    """Shared option checks of the DP hooks, each a one-line ConfigError naming the fix."""
    if not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
        raise ConfigError(f"{hook}.clip={clip!r} must be a positive number (the L2 bound C)")
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ConfigError(f"{hook} needs exactly one of noise_multiplier or target_epsilon")
    low_ok = (lambda z: z >= 0) if allow_zero_noise else (lambda z: z > 0)
    if noise_multiplier is not None and not (math.isfinite(noise_multiplier) and low_ok(noise_multiplier)):
        raise ConfigError(f"{hook}.noise_multiplier={noise_multiplier!r} must be a number "
                          + (">= 0" if allow_zero_noise else "> 0 (use no dp_sgd hook for z = 0)"))
    if target_epsilon is not None and not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError(f"{hook}.target_epsilon={target_epsilon!r} must be a positive number")
    check_accountant(accountant, f"{hook}.accountant")


#: Where DP noise comes from. ``seeded``: a stream keyed by (run seed, client, round) — runs are
#: reproducible, but anyone who knows the run's seed (the server does: it has the config) can
#: subtract the noise, so ε holds only against parties without the seed; right for simulation and
#: audits. ``local``: a fresh secret seed from the OS per release, unknown to the server — what a
#: deployment needs; runs are no longer reproducible. (torch's generator is not a CSPRNG, and
#: floating-point attacks on Gaussian sampling are not addressed, as in Opacus without secure_mode.)
NOISE_SOURCES = ("seeded", "local")


def check_noise_source(hook: str, source: str) -> None:
    if source not in NOISE_SOURCES:
        raise ConfigError(f"{hook}.noise={source!r} is not one of {', '.join(NOISE_SOURCES)}")


def noise_generator(ctx, source: str, component: str, *, client: int, round: int) -> torch.Generator:
    if source == "seeded":
        return ctx.seeds.torch(component, client=client, round=round)
    g = torch.Generator()
    g.manual_seed(secrets.randbits(63))
    return g


PUBLIC = ("the client's split sizes, the rounds it takes part in and its number of local steps, the noise "
          "multiplier, and the accountant's state (a function of those)")


def client_metrics_statement(ctx) -> str:
    """What the statement says of the clients' own losses, accuracies and measurements (DESIGN §5)."""
    cfg = ctx.config if ctx is not None else None
    if cfg is not None and cfg.privacy.release_metrics:
        return ("RELEASED to the server outside the guarantee (privacy.release_metrics: true): training loss, records "
                "drawn, clipped fraction, evaluation accuracy and loss, and hook measurements")
    if cfg is not None and cfg.engine == "flower":
        return "kept by each client in its own metrics file, never sent to the server"
    return ("kept on the client side: the in-process runner stands for both sides and records them as the client "
            "would (a Flower client keeps them in its own metrics file)")


def warn_seeded_deployment(hook: str, ctx, source: str) -> None:
    """A deployed run whose server knows the noise seed gets a loud log line, not silence."""
    cfg = ctx.config
    if source == "seeded" and getattr(cfg, "engine", None) == "flower" and cfg.flower.superlink is not None:
        ctx.log(f"WARNING {hook}: noise is drawn from the run seed, which the server knows; the ε reported holds "
                f"against parties without the seed, not against this deployment's server. Set {hook}.noise: local")
