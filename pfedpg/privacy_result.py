"""The privacy level's one source of truth (DESIGN §5): what a DP mechanism did, release by release
(:class:`Release`), what it is (:class:`PrivacyMechanism`, the face every reader uses: accountants,
audits, sweeps and reports, with no attribute probing and no parsing of prose), and what it reports
at the end of a run, in one shape for every mechanism (:class:`PrivacyResult`)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Protocol, runtime_checkable

UNITS = ("client", "record")
ADJACENCIES = ("replace", "add_remove")


@dataclass(frozen=True)
class Release:
    """One entry of a mechanism's record, taken where the mechanism acts: ``steps`` compositions at
    round ``round`` of a Gaussian mechanism with noise std ``noise_multiplier``·``clip`` on a sum whose
    sensitivity is ``sensitivity``·``clip`` (2 under client ``replace``, 1 under ``add_remove``),
    each at sample rate ``sample_rate`` (1: full participation). ``accounting_multiplier`` is the
    noise per unit sensitivity that the accountant composes, as the mechanism computed it; it must
    equal noise_multiplier / sensitivity (:meth:`check`), so a wrong conversion fails at the first
    release instead of reporting an ε consistent with itself and wrong for the mechanism."""

    round: int
    noise_multiplier: float
    clip: float
    sensitivity: float
    adjacency: str
    accounting_multiplier: float
    sample_rate: float = 1.0
    steps: int = 1

    def check(self) -> Release:
        if self.adjacency not in ADJACENCIES:
            raise ValueError(f"Release.adjacency={self.adjacency!r} must be one of {', '.join(ADJACENCIES)}")
        want = self.noise_multiplier / self.sensitivity
        if not math.isclose(self.accounting_multiplier, want, rel_tol=1e-9, abs_tol=1e-300):
            raise ValueError(f"round {self.round}: accounting multiplier {self.accounting_multiplier!r} is not z / "
                             f"sensitivity = {self.noise_multiplier!r} / {self.sensitivity!r}; the mechanism converts "
                             "its noise to the accountant's unit wrongly")
        if not (0 < self.sample_rate <= 1 and self.steps >= 0):
            raise ValueError(f"round {self.round}: sample_rate {self.sample_rate} must be in (0, 1], steps >= 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Release:
        return cls(**d)


def gdp_mu(releases: Iterable[Release]) -> float:
    """The μ of the μ-GDP composition of full-participation releases (Dong, Roth & Su 2022):
    √(Σ 1/a²) over their accounting multipliers a (∞ for a noise-free one); R equal releases give
    sensitivity·√R / z."""
    rel = list(releases)
    if any(r.sample_rate != 1.0 for r in rel):
        raise ValueError("gdp_mu covers full-participation releases only (sample rate 1)")
    if any(r.noise_multiplier == 0 for r in rel):
        return math.inf
    first = rel[0] if rel else None
    if first is not None and all((r.noise_multiplier, r.sensitivity) == (first.noise_multiplier, first.sensitivity)
                                 for r in rel):
        return first.sensitivity * math.sqrt(sum(r.steps for r in rel)) / first.noise_multiplier
    return math.sqrt(sum(r.steps / r.accounting_multiplier ** 2 for r in rel))


@runtime_checkable
class PrivacyMechanism(Protocol):
    """A DP mechanism in the run (a hook with ``privacy_mechanism = True``), as every reader sees it:
    its privacy ``unit`` (client | record), its ``adjacency`` (replace | add_remove), its clip C and
    δ, each client's release record, each client's ε, and its end-of-run :class:`PrivacyResult`."""

    name: str
    unit: str
    adjacency: str
    clip: float
    delta: float | None

    def releases(self, client: int) -> list[Release]: ...

    def epsilon(self, client: int) -> float: ...

    def statement(self) -> dict[str, Any]: ...

    def privacy_result(self, ctx: Any) -> PrivacyResult: ...


@dataclass(frozen=True)
class DPEnvelope:
    """What a run's DP guarantee says about a probe's question (DESIGN §6): the mechanism (``hook``),
    its unit, and (ε, δ) over the clients asked about — under add/remove client adjacency the group
    privacy of a replacement, (2ε, (1 + e^ε)δ), which ``note`` says."""

    hook: str
    unit: str
    epsilon: float
    delta: float
    note: str | None = None

    @classmethod
    def of(cls, mech: PrivacyMechanism, clients: Iterable[int]) -> DPEnvelope:
        eps, delta, note = max(mech.epsilon(n) for n in clients), float(mech.delta), None
        if mech.unit == "client" and mech.adjacency == "add_remove":
            # A change inside a client's data is a replacement = two add/remove steps.
            eps, delta = 2 * eps, (1 + math.exp(min(eps, 700.0))) * delta
            note = "add/remove client adjacency: group privacy over 2 steps (2ε, (1+e^ε)δ)"
        return cls(mech.name, mech.unit, eps, delta, note)

    def covers(self, probe_side: str, probe_unit: str) -> bool:
        """Whether it covers a probe's question: client-level DP what the server holds, record-level
        DP record questions; a placement question neither."""
        if not math.isfinite(self.epsilon) or probe_unit == "placement":
            return False
        return probe_side == "server" if self.unit == "client" else probe_unit == "record"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mechanism_of(hooks: Iterable[Any]) -> PrivacyMechanism | None:
    """The run's DP mechanism (the hook that declares ``privacy_mechanism``), or None."""
    for h in hooks:
        if h.privacy_mechanism:
            if not isinstance(h, PrivacyMechanism):
                raise TypeError(f"hook {h.name!r} declares privacy_mechanism but lacks the PrivacyMechanism face "
                                "(unit, adjacency, clip, delta, releases, epsilon, statement, privacy_result)")
            return h
    return None


@dataclass
class PrivacyResult:
    """What every DP hook reports at the end of a run (its ``hook_results`` entry), in one shape for
    every mechanism: the unit of privacy (``client`` or ``record``), δ, and ε and the noise multiplier
    z per training client, in client order; ``new_clients`` (data.new_clients) the same for the
    clients that joined afterwards; ``statement`` the hook's privacy statement (DESIGN §5)."""

    unit: str
    delta: float
    epsilon: list[float]
    noise_multiplier: list[float]
    statement: dict[str, Any]
    new_clients: dict[str, Any] | None = None  # {clients, epsilon, noise_multiplier, and the hook's extras}

    def __post_init__(self):
        if self.unit not in ("client", "record"):
            raise ValueError(f"PrivacyResult.unit={self.unit!r} must be 'client' or 'record'")
        if len(self.epsilon) != len(self.noise_multiplier):
            raise ValueError("PrivacyResult: one ε and one z per client")

    @staticmethod
    def _spread(eps: list[float]) -> dict[str, Any]:
        return {"epsilon_max": max(eps), "epsilon_mean": sum(eps) / len(eps), "epsilon_per_client": eps}

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: the statement, ``unit``, ``noise_multiplier`` (one per client), ``epsilon_max``
        (over every client, new ones included), ``epsilon_mean`` and ``epsilon_per_client`` (the
        training clients)."""
        out = {**self.statement, "unit": self.unit, "noise_multiplier": list(self.noise_multiplier),
               **self._spread(list(self.epsilon))}
        if self.new_clients is not None:
            extra = {k: v for k, v in self.new_clients.items() if k != "epsilon"}
            out["new_clients"] = {**extra, **self._spread(list(self.new_clients["epsilon"]))}
            out["epsilon_max_training_clients"] = out["epsilon_max"]
            out["epsilon_max"] = max(out["epsilon_max"], out["new_clients"]["epsilon_max"])
        return out
