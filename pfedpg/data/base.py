"""In-memory containers shared by every data source and partitioner (DESIGN §2).

An :class:`ImageDataset` is the whole pool of records of one source, uint8 at one square storage
size (``data.storage_size``; the model's input size is reached per batch, :mod:`pfedpg.data.pipeline`);
a :class:`ClientSplit` is one client's view of it, as sorted index arrays.
Clients hold indices rather than copies so probes and audits can refer to the exact records a client
trained on (members) or held out (non-members), DESIGN §6.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pfedpg.errors import DataError


def _describe(arr: object) -> str:
    return f"shape {getattr(arr, 'shape', None)} dtype {getattr(arr, 'dtype', type(arr).__name__)}"


@dataclass
class ImageDataset:
    """All records of one source: uint8 RGB images of one square size, labels and domains.

    ``split`` (0 train / 1 test) is set when the source ships its own test set; ``public`` marks the
    records reserved for backbone pretraining, which no client ever receives.
    """

    images: np.ndarray
    labels: np.ndarray
    domains: np.ndarray
    class_names: list[str]
    domain_names: list[str]
    split: np.ndarray | None = None
    public: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def validate(self, *, image_size: int | None = None, square: bool = True) -> "ImageDataset":
        """Raise :class:`DataError` on any shape, dtype or range mismatch; return ``self``.

        ``square=False`` accepts H != W (raw loader output, before the centre crop).
        """
        im = self.images
        if not isinstance(im, np.ndarray) or im.ndim != 4 or im.shape[-1] != 3 or im.dtype != np.uint8:
            raise DataError(f"images must be a (N, H, W, 3) uint8 array, got {_describe(im)}")
        n, h, w, _ = im.shape
        if square and h != w:
            raise DataError(f"images must be square, got {h}×{w}")
        if image_size is not None and h != image_size:
            raise DataError(f"images are {h}×{w} but their storage size is {image_size}")
        for name in ("labels", "domains"):
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.shape != (n,) or arr.dtype != np.int64:
                raise DataError(f"{name} must be an int64 array of shape ({n},), got {_describe(arr)}")
        if not self.class_names or not self.domain_names:
            raise DataError("class_names and domain_names must be non-empty")
        if len(set(self.class_names)) != len(self.class_names):
            raise DataError(f"class_names repeat a name: {self.class_names}")
        if len(set(self.domain_names)) != len(self.domain_names):
            raise DataError(f"domain_names repeat a name: {self.domain_names}")
        checks = (("labels", self.labels, self.class_names), ("domains", self.domains, self.domain_names))
        for name, arr, names in checks:
            if n and (arr.min() < 0 or arr.max() >= len(names)):
                raise DataError(
                    f"{name} must lie in 0..{len(names) - 1} (one id per name), got {arr.min()}..{arr.max()}"
                )
        if self.split is not None:
            s = self.split
            if not isinstance(s, np.ndarray) or s.shape != (n,) or s.dtype != np.int64:
                raise DataError(f"split must be an int64 array of shape ({n},), got {_describe(s)}")
            if n and not np.isin(s, (0, 1)).all():
                raise DataError("split must contain only 0 (train) and 1 (test)")
        if self.public is not None:
            p = self.public
            if not isinstance(p, np.ndarray) or p.shape != (n,) or p.dtype != np.bool_:
                raise DataError(f"public must be a bool array of shape ({n},), got {_describe(p)}")
        return self

    def subset(self, indices: np.ndarray) -> "ImageDataset":
        """A new dataset holding only ``indices`` (names unchanged)."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageDataset(
            images=self.images[idx],
            labels=self.labels[idx],
            domains=self.domains[idx],
            class_names=list(self.class_names),
            domain_names=list(self.domain_names),
            split=None if self.split is None else self.split[idx],
            public=None if self.public is None else self.public[idx],
        )


@dataclass
class ClientSplit:
    """One client's records: sorted int64 indices into the :class:`ImageDataset`.

    ``domain`` is the client's domain under the ``domain`` partition, otherwise the most common
    domain among its training records (ties go to the lower id).
    """

    client: int
    train: np.ndarray
    test: np.ndarray
    val: np.ndarray
    domain: int | None

    def __len__(self) -> int:
        return int(self.train.size + self.test.size + self.val.size)


def public_indices(ds: ImageDataset) -> np.ndarray:
    """Indices of the records reserved for backbone pretraining (an empty int64 array if none)."""
    if ds.public is None:
        return np.empty(0, dtype=np.int64)
    return np.flatnonzero(ds.public).astype(np.int64)


def private_mask(ds: ImageDataset) -> np.ndarray:
    """Records that may be given to clients (everything not public)."""
    if ds.public is None:
        return np.ones(len(ds), dtype=bool)
    return ~ds.public


def center_crop_square(images: np.ndarray) -> np.ndarray:
    """Crop (N, H, W, ...) images to their central min(H, W) square (the data README's pre-processing)."""
    h, w = images.shape[1:3]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return images[:, top : top + s, left : left + s]


def resize_images(images: np.ndarray, *, size: int, chunk: int = 2048) -> np.ndarray:
    """Centre-crop to square and resize (N, H, W, C) uint8 images to size×size, bicubic.

    Uses torch's antialiased bicubic interpolation (close to PIL's bicubic when shrinking), in
    chunks so a 60k-image CIFAR resize does not hold a float copy of the whole set.
    """
    import torch
    import torch.nn.functional as F

    images = center_crop_square(images)
    if images.shape[1] == size:
        return np.ascontiguousarray(images)
    out = np.empty((images.shape[0], size, size, images.shape[3]), dtype=np.uint8)
    for start in range(0, images.shape[0], chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + chunk])).permute(0, 3, 1, 2).float()
        y = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out[start : start + chunk] = y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out
