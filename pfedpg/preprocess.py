"""uint8 NHWC images -> normalised float NCHW tensors (done once per client, kept in memory)."""
from __future__ import annotations

import numpy as np
import torch


def images_to_tensor(images: np.ndarray, *, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s
