"""Backbone pretraining on the data's public split (``pfedpg-eval pretrain``, DESIGN §3).

The paper uses an ImageNet-21k ViT-B/16; without a network the toolkit instead trains the whole
backbone, supervised, on a public split that no client ever holds (stratified over all classes),
and caches the result under a hash of everything that determines it. Federated runs then freeze it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pfedpg.data import load_dataset, public_indices
from pfedpg.data.pipeline import InputPipeline, random_shift
from pfedpg.errors import ConfigError
from pfedpg.models.device import configure, resolve_device
from pfedpg.seeding import Seeds


#: pretraining refuses fewer records than this per class (a backbone from a dozen images is noise)
MIN_RECORDS_PER_CLASS = 5
PUBLIC_SPLIT_FIELDS = ("source", "path", "image_size", "storage_size", "public_fraction", "num_domains", "domains",
                       "classes", "public_domains", "composite")


# Recipe fields added after backbones were cached: left out of the key at these values, so those
# cache entries stay valid. checkpoint_every never changes the weights (resume is bit for bit).
_KEY_DEFAULTS = {"augment": "shift", "warmup_epochs": 1, "init": None, "device": "cpu", "amp": False}


def file_digest(path: str | os.PathLike, what: str = "pretrain.data") -> str:
    """SHA-256 of a file; of a folder, of its files' relative paths and sizes (hashing 100,000
    images' bytes would take longer than it protects against)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{what}: {p} not found; set it to an existing file" +
                          (" (an .npz file or an image folder)" if what.startswith("pretrain.data") else ""))
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(f"{f.relative_to(p).as_posix()}\0{f.stat().st_size}\n".encode())
        return "dir:" + h.hexdigest()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pretrain_key(cfg) -> str:
    """Hash of what determines the pretrained weights (not the federated settings)."""
    from dataclasses import asdict

    p = cfg.pretrain
    # The device's kind, not its name: cuda:0 and cuda:1 train the same weights; CPU and GPU differ
    # in the last digits, so their backbones are cached apart.
    recipe = {k: v for k, v in {**asdict(p), "device": pretrain_device(cfg).type}.items()
              if k not in ("cache_dir", "checkpoint_every", "data")
              and not (k in ("domain_prompts", "remix", "mixed_default") and not v)
              and not (k in _KEY_DEFAULTS and v == _KEY_DEFAULTS[k])}
    if p.init is not None:
        recipe["init"] = file_digest(p.init, "pretrain.init")
    if p.data.path is not None:
        # An external data set: its content and how it is split decide the records, the run's own
        # data only its image size.
        data = {"image_size": cfg.data.image_size, "external": file_digest(p.data.path),
                "val": file_digest(p.data.val_path, "pretrain.data.val_path") if p.data.val_path else None,
                "val_fraction": p.data.val_fraction, "max_records": p.data.max_records}
    else:
        # Only what decides the public records: partition settings (clients, alpha, caps, splits)
        # never touch them, so runs that differ only there share one pretrained backbone.
        # (public_domains only when set, so backbones cached before the key existed stay valid.)
        # (storage_size likewise: null keeps the keys of backbones cached before it existed.)
        data = {k: v for k, v in asdict(cfg.data).items()
                if k in PUBLIC_SPLIT_FIELDS and not (k in ("public_domains", "storage_size") and v is None)}
    payload = {
        "model": {"name": cfg.model.name, "kwargs": cfg.model.kwargs, "mean": cfg.model.mean, "std": cfg.model.std},
        "data": data,
        "pretrain": recipe,
        "seed": cfg.seed,
        "version": 2,
    }
    if p.domain_prompts:
        # revision 2: the domain-prompted head is seeded (revision 1 read torch's global generator)
        payload["prompts"] = {"num_prompts": cfg.model.num_prompts, "prompt_depth": cfg.model.prompt_depth, "revision": 2}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def pretrain_device(cfg) -> torch.device:
    """``pretrain.device``, else the run's ``device``, resolved on this machine."""
    spec = cfg.pretrain.device or cfg.device
    return resolve_device(spec, where="pretrain.device" if cfg.pretrain.device else "device")


def cached_path(cfg) -> Path:
    return Path(os.path.expanduser(cfg.pretrain.cache_dir)) / f"{cfg.model.name}-{pretrain_key(cfg)}.safetensors"


