"""The pretraining loop behind :func:`pfedpg.pretrain.pretrain_backbone`: the model (a timm ViT, or
with ``pretrain.domain_prompts`` the ViT, a head and one prompt per domain), AdamW with a warm-up
and cosine schedule, one seeded shuffling stream, per-epoch logs, resumable partial states and the
cached ``.safetensors`` file at the end. The random streams are drawn in one fixed order (the
model's init, the domain prompts, then per batch the shuffle, the remix and the augmentation), so a
resumed pretraining ends with the uninterrupted one's weights."""
from __future__ import annotations

import contextlib
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

from pfedpg import jsonio
from pfedpg.data.pipeline import InputPipeline, random_shift
from pfedpg.errors import ConfigError
from pfedpg.progress import ANNOUNCE_EVERY_S, duration  # without a bar: a line at the first epoch, then this often
from pfedpg.seeding import Seeds


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


def _create_model(cfg, num_classes: int, g_init: torch.Generator) -> torch.nn.Module:
    """The timm model of ``cfg.model``, initialised from ``g_init`` (and ``pretrain.init`` when set)."""
    import timm

    p = cfg.pretrain
    # timm's init draws from torch's global generator: seed it inside fork_rng, which restores it.
    with torch.random.fork_rng():
        torch.random.default_generator.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g_init)))
        try:
            model = timm.create_model(cfg.model.name, pretrained=False,
                                      num_classes=0 if p.domain_prompts else num_classes, **cfg.model.kwargs)
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
    return model


