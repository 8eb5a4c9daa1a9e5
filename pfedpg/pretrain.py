"""Backbone pretraining on the data's public split (``pfedpg-eval pretrain``, DESIGN §3).

The paper uses an ImageNet-21k ViT-B/16; without a network the toolkit instead trains the whole
backbone, supervised, on a public split that no client ever holds (stratified over all classes),
and caches the result under a hash of everything that determines it. Federated runs then freeze it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pfedpg.data import load_dataset, public_indices
from pfedpg.errors import ConfigError, DataError
from pfedpg.models.device import configure, resolve_device
from pfedpg.seeding import Seeds

#: pretraining refuses fewer records than this per class (a backbone from a dozen images is noise)
MIN_RECORDS_PER_CLASS = 5
PUBLIC_SPLIT_FIELDS = ("source", "path", "image_size", "storage_size", "public_fraction", "num_domains", "domains",
                       "classes", "public_domains", "composite")


# Recipe fields added after backbones were cached: left out of the key at these values, so those
# cache entries stay valid. checkpoint_every never changes the weights (resume is bit for bit).
_KEY_DEFAULTS = {"augment": "shift", "warmup_epochs": 1, "init": None, "device": "cpu", "amp": False}


def file_digest(path: str | os.PathLike, what: str = "pretrain.data") -> str:
    """SHA-256 of a file; of a folder, of its files' relative paths and sizes (hashing 100,000
    images' bytes would take longer than it protects against)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{what}: {p} not found; set it to an existing file" +
                          (" (an .npz file or an image folder)" if what.startswith("pretrain.data") else ""))
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(f"{f.relative_to(p).as_posix()}\0{f.stat().st_size}\n".encode())
        return "dir:" + h.hexdigest()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# SHA-256 of each file hashed in this process, by (resolved path, size, mtime): a grid asks for the key of
# every cell, and a file is read once per process however often.
_SHA256: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


def data_digest(data) -> str:
    """SHA-256 of what ``data.path`` holds (a ``DataConfig``): a file's bytes; a folder's files (their
    paths relative to it and their bytes; for a CIFAR source the release's own folder when ``path``
    is its parent). The same wherever the file lies and however the path is written; another file at
    the same path gives another digest."""
    p = Path(data.path).expanduser()
    if not p.exists():
        where = "" if p.is_absolute() else f" (a relative data.path is read from the current directory, {os.getcwd()})"
        raise DataError(f"data file {p} not found{where}; set data.path to an existing file or folder")
    if p.is_file():
        return _sha256(p)
    from pfedpg.data.sources import _CIFAR

    release = p / _CIFAR[data.source][0] if data.source in _CIFAR else p
    root = release if release.is_dir() else p
    h = hashlib.sha256()
    for f in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(f"{f.relative_to(root).as_posix()}\0{_sha256(f)}\n".encode())
    return "dir:" + h.hexdigest()


def pretrain_key(cfg) -> str:
    """Hash of what determines the pretrained weights (not the federated settings)."""
    from dataclasses import asdict

    p = cfg.pretrain
    # The device's kind, not its name: cuda:0 and cuda:1 train the same weights; CPU and GPU differ
    # in the last digits, so their backbones are cached apart.
    recipe = {k: v for k, v in {**asdict(p), "device": pretrain_device(cfg).type}.items()
              if k not in ("cache_dir", "checkpoint_every", "data")
              and not (k in ("domain_prompts", "remix", "mixed_default") and not v)
              and not (k in _KEY_DEFAULTS and v == _KEY_DEFAULTS[k])}
    if p.init is not None:
        recipe["init"] = file_digest(p.init, "pretrain.init")
    if p.data.path is not None:
        # An external data set: its content and how it is split decide the records, the run's own
        # data only its image size.
        data = {"image_size": cfg.data.image_size, "external": file_digest(p.data.path),
                "val": file_digest(p.data.val_path, "pretrain.data.val_path") if p.data.val_path else None,
                "val_fraction": p.data.val_fraction, "max_records": p.data.max_records}
    else:
        # Only what decides the public records: partition settings (clients, alpha, caps, splits)
        # never touch them, so runs that differ only there share one pretrained backbone.
        # (public_domains only when set, so backbones cached before the key existed stay valid.)
        # (storage_size likewise: null keeps the keys of backbones cached before it existed.)
        data = {k: v for k, v in asdict(cfg.data).items()
                if k in PUBLIC_SPLIT_FIELDS and not (k in ("public_domains", "storage_size") and v is None)}
        if cfg.data.path is not None:
            # A data file by its content, not the text of its path: another npz at the same path must
            # not reuse a backbone pretrained on the old one's public split (whose records may now be
            # clients' members), and the same file by another path is the same backbone. (Entries
            # cached before this keyed the path's text: they are not found any more and retrain.)
            del data["path"]
            data["content_sha256"] = data_digest(cfg.data)
    payload = {
        "model": {"name": cfg.model.name, "kwargs": cfg.model.kwargs, "mean": cfg.model.mean, "std": cfg.model.std},
        "data": data,
        "pretrain": recipe,
        "seed": cfg.seed,
        "version": 2,
    }
    if p.domain_prompts:
        # revision 2: the domain-prompted head is seeded (revision 1 read torch's global generator)
        payload["prompts"] = {"num_prompts": cfg.model.num_prompts, "prompt_depth": cfg.model.prompt_depth,
                              "revision": 2}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def pretrain_device(cfg) -> torch.device:
    """``pretrain.device``, else the run's ``device``, resolved on this machine."""
    spec = cfg.pretrain.device or cfg.device
    return resolve_device(spec, where="pretrain.device" if cfg.pretrain.device else "device")


