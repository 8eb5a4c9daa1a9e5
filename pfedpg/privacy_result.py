"""What a DP hook reports at the end of a run, in one shape for every mechanism (DESIGN §5)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
