"""Backbone pretraining on the data's public split (``pfedpg-eval pretrain``, DESIGN §3).

The paper uses an ImageNet-21k ViT-B/16; without a network the toolkit instead trains the whole
backbone, supervised, on a public split that no client ever holds (stratified over all classes),
and caches the result under a hash of everything that determines it. Federated runs then freeze it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from pfedpg.data import load_dataset, public_indices
from pfedpg.errors import ConfigError
from pfedpg.preprocess import images_to_tensor
from pfedpg.seeding import Seeds


PUBLIC_SPLIT_FIELDS = ("source", "path", "image_size", "public_fraction", "num_domains", "domains", "classes",
                       "public_domains", "composite")


def pretrain_key(cfg) -> str:
    """Hash of what determines the pretrained weights (not the federated settings)."""
    from dataclasses import asdict

    payload = {
        "model": {"name": cfg.model.name, "kwargs": cfg.model.kwargs, "mean": cfg.model.mean, "std": cfg.model.std},
        # Only what decides the public records: partition settings (clients, alpha, caps, splits)
        # never touch them, so runs that differ only there share one pretrained backbone.
        # (public_domains only when set, so backbones cached before the key existed stay valid.)
        "data": {k: v for k, v in asdict(cfg.data).items()
                 if k in PUBLIC_SPLIT_FIELDS and not (k == "public_domains" and v is None)},
        # (domain_prompts only when on, with the prompt shape it trains, so older cache keys stay valid.)
        "pretrain": {k: v for k, v in asdict(cfg.pretrain).items()
                     if k != "cache_dir" and not (k == "domain_prompts" and not v)},
        "seed": cfg.seed,
        "version": 2,
    }
    if cfg.pretrain.domain_prompts:
        # revision 2: the domain-prompted head is seeded (revision 1 read torch's global generator)
        payload["prompts"] = {"num_prompts": cfg.model.num_prompts, "prompt_depth": cfg.model.prompt_depth, "revision": 2}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cached_path(cfg) -> Path:
    return Path(os.path.expanduser(cfg.pretrain.cache_dir)) / f"{cfg.model.name}-{pretrain_key(cfg)}.safetensors"


def _shift_augment(x: torch.Tensor, pad: int, g: torch.Tensor | torch.Generator) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (reflect padding), one offset per image."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    rows = (dy.view(b, 1) + torch.arange(h).view(1, h))  # (b, h)
    cols = (dx.view(b, 1) + torch.arange(w).view(1, w))  # (b, w)
    bi = torch.arange(b).view(b, 1, 1)
    return padded.permute(0, 2, 3, 1)[bi, rows.view(b, h, 1), cols.view(b, 1, w)].permute(0, 3, 1, 2)


def _domain_prompted(model, cfg, *, num_classes: int, domains: torch.Tensor, num_domains: int,
                     generator: torch.Generator):
    """``pretrain.domain_prompts``: the backbone, a head and one prompt per domain, trained together
    through the clients' own prompt insertion (:class:`PromptedViT` with per-sample prompts).
    Returns ``(forward(images, record_indices) -> logits, trainable parameters)``."""
    from pfedpg.models import PromptedViT, vpt_init_bound

    with torch.random.fork_rng():  # the head's init reads torch's global generator: seed it from ours
        torch.random.default_generator.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        wrapped = PromptedViT(model, num_prompts=cfg.model.num_prompts, num_classes=num_classes,
                              deep=cfg.model.prompt_depth == "deep")
    for q in model.parameters():  # PromptedViT freezes its backbone; here it is what is trained
        q.requires_grad_(True)
    v = vpt_init_bound(model)
    prompts = torch.nn.Parameter(torch.empty(num_domains, wrapped.num_prompt_tokens, model.embed_dim)
                                 .uniform_(-v, v, generator=generator))

    onehot = torch.nn.functional.one_hot(domains, num_domains).to(prompts.dtype)

    def forward(images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # A one-hot product, not prompts[domains[idx]]: the indexing backward accumulates in a
        # thread-dependent order, which made pretraining differ run to run on 2 threads.
        per_sample = torch.einsum("bm,mtd->btd", onehot[idx], prompts)
        return wrapped.head(wrapped.features(images, per_sample))

    return forward, [*model.parameters(), *wrapped.head.parameters(), prompts]


def pretrain_backbone(cfg, *, dataset=None, log: Callable[[str], None] = print, force: bool = False,
                      progress: bool = False) -> Path:
    """Train (or find in the cache) the backbone for ``cfg``; returns the ``.safetensors`` path."""
    import timm
    from safetensors.torch import save_file

    path = cached_path(cfg)
    if path.is_file() and not force:
        return path
    ds = dataset if dataset is not None else load_dataset(cfg.data, seed=cfg.seed)
    pub = public_indices(ds)
    if len(pub) == 0:
        raise ConfigError(
            "model.weights=pretrain needs a public split: set data.public_fraction > 0, "
            "or use model.weights=checkpoint with model.checkpoint=PATH"
        )
    seeds = Seeds(cfg.seed)
    g_init = seeds.torch("pretrain.init")
    # timm's init draws from torch's global generator: seed it inside fork_rng, which restores it.
    with torch.random.fork_rng():
        torch.random.default_generator.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g_init)))
        model = timm.create_model(cfg.model.name, pretrained=False,
                                  num_classes=0 if cfg.pretrain.domain_prompts else ds.num_classes, **cfg.model.kwargs)
    x = images_to_tensor(ds.images[pub], mean=cfg.model.mean, std=cfg.model.std)
    y = torch.from_numpy(ds.labels[pub]).long()
    p = cfg.pretrain
    forward, params = model, list(model.parameters())
    if p.domain_prompts:
        forward, params = _domain_prompted(model, cfg, num_classes=ds.num_classes,
                                           domains=torch.from_numpy(ds.domains[pub]).long(),
                                           num_domains=len(ds.domain_names), generator=g_init)
    opt = torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay)
    steps_per_epoch = math.ceil(len(y) / p.batch_size)
    total = p.epochs * steps_per_epoch
    warmup = max(1, steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    g = seeds.torch("pretrain.shuffle")
    pad = max(1, x.shape[-1] // 8)
    t0 = time.time()
    log(f"pretraining {cfg.model.name} on {len(y)} public records for {p.epochs} epochs -> {path}")
    model.train()
    epochs = range(p.epochs)
    if progress:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc="pretrain", unit="epoch", file=sys.stderr)
    for epoch in epochs:
        order = torch.randperm(len(y), generator=g)
        correct, seen, loss_sum = 0, 0, 0.0
        for i in range(0, len(y), p.batch_size):
            idx = order[i:i + p.batch_size]
            xb = _shift_augment(x[idx], pad, g)
            logits = forward(xb, idx) if p.domain_prompts else model(xb)
            loss = F.cross_entropy(logits, y[idx], label_smoothing=p.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
            seen += len(idx)
    model.eval()
    info = {"public_records": int(len(y)), "epochs": p.epochs, "final_train_loss": loss_sum / seen,
            "final_train_accuracy": correct / seen, "seconds": round(time.time() - t0, 2), "key": pretrain_key(cfg)}
    log(f"pretraining done in {info['seconds']} s; last-epoch train accuracy {info['final_train_accuracy']:.3f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # A per-process temporary name: two runs that pretrain the same backbone at once never share it.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={k: str(v) for k, v in info.items()})
    os.replace(tmp, path)  # atomic: a crashed pretraining never leaves a half-written cache entry
    path.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return path