class Pretraining:
    """One backbone's pretraining on ``ds`` (validated on ``val`` when given), on ``device``."""

    def __init__(self, cfg, ds, val, *, device: torch.device, log: Callable[[str], None], key: str, where: str):
        self.cfg, self.p, self.ds, self.val, self.device, self.log = cfg, cfg.pretrain, ds, val, device, log
        self.key, self.where = key, where
        p = self.p
        seeds = Seeds(cfg.seed)
        g_init = seeds.torch("pretrain.init")
        self.model = _create_model(cfg, ds.num_classes, g_init)
        self.y = torch.from_numpy(ds.labels).long()
        self.dom = torch.from_numpy(ds.domains).long()
        self.remix = None
        if p.remix:  # (RunConfig has checked data.composite: overlay)
            self.remix = _remixer(ds.images, ds.domains, channels=len(ds.domain_names), mean=cfg.model.mean,
                                  std=cfg.model.std)
        self.forward, self.params, self.unprompted = self.model, list(self.model.parameters()), None
        if p.domain_prompts:
            self.forward, self.unprompted, self.params = _domain_prompted(
                self.model, cfg, num_classes=ds.num_classes, num_domains=len(ds.domain_names), generator=g_init)
        self.model.to(device)
        for q in self.params:  # the domain prompts and their head live outside the model
            q.data = q.data.to(device)
        self.opt = torch.optim.AdamW(self.params, lr=p.lr, weight_decay=p.weight_decay)
        steps_per_epoch = math.ceil(len(self.y) / p.batch_size)
        total = p.epochs * steps_per_epoch
        warmup = max(1, p.warmup_epochs * steps_per_epoch)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
        self.g = seeds.torch("pretrain.shuffle")
        # Records uint8 at their stored size; each batch resized and normalised on the device.
        self.prep = InputPipeline(image_size=cfg.data.image_size, mean=cfg.model.mean, std=cfg.model.std).to(device)
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if p.amp else contextlib.nullcontext
        self.history: list[dict] = []
        self.start, self.seconds = 0, 0.0

    def resume(self, partial: Path) -> None:
        """Load an interrupted pretraining's state (weights, optimiser, schedule, shuffle stream, log)."""
        try:
            st = torch.load(partial, map_location="cpu", weights_only=True)
            for q, v in zip(self.params, st["params"]):
                q.data.copy_(v)
            self.opt.load_state_dict(st["opt"])
            self.sched.load_state_dict(st["sched"])
            self.g.set_state(st["generator"])
            self.start, self.seconds, self.history = int(st["epoch"]), float(st["seconds"]), json.loads(st["history"])
        except Exception as e:
            raise ConfigError(f"cannot resume pretraining from {partial} ({type(e).__name__}: {str(e)[:100]}); "
                              f"delete it to start over") from None
        self.log(f"resuming pretraining at epoch {self.start + 1}/{self.p.epochs} from {partial}")

    def train(self, log_file: Path, partial: Path, *, progress: bool, stop_after: int | None) -> bool:
        """Run the remaining epochs, appending to ``log_file`` and checkpointing to ``partial``;
        False when ``stop_after`` epochs of this call ended it early (the partial state is kept)."""
        p = self.p
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text("".join(jsonio.dumps(h) + "\n" for h in self.history))
        epochs = range(self.start, p.epochs)
        bar = progress and sys.stderr.isatty()  # a bar on a terminal; lines wherever the output goes
        if bar:
            from tqdm import tqdm

            epochs = tqdm(epochs, desc="pretrain", unit="epoch", file=sys.stderr, initial=self.start, total=p.epochs)
        done_here, said, t0 = 0, None, time.monotonic()
        for epoch in epochs:
            rec = self.epoch(epoch)
            with open(log_file, "a") as fh:
                fh.write(jsonio.dumps(rec) + "\n")
            done_here += 1
            now = time.monotonic()
            if self.val is not None or (not bar and (said is None or now - said >= ANNOUNCE_EVERY_S
                                                     or epoch + 1 == p.epochs)):
                said, left = now, (now - t0) / done_here * (p.epochs - epoch - 1)
                self.log(f"pretraining epoch {epoch + 1}/{p.epochs}: loss {rec['train_loss']:.4f}, train accuracy "
                         f"{100 * rec['train_accuracy']:.1f} %"
                         + (f", val accuracy {100 * rec['val_accuracy']:.1f} %" if self.val is not None else "")
                         + (f"; about {duration(left)} left (estimate)" if epoch + 1 < p.epochs else ""))
            last = epoch + 1 == p.epochs
            if not last and p.checkpoint_every and ((epoch + 1) % p.checkpoint_every == 0 or done_here == stop_after):
                self.checkpoint(partial, epoch + 1)
            if stop_after is not None and done_here >= stop_after and not last:
                return False
        return True

    def epoch(self, epoch: int) -> dict:
        """One pass over the records in a fresh seeded order; returns the epoch's log record."""
        p, y, g = self.p, self.y, self.g
        t0 = time.time()
        self.model.train()
        order = torch.randperm(len(y), generator=g)
        correct, seen, loss_sum = 0, 0, 0.0
        for i in range(0, len(y), p.batch_size):
            idx = order[i:i + p.batch_size]
            loss, logits, yb = self.step(idx)
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
        self.model.eval()
        rec = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
               "lr": self.sched.get_last_lr()[0]}
        if self.val is not None:
            rec["val_accuracy"] = _evaluate(self.forward, self.val, self.prep, device=self.device,
                                            domain_prompts=p.domain_prompts)
        self.seconds += time.time() - t0
        rec["seconds"] = round(self.seconds, 2)
        self.history.append(rec)
        return rec

    def step(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimiser step on records ``idx``; returns (loss, logits, labels)."""
        p, g, device = self.p, self.g, self.device
        if self.remix is not None:
            xb, sources = self.remix(idx, g)
        else:
            xb = _records(self.ds.images[idx.numpy()])
        # shift: a random translation by up to S/8; crop_flip: the same, then a horizontal flip
        xb = random_shift(self.prep(xb), g, flip=p.augment == "crop_flip")
        yb = self.y[idx].to(device)
        with self.autocast():
            logits = self.forward(xb, self.dom[idx].to(device)) if p.domain_prompts else self.model(xb)
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=p.label_smoothing)
            if p.mixed_default:
                # What a client starts from must read every channel at once: under a fresh
                # initial prompt the target is the even mixture of all channels' digits.
                mix = F.one_hot(self.y[sources], self.ds.num_classes).float().mean(0).to(device)
                loss = loss + F.cross_entropy(self.unprompted(xb, g).float(), mix)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return loss, logits, yb

    def checkpoint(self, partial: Path, epochs_done: int) -> None:
        tmp = partial.with_name(f"{partial.name}.{os.getpid()}.tmp")
        torch.save({"params": [q.detach().cpu() for q in self.params], "opt": self.opt.state_dict(),
                    "sched": self.sched.state_dict(), "generator": self.g.get_state(), "epoch": epochs_done,
                    "seconds": self.seconds, "history": json.dumps(self.history)}, tmp)
        os.replace(tmp, partial)

    def save(self, path: Path) -> None:
        """The trained backbone as ``path`` (.safetensors, with its facts as metadata) and its log as .json."""
        from safetensors.torch import save_file

        self.model.cpu().eval()
        final, val = self.history[-1], self.val
        info = {"public_records": int(len(self.y)), "data": self.where, "epochs": self.p.epochs,
                "final_train_loss": final["train_loss"], "final_train_accuracy": final["train_accuracy"],
                "seconds": round(self.seconds, 2), "key": self.key}
        if val is not None:
            info.update(val_records=int(len(val.labels)), final_val_accuracy=final["val_accuracy"])
        self.log(f"pretraining done in {info['seconds']} s; "
                 f"last-epoch train accuracy {100 * info['final_train_accuracy']:.1f} %"
                 + (f", val accuracy {100 * info['final_val_accuracy']:.1f} %" if val is not None else "")
                 + f" -> {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        # A per-process temporary name: two runs that pretrain the same backbone at once never share it.
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(tmp), metadata={k: str(v) for k, v in info.items()})
        os.replace(tmp, path)  # atomic: a crashed pretraining never leaves a half-written cache entry
        path.with_suffix(".json").write_text(jsonio.dumps({**info, "history": self.history}, indent=2))
