"""Records stay uint8; a batch becomes model input on the run's device (DESIGN §2, "Storage and
transforms").

A client's records are held as uint8 ``(N, 3, S, S)`` at their stored resolution S
(``data.storage_size``). :class:`InputPipeline` turns a drawn batch into what the model reads, on
the device of its buffers (the run's device):

1. move the uint8 batch to the device and widen it to float (pixel values 0..255);
2. training batches only, with a generator: augment (``data.augment``) —
   ``crop_flip``: reflect-pad by S/8 pixels, a random S×S crop and a horizontal flip with
   probability ½ (the CIFAR recipe); ``random_resized_crop``: torchvision's RandomResizedCrop
   (area 8–100 %, aspect 3/4–4/3, ten tries then the whole image) straight to the model's size,
   bilinear, and a horizontal flip with probability ½; ``none``: nothing;
3. resize to ``data.image_size`` when S differs (bicubic, antialiased, rounded to whole pixel
   values — what resizing the uint8 records once used to give, so the numbers do not change);
4. scale to [0, 1] and normalise with the model's mean and std.

A batch's peak is a few float batches on the device, never a float copy of a client. The
augmentation's random numbers are drawn on the CPU from the generator it is given (the run's
``augment`` stream, keyed by client and round): the same draws on every device, so augmented runs
reproduce. Float input is taken as model-ready (already normalised at the model's size) and only
moved to the device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

AUGMENTS = ("none", "crop_flip", "random_resized_crop")


class InputPipeline(nn.Module):
    """uint8 ``(B, 3, S, S)`` -> normalised float ``(B, 3, image_size, image_size)`` on the device
    of its buffers (move it with the model). No parameters; mean and std are non-persistent buffers."""

    def __init__(self, *, image_size: int, mean, std, augment: str = "none"):
        super().__init__()
        if augment not in AUGMENTS:
            raise ValueError(f"augment={augment!r} is not one of {', '.join(AUGMENTS)}")
        self.image_size, self.augment = int(image_size), augment
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``generator`` given: a training batch, augmented with it (when ``augment`` is not none)."""
        if images.is_floating_point():
            return images.to(self.device)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise TypeError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.device, non_blocking=True).float()
        if generator is not None and self.augment == "crop_flip":
            x = crop_flip(x, generator)
        elif generator is not None and self.augment == "random_resized_crop":
            x = random_resized_crop(x, self.image_size, generator)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = resize_pixels(x, self.image_size)
        return (x.div_(255.0) - self.mean) / self.std


def resize_pixels(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float pixel values (0..255) resized to size×size as uint8 images are: bicubic, antialiased,
    rounded and clamped to whole pixel values (``pfedpg.data.resize_images`` on a batch)."""
    y = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255)


def crop_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Reflect-pad by max(1, S/8), crop S×S at a random offset, flip half the batch horizontally."""
    return random_shift(x, generator, flip=True)


def random_shift(x: torch.Tensor, generator: torch.Generator, *, flip: bool = False) -> torch.Tensor:
    """Random translation by up to max(1, S/8) pixels (reflect padding), one offset per image, and
    with ``flip`` a horizontal flip of a random half. The offsets (then the flips) are drawn on the
    CPU from ``generator``; the gather runs on x's device (exact: pixels are only moved)."""
    b, _, h, w = x.shape
    pad = max(1, min(h, w) // 8)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = (torch.rand(b, generator=generator) < 0.5) if flip else torch.zeros(b, dtype=torch.bool)
    cols = torch.arange(w)
    cols = torch.where(flip.view(b, 1), (w - 1) - cols.view(1, w), cols.view(1, w)) + dx.view(b, 1)
    rows = dy.view(b, 1) + torch.arange(h).view(1, h)
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    bi = torch.arange(b, device=dev).view(b, 1, 1)
    out = padded.permute(0, 2, 3, 1)[bi, rows.to(dev).view(b, h, 1), cols.to(dev).view(b, 1, w)]
    return out.permute(0, 3, 1, 2)


def random_resized_crop(x: torch.Tensor, size: int, generator: torch.Generator, *, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3), tries: int = 10) -> torch.Tensor:
    """torchvision's RandomResizedCrop box sampling (``tries`` candidate boxes per image, the first
    that fits; none: the whole image), cropped and resized to size×size in one bilinear
    ``grid_sample``, with a horizontal flip of probability ½. A fixed number of draws per image,
    all on the CPU from ``generator``."""
    b, _, h, w = x.shape
    area = float(h * w)
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(b, tries, generator=generator, dtype=torch.float64))
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * \
        torch.rand(b, tries, generator=generator, dtype=torch.float64)
    aspect = torch.exp(log_r)
    cw = torch.sqrt(target * aspect).round()
    ch = torch.sqrt(target / aspect).round()
    fits = (cw >= 1) & (cw <= w) & (ch >= 1) & (ch <= h)
    first = torch.where(fits.any(1), fits.double().argmax(1), torch.full((b,), -1, dtype=torch.long))
    pick = first.clamp_min(0).view(b, 1)
    cw = torch.where(first >= 0, cw.gather(1, pick)[:, 0], torch.full((b,), float(w), dtype=torch.float64))
    ch = torch.where(first >= 0, ch.gather(1, pick)[:, 0], torch.full((b,), float(h), dtype=torch.float64))
    u_top, u_left = torch.rand(b, generator=generator, dtype=torch.float64), torch.rand(b, generator=generator,
                                                                                      dtype=torch.float64)
    top = torch.floor(u_top * (h - ch + 1))
    left = torch.floor(u_left * (w - cw + 1))
    flip = torch.rand(b, generator=generator) < 0.5
    # The box as an affine map of the output grid into x's normalised coordinates (align_corners=False).
    sx = torch.where(flip, -cw / w, cw / w)
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2] = sx, (2 * left + cw) / w - 1
    theta[:, 1, 1], theta[:, 1, 2] = ch / h, (2 * top + ch) / h - 1
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
