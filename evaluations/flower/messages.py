"""What travels in a Flower message of this engine: tensors as ``ArrayRecord`` arrays, other
values as ``torch.save`` bytes (loaded with ``weights_only``), and the run settings the driver hands
both apps (see :mod:`evaluations.flower.trainer` for the message table)."""
from __future__ import annotations

import io
from typing import Any

import torch
from flwr.app import ArrayRecord

from pfedpg.config import RunConfig, config_from_dict
from pfedpg.errors import ConfigError


def pack(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def tensor_record(**tensors: torch.Tensor) -> ArrayRecord:
    """Tensors as a message's arrays (from the CPU: a message carries host bytes)."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def tensor_of(record: ArrayRecord, key: str) -> torch.Tensor:
    return record.to_torch_state_dict()[key]


def settings_from(values: dict[str, Any]) -> tuple[RunConfig, str, str | None]:
    """(config, run_dir, backbone_path) from the run settings the driver hands both apps."""
    import yaml

    for key in ("config-yaml", "run-dir"):
        if key not in values:
            raise ConfigError(f"the Flower run config lacks {key!r}; start Flower runs with "
                              "`pfedpg-eval train --set engine=flower` (it writes the app's config)")
    cfg = config_from_dict(yaml.safe_load(values["config-yaml"]))
    return cfg, str(values["run-dir"]), (str(values.get("backbone-path")) or None)
