"""The embedded default data set: scikit-learn's bundled digits with synthetic domain shifts (DESIGN §2, §8).

It needs no download (``sklearn.datasets.load_digits``: 1797 images, 8×8, grey levels 0..16) and is
small enough to pretrain, train, sweep and report on two CPU cores. Personalisation only matters if
clients differ, so each private record is rendered in one of several fixed visual *domains*
(:data:`EMBEDDED_SHIFTS`): a shared prompt cannot suit a white-on-black client and a dark-on-light one
at once, while a client-specific prompt can.

Steps, each with its own seeded stream (DESIGN §8):

1. keep ``cfg.classes`` if given;
2. reserve ``cfg.public_fraction`` of the digits, stratified by label (``"data.public"``), for
   backbone pretraining; each public record gets a random one of the configured domains (or of
   ``cfg.public_domains``), so by default the backbone sees every style the clients will use;
3. spread the remaining private records over the domains, stratified by label (``"data.domains"``),
   so every digit appears in every domain;
4. upscale 8×8 → ``image_size`` (bicubic) and render each record in its domain's style — or, with
   ``composite: overlay``, put its digit in its domain's colour channel and distractor digits of
   other records in the other two (:func:`render_overlay`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pfedpg.data.styles import EMBEDDED_SHIFTS, OVERLAY_DOMAINS, render_overlay
from pfedpg.seeding import Seeds

if TYPE_CHECKING:
    from pfedpg.data.base import ImageDataset
    from pfedpg.data.config import DataConfig

def _upscale_digits(x: np.ndarray, *, size: int) -> np.ndarray:
    """(n, 8, 8) grey levels 0..16 → (n, size, size) float in [0, 1], bicubic."""
    from pfedpg.data.base import resize_images

    u8 = np.round(x * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return resize_images(u8, size=size)[..., 0].astype(np.float64) / 255.0


def render_domains(gray: np.ndarray, domains: np.ndarray, names: list[str], *, rng: np.random.Generator) -> np.ndarray:
    """Render grey images (n, S, S) in [0, 1] in the style of their domain → (n, S, S, 3) uint8."""
    out = np.empty(gray.shape + (3,), dtype=np.uint8)
    for d, name in enumerate(names):
        sel = np.flatnonzero(domains == d)
        if sel.size:
            rgb = EMBEDDED_SHIFTS[name](gray[sel], rng)
            out[sel] = np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out


def load_embedded(cfg: "DataConfig", *, seed: int) -> "ImageDataset":
    """Build the embedded digits data set described in the module docstring."""
    from sklearn.datasets import load_digits

    from pfedpg.data.base import ImageDataset
    from pfedpg.data.partition import stratified_deal, stratified_public_mask

    digits = load_digits()
    images8 = np.asarray(digits.images, dtype=np.float64)
    labels = np.asarray(digits.target, dtype=np.int64)
    class_names = [str(c) for c in range(10)]
    if cfg.classes is not None:
        keep_ids = [class_names.index(c) for c in class_names if c in cfg.classes]
        keep = np.isin(labels, keep_ids)
        images8, labels = images8[keep], np.searchsorted(keep_ids, labels[keep]).astype(np.int64)
        class_names = [class_names[i] for i in keep_ids]

    if cfg.composite == "overlay":
        domain_names = list(OVERLAY_DOMAINS[: cfg.num_domains])
    elif cfg.domains:
        domain_names = [name for name in EMBEDDED_SHIFTS if name in cfg.domains]
    else:
        domain_names = list(EMBEDDED_SHIFTS)[: cfg.num_domains]
    seeds = Seeds(seed)
    n = labels.size
    rng_public = seeds.numpy("data.public")
    # Stratified by label only: domains are not assigned yet (public records get theirs below).
    public = stratified_public_mask(
        labels, np.zeros(n, dtype=np.int64), np.ones(n, dtype=bool), fraction=cfg.public_fraction, rng=rng_public
    )
    domains = np.empty(n, dtype=np.int64)
    public_styles = [domain_names.index(d) for d in (cfg.public_domains or domain_names)]
    domains[public] = np.asarray(public_styles)[rng_public.integers(0, len(public_styles), size=int(public.sum()))]
    private = np.flatnonzero(~public)
    private_styles = [domain_names.index(d) for d in (cfg.private_domains or domain_names)]
    domains[private] = np.asarray(private_styles)[
        stratified_deal(labels[private], n_groups=len(private_styles), rng=seeds.numpy("data.domains"))]

    gray = _upscale_digits(images8, size=cfg.image_size)
    if cfg.composite == "overlay":
        images = render_overlay(gray, domains, channels=len(domain_names), rng=seeds.numpy("data.embedded.overlay"))
    else:
        images = render_domains(gray, domains, domain_names, rng=seeds.numpy("data.embedded.noise"))
    return ImageDataset(
        images=images,
        labels=labels,
        domains=domains,
        class_names=class_names,
        domain_names=domain_names,
        split=None,
        public=public,
    )
