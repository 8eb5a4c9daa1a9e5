"""What the client-side hook points pass along: a client's records, its local-training job and
the result. A leaf module (torch only), so that the client code and the hook interface both read
these types without importing each other."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class ClientData:
    """One client's training records for a round: ``x`` uint8 images (N, 3, S, S) at their stored
    size S on the host, ``y`` int64 labels. A hook that edits pixels edits these uint8 records (a
    trigger or a canary is part of the image); the model's input pipeline resizes, normalises and
    augments per batch on the run's device."""

    x: torch.Tensor
    y: torch.Tensor


@dataclass
class GradientCanaries:
    """White-box canaries for a record-level mechanism (DESIGN §6, "Audits that can fail"): records
    whose per-sample gradient the auditor sets. Each step the mechanism calls ``directions()`` for the
    inserted canaries' gradient directions of that step, (G, P) unit rows over the trainable
    parameters (``pfedpg.client.trainable_parameters(model)``, flattened and concatenated), samples
    each canary like a record at the records' own rate, with gradient ``scale`` × its direction
    (None: the mechanism's clip norm, which its clipping leaves alone), and hands ``observe`` the
    step's released (noised) gradient sum, flattened."""

    directions: Callable[[], torch.Tensor]
    scale: float | None
    observe: Callable[[torch.Tensor], None]


@dataclass
class LocalJob:
    """Everything local training needs; ``run_default()`` is the plain SGD loop of DESIGN §1.
    Train what ``pfedpg.client.trainable_parameters(model)`` lists: a new client's round 0 freezes
    the prompt and trains its head alone."""

    client: int
    round: int
    model: torch.nn.Module
    data: ClientData
    generator: torch.Generator  # the round's shuffling stream for this client
    run_default: Callable[["LocalJob"], "LocalResult"]
    #: the round's augmentation stream for this client (``data.augment``), None = no augmentation;
    #: pass it to ``pfedpg.client.training_batch`` / ``model.prepare``
    augment: torch.Generator | None = None
    #: set by an audit hook for a record-level mechanism to take (None = no canaries)
    gradient_canaries: GradientCanaries | None = None


@dataclass
class LocalResult:
    loss: float
    steps: int
    samples: int
    extra: dict[str, Any] = field(default_factory=dict)
