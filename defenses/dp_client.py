"""``dp_client``: client-level (local) differential privacy on the prompt delta (DESIGN §5).

Each honest client clips ΔP_n to L2 norm C (over all K×D numbers, after local training) and adds
N(0, (zC)² I) before sending. The server uses every ΔP_n individually, so there is no
amplification by averaging, and client sampling does not amplify against the server that picks the
participants: each client's ε grows with the rounds it joins (sample rate 1 per release).

Privacy unit: one client's whole dataset. Adjacency ``replace`` (default; sensitivity 2C) or
``add_remove`` (sensitivity C). Threat model: honest-but-curious server and anyone who sees what
the server holds (φ, P_base, d_n, the released ΔP_n). NOT covered: the client's adapted prompt P̃_n
and head H_n, which are trained on raw data and never noised.

By default (``noise: seeded``) the noise is drawn from a stream keyed by (seed, client, round) so
runs are reproducible. That is for simulation only: anyone holding the seed could subtract it. A
deployed client needs ``noise: local`` (a secret seed per release that the server cannot know); a
Flower deployment with seeded noise logs a warning.
"""
from __future__ import annotations

import torch

from defenses.accounting import (
    PUBLIC,
    ClientAccountants,
    calibrate_noise,
    check_dp_options,
    check_noise_source,
    client_metrics_statement,
    load_record,
    merge_record,
    noise_generator,
    record_state,
    warn_seeded_deployment,
)
from pfedpg.context import ClientSide, RunContext
from pfedpg.errors import ConfigError
from pfedpg.hooks import Hook, register_hook
from pfedpg.privacy_result import PrivacyResult, Release
from pfedpg.seeding import normal_like

ADJACENCIES = {"replace": 2.0, "add_remove": 1.0}  # sensitivity in units of C


def clip_by_norm(x: torch.Tensor, clip: float) -> torch.Tensor:
    """x scaled to L2 norm ≤ clip; the zero vector passes unchanged (no division by zero)."""
    norm = float(x.norm())
    if norm <= clip or norm == 0.0:
        return x.clone()
    return x * (clip / norm)


