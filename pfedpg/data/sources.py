"""Data sources, registered by name, and :func:`load_dataset` (DESIGN §2).

A loader turns ``(cfg, seed)`` into a raw :class:`ImageDataset`; :func:`load_dataset` looks it up in
:data:`SOURCES` and then applies the steps every source shares, in this order:

1. keep only ``cfg.classes`` / ``cfg.domains`` if given (labels and domain ids are renumbered in the
   source's own order; an unknown name is a ConfigError listing the available ones);
2. centre-crop to square and resize to the storage size (bicubic, antialiased): ``cfg.storage_size``,
   else the source's own size capped at max(256, ``cfg.image_size``). Records stay uint8 at that
   size; the model's input pipeline resizes each batch to ``cfg.image_size`` on the run's device
   (:mod:`pfedpg.data.pipeline`);
3. for every source but ``embedded`` (which reserves its public digits itself, before the domain
   shifts), carve ``cfg.public_fraction`` of the *train* records (``split == 0``, or all records when
   the source has no split) as the public pretraining split, stratified over (domain, class) cells,
   stream ``Seeds(seed).numpy("data.public")``; 0 disables it;
4. validate shapes, dtypes and ranges.

Layouts read:

* ``npz`` — keys ``images`` (N, H, W, 3) uint8, ``labels``, ``domains``, ``class_names``,
  ``domain_names``, optional ``split`` (0 train / 1 test); loaded with ``allow_pickle=False``. The
  format of ``../shared/data`` (its ``paths`` / ``split_names`` keys are ignored).
* ``folder`` — ``root/<domain>/<class>/*.{jpg,jpeg,png,bmp}`` (Office-Caltech10, PACS, DomainNet).
  If the folders under ``root`` hold images directly, the layout is read as a single domain
  ``root/<class>/*`` named after ``root``. Class names are the sorted union over domains.
* ``cifar10`` / ``cifar100`` — the official python-pickle directories (``cifar-10-batches-py``:
  ``data_batch_*``, ``test_batch``, ``batches.meta``; ``cifar-100-python``: ``train``, ``test``,
  ``meta``). ``path`` may also be their parent. Whatever ``data_batch_*`` files exist are read.
  Sets ``split`` from train/test; one domain named after the source.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pfedpg.data.base import ImageDataset, resize_images
from pfedpg.data.config import DataConfig
from pfedpg.data.embedded import load_embedded
from pfedpg.data.partition import stratified_public_mask
from pfedpg.errors import ConfigError, DataError
from pfedpg.seeding import Seeds

Loader = Callable[..., ImageDataset]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def _require(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data file {p} not found; set data.path to {what}")
    return p


# --------------------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------------------


def load_npz(cfg: DataConfig, *, seed: int) -> ImageDataset:
    """Read an ``.npz`` file in the project's format (see the module docstring)."""
    path = _require(cfg.path, "an existing .npz file with images, labels, domains, class_names, domain_names")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, pickle.UnpicklingError) as exc:
        raise DataError(
            f"data file {path} is not a readable .npz archive ({exc}); re-create it with numpy.savez"
        ) from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"data file {path} holds a single array, not an .npz archive of named arrays")
    with archive:

        def get(key: str, required: bool = True) -> np.ndarray | None:
            if key not in archive.files:
                if required:
                    raise DataError(f"data file {path} has no key {key!r} (it has {', '.join(archive.files)})")
                return None
            try:
                return archive[key]
            except ValueError as exc:  # object arrays need pickle, which we refuse
                raise DataError(
                    f"data file {path}: key {key!r} cannot be read without pickle ({exc}); store it as a str/int array"
                ) from exc
            except Exception as exc:  # corrupt member (CRC / truncated)
                raise DataError(f"data file {path}: key {key!r} is corrupt ({exc})") from exc

        images, labels, domains = get("images"), get("labels"), get("domains")
        class_names, domain_names, split = get("class_names"), get("domain_names"), get("split", required=False)

    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(f"data file {path}: key 'images' must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
    n = images.shape[0]
    for key, arr in (("labels", labels), ("domains", domains), ("split", split)):
        if arr is not None and (arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer)):
            raise DataError(
                f"data file {path}: key {key!r} must be an integer array of shape ({n},), got {arr.shape} {arr.dtype}"
            )
    for key, arr in (("class_names", class_names), ("domain_names", domain_names)):
        if arr.ndim != 1 or arr.size == 0:
            raise DataError(
                f"data file {path}: key {key!r} must be a non-empty 1-D array of names, got shape {arr.shape}"
            )
    return ImageDataset(
        images=images,
        labels=labels.astype(np.int64),
        domains=domains.astype(np.int64),
        class_names=[str(c) for c in class_names],
        domain_names=[str(d) for d in domain_names],
        split=None if split is None else split.astype(np.int64),
    )


