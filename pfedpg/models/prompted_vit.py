"""Visual prompt tuning (VPT, Jia et al. 2022) on a frozen timm ViT, as pFedPG uses it.

DESIGN §1: after patch and positional embedding the encoder input is ``[CLS, P, patches]``; the K
prompt tokens sit after the class (and any register) tokens, before the patch tokens, and get no
positional embedding. The backbone is frozen and stays in eval mode whatever ``train()`` says. The
classifier is a linear head on the final, normed CLS token.

``depth`` = 1 is shallow VPT (the paper's). ``depth`` = L > 1 is VPT-deep: one K×D prompt per layer;
the first is inserted before block 1 like the shallow prompt, and before each later block l < L the
K prompt positions are *overwritten* with layer l's prompt (VPT's own code). The prompt parameter
is always one (L·K)×D matrix, layer by layer, so everything downstream (server, DP, attacks) sees a
set of L·K tokens — pFedPG-deep generates all of them with one generator and one descriptor.

Input: uint8 records at their stored size go through the model's :class:`InputPipeline` (moved to
the model's device, resized, normalised; ``prepare`` with a generator also augments a training
batch); float input is taken as model-ready. With ``amp="bf16"`` on CUDA the frozen backbone runs
under bfloat16 autocast; the prompt tokens, the head and the features the head reads stay float32.
"""
from __future__ import annotations

import torch
from torch import nn

from pfedpg.models.device import autocast


class PromptTokens(nn.Module):
    """The prompt tokens as their own leaf module; its output is every sample's copy of them.

    A separate module (rather than a bare parameter on the top module) lets a per-sample-gradient
    engine such as Opacus attach a cheap grad sampler to it: each sample reads the prompt only
    through its own copy, so the gradient at the module's output (B × L·K × D) *is* the per-sample
    gradient of the prompt, for shallow and deep prompts alike.
    """

    def __init__(self, num_prompts: int, dim: int, *, depth: int = 1, num_prefix_tokens: int = 1):
        super().__init__()
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.depth = int(depth)
        self.prompt = nn.Parameter(torch.zeros(self.depth * num_prompts, dim))

    @property
    def num_prompts(self) -> int:
        """K, the prompt tokens per layer."""
        return self.prompt.shape[0] // self.depth

    @property
    def num_tokens(self) -> int:
        """L·K, all prompt numbers a client trains and sends are this many tokens of width D."""
        return self.prompt.shape[0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The prompt expanded to the batch of ``tokens``: B × L·K × D."""
        return self.prompt.unsqueeze(0).expand(tokens.shape[0], -1, -1)


class PromptedViT(nn.Module):
    """Frozen timm ``VisionTransformer`` + prompt tokens (shallow or deep) + local linear head."""

    def __init__(self, backbone: nn.Module, *, num_prompts: int, num_classes: int, deep: bool = False,
                 inputs: nn.Module | None = None, amp: str | None = None):
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
        depth = len(backbone.blocks) if deep else 1
        self.prompt = PromptTokens(num_prompts, dim, depth=depth, num_prefix_tokens=backbone.num_prefix_tokens)
        self.head = nn.Linear(dim, num_classes)
        self.inputs = inputs  # pfedpg.data.pipeline.InputPipeline: uint8 records -> model input
        self.amp = amp

    @property
    def device(self) -> torch.device:
        """Where the frozen backbone computes (the run's device)."""
        return self.backbone.cls_token.device

    def prepare(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Model-ready float images on the model's device: uint8 records through the input pipeline
        (augmented with ``generator`` when given), float ones only moved."""
        if images.is_floating_point():
            return images.to(self.device)
        if self.inputs is None:
            raise TypeError("this PromptedViT has no input pipeline for uint8 images; build it with "
                            "inputs=InputPipeline(...) or pass normalised float images")
        return self.inputs(images, generator)

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    @property
    def num_prompt_tokens(self) -> int:
        return self.prompt.num_tokens

    def train(self, mode: bool = True) -> "PromptedViT":
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout, no batch statistics, whatever the caller asks
        return self

    def features(self, images: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed CLS token; ``prompts`` (B × L·K × D): a prompt per sample instead of the
        module's (clients trained in one batch, DESIGN §9)."""
        b = self.backbone
        images = self.prepare(images)
        with autocast(images.device, self.amp):
            x = b.patch_embed(images)
            x = b._pos_embed(x)  # CLS (+ registers) and positional embedding, as the backbone does
            if prompts is None:
                prompts = self.prompt(x)
            p, k, depth = self.prompt.num_prefix_tokens, self.prompt.num_prompts, self.prompt.depth
            layers = prompts.reshape(prompts.shape[0], depth, k, prompts.shape[-1])
            x = torch.cat([x[:, :p], layers[:, 0].to(x.dtype), x[:, p:]], dim=1)  # no position for prompts
            x = b.patch_drop(x)
            x = b.norm_pre(x)
            if depth == 1:
                x = b.blocks(x)
            else:
                for i, block in enumerate(b.blocks):
                    if i > 0:  # VPT-deep: overwrite the prompt positions with this layer's prompt
                        x = torch.cat([x[:, :p], layers[:, i].to(x.dtype), x[:, p + k:]], dim=1)
                    x = block(x)
            x = b.norm(x)
        return x[:, 0].float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))
