"""Record-level membership inference scores (DESIGN §6). Members (a client's training records) are
the positive class; every score is "higher = more likely a member".

* ``loss_scores`` / ``confidence_scores`` — an observer who can query the client's final model
  (adapted prompt and head): members tend to have lower loss and higher confidence.
* ``alignment_scores`` — the honest-but-curious server, which sees P_n it sent and the released
  ΔP_n but not the head: cos(−ΔP_n, ∇_P ℓ(x)) with a proxy head fitted on auxiliary data. Local SGD
  makes −ΔP_n ≈ γ Σ_members ∇_P ℓ, so members' gradients align with it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pfedpg.client import load_into


@torch.no_grad()
def loss_scores(model, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    out = [F.cross_entropy(model(x[i:i + batch_size]), y[i:i + batch_size], reduction="none")
           for i in range(0, x.shape[0], batch_size)]
    return -torch.cat(out)


@torch.no_grad()
def confidence_scores(model, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Probability the model gives the record's true label."""
    model.eval()
    out = [F.softmax(model(x[i:i + batch_size]), dim=1).gather(1, y[i:i + batch_size, None])[:, 0]
           for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out)


def alignment_scores(model, *, prompt: torch.Tensor, delta: torch.Tensor, head_weight: torch.Tensor,
                     head_bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """cos(−ΔP, ∇_P ℓ(x_i)) per record, gradients taken at the prompt P the server sent."""
    load_into(model, prompt=prompt, head_weight=head_weight, head_bias=head_bias)
    model.eval()
    direction = (-delta).reshape(-1)
    scores = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        (g,) = torch.autograd.grad(loss, model.prompt.prompt)
        scores.append(F.cosine_similarity(g.reshape(-1), direction, dim=0))
    return torch.stack(scores).detach()