def _remixer(images: np.ndarray, domains: np.ndarray, *, channels: int, mean, std):
    """``pretrain.remix``: ``(idx, generator) -> normalised batch`` in which record ``idx[i]`` keeps
    its label channel and each other of the first ``channels`` channels holds the label channel of
    another public record drawn afresh (never the record itself), as ``render_overlay`` draws them."""
    raw = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    dom = torch.from_numpy(domains).long()
    label_channel = raw[torch.arange(len(dom)), dom]  # (n, S, S): each record's own digit
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    n = len(dom)

    def batch(idx: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.zeros((len(idx),) + tuple(raw.shape[1:]))
        sources = torch.empty(channels, len(idx), dtype=torch.long)  # whose digit is in each channel
        for c in range(channels):
            other = torch.randint(0, n - 1, (len(idx),), generator=g)
            other += (other >= idx).long()
            keep = dom[idx] == c
            out[:, c] = torch.where(keep.view(-1, 1, 1), label_channel[idx], label_channel[other])
            sources[c] = torch.where(keep, idx, other)
        return (out - m) / s, sources

    return batch


def _domain_prompted(model, cfg, *, num_classes: int, num_domains: int, generator: torch.Generator):
    """``pretrain.domain_prompts``: the backbone, a head and one prompt per domain, trained together
    through the clients' own prompt insertion (:class:`PromptedViT` with per-sample prompts).
    Returns ``(forward(images, domain_ids) -> logits, unprompted(images, generator) -> logits,
    trainable parameters)``; ``unprompted`` gives each sample a fresh prompt from the clients' own
    init distribution (VPT's uniform ±v), i.e. what a client starts from."""
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

    def forward(images: torch.Tensor, domain_ids: torch.Tensor) -> torch.Tensor:
        # A one-hot product, not prompts[domain_ids]: the indexing backward accumulates in a
        # thread-dependent order, which made pretraining differ run to run on 2 threads.
        onehot = torch.nn.functional.one_hot(domain_ids, num_domains).to(prompts.dtype)
        per_sample = torch.einsum("bm,mtd->btd", onehot, prompts)
        return wrapped.head(wrapped.features(images, per_sample))

    def unprompted(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        fresh = torch.empty(len(images), wrapped.num_prompt_tokens, model.embed_dim).uniform_(-v, v, generator=g)
        return wrapped.head(wrapped.features(images, fresh.to(images.device)))

    return forward, unprompted, [*model.parameters(), *wrapped.head.parameters(), prompts]


def _pretrain_records(cfg, dataset):
    """``(train ImageDataset, validation ImageDataset or None, where)`` for the pretraining."""
    from pfedpg.data import DataConfig
    from pfedpg.data.partition import stratified_choice

    d = cfg.pretrain.data
    if d.path is None:
        ds = dataset if dataset is not None else load_dataset(cfg.data, seed=cfg.seed)
        pub = public_indices(ds)
        if len(pub) == 0:
            raise ConfigError(
                "model.weights=pretrain needs a public split: set data.public_fraction > 0, pretrain on "
                "another data set with pretrain.data.path, or use model.weights=checkpoint with model.checkpoint=PATH"
            )
        return ds.subset(pub), None, "public split"

    def load(path: str):
        pth = Path(path).expanduser()
        if not pth.exists():
            raise ConfigError(f"pretrain.data: {pth} not found; set it to an .npz file or an image folder")
        return load_dataset(DataConfig(source="folder" if pth.is_dir() else "npz", path=str(pth),
                                       image_size=cfg.data.image_size, public_fraction=0.0), seed=cfg.seed)

    full = load(d.path)
    rng = Seeds(cfg.seed).numpy("pretrain.data")
    if d.val_path is not None:
        train_idx, val = np.arange(len(full.labels)), load(d.val_path)
        if val.class_names != full.class_names:
            raise ConfigError(f"pretrain.data.val_path {d.val_path} has other classes than {d.path}; "
                              "give both the same class folders / class_names")
    elif full.split is not None and (full.split == 1).any():
        if d.val_fraction:
            raise ConfigError(f"pretrain.data.val_fraction={d.val_fraction} is set but {d.path} has a split key, whose "
                              "test records are the validation set; drop val_fraction")
        train_idx, val = np.flatnonzero(full.split != 1), full.subset(np.flatnonzero(full.split == 1))
    elif d.val_fraction > 0:
        held = stratified_choice(full.labels, total=round(d.val_fraction * len(full.labels)), rng=rng)
        train_idx, val = np.setdiff1d(np.arange(len(full.labels)), held), full.subset(held)
    else:
        train_idx, val = np.arange(len(full.labels)), None
    if d.max_records is not None and d.max_records >= len(train_idx):
        raise ConfigError(f"pretrain.data.max_records={d.max_records} is not below the {len(train_idx)} training records of "
                          f"{d.path}; drop it (null uses them all)")
    if d.max_records is not None:
        train_idx = train_idx[stratified_choice(full.labels[train_idx], total=d.max_records, rng=rng)]
    return full.subset(train_idx), val, str(d.path)


def _records(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 array -> the (N, 3, H, W) uint8 view the input pipeline reads."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def _evaluate(forward, ds, prep, *, device, domain_prompts: bool, batch_size: int = 512) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(ds.labels), batch_size):
            xb = prep(_records(ds.images[i:i + batch_size]))
            yb = torch.from_numpy(ds.labels[i:i + batch_size]).long().to(device)
            logits = (forward(xb, torch.from_numpy(ds.domains[i:i + batch_size]).long().to(device))
                      if domain_prompts else forward(xb))
            correct += int((logits.argmax(1) == yb).sum())
    return correct / max(1, len(ds.labels))


def partial_path(cfg) -> Path:
    """Where an interrupted pretraining's state is kept (beside its cache entry)."""
    path = cached_path(cfg)
    return path.with_name(path.stem + ".partial.pt")


def log_path(cfg) -> Path:
    """The per-epoch log (one JSON object a line) of the pretraining of ``cfg``."""
    path = cached_path(cfg)
    return path.with_name(path.stem + ".log.jsonl")


def pretrain_backbone(cfg, *, dataset=None, log: Callable[[str], None] = print, force: bool = False,
                      progress: bool = False, stop_after: int | None = None) -> Path:
    """Train (or find in the cache) the backbone for ``cfg``; returns the ``.safetensors`` path.

    Every ``pretrain.checkpoint_every`` epochs the whole state (weights, optimiser, schedule, random
    generators, log) goes to :func:`partial_path`; a later call resumes there and ends with the same
    weights as an uninterrupted run. ``stop_after`` (tests, budgeted jobs) stops after that many
    epochs of this call, leaving the partial state, and returns the partial path."""
    import timm
    from safetensors.torch import save_file

    path = cached_path(cfg)
    if path.is_file() and not force:
        return path
    p = cfg.pretrain
    device = pretrain_device(cfg)
    if p.amp and device.type != "cuda":
        raise ConfigError(f"pretrain.amp (bfloat16 autocast) needs a CUDA device, and pretraining runs on {device}; "
                          "drop pretrain.amp or set pretrain.device: cuda")
    configure(device, deterministic=cfg.deterministic)
    ds, val, where = _pretrain_records(cfg, dataset)
    least = MIN_RECORDS_PER_CLASS * ds.num_classes
    if len(ds.labels) < least:
        raise ConfigError(f"pretraining on {len(ds.labels)} {where} records for {ds.num_classes} classes: fewer than "
                          f"{MIN_RECORDS_PER_CLASS} per class ({least}) cannot give a useful backbone; raise "
                          "data.public_fraction, pretrain on pretrain.data.path, or use model.weights: checkpoint")
    seeds = Seeds(cfg.seed)
    g_init = seeds.torch("pretrain.init")
    # timm's init draws from torch's global generator: seed it inside fork_rng, which restores it.
    with torch.random.fork_rng():
        torch.random.default_generator.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g_init)))
        try:
            model = timm.create_model(cfg.model.name, pretrained=False,
                                      num_classes=0 if p.domain_prompts else ds.num_classes, **cfg.model.kwargs)
        except TypeError as e:
            raise ConfigError(f"model.kwargs not accepted by {cfg.model.name}: {e}") from None
    if p.init is not None:
        from pfedpg.models.backbone import load_state_file

        state = {k: v for k, v in load_state_file(p.init).items() if not k.startswith("head.")}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shapes differ
            missing, unexpected = [str(e).split("\n\t")[1][:120]], []
        if unexpected or [k for k in missing if not k.startswith("head.")]:
            raise ConfigError(f"pretrain.init {p.init} does not match {cfg.model.name} with kwargs {cfg.model.kwargs}: "
                              f"missing or mismatched {list(missing)[:4]}, unexpected {list(unexpected)[:4]}; "
                              "set model.kwargs to the checkpoint's architecture")
    y = torch.from_numpy(ds.labels).long()
    dom = torch.from_numpy(ds.domains).long()
    remix = None
    if p.remix:  # (RunConfig has checked data.composite: overlay)
        remix = _remixer(ds.images, ds.domains, channels=len(ds.domain_names), mean=cfg.model.mean, std=cfg.model.std)
    forward, params = model, list(model.parameters())
    if p.domain_prompts:
        forward, unprompted, params = _domain_prompted(model, cfg, num_classes=ds.num_classes,
                                                       num_domains=len(ds.domain_names), generator=g_init)
    model.to(device)
    for q in params:  # the domain prompts and their head live outside the model
        q.data = q.data.to(device)
    opt = torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay)
    steps_per_epoch = math.ceil(len(y) / p.batch_size)
    total = p.epochs * steps_per_epoch
    warmup = max(1, p.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    g = seeds.torch("pretrain.shuffle")
    # Records uint8 at their stored size; each batch resized and normalised on the device.
    prep = InputPipeline(image_size=cfg.data.image_size, mean=cfg.model.mean, std=cfg.model.std).to(device)
    history: list[dict] = []
    start, seconds = 0, 0.0
    partial = partial_path(cfg)
    if partial.is_file() and not force:
        try:
            st = torch.load(partial, map_location="cpu", weights_only=True)
            for q, v in zip(params, st["params"]):
                q.data.copy_(v)
            opt.load_state_dict(st["opt"])
            sched.load_state_dict(st["sched"])
            g.set_state(st["generator"])
            start, seconds, history = int(st["epoch"]), float(st["seconds"]), json.loads(st["history"])
        except Exception as e:
            raise ConfigError(f"cannot resume pretraining from {partial} ({type(e).__name__}: {str(e)[:100]}); "
                              f"delete it to start over") from None
        log(f"resuming pretraining at epoch {start + 1}/{p.epochs} from {partial}")
    else:
        log(f"pretraining {cfg.model.name} on {len(y)} records ({where}) for {p.epochs} epochs -> {path}")
    log_file = log_path(cfg)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text("".join(json.dumps(h) + "\n" for h in history))
    epochs = range(start, p.epochs)
    if progress:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc="pretrain", unit="epoch", file=sys.stderr, initial=start, total=p.epochs)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if p.amp else contextlib.nullcontext
    done_here = 0
    for epoch in epochs:
        t0 = time.time()
        model.train()
        order = torch.randperm(len(y), generator=g)
        correct, seen, loss_sum = 0, 0, 0.0
        for i in range(0, len(y), p.batch_size):
            idx = order[i:i + p.batch_size]
            if remix is not None:
                xb, sources = remix(idx, g)
            else:
                xb = _records(ds.images[idx.numpy()])
            # shift: a random translation by up to S/8; crop_flip: the same, then a horizontal flip
            xb = random_shift(prep(xb), g, flip=p.augment == "crop_flip")
            yb = y[idx].to(device)
            with autocast():
                logits = forward(xb, dom[idx].to(device)) if p.domain_prompts else model(xb)
                loss = F.cross_entropy(logits.float(), yb, label_smoothing=p.label_smoothing)
                if p.mixed_default:
                    # What a client starts from must read every channel at once: under a fresh
                    # initial prompt the target is the even mixture of all channels' digits.
                    mix = F.one_hot(y[sources], ds.num_classes).float().mean(0).to(device)
                    loss = loss + F.cross_entropy(unprompted(xb, g).float(), mix)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
        model.eval()
        rec = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
               "lr": sched.get_last_lr()[0]}
        if val is not None:
            rec["val_accuracy"] = _evaluate(forward, val, prep, device=device, domain_prompts=p.domain_prompts)
        seconds += time.time() - t0
        rec["seconds"] = round(seconds, 2)
        history.append(rec)
        with open(log_file, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if val is not None or (not progress and (epoch + 1 == p.epochs or (epoch + 1) % 10 == 0)):
            log(f"epoch {epoch + 1}/{p.epochs}: loss {rec['train_loss']:.4f}, train accuracy "
                    f"{rec['train_accuracy']:.3f}" + (f", val accuracy {rec['val_accuracy']:.3f}" if val is not None else ""))
        done_here += 1
        last = epoch + 1 == p.epochs
        if not last and p.checkpoint_every and ((epoch + 1) % p.checkpoint_every == 0 or done_here == stop_after):
            tmp = partial.with_name(f"{partial.name}.{os.getpid()}.tmp")
            torch.save({"params": [q.detach().cpu() for q in params], "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "generator": g.get_state(), "epoch": epoch + 1,
                        "seconds": seconds, "history": json.dumps(history)}, tmp)
            os.replace(tmp, partial)
        if stop_after is not None and done_here >= stop_after and not last:
            return partial
    model.cpu().eval()
    final = history[-1]
    info = {"public_records": int(len(y)), "data": where, "epochs": p.epochs, "final_train_loss": final["train_loss"],
            "final_train_accuracy": final["train_accuracy"], "seconds": round(seconds, 2), "key": pretrain_key(cfg)}
    if val is not None:
        info.update(val_records=int(len(val.labels)), final_val_accuracy=final["val_accuracy"])
    log(f"pretraining done in {info['seconds']} s; last-epoch train accuracy {info['final_train_accuracy']:.3f}"
        + (f", val accuracy {info['final_val_accuracy']:.3f}" if val is not None else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    # A per-process temporary name: two runs that pretrain the same backbone at once never share it.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={k: str(v) for k, v in info.items()})
    os.replace(tmp, path)  # atomic: a crashed pretraining never leaves a half-written cache entry
    path.with_suffix(".json").write_text(json.dumps({**info, "history": history}, indent=2))
    partial.unlink(missing_ok=True)
    return path

