"""The client side shared by every method (DESIGN §1, Algorithm 1 step 2).

The client loads the prompt it was sent (or keeps its own, for ``local``), trains prompt and head
for E local epochs with SGD (paper: lr 0.25, weight decay 1e-3, batch 64; momentum 0.9 as in VPT),
and returns ΔP = P̃ − P. The head never leaves the client and persists across rounds; the SGD
momentum buffer is fresh each round.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pfedpg.errors import ConfigError
from pfedpg.jobs import LocalJob, LocalResult


@dataclass
class ClientConfig:
    lr: float = 0.25  # γ (paper: 0.25), for the prompt (and the head unless head_lr is set)
    # VPT-style prompts want a large step that destabilises a linear head; null = same as lr.
    head_lr: float | None = None
    momentum: float = 0.9  # not stated in the paper; VPT uses 0.9
    weight_decay: float = 1e-3  # paper: 1e-3
    batch_size: int = 64  # paper: 64
    local_epochs: int = 1  # E (paper: 5)
    # records per evaluation batch; null = batch_size, so that evaluation (forward only) never needs
    # more activation memory than a training step (a smaller batch_size lowers both)
    eval_batch_size: int | None = None

    def __post_init__(self):
        for key in ("lr", "weight_decay", "momentum"):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"client.{key}={v!r} must be a finite number >= 0")
        if self.lr == 0:
            raise ConfigError("client.lr=0 trains nothing; set a positive learning rate (paper: 0.25)")
        if self.head_lr is not None and not (isinstance(self.head_lr, (int, float)) and math.isfinite(self.head_lr)
                                             and self.head_lr >= 0):
            raise ConfigError(f"client.head_lr={self.head_lr!r} must be a finite number >= 0, or null (= client.lr)")
        if self.momentum >= 1:
            raise ConfigError(f"client.momentum={self.momentum} must be < 1")
        for key in ("batch_size", "local_epochs", "eval_batch_size"):
            v = getattr(self, key)
            if (v is not None or key != "eval_batch_size") and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"client.{key}={v!r} must be a positive integer"
                                  + (" (or null = client.batch_size)" if key == "eval_batch_size" else ""))

    @property
    def eval_batch(self) -> int:
        """Records per evaluation batch: ``eval_batch_size``, or ``batch_size`` where it is null."""
        return self.eval_batch_size if self.eval_batch_size is not None else self.batch_size


@dataclass
class ClientState:
    """Everything a client keeps between rounds: K×D prompt numbers and its head. The backbone is
    shared and frozen, so per-client memory does not grow with it."""

    prompt: torch.Tensor  # the client's current adapted prompt P̃_n (its own prompt for `local`)
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    rounds_joined: int = 0

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "head_weight": self.head_weight, "head_bias": self.head_bias,
                "rounds_joined": self.rounds_joined}

    def to(self, device: torch.device) -> "ClientState":
        return ClientState(self.prompt.to(device), self.head_weight.to(device), self.head_bias.to(device),
                           self.rounds_joined)

    @classmethod
    def from_dict(cls, d: dict) -> "ClientState":
        return cls(d["prompt"], d["head_weight"], d["head_bias"], int(d["rounds_joined"]))


@torch.no_grad()
def load_into(model, *, prompt: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor) -> None:
    model.prompt.prompt.copy_(prompt)
    model.head.weight.copy_(head_weight)
    model.head.bias.copy_(head_bias)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """Prompt and head — the prompt only while it requires grad (a new client's round 0 trains its
    head alone on the prompt it received, see :func:`frozen_prompt`)."""
    return [p for p in (model.prompt.prompt, model.head.weight, model.head.bias) if p.requires_grad]


class frozen_prompt:
    """``with frozen_prompt(model):`` local training (and any hook wrapping it) trains the head only."""

    def __init__(self, model):
        self.param = model.prompt.prompt

    def __enter__(self):
        self.param.requires_grad_(False)

    def __exit__(self, *exc):
        self.param.requires_grad_(True)


def make_optimizer(model, cfg: ClientConfig) -> torch.optim.SGD:
    """SGD on prompt (lr) and head (head_lr, default lr); fresh momentum every round."""
    head_lr = cfg.lr if cfg.head_lr is None else cfg.head_lr
    groups = [{"params": [model.prompt.prompt], "lr": cfg.lr}] if model.prompt.prompt.requires_grad else []
    groups.append({"params": [model.head.weight, model.head.bias], "lr": head_lr})
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def training_batch(model, data, idx: torch.Tensor,
                   augment: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Records ``idx`` of ``data`` as a training batch on the model's device: images through the
    model's input pipeline (augmented with the ``augment`` stream when the run augments), labels moved."""
    x = model.prepare(data.x[idx], augment)
    return x, data.y[idx].to(x.device, non_blocking=True)


def sgd_local_training(job: LocalJob, cfg: ClientConfig) -> LocalResult:
    """The plain local loop: E epochs of minibatch SGD on prompt and head."""
    model = job.model
    model.train()
    opt = make_optimizer(model, cfg)
    n = job.data.y.shape[0]
    total, steps = 0.0, 0
    for _ in range(cfg.local_epochs):
        order = torch.randperm(n, generator=job.generator)
        for i in range(0, n, cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            xb, yb = training_batch(model, job.data, idx, job.augment)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * idx.numel()
            steps += 1
    model.eval()
    return LocalResult(loss=total / max(1, n * cfg.local_epochs), steps=steps, samples=n * cfg.local_epochs)


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256) -> tuple[float, float]:
    """(top-1 accuracy, mean cross-entropy) of the model as loaded, on records ``x`` (uint8 at their
    stored size, or model-ready floats). A sample whose logits are not all finite counts as wrong
    (argmax would read NaN as the largest value and could guess right). The loss is the exactly
    rounded sum of the per-record losses (``math.fsum``), so the batch size does not change it."""
    model.eval()
    correct, losses = 0, []
    for i in range(0, x.shape[0], batch_size):
        logits = model(x[i:i + batch_size])
        yb = y[i:i + batch_size].to(logits.device, non_blocking=True)
        right = (logits.argmax(1) == yb) & torch.isfinite(logits).all(1)
        correct += int(right.sum())
        losses.append(F.cross_entropy(logits.float(), yb, reduction="none").double().cpu())
    n = max(1, x.shape[0])
    return correct / n, math.fsum(torch.cat(losses).tolist()) / n if losses else 0.0
