"""LiRA, the likelihood-ratio membership attack (Carlini et al. 2022), on prompted ViTs (DESIGN §6).

Threat model: an observer who can query a client's final model (adapted prompt P̃_n and head H_n)
and owns auxiliary data from the same population. The attacker trains *shadow* prompt-and-head
models on its auxiliary data with the client's training recipe, and compares the target model's
logit-scaled confidence φ(x) = log p_y − log(1 − p_y) on a record with the distribution of φ(x)
under shadows that did not (OUT) or did (IN) train on x.

* offline (the CPU default): shadows never see the targets; score = (φ − μ_out(x)) / σ_out.
* online: each target record is in a random half of the shadows; score =
  log N(φ; μ_in(x), σ_in) − log N(φ; μ_out(x), σ_out).

With few shadows (~8) a fixed (global) variance is more stable than a per-record one and is the
default. Higher scores mean "member", as for every probe here.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from attacks.membership import batches
from pfedpg.client import load_into, sgd_local_training
from pfedpg.jobs import ClientData, LocalJob


@torch.no_grad()
def logit_confidence(model, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """φ = log p_y − log Σ_{j≠y} p_j, computed stably from the logits."""
    model.eval()
    out = []
    for z, yy in batches(model, x, y, batch_size):
        zy = z.gather(1, yy[:, None])[:, 0]
        others = z.scatter(1, yy[:, None], float("-inf"))
        out.append(zy - torch.logsumexp(others, dim=1))
    return torch.cat(out)


def train_shadow(model, x: torch.Tensor, y: torch.Tensor, *, init_prompt: torch.Tensor, num_classes: int,
                 client_cfg, epochs: int, generator: torch.Generator,
                 augment: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A shadow prompt + head trained like a client (same optimiser, lrs and, with ``augment``, the
    same data augmentation) for ``epochs`` epochs."""
    head_w = torch.zeros(num_classes, init_prompt.shape[1], device=init_prompt.device)
    head_b = torch.zeros(num_classes, device=init_prompt.device)
    load_into(model, prompt=init_prompt, head_weight=head_w, head_bias=head_b)
    job = LocalJob(client=-1, round=0, model=model, data=ClientData(x, y), generator=generator,
                   run_default=None, augment=augment)
    sgd_local_training(job, dataclasses.replace(client_cfg, local_epochs=epochs))
    return {"prompt": model.prompt.prompt.detach().clone(), "head_weight": model.head.weight.detach().clone(),
            "head_bias": model.head.bias.detach().clone()}


def lira_scores(target_phi: np.ndarray, shadow_phi: np.ndarray, in_mask: np.ndarray | None = None, *,
                fixed_variance: bool = True) -> np.ndarray:
    """``shadow_phi``: S × n (φ of each target under each shadow); ``in_mask``: S × n, True where the
    shadow trained on the record (None = offline, no shadow did)."""
    t = np.asarray(target_phi, dtype=float)
    s = np.asarray(shadow_phi, dtype=float)
    out_mask = np.ones_like(s, dtype=bool) if in_mask is None else ~np.asarray(in_mask, dtype=bool)

    def stats(mask):
        cnt = mask.sum(0)
        if (cnt == 0).any():
            raise ValueError("a target record has no IN or no OUT shadow; use more shadows")
        mu = (s * mask).sum(0) / cnt
        resid = (s - mu) * mask
        if fixed_variance:
            sd = np.full_like(mu, np.sqrt((resid ** 2).sum() / max(1, mask.sum() - 1)))
        else:
            sd = np.sqrt((resid ** 2).sum(0) / np.maximum(1, cnt - 1))
        return mu, np.maximum(sd, 1e-6)

    mu_out, sd_out = stats(out_mask)
    if in_mask is None:
        return (t - mu_out) / sd_out
    mu_in, sd_in = stats(np.asarray(in_mask, dtype=bool))

    def logpdf(v, mu, sd):
        return -0.5 * ((v - mu) / sd) ** 2 - np.log(sd)

    return logpdf(t, mu_in, sd_in) - logpdf(t, mu_out, sd_out)


def run_lira(model, *, targets_x: torch.Tensor, targets_y: torch.Tensor, target_phi: np.ndarray,
             aux_x: torch.Tensor, aux_y: torch.Tensor, num_classes: int, client_cfg, shadows: int, epochs: int,
             online: bool, init_prompt: torch.Tensor, rng: np.random.Generator, seed_stream,
             augment_stream=lambda i: None) -> np.ndarray:
    """Train the shadows and return the LiRA score of every target record.

    ``seed_stream(i)`` gives shadow i's shuffling generator, ``augment_stream(i)`` its augmentation
    stream (None: none, as the target's recipe says). Offline: each shadow trains on a
    random half of the auxiliary data. Online: also on a random half of the target records, chosen
    so that every record is IN for half of the shadows (balanced per record)."""
    n_aux, n_t = aux_x.shape[0], targets_x.shape[0]
    phis, ins = [], []
    # Balanced IN assignment for online LiRA: each record in exactly half of the shadows.
    in_mask = np.zeros((shadows, n_t), dtype=bool)
    if online:
        if shadows < 2:
            raise ValueError("online LiRA needs at least 2 shadows")
        for j in range(n_t):
            in_mask[rng.permutation(shadows)[: shadows // 2], j] = True
    for i in range(shadows):
        aux_idx = torch.from_numpy(rng.permutation(n_aux)[: n_aux // 2])
        x, y = aux_x[aux_idx], aux_y[aux_idx]
        if online:
            sel = torch.from_numpy(np.flatnonzero(in_mask[i]))
            x, y = torch.cat([x, targets_x[sel]]), torch.cat([y, targets_y[sel]])
        state = train_shadow(model, x, y, init_prompt=init_prompt, num_classes=num_classes, client_cfg=client_cfg,
                             epochs=epochs, generator=seed_stream(i), augment=augment_stream(i))
        load_into(model, **state)
        phis.append(logit_confidence(model, targets_x, targets_y).cpu().numpy())
        ins.append(in_mask[i])
    return lira_scores(target_phi, np.stack(phis), np.stack(ins) if online else None)


__all__ = ["lira_scores", "logit_confidence", "run_lira", "train_shadow"]
