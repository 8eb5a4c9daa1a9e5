"""The visual styles of the embedded data set (numpy only, no loader): one shift per domain
(:data:`EMBEDDED_SHIFTS`) and the channel-overlay composite (:data:`OVERLAY_DOMAINS`,
:func:`render_overlay`). ``pfedpg.data.config`` validates domain names against them without
importing the loader, ``pfedpg.data.embedded`` renders with them."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

# A shift maps grey images in [0, 1], shape (n, S, S), to RGB in [0, 1], shape (n, S, S, 3).
# It also gets a generator, used only by the noisy style (noise keyed to the master seed, so the
# rendered data set is a pure function of (config, seed)).
Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]

# Fixed colours for the "tinted" style: amber digit on navy ground (far from both grey styles).
_TINT_FG = np.array([1.0, 0.8, 0.2])
_TINT_BG = np.array([0.1, 0.2, 0.55])


def _gray_to_rgb(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[..., None], 3, axis=-1)


def _plain(g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _gray_to_rgb(g)


def _inverted(g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _gray_to_rgb(1.0 - g)


def _tinted(g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    a = g[..., None]
    return _TINT_BG * (1.0 - a) + _TINT_FG * a


def _rotated(g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _gray_to_rgb(np.rot90(g, k=1, axes=(1, 2)))


def _noisy(g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Low contrast plus per-pixel, per-channel noise: the digit survives but the statistics move.
    low = 0.25 + 0.5 * _gray_to_rgb(g)
    return np.clip(low + rng.normal(0.0, 0.12, size=low.shape), 0.0, 1.0)


def _blurred(g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Thicken strokes (max filter) then soften them (box blur); radius scales with the image size.
    r = max(1, round(g.shape[1] / 16))
    padded = np.pad(g, ((0, 0), (r, r), (r, r)), mode="constant")
    s = g.shape[1]
    thick = np.max([padded[:, i : i + s, j : j + s] for i in range(2 * r + 1) for j in range(2 * r + 1)], axis=0)
    padded = np.pad(thick, ((0, 0), (1, 1), (1, 1)), mode="edge")
    blur = np.mean([padded[:, i : i + s, j : j + s] for i in range(3) for j in range(3)], axis=0)
    return _gray_to_rgb(blur)


OVERLAY_DOMAINS = ("red", "green", "blue")
"""Domains of ``composite: overlay``: the colour channel whose digit is the record's label."""


def render_overlay(gray: np.ndarray, domains: np.ndarray, *, channels: int, rng: np.random.Generator) -> np.ndarray:
    """(n, S, S) grey digits → (n, S, S, 3) uint8: record i's digit in channel ``domains[i]``, and in
    each other of the first ``channels`` channels the digit of another record drawn at random (a
    distractor); channels beyond those stay black."""
    n = gray.shape[0]
    out = np.zeros(gray.shape + (3,), dtype=np.float64)
    for c in range(channels):
        other = rng.integers(0, n - 1, size=n)
        other += other >= np.arange(n)  # never the record itself
        out[..., c] = np.where((domains == c)[:, None, None], gray, gray[other])
    return np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)


EMBEDDED_SHIFTS: dict[str, Shift] = {
    "plain": _plain,
    "inverted": _inverted,
    "tinted": _tinted,
    "rotated": _rotated,
    "noisy": _noisy,
    "blurred": _blurred,
}
"""Domain styles of the embedded data set, in domain-id order; ``num_domains: k`` uses the first k."""