@register_hook("dp_client")
class ClientLevelDP(Hook):
    """Clip + Gaussian noise on ΔP_n, with one Opacus accountant per client.

    Options: ``clip`` C > 0; exactly one of ``noise_multiplier`` z ≥ 0 (noise std zC) or
    ``target_epsilon`` (z calibrated up front for the most rounds any client is scheduled to join,
    a new client's pFedPG join rounds included);
    ``delta`` (< 1/N); ``adjacency`` (replace | add_remove); ``accountant`` (rdp | prv);
    ``noise`` (seeded | local, see ``defenses.accounting.NOISE_SOURCES``).
    z = 0 is the clip-only ablation: ε = ∞.
    """

    privacy_mechanism = True  # what a client sends under it: the release and what the statement names public
    unit = "client"

    def __init__(self, *, clip: float, noise_multiplier: float | None = None, target_epsilon: float | None = None,
                 delta: float = 1e-5, adjacency: str = "replace", accountant: str = "rdp", noise: str = "seeded"):
        super().__init__()
        check_noise_source("dp_client", noise)
        self.noise_source = noise
        check_dp_options("dp_client", clip=clip, noise_multiplier=noise_multiplier, target_epsilon=target_epsilon,
                         accountant=accountant, allow_zero_noise=True)
        if adjacency not in ADJACENCIES:
            raise ConfigError(f"dp_client.adjacency={adjacency!r} is not one of {', '.join(ADJACENCIES)}")
        if not 0 < delta < 1:
            raise ConfigError(f"dp_client.delta={delta!r} must be in (0, 1)")
        self.clip, self.delta, self.adjacency, self.accountant_name = float(clip), float(delta), adjacency, accountant
        self.target_epsilon = target_epsilon
        self.noise_multiplier = None if noise_multiplier is None else float(noise_multiplier)
        self.sensitivity = ADJACENCIES[adjacency] * self.clip
        self.accountants = ClientAccountants(accountant, self.delta)
        #: What the mechanism did, per client, one Release per release: the z and the C privatize used,
        #: taken there; the accountant composes these records and nothing else, and a wrong conversion
        #: between adjacencies fails Release.check (tests/test_accounting_history.py).
        self.mechanism_record: dict[int, list[Release]] = {}
        self._used: dict | None = None  # what the last privatize call used, for outgoing_delta's record

    def fixes_rounds(self) -> bool:
        return self.target_epsilon is not None  # z is calibrated to the rounds each client joins

    def check(self, facts) -> None:
        # New clients (data.new_clients) are clients too: each pFedPG join round is a release.
        n = facts.num_clients + len(facts.new_clients)
        if self.delta >= 1.0 / n:
            raise ConfigError(f"dp_client.delta={self.delta} must be < 1/N = {1.0 / n:.3g} for client-level DP"
                              f"{' (N counts the new clients)' if facts.new_clients else ''}; lower it")

    def setup(self, ctx: RunContext) -> None:
        self.check(ctx.facts)
        warn_seeded_deployment("dp_client", ctx, self.noise_source)
        self.metrics_statement = client_metrics_statement(ctx)
        if self.target_epsilon is not None and self.noise_multiplier is None:
            trained = max(sum(c in r for r in ctx.schedule) for c in range(ctx.num_clients))
            joins = max(trained, self.new_client_releases(ctx))
            unit = calibrate_noise(target_epsilon=self.target_epsilon, delta=self.delta, sample_rate=1.0,
                                   steps=joins, accountant=self.accountant_name)
            self.noise_multiplier = unit * self.sensitivity / self.clip  # z = 2·unit under replace
            who = "" if joins == trained else (" (a new client's join rounds; training clients release at most "
                                              f"{trained} times and end below the target)")
            ctx.log(f"dp_client: z = {self.noise_multiplier:.4f} for ε = {self.target_epsilon} "
                    f"over {joins} releases{who}")

    @staticmethod
    def new_client_releases(ctx) -> int:
        """Releases of each new client: one per join round where the server updates its state from
        ΔP_new (pfedpg); fedvpt and local newcomers send nothing."""
        return ctx.join_rounds if ctx.new_clients and ctx.server.joins_with_updates else 0

    def privatize(self, delta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        clip, std = self.clip, self.noise_multiplier * self.clip
        self._used = self.parameters()
        clipped = clip_by_norm(delta, clip)
        if std == 0:
            return clipped
        # Drawn on the CPU from the keyed (or secret) stream and moved: exact, and the same on every device.
        return clipped + normal_like(clipped, generator) * std

    def outgoing_delta(self, ctx: ClientSide, *, client, round, delta):
        self._used = None
        released = self.privatize(delta, noise_generator(ctx, self.noise_source, "dp_client.noise",
                                                         client=client, round=round))
        # The record holds the release as privatize made it (a privatize that reports nothing, such as
        # the tests' broken variants, as configured: what the mechanism claims), and the accountant
        # composes exactly that record.
        release = Release(round=round, **(self._used or self.parameters())).check()
        self.mechanism_record.setdefault(client, []).append(release)
        self.accountants.account(client, release)  # z = 0, the clip-only ablation: ε = ∞
        return released

    # Noise std is z·C; for accounting, the multiplier per unit sensitivity is z·C / sensitivity.
    @property
    def accounting_multiplier(self) -> float:
        return self.noise_multiplier * self.clip / self.sensitivity

    def parameters(self) -> dict:
        """The mechanism's parameters for one release (a Release without its round)."""
        return {"noise_multiplier": self.noise_multiplier, "clip": self.clip, "adjacency": self.adjacency,
                "sensitivity": ADJACENCIES[self.adjacency], "accounting_multiplier": self.accounting_multiplier}

    def releases(self, client: int) -> list[Release]:
        return list(self.mechanism_record.get(client, []))

    def epsilon(self, client: int) -> float:
        return self.accountants.epsilon(client)

    def end_of_round(self, ctx: RunContext, *, round, record):
        return self.accountants.summary(ctx.num_clients)

    def statement(self) -> dict:
        return {
            "privacy_unit": "client (a client's whole local dataset)",
            "adjacency": self.adjacency,
            "threat_model": "honest-but-curious server and observers of server state; "
                            "not the client's own adapted prompt or head",
            "mechanism": f"clip ΔP_n to global L2 norm C={self.clip}, add N(0, (zC)^2 I) "
                         f"with z={self.noise_multiplier:.4g}, on the client before sending",
            "sensitivity": self.sensitivity,
            "sampling": "none (sample rate 1 per release; client sampling gives no amplification against the server)",
            "delta": self.delta,
            "accountant": f"opacus {self.accountant_name}",
            "noise_source": self.noise_source,
            "public": PUBLIC,
            "client_metrics": getattr(self, "metrics_statement", client_metrics_statement(None)),
        }

    def end_of_run(self, ctx: RunContext, *, summary):
        return self.privacy_result(ctx).to_dict()

    def privacy_result(self, ctx) -> PrivacyResult:
        ids = range(ctx.num_clients)
        new = None
        if ctx.new_clients:
            new = {"clients": list(ctx.new_clients), "releases": self.new_client_releases(ctx),
                   "noise_multiplier": [self.noise_multiplier] * len(ctx.new_clients),
                   "epsilon": [self.epsilon(c) for c in ctx.new_clients]}
        return PrivacyResult(unit="client", delta=self.delta, epsilon=[self.epsilon(c) for c in ids],
                             noise_multiplier=[self.noise_multiplier] * ctx.num_clients, statement=self.statement(),
                             new_clients=new)

    # Checkpoints from before the mechanism record load with an empty one.
    def state_dict(self):
        return {"noise_multiplier": self.noise_multiplier, "accountants": self.accountants.state_dict(),
                "mechanism_record": record_state(self.mechanism_record)}

    def client_state(self, client):
        return {"accountant": self.accountants.client_state(client),
                "mechanism_record": [e.to_dict() for e in self.mechanism_record.get(client, [])]}

    def merge_client_state(self, client, state):
        self.accountants.merge_client_state(client, state["accountant"])
        merge_record(self.mechanism_record, client, state.get("mechanism_record", []), **self.record_defaults())

    def load_state_dict(self, state):
        self.noise_multiplier = state["noise_multiplier"]
        self.accountants.load_state_dict(state["accountants"])
        self.mechanism_record = load_record(state.get("mechanism_record", {}), **self.record_defaults())

    def record_defaults(self) -> dict:
        return {"sensitivity": ADJACENCIES[self.adjacency]}