def cached_path(cfg) -> Path:
    return Path(os.path.expanduser(cfg.pretrain.cache_dir)) / f"{cfg.model.name}-{pretrain_key(cfg)}.safetensors"


def _pretrain_records(cfg, dataset):
    """``(train ImageDataset, validation ImageDataset or None, where)`` for the pretraining."""
    from pfedpg.data import DataConfig
    from pfedpg.data.partition import stratified_choice

    d = cfg.pretrain.data
    if d.path is None:
        ds = dataset if dataset is not None else load_dataset(cfg.data, seed=cfg.seed)
        pub = public_indices(ds)
        if len(pub) == 0:
            raise ConfigError(
                "model.weights=pretrain needs a public split: set data.public_fraction > 0, pretrain on "
                "another data set with pretrain.data.path, or use model.weights=checkpoint with model.checkpoint=PATH"
            )
        return ds.subset(pub), None, "public split"

    def load(path: str):
        pth = Path(path).expanduser()
        if not pth.exists():
            raise ConfigError(f"pretrain.data: {pth} not found; set it to an .npz file or an image folder")
        return load_dataset(DataConfig(source="folder" if pth.is_dir() else "npz", path=str(pth),
                                       image_size=cfg.data.image_size, public_fraction=0.0), seed=cfg.seed)

    full = load(d.path)
    rng = Seeds(cfg.seed).numpy("pretrain.data")
    if d.val_path is not None:
        train_idx, val = np.arange(len(full.labels)), load(d.val_path)
        if val.class_names != full.class_names:
            raise ConfigError(f"pretrain.data.val_path {d.val_path} has other classes than {d.path}; "
                              "give both the same class folders / class_names")
    elif full.split is not None and (full.split == 1).any():
        if d.val_fraction:
            raise ConfigError(f"pretrain.data.val_fraction={d.val_fraction} is set but {d.path} has a split key, whose "
                              "test records are the validation set; drop val_fraction")
        train_idx, val = np.flatnonzero(full.split != 1), full.subset(np.flatnonzero(full.split == 1))
    elif d.val_fraction > 0:
        held = stratified_choice(full.labels, total=round(d.val_fraction * len(full.labels)), rng=rng)
        train_idx, val = np.setdiff1d(np.arange(len(full.labels)), held), full.subset(held)
    else:
        train_idx, val = np.arange(len(full.labels)), None
    if d.max_records is not None and d.max_records >= len(train_idx):
        raise ConfigError(f"pretrain.data.max_records={d.max_records} is not below the {len(train_idx)} "
                          f"training records of {d.path}; drop it (null uses them all)")
    if d.max_records is not None:
        train_idx = train_idx[stratified_choice(full.labels[train_idx], total=d.max_records, rng=rng)]
    return full.subset(train_idx), val, str(d.path)


def partial_path(cfg) -> Path:
    """Where an interrupted pretraining's state is kept (beside its cache entry)."""
    path = cached_path(cfg)
    return path.with_name(path.stem + ".partial.pt")


def log_path(cfg) -> Path:
    """The per-epoch log (one JSON object a line) of the pretraining of ``cfg``."""
    path = cached_path(cfg)
    return path.with_name(path.stem + ".log.jsonl")


def pretrain_backbone(cfg, *, dataset=None, log: Callable[[str], None] = print, force: bool = False,
                      progress: bool = False, stop_after: int | None = None) -> Path:
    """Train (or find in the cache) the backbone for ``cfg``; returns the ``.safetensors`` path.

    Every ``pretrain.checkpoint_every`` epochs the whole state (weights, optimiser, schedule, random
    generators, log) goes to :func:`partial_path`; a later call resumes there and ends with the same
    weights as an uninterrupted run. ``stop_after`` (tests, budgeted jobs) stops after that many
    epochs of this call, leaving the partial state, and returns the partial path."""
    from pfedpg.pretrain_loop import Pretraining

    path = cached_path(cfg)
    if path.is_file() and not force:
        return path
    device = pretrain_device(cfg)
    if cfg.pretrain.amp and device.type != "cuda":
        raise ConfigError(f"pretrain.amp (bfloat16 autocast) needs a CUDA device, and pretraining runs on {device}; "
                          "drop pretrain.amp or set pretrain.device: cuda")
    configure(device, deterministic=cfg.deterministic)
    ds, val, where = _pretrain_records(cfg, dataset)
    least = MIN_RECORDS_PER_CLASS * ds.num_classes
    if len(ds.labels) < least:
        raise ConfigError(f"pretraining on {len(ds.labels)} {where} records for {ds.num_classes} classes: fewer than "
                          f"{MIN_RECORDS_PER_CLASS} per class ({least}) cannot give a useful backbone; raise "
                          "data.public_fraction, pretrain on pretrain.data.path, or use model.weights: checkpoint")
    run = Pretraining(cfg, ds, val, device=device, log=log, key=pretrain_key(cfg), where=where)
    partial = partial_path(cfg)
    if partial.is_file() and not force:
        run.resume(partial)
    else:
        log(f"pretraining {cfg.model.name} on {len(ds.labels)} records ({where}) for {cfg.pretrain.epochs} epochs "
            f"-> {path}")
    if run.train(log_path(cfg), partial, progress=progress, stop_after=stop_after):
        run.save(path)
        partial.unlink(missing_ok=True)
        return path
    return partial
