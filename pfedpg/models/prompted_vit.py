"""Shallow visual prompt tuning (VPT, Jia et al. 2022) on a frozen timm ViT, as pFedPG uses it.

DESIGN §1: after patch and positional embedding the encoder input is ``[CLS, P, patches]``; the K
prompt tokens sit after the class (and any register) tokens, before the patch tokens, and get no
positional embedding. The backbone is frozen and stays in eval mode whatever ``train()`` says. The
classifier is a linear head on the final, normed CLS token.
"""
from __future__ import annotations

import torch
from torch import nn


class PromptTokens(nn.Module):
    """The K prompt tokens as their own leaf module.

    A separate module (rather than a bare parameter on the top module) lets a per-sample-gradient
    engine such as Opacus attach a cheap grad sampler to it: the per-sample gradient of the prompt is
    the slice of the output gradient at the prompt positions.
    """

    def __init__(self, num_prompts: int, dim: int, *, num_prefix_tokens: int = 1):
        super().__init__()
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.prompt = nn.Parameter(torch.zeros(num_prompts, dim))

    @property
    def num_prompts(self) -> int:
        return self.prompt.shape[0]

    def forward(self, tokens: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Insert the prompt; ``prompts`` (B × K × D) gives every sample its own prompt instead
        (clients trained in one batch, DESIGN §9)."""
        p = self.num_prefix_tokens
        if prompts is None:
            prompts = self.prompt.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return torch.cat([tokens[:, :p], prompts, tokens[:, p:]], dim=1)


class PromptedViT(nn.Module):
    """Frozen timm ``VisionTransformer`` + prompt tokens + local linear head."""

    def __init__(self, backbone: nn.Module, *, num_prompts: int, num_classes: int):
        super().__init__()
        for attr in ("patch_embed", "_pos_embed", "blocks", "norm", "num_prefix_tokens"):
            if not hasattr(backbone, attr):
                raise TypeError(
                    f"backbone {type(backbone).__name__} is not a timm VisionTransformer (no `{attr}`); "
                    "choose a timm ViT model name such as vit_tiny_patch16_224"
                )
        if getattr(backbone, "cls_token", None) is None:
            raise TypeError("the backbone has no class token; pFedPG's head reads the CLS token (class_token=True)")
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()
        dim = backbone.embed_dim
        self.prompt = PromptTokens(num_prompts, dim, num_prefix_tokens=backbone.num_prefix_tokens)
        self.head = nn.Linear(dim, num_classes)

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    def train(self, mode: bool = True) -> "PromptedViT":
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout, no batch statistics, whatever the caller asks
        return self

    def features(self, images: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed CLS token; ``prompts`` (B × K × D): a prompt per sample instead of the module's."""
        b = self.backbone
        x = b.patch_embed(images)
        x = b._pos_embed(x)  # CLS (+ registers) and positional embedding, as the backbone does
        x = self.prompt(x, prompts) if prompts is not None else self.prompt(x)  # no position for prompts
        x = b.patch_drop(x)
        x = b.norm_pre(x)
        x = b.blocks(x)
        x = b.norm(x)
        return x[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))
