"""Frozen ViT backbones: any timm ViT by name, with weights from timm's hub, a local checkpoint,
the toolkit's own pretraining (``pfedpg-eval pretrain``) or, when asked for explicitly, random.

DESIGN §3. Checkpoints load without executing code: ``.safetensors`` through safetensors, ``.pth``
through ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pfedpg.errors import ConfigError

WEIGHTS = ("pretrain", "pretrained", "checkpoint", "random")
PROMPT_DEPTHS = ("shallow", "deep")


@dataclass
class ModelConfig:
    """The frozen backbone and the prompt.

    ``weights``: ``pretrain`` (the toolkit pretrains the backbone on the data's public split and
    caches it by config hash), ``pretrained`` (timm's hub; needs a network), ``checkpoint`` (local
    file at ``checkpoint``), ``random`` (a random frozen backbone — it learns little; only on
    request).
    """

    name: str = "vit_tiny_patch16_224"  # any timm ViT
    weights: str = "pretrain"  # pretrain | pretrained | checkpoint | random (above)
    checkpoint: str | None = None  # weights: checkpoint: a local .safetensors or .pth (loaded without executing code)
    # Passed to timm.create_model; overrides the named architecture (e.g. a small input size).
    kwargs: dict[str, Any] = field(
        default_factory=lambda: {"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4,
                                 "mlp_ratio": 2.0}
    )
    num_prompts: int = 10  # K, prompt tokens per prompted layer (paper: 10)
    # shallow: K tokens before the first block (the paper's VPT). deep: K tokens per block, the
    # positions overwritten before every later block (VPT-deep, FedVPT-D); L·K tokens in all.
    prompt_depth: str = "shallow"
    # input normalisation per channel (the backbone's own; timm models document theirs)
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    def __post_init__(self):
        if self.weights not in WEIGHTS:
            raise ConfigError(f"model.weights={self.weights!r} is not one of {', '.join(WEIGHTS)}")
        if self.weights == "checkpoint" and not self.checkpoint:
            raise ConfigError("model.weights=checkpoint needs model.checkpoint=PATH (.safetensors or .pth)")
        if self.checkpoint and self.weights != "checkpoint":
            raise ConfigError(f"model.checkpoint is set but model.weights={self.weights!r}; "
                              "set model.weights=checkpoint")
        if not isinstance(self.num_prompts, int) or self.num_prompts < 1:
            raise ConfigError(f"model.num_prompts={self.num_prompts!r} must be a positive integer (paper: 10)")
        if self.prompt_depth not in PROMPT_DEPTHS:
            raise ConfigError(f"model.prompt_depth={self.prompt_depth!r} is not one of {', '.join(PROMPT_DEPTHS)}")
        for key in ("mean", "std"):
            v = getattr(self, key)
            if len(v) != 3 or (key == "std" and min(v) <= 0):
                raise ConfigError(f"model.{key}={v!r} must be three numbers (RGB){', all > 0' if key == 'std' else ''}")
        if "num_classes" in self.kwargs:
            raise ConfigError("model.kwargs.num_classes is set by the toolkit (the head is local); remove it")

    def image_size(self) -> int | None:
        s = self.kwargs.get("img_size")
        return int(s if isinstance(s, int) else s[0]) if s is not None else None


def _create(cfg: ModelConfig, *, pretrained: bool) -> nn.Module:
    import timm

    try:
        model = timm.create_model(cfg.name, pretrained=pretrained, num_classes=0, **cfg.kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"model.name={cfg.name!r} is not a timm model; see timm.list_models('vit_*')") from None
        raise
    except TypeError as e:
        raise ConfigError(f"model.kwargs not accepted by {cfg.name}: {e}") from None
    return model


def load_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or ``.pth`` state dict without executing code."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"checkpoint {str(p)!r} not found; set model.checkpoint to an existing "
                          ".safetensors or .pth file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file: say which and why, in one line
        raise ConfigError(f"cannot read checkpoint {str(p)!r} "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"checkpoint {str(p)!r} does not hold a flat state dict of tensors")
    return state


def build_backbone(cfg: ModelConfig, *, checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """Create the frozen backbone. ``checkpoint`` overrides the file for ``weights=pretrain``."""
    if cfg.weights == "pretrained":
        try:
            model = _create(cfg, pretrained=True)
        except ConfigError:
            raise
        except Exception as e:  # no network, HF_HUB_OFFLINE=1, no such weights: one line, and the way out
            first = (str(e).splitlines() or [type(e).__name__])[0][:160]
            offline = (" (HF_HUB_OFFLINE=1 is set: unset it to download)" if os.environ.get("HF_HUB_OFFLINE") == "1"
                       else "")
            raise ConfigError(f"cannot get {cfg.name}'s hub weights{offline}: {type(e).__name__}: {first}; "
                              "on a machine without a network use model.weights: checkpoint with "
                              "model.checkpoint: <local file>") from None
    else:
        model = _create(cfg, pretrained=False)
        path = cfg.checkpoint if cfg.weights == "checkpoint" else checkpoint
        if cfg.weights == "pretrain" and path is None:
            raise ValueError("weights=pretrain needs the pretrained file; use pfedpg.pretrain.ensure_backbone")
        if path is not None:
            state = load_state_file(path)
            # The pretraining head belongs to another task; the toolkit puts a local head on top.
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            try:
                missing, unexpected = model.load_state_dict(state, strict=False)
            except RuntimeError as e:  # shapes differ: name the first tensor and the fix
                first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln),
                             str(e).splitlines()[0])
                raise ConfigError(f"checkpoint {str(path)!r} does not fit {cfg.name} with kwargs {cfg.kwargs}: "
                                  f"{first[:200]}; set model.kwargs to the checkpoint's architecture") from None
            if missing or unexpected:
                raise ConfigError(
                    f"checkpoint {str(path)!r} does not match {cfg.name} with kwargs {cfg.kwargs}: "
                    f"missing {list(missing)[:4]}, unexpected {list(unexpected)[:4]}; "
                    "set model.kwargs to the checkpoint's architecture"
                )
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def backbone_num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def vpt_init_bound(backbone: nn.Module) -> float:
    """VPT's uniform prompt init bound v = sqrt(6 / (3 * patch_h * patch_w + D))."""
    ph, pw = backbone.patch_embed.patch_size
    return math.sqrt(6.0 / (3 * ph * pw + backbone.embed_dim))
