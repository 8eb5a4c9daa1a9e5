"""Assembling a run from its config: the clients' data (partitioned, held as uint8 per client), the
participation schedule, the backbone and prompted model, the server and the hooks' context."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pfedpg.client import ClientState
from pfedpg.config import RunConfig
from pfedpg.context import RunContext
from pfedpg.data import load_dataset, partition_clients, split_new_clients
from pfedpg.data.pipeline import InputPipeline
from pfedpg.errors import ConfigError
from pfedpg.hooks import HookChain, build_hooks
from pfedpg.models import PromptedViT, backbone_num_params, build_backbone, vpt_init_bound
from pfedpg.models.device import configure, resolve_device
from pfedpg.seeding import Seeds
from pfedpg.server import SERVERS


def participation_schedule(*, num_clients: int, per_round: int | None, rounds: int, seeds: Seeds,
                           held_out: int = 0) -> list[list[int]]:
    """Pre-computed, seeded m-of-N schedule (full participation when per_round is None)."""
    if per_round is None or per_round == num_clients:
        return [list(range(num_clients)) for _ in range(rounds)]
    if per_round > num_clients:
        raise ConfigError(f"clients_per_round={per_round} exceeds the {num_clients} clients that train"
                          f"{' (data.new_clients are held out)' if held_out else ''}; lower it or use null (all)")
    return [sorted(int(c) for c in seeds.numpy("participation", round=r).choice(num_clients, per_round, replace=False))
            for r in range(1, rounds + 1)]


def partition_run(cfg: RunConfig):
    """(data set, training clients' splits, new clients' splits) from the config and seed. New
    clients (data.new_clients) are held out of the partition before anything else sees it:
    training clients are numbered 0..N-1 in partition order, new clients N, N+1, ..."""
    dataset = load_dataset(cfg.data, seed=cfg.seed)
    splits, new = split_new_clients(partition_clients(dataset, cfg.data, seed=cfg.seed), cfg.data, seed=cfg.seed)
    return dataset, splits, new


def client_indices(cfg: RunConfig, split) -> tuple[np.ndarray, np.ndarray]:
    """(training, evaluated) record indices of one client's split: the evaluated split is the test
    split, or the validation split when tuning (evaluate_on: val)."""
    return split.train, (split.val if cfg.evaluate_on == "val" else split.test)


class Assembly:
    """The Trainer's set-up: data, model, server, initial client states, the hooks' context."""

    def __init__(self, cfg: RunConfig, *, run_dir: str | Path, hooks: HookChain | None = None,
                 log: Callable[[str], None] | None = None, progress: bool = False,
                 backbone_path: str | Path | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.progress = progress
        self._log_file = None
        self._log = log
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        # One device for the run, chosen before anything is built (DESIGN §9).
        self.device = resolve_device(cfg.device, amp=cfg.amp)
        configure(self.device, deterministic=cfg.deterministic)
        self.seeds = Seeds(cfg.seed)
        self.hooks = hooks if hooks is not None else build_hooks(cfg.hooks)

        t0 = time.time()
        self.dataset = None
        self.new_train_data, self.new_test_data, self.new_facts = [], [], []  # data.new_clients
        self.load_clients()
        if cfg.model.weights == "pretrain" and backbone_path is None:
            from pfedpg.pretrain import pretrain_backbone

            backbone_path = pretrain_backbone(cfg, dataset=self.dataset, log=self.log, progress=progress)
        self.dataset = None  # every client holds its own records now: the pool is not kept twice
        # Which backbone file this run used (a pretraining cache entry or a checkpoint), for the record.
        self.backbone_file = str(backbone_path) if backbone_path is not None else (
            cfg.model.checkpoint if cfg.model.weights == "checkpoint" else None)
        self._build_model(backbone_path)
        self._build_server_and_context()
        self.setup_seconds = time.time() - t0
        self.join_seconds = 0.0  # the new clients' join rounds (run_new_clients)
        self.round = 0
        self.current_round = 0  # the round being run (evaluation messages name it)

    def _build_model(self, backbone_path) -> None:
        """The frozen backbone (its init from the run's own stream) with its prompt and head, on the device."""
        cfg = self.cfg
        with torch.random.fork_rng():  # timm's init reads torch's global generator; keep it ours
            torch.random.default_generator.manual_seed(int(self.seeds.sequence("init.backbone").generate_state(1)[0]))
            backbone = build_backbone(cfg.model, checkpoint=backbone_path)
        inputs = InputPipeline(image_size=cfg.data.image_size, mean=cfg.model.mean, std=cfg.model.std,
                               augment=cfg.data.augment)
        self.model = PromptedViT(backbone, num_prompts=cfg.model.num_prompts, num_classes=self.num_classes,
                                 deep=cfg.model.prompt_depth == "deep", inputs=inputs, amp=cfg.amp).to(self.device)
        # K for shallow prompts, L·K for deep ones: the tokens a client trains, sends and the server generates.
        self.prompt_tokens = self.model.num_prompt_tokens
        self.backbone_numbers = backbone_num_params(backbone)
        self.dim = self.model.embed_dim
        self.init_bound = vpt_init_bound(backbone)

    def _build_server_and_context(self) -> None:
        """The method's server, every client's initial state, the participation schedule and the
        hooks' context."""
        cfg = self.cfg
        train_sizes = [f["train"] for f in self.client_facts]
        server_cls = SERVERS.get(cfg.method)
        # An audit's clients (canary clients) get the ids after the training and the new clients.
        self.audit_clients = self.hooks.assign_audit_clients(self.num_clients + len(self.new_facts))
        self.audit_ids = [c for ids in self.audit_clients.values() for c in ids]
        if self.audit_ids and not server_cls.sends_prompts:
            raise ConfigError(f"hooks {sorted(self.audit_clients)} add clients whose releases the server takes in; "
                              f"method {cfg.method!r} sends nothing: use pfedpg or fedvpt")
        # Initialised on the CPU from its keyed streams (the same numbers on every device), then moved.
        self.server = server_cls(cfg.server, num_clients=self.num_clients, num_prompts=self.prompt_tokens,
                                 dim=self.dim, init_bound=self.init_bound, seeds=self.seeds,
                                 train_sizes=train_sizes, audit_clients=self.audit_ids).to(self.device)
        self.states = [self._initial_state(n) for n in range(self.num_clients)]
        self.schedule = participation_schedule(num_clients=self.num_clients, per_round=cfg.clients_per_round,
                                               rounds=cfg.rounds, seeds=self.seeds, held_out=len(self.new_facts))
        self.ctx = RunContext(config=cfg, seeds=self.seeds, run_dir=self.run_dir, num_clients=self.num_clients,
                              log=self.log, num_classes=self.num_classes, server=self.server,
                              schedule=self.schedule, train_sizes=train_sizes, eval_data=self.test_data,
                              evaluate=self.evaluate_client, train_data=self.train_data, model=self.model,
                              client_states=lambda: self.states, client_info=self.client_info(),
                              hooks=list(self.hooks.hooks),
                              new_clients=[f["client"] for f in self.new_facts],
                              new_train_sizes=[f["train"] for f in self.new_facts],
                              new_client_info=self.client_info(self.new_facts),
                              join_rounds=cfg.data.new_client_rounds if self.new_facts else 0,
                              audit_clients=self.audit_clients)

    def load_clients(self) -> None:
        """The clients' data: sets ``num_clients``, ``num_classes``, ``train_data`` / ``test_data``
        (tensors per client; "test_data" is what evaluation reads: the test split, or the validation
        split when tuning), ``client_facts`` (split sizes, domain, training label counts per client)
        and ``domain_names``. The Flower engine's server learns the facts from its clients instead."""
        self.dataset, splits, new = self.partition()
        self.num_clients = len(splits)
        self.num_classes = self.dataset.num_classes
        held = [self.client_tensors(self.dataset, s) for s in splits]
        self.train_data = [t for t, _ in held]
        self.test_data = [e for _, e in held]
        self.client_facts = [self.client_fact(self.dataset, i, s) for i, s in enumerate(splits)]
        held = [self.client_tensors(self.dataset, s) for s in new]
        self.new_train_data = [t for t, _ in held]
        self.new_test_data = [e for _, e in held]
        self.new_facts = [self.client_fact(self.dataset, len(splits) + j, s) for j, s in enumerate(new)]
        self.domain_names = list(getattr(self.dataset, "domain_names", []) or [])
        self.class_names = list(getattr(self.dataset, "class_names", []) or [])

    def partition(self):
        return partition_run(self.cfg)

    def client_tensors(self, dataset,
                       split) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """One client's (training, evaluated) tensors: the evaluated split is the test split, or the
        validation split when tuning (evaluate_on: val)."""
        return tuple(self.as_tensors(dataset.images[idx], dataset.labels[idx]) for idx in self.client_indices(split))

    def client_indices(self, split) -> tuple[np.ndarray, np.ndarray]:
        return client_indices(self.cfg, split)

    def as_tensors(self, images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Records as a client holds them: uint8 images (N, 3, S, S) at their stored size, on the host,
        and int64 labels. The model's input pipeline resizes, normalises (and, in training,
        augments) each batch on the run's device; no float copy of a client is ever made."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
        return x, torch.from_numpy(np.asarray(labels)).long()

    def client_fact(self, dataset, i: int, split) -> dict[str, Any]:
        return {"client": i, "partition_id": split.client, "train": len(split.train), "test": len(split.test),
                "val": len(split.val), "domain": split.domain,
                "evaluated": len(split.val if self.cfg.evaluate_on == "val" else split.test),
                "label_counts": np.bincount(dataset.labels[split.train], minlength=dataset.num_classes).tolist()}

    def client_names(self, facts: list[dict] | None = None) -> list[str]:
        """A reader's name per client: its domain, and for label-skew partitions its dominant classes
        (the classes holding half of its training records, at most three) — beside the id in tables."""
        out, classes = [], self.class_names
        for f in self.client_facts if facts is None else facts:
            parts = []
            if f.get("domain") is not None and self.domain_names:
                parts.append(self.domain_names[f["domain"]])
            counts = f.get("label_counts")
            if counts and self.cfg.data.partition != "domain" and sum(counts):
                order = sorted(range(len(counts)), key=lambda c: -counts[c])
                top, acc = [], 0
                for c in order[:3]:
                    top.append(classes[c] if c < len(classes) else str(c))
                    acc += counts[c]
                    if acc >= sum(counts) / 2:
                        break
                parts.append("mostly " + "/".join(top))
            out.append(" ".join(parts) or f"client {f['client']}")
        return out

    def client_info(self, facts: list[dict] | None = None) -> list[dict[str, Any]]:
        return [{"client": f["client"], "domain": f["domain"], "label_counts": f["label_counts"],
                 "domain_names": self.domain_names} for f in (self.client_facts if facts is None else facts)]

    def log(self, msg: str) -> None:
        if self._log is not None:
            self._log(msg)
        if self._log_file is not None:
            self._log_file.write(msg + "\n")
            self._log_file.flush()

    def _fresh_head(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A linear head with nn.Linear's default init, drawn from the client's own stream ``g``."""
        d, c = self.dim, self.num_classes
        bound = 1.0 / math.sqrt(d)
        w = torch.empty(c, d).uniform_(-bound, bound, generator=g)  # drawn on the CPU: the same on every device
        b = torch.empty(c).uniform_(-bound, bound, generator=g)
        return w.to(self.device), b.to(self.device)

    def _vpt_prompt(self, g: torch.Generator) -> torch.Tensor:
        """VPT's uniform prompt init, drawn from ``g`` (on the CPU) and moved to the run's device."""
        p = torch.empty(self.prompt_tokens, self.dim).uniform_(-self.init_bound, self.init_bound, generator=g)
        return p.to(self.device)

    def augment_stream(self, component: str, client: int, round: int) -> torch.Generator | None:
        """The augmentation stream of one local training (None when ``data.augment`` is none)."""
        return None if self.cfg.data.augment == "none" else self.seeds.torch(component, client=client, round=round)

    def _initial_state(self, n: int) -> ClientState:
        w, b = self._fresh_head(self.seeds.torch("init.head", client=n))
        if self.server.sends_prompts:
            prompt = self.server.prompts_for([n])[n]
        else:
            prompt = self._vpt_prompt(self.seeds.torch("init.prompt", client=n))
        return ClientState(prompt=prompt, head_weight=w, head_bias=b)
