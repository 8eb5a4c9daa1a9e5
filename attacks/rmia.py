"""RMIA, the relative membership inference attack (Zarifzadeh, Liu, Mittal & Shokri, ICML 2024),
offline, on prompted ViTs (DESIGN §6). Threat model: the observer of LiRA — it queries a client's
final model (adapted prompt and head) and owns auxiliary data from the same population.

A record x is scored against a population Z of records that no model trained on:

    LR(x, z) = [Pr(x | θ) / Pr(x)] / [Pr(z | θ) / Pr(z)],     score(x) = mean_z 1[LR(x, z) > γ],

with Pr(· | θ) the target model's probability of the true label and Pr(·) its average over
reference models. Offline (no reference model trained on x), the average over OUT references is
corrected as the paper does: Pr(x) = ½[(1 + a) · mean_ref Pr(x | θ_ref) + (1 − a)]. The references
are prompt-and-head models trained like a client on random halves of the auxiliary records that are
not in Z. Higher scores mean "member".
"""
from __future__ import annotations

import numpy as np
import torch

from attacks.lira import train_shadow
from attacks.membership import batches
from pfedpg.client import load_into


@torch.no_grad()
def true_class_probability(model, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256) -> np.ndarray:
    model.eval()
    out = [torch.softmax(z, dim=1).gather(1, yy[:, None])[:, 0] for z, yy in batches(model, x, y, batch_size)]
    return torch.cat(out).cpu().numpy().astype(np.float64)


def rmia_scores(p_x: np.ndarray, ref_x: np.ndarray, p_z: np.ndarray, ref_z: np.ndarray, *, a: float = 0.3,
                gamma: float = 1.0) -> np.ndarray:
    """``p_x`` (n,), ``p_z`` (|Z|,): the target model's true-class probabilities; ``ref_x`` (R, n),
    ``ref_z`` (R, |Z|): the reference (OUT) models'. Returns the n scores in [0, 1]."""
    prior_x = 0.5 * ((1 + a) * np.asarray(ref_x).mean(0) + (1 - a))
    prior_z = 0.5 * ((1 + a) * np.asarray(ref_z).mean(0) + (1 - a))
    rx = np.asarray(p_x) / np.maximum(prior_x, 1e-30)
    rz = np.asarray(p_z) / np.maximum(prior_z, 1e-30)
    return (rx[:, None] > gamma * rz[None, :]).mean(1)


def train_references(model, *, aux_x: torch.Tensor, aux_y: torch.Tensor, references: int, epochs: int,
                     population: int, num_classes: int, client_cfg, init_prompt: torch.Tensor,
                     rng: np.random.Generator, seed_stream,
                     augment_stream=lambda i: None) -> tuple[list[dict], torch.Tensor]:
    """Split the auxiliary records into a population Z (``population`` of them, or a quarter if
    fewer) and a reference pool; train ``references`` models, each on a random half of the pool.
    Returns (the reference states, the indices of Z in aux)."""
    n = aux_x.shape[0]
    order = rng.permutation(n)
    k = min(population, n // 4)
    if k < 1 or n - k < 2:
        raise ValueError(f"RMIA needs auxiliary records for a population and references; got {n}")
    z_idx, pool = torch.from_numpy(np.sort(order[:k])), order[k:]
    states = []
    for i in range(references):
        half = torch.from_numpy(rng.permutation(pool)[: len(pool) // 2])
        states.append(train_shadow(model, aux_x[half], aux_y[half], init_prompt=init_prompt, num_classes=num_classes,
                                   client_cfg=client_cfg, epochs=epochs, generator=seed_stream(i),
                                   augment=augment_stream(i)))
    return states, z_idx


def reference_probabilities(model, states: list[dict], x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """(R, n): each reference model's true-class probability of every record."""
    out = []
    for st in states:
        load_into(model, **st)
        out.append(true_class_probability(model, x, y))
    return np.stack(out)


__all__ = ["reference_probabilities", "rmia_scores", "train_references", "true_class_probability"]