# --------------------------------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------------------------------


def _subdirs(p: Path) -> list[Path]:
    return sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_files(p: Path) -> list[Path]:
    return sorted(
        f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".")
    )


def _check_subset(field: str, wanted: list[str] | None, available: list[str]) -> list[str]:
    if wanted is None:
        return available
    unknown = [w for w in wanted if w not in available]
    if unknown:
        raise ConfigError(f"data.{field}: {unknown} not in this source; available: {', '.join(available)}")
    return [a for a in available if a in wanted]


def _read_image(f: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(f) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s))
            if s != size:
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read image {f} ({exc}); remove or replace the file") from exc


def storage_size(cfg: DataConfig, native: int) -> int:
    """The square size records are held at: ``data.storage_size``, else the source's own size
    capped at max(256, ``data.image_size``) (never below the model's input unless the source is)."""
    if cfg.storage_size is not None:
        return int(cfg.storage_size)
    return int(min(native, max(256, cfg.image_size)))


def _folder_storage_size(cfg: DataConfig, files: list[Path]) -> int:
    """An image folder's storage size: ``data.storage_size``, else the largest centre square among
    the files (read from their headers only) capped as :func:`storage_size` says."""
    if cfg.storage_size is not None:
        return int(cfg.storage_size)
    from PIL import Image, UnidentifiedImageError

    largest = 1
    for f in files:
        try:
            with Image.open(f) as im:  # lazy: the header alone, no decoding
                largest = max(largest, min(im.size))
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"cannot read image {f} ({exc}); remove or replace the file") from exc
    return storage_size(cfg, largest)


def load_folder(cfg: DataConfig, *, seed: int) -> ImageDataset:
    """Read ``root/<domain>/<class>/*`` (or single-domain ``root/<class>/*``), filtering by name before reading."""
    root = _require(cfg.path, "a directory laid out as root/<domain>/<class>/*.jpg")
    if not root.is_dir():
        raise DataError(f"data.path {root} is not a directory; the folder source needs root/<domain>/<class>/*.jpg")
    top = _subdirs(root)
    # Single-domain layout: the first level already holds image files.
    single = any(_image_files(d) for d in top)
    domain_dirs = {root.name: root} if single else {d.name: d for d in top}
    class_dirs: dict[str, dict[str, Path]] = {dom: {c.name: c for c in _subdirs(p)} for dom, p in domain_dirs.items()}

    domain_names = _check_subset("domains", cfg.domains, sorted(domain_dirs))
    class_names = _check_subset("classes", cfg.classes, sorted({c for cs in class_dirs.values() for c in cs}))
    files, labels, domains = [], [], []
    for d, dom in enumerate(domain_names):
        for c, cls in enumerate(class_names):
            if cls in class_dirs[dom]:
                found = _image_files(class_dirs[dom][cls])
                files += found
                labels += [c] * len(found)
                domains += [d] * len(found)
    if not files:
        raise DataError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}; "
            "expected root/<domain>/<class>/*.jpg or root/<class>/*.jpg"
        )
    # A class folder that holds no image anywhere would become a class nobody can learn.
    empty = [cls for c, cls in enumerate(class_names) if c not in set(labels)]
    if empty:
        where = [str(class_dirs[dom][empty[0]]) for dom in domain_names if empty[0] in class_dirs[dom]]
        raise DataError(f"class folder {where[0] if where else empty[0]!r} holds no images "
                        f"({', '.join(IMAGE_EXTENSIONS)}); add images, remove the folder, or list the classes to "
                        "keep in data.classes")
    size = _folder_storage_size(cfg, files)
    images = np.empty((len(files), size, size, 3), dtype=np.uint8)  # filled in place: no list of copies
    for i, f in enumerate(files):
        images[i] = _read_image(f, size)
    return ImageDataset(
        images=images,
        labels=np.asarray(labels, dtype=np.int64),
        domains=np.asarray(domains, dtype=np.int64),
        class_names=class_names,
        domain_names=domain_names,
    )


# --------------------------------------------------------------------------------------------------
# CIFAR python pickles
# --------------------------------------------------------------------------------------------------

_CIFAR = {
    # source: (directory name, train files pattern, test file, meta file, label key, names key)
    "cifar10": ("cifar-10-batches-py", r"data_batch_\d+", "test_batch", "batches.meta", b"labels", b"label_names"),
    "cifar100": ("cifar-100-python", r"train", "test", "meta", b"fine_labels", b"fine_label_names"),
}


def _unpickle(f: Path) -> dict:
    # The CIFAR python release is a set of pickles; pickle can execute code, so this is only for the
    # trusted official dataset files named by the user's config, never for arbitrary input.
    try:
        with open(f, "rb") as fh:
            return pickle.load(fh, encoding="bytes")
    except Exception as exc:
        raise DataError(
            f"cannot read CIFAR pickle {f} ({exc}); re-download the python version of the data set"
        ) from exc


