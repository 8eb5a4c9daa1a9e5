"""Independent random streams derived from one master seed (DESIGN §8).

Every stream is keyed by (component, client, round) through ``numpy.random.SeedSequence`` spawn
keys, so adding a hook or changing the number of rounds never shifts another component's
randomness, and a resumed run draws exactly the numbers an uninterrupted one would.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch

_NONE = 2**32 - 1  # spawn-key placeholder for "no client" / "no round"


def _component_key(component: str) -> int:
    return zlib.crc32(component.encode("utf-8"))


class Seeds:
    """Factory of reproducible generators: ``Seeds(0).numpy("partition")``."""

    def __init__(self, master: int):
        if not isinstance(master, (int, np.integer)) or master < 0:
            raise ValueError(f"seed must be a non-negative integer, got {master!r}")
        self.master = int(master)

    def sequence(self, component: str, client: int | None = None, round: int | None = None) -> np.random.SeedSequence:
        key = (
            _component_key(component),
            _NONE if client is None else int(client),
            _NONE if round is None else int(round),
        )
        return np.random.SeedSequence(self.master, spawn_key=key)

    def numpy(self, component: str, client: int | None = None, round: int | None = None) -> np.random.Generator:
        return np.random.default_rng(self.sequence(component, client, round))

    def torch(self, component: str, client: int | None = None, round: int | None = None) -> torch.Generator:
        state = self.sequence(component, client, round).generate_state(2, dtype=np.uint32)
        g = torch.Generator()
        g.manual_seed(int(state[0]) << 32 | int(state[1]))
        return g


def normal_like(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal numbers of ``like``'s shape and dtype, drawn on the CPU from ``generator`` (a
    keyed stream, or a secret one) and moved to ``like``'s device. Drawing on the CPU is exact and
    cheap for what is drawn this way (a prompt's or a head's numbers per release or step), and gives
    the same numbers on every device."""
    return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)
