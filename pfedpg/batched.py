"""Clients trained in one batch (DESIGN §9): the backbone is frozen and shared, so the local steps of
a round's clients can run as one forward and backward pass in which every sample carries its own
client's prompt and head.

Exactly the sequential loop of ``pfedpg.client.sgd_local_training``, vectorised over clients: each
client keeps its own shuffling stream (the same ``randperm`` calls in the same order), its own
minibatches, its own SGD state (momentum buffer created at its first step, weight decay added to the
gradient, separate prompt and head learning rates — torch.optim.SGD's update rule), and its own
mean loss. Step t stacks step t of every client that still has one; the summed loss Σ_n mean_n has
the gradient of each client's own loss on that client's parameters, since no parameter is shared.
Results equal the sequential loop up to floating-point reassociation inside the backbone (~1e-6).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pfedpg.client import training_batch
from pfedpg.jobs import LocalJob, LocalResult


def batched_sgd_local_training(model, jobs: list[LocalJob], starts: list[dict[str, torch.Tensor]], cfg) -> \
        tuple[list[LocalResult], list[dict[str, torch.Tensor]]]:
    """Train ``jobs`` (one per client) together from ``starts`` ({prompt, head_weight, head_bias});
    returns each client's LocalResult and final {prompt, head_weight, head_bias}."""
    c = len(jobs)
    dev = model.device
    prompts = torch.stack([s["prompt"] for s in starts]).clone().requires_grad_(True)
    weights = torch.stack([s["head_weight"] for s in starts]).clone().requires_grad_(True)
    biases = torch.stack([s["head_bias"] for s in starts]).clone().requires_grad_(True)
    head_lr = cfg.lr if cfg.head_lr is None else cfg.head_lr
    lrs = [cfg.lr, head_lr, head_lr]
    bufs: list[torch.Tensor | None] = [None, None, None]
    # Every client's minibatch index lists, drawn exactly as the sequential loop draws them.
    plans = []
    for job in jobs:
        n = job.data.y.shape[0]
        steps = []
        for _ in range(cfg.local_epochs):
            order = torch.randperm(n, generator=job.generator)
            steps += [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
        plans.append(steps)
    totals = [0.0] * c
    model.train()
    for t in range(max(len(p) for p in plans)):
        active = [i for i in range(c) if t < len(plans[i])]
        # Each client's batch through the input pipeline with its own augmentation stream.
        batches = [training_batch(model, jobs[i].data, plans[i][t], jobs[i].augment) for i in active]
        ys = [yb for _, yb in batches]
        owner = torch.cat([torch.full((len(y),), i, dtype=torch.long, device=dev) for i, y in zip(active, ys)])
        x, y = torch.cat([xb for xb, _ in batches]), torch.cat(ys)
        feats = model.features(x, prompts[owner])
        logits = torch.einsum("bd,bkd->bk", feats, weights[owner]) + biases[owner]
        per_sample = F.cross_entropy(logits, y, reduction="none")
        sizes = torch.tensor([len(yy) for yy in ys], dtype=per_sample.dtype, device=dev)
        idx = torch.tensor(active, device=dev)
        sample_size = torch.zeros(c, dtype=per_sample.dtype, device=dev)
        sample_size[idx] = sizes
        losses = (torch.zeros(c, dtype=per_sample.dtype, device=dev).index_add(0, owner, per_sample)
                  / sample_size.clamp_min(1))
        grads = torch.autograd.grad(losses.sum(), [prompts, weights, biases])
        with torch.no_grad():
            for k, (param, grad) in enumerate(zip((prompts, weights, biases), grads)):
                d = grad[idx] + cfg.weight_decay * param[idx] if cfg.weight_decay else grad[idx]
                if cfg.momentum:
                    if bufs[k] is None:  # every client starts at step 0, so all buffers start together
                        bufs[k] = torch.zeros_like(param)
                        bufs[k][idx] = d
                    else:
                        bufs[k][idx] = cfg.momentum * bufs[k][idx] + d
                    d = bufs[k][idx]
                param[idx] = param[idx] - lrs[k] * d
        for j, i in enumerate(active):
            totals[i] += float(losses[i].detach()) * len(ys[j])
    model.eval()
    results, finals = [], []
    for i, job in enumerate(jobs):
        n = job.data.y.shape[0]
        results.append(LocalResult(loss=totals[i] / max(1, n * cfg.local_epochs), steps=len(plans[i]),
                                   samples=n * cfg.local_epochs))
        finals.append({"prompt": prompts[i].detach().clone(), "head_weight": weights[i].detach().clone(),
                       "head_bias": biases[i].detach().clone()})
    return results, finals