def _cifar_batch(f: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(f)
    if b"data" not in batch or label_key not in batch:
        raise DataError(f"CIFAR pickle {f} lacks b'data' or {label_key!r}; is data.source the right CIFAR variant?")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"CIFAR pickle {f}: b'data' must be (N, 3072) uint8, got {data.shape}")
    # Rows are channel-major (1024 R, 1024 G, 1024 B), each 32×32 row-major.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(batch[label_key], dtype=np.int64)


def load_cifar(cfg: DataConfig, *, seed: int) -> ImageDataset:
    """Read the CIFAR-10 / CIFAR-100 python pickles (train → split 0, test → split 1)."""
    dirname, train_pat, test_name, meta_name, label_key, names_key = _CIFAR[cfg.source]
    root = _require(cfg.path, f"the {dirname} directory of the official python release")
    if (root / dirname).is_dir():
        root = root / dirname
    train_files = sorted(
        (f for f in root.iterdir() if re.fullmatch(train_pat, f.name)),
        key=lambda f: int(re.sub(r"\D", "", f.name) or 0),
    ) if root.is_dir() else []
    missing = [n for n in (test_name, meta_name) if not (root / n).is_file()]
    if not train_files or missing:
        need = (["no training batch"] if not train_files else []) + missing
        raise DataError(f"data file(s) {', '.join(need)} not found in {root}; set data.path to the {dirname} directory")
    parts = [_cifar_batch(f, label_key) for f in train_files] + [_cifar_batch(root / test_name, label_key)]
    meta = _unpickle(root / meta_name)
    if names_key not in meta:
        raise DataError(f"CIFAR meta file {root / meta_name} lacks {names_key!r}")
    class_names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    n_train = sum(p[1].size for p in parts[:-1])
    labels = np.concatenate([p[1] for p in parts])
    return ImageDataset(
        images=np.concatenate([p[0] for p in parts]),
        labels=labels,
        domains=np.zeros(labels.size, dtype=np.int64),
        class_names=class_names,
        domain_names=[cfg.source],
        split=(np.arange(labels.size) >= n_train).astype(np.int64),
    )


# --------------------------------------------------------------------------------------------------
# Registry and the shared pipeline
# --------------------------------------------------------------------------------------------------

SOURCES: dict[str, Loader] = {
    "embedded": load_embedded,
    "npz": load_npz,
    "folder": load_folder,
    "cifar10": load_cifar,
    "cifar100": load_cifar,
}
"""Source name → loader(cfg, *, seed) returning a raw :class:`ImageDataset`."""


def _keep_names(ds: ImageDataset, cfg: DataConfig) -> ImageDataset:
    """Drop classes / domains not asked for, renumbering the rest in the source's order."""
    classes = _check_subset("classes", cfg.classes, ds.class_names)
    domains = _check_subset("domains", cfg.domains, ds.domain_names)
    if classes == ds.class_names and domains == ds.domain_names:
        return ds
    class_ids = np.array([ds.class_names.index(c) for c in classes])
    domain_ids = np.array([ds.domain_names.index(d) for d in domains])
    out = ds.subset(np.flatnonzero(np.isin(ds.labels, class_ids) & np.isin(ds.domains, domain_ids)))
    out.labels = np.searchsorted(class_ids, out.labels).astype(np.int64)
    out.domains = np.searchsorted(domain_ids, out.domains).astype(np.int64)
    out.class_names, out.domain_names = classes, domains
    return out


def load_dataset(cfg: DataConfig, *, seed: int) -> ImageDataset:
    """Load ``cfg.source`` and apply the shared steps listed in the module docstring."""
    if cfg.source not in SOURCES:
        raise ConfigError(f"data.source: got {cfg.source!r}; must be one of {', '.join(SOURCES)}")
    ds = SOURCES[cfg.source](cfg, seed=seed)
    if cfg.source != "embedded":
        ds.validate(square=False)  # catch out-of-range labels/domains before renumbering
        ds = _keep_names(ds, cfg)
        if len(ds) == 0:
            raise DataError(f"no records left after data.classes / data.domains filtering in {cfg.path}")
        size = storage_size(cfg, min(ds.images.shape[1:3]))
        ds.images = resize_images(ds.images, size=size)
        train = np.ones(len(ds), dtype=bool) if ds.split is None else ds.split == 0
        ds.public = stratified_public_mask(
            ds.labels, ds.domains, train, fraction=cfg.public_fraction, rng=Seeds(seed).numpy("data.public")
        )
        return ds.validate(image_size=size)
    return ds.validate(image_size=cfg.image_size)
