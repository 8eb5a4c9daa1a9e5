"""The in-process runner: one pFedPG (or baseline) run into one run directory (DESIGN §1, §8).

Run directory::

    config.yaml        resolved config (every default filled in)
    seeds.json         master seed, participation schedule, data split sizes
    env.json           versions, platform, threads
    metrics.jsonl      one ``round`` record per round and one ``client`` record per client/eval round
    summary.json       final accuracies (adapted and generated prompts), communication, timings
    checkpoints/       round_XXXX.pt every ``checkpoint_every`` rounds and after the last; ``--resume`` continues exactly
    log.txt

Evaluation uses the final round only (no best-round selection on test data).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pfedpg.client import ClientState, evaluate, frozen_prompt, load_into, sgd_local_training
from pfedpg.config import RunConfig, dump_config, saved_config
from pfedpg.data import load_dataset, partition_clients, split_new_clients
from pfedpg.data.pipeline import InputPipeline
from pfedpg.errors import ConfigError, NonFiniteDeltaError
from pfedpg.hooks import ClientData, HookChain, LocalJob, RunContext, build_hooks
from pfedpg.models import PromptedViT, backbone_num_params, build_backbone, vpt_init_bound
from pfedpg.models.device import configure, describe, out_of_memory_as_error, resolve_device, to_cpu
from pfedpg.seeding import Seeds
from pfedpg.server import SERVERS, plain_aggregate

CHECKPOINT_VERSION = 1


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest ``checkpoints/round_XXXX.pt`` of a run directory, or None."""
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("round_*.pt"))
    return ckpts[-1] if ckpts else None


def set_aside(run_dir: str | Path) -> Path:
    """Move an unfinished run's files into RUN_DIR/attempt-<k>/ (kept, never deleted)."""
    run_dir = Path(run_dir)
    k = 1
    while (run_dir / f"attempt-{k}").exists():
        k += 1
    keep = run_dir / f"attempt-{k}"
    keep.mkdir()
    for f in list(run_dir.iterdir()):
        if not f.name.startswith("attempt-"):
            f.rename(keep / f.name)
    return keep


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


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "worst": float(a.min()), "best": float(a.max()), "std": float(a.std())}


def round_train_stats(rows) -> dict[str, Any]:
    """A round record's training figures from its participants' rows (clients that failed, or keep
    their loss to themselves, are left out)."""
    trained = [row["train_loss"] for row in rows if "error" not in row and row.get("train_loss") is not None]
    return {"train_loss_mean": float(np.mean(trained)) if trained else None}


def round_eval_stats(evals: list[dict[str, Any]]) -> dict[str, Any]:
    """A round record's accuracy figures from every client's evaluation row; a client that could not
    be evaluated counts as missing, not as 0."""
    answered = [e for e in evals if e.get("acc_adapted") is not None]
    out: dict[str, Any] = {}
    if len(answered) < len(evals):
        out["clients_missing"] = [e["client"] for e in evals if e.get("acc_adapted") is None]
    out.update({f"acc_adapted_{k}": v for k, v in _stats([e["acc_adapted"] for e in answered]).items()})
    if answered[0].get("acc_generated") is not None:
        out.update({f"acc_generated_{k}": v for k, v in _stats([e["acc_generated"] for e in answered]).items()})
    return out


def accuracy_blocks(final: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json's ``accuracy`` and ``accuracy_generated`` from the last round's client rows
    (sorted by client); a client that could not be evaluated is None in ``per_client``."""
    def block(key):
        vals = [r.get(key) for r in final]
        present = [v for v in vals if v is not None]
        if not present:
            return None
        return {**_stats(present), "per_client": vals}

    return {"accuracy": block("acc_adapted"), "accuracy_generated": block("acc_generated")}


def environment(device: torch.device | None = None) -> dict[str, Any]:
    import timm

    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "timm": timm.__version__, "numpy": np.__version__, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "argv": _redacted(sys.argv),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        **(describe(device) if device is not None else {}),
    }


def _redacted(argv: list[str]) -> list[str]:
    """argv for the record, without secrets (a Flower process's one-use ``--token``)."""
    out = list(argv)
    for i, a in enumerate(out[:-1]):
        if a == "--token":
            out[i + 1] = "<redacted>"
    return out


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


class Trainer:
    """Builds everything a run needs from a ``RunConfig`` and runs the rounds.

    ``hooks`` overrides ``cfg.hooks`` (tests pass instances); ``backbone_path`` skips the
    pretraining lookup for ``weights: pretrain``.
    """

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

        train_sizes = [f["train"] for f in self.client_facts]

        server_cls = SERVERS.get(cfg.method)
        # Initialised on the CPU from its keyed streams (the same numbers on every device), then moved.
        self.server = server_cls(cfg.server, num_clients=self.num_clients, num_prompts=self.prompt_tokens,
                                 dim=self.dim, init_bound=self.init_bound, seeds=self.seeds,
                                 train_sizes=train_sizes).to(self.device)
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
                              join_rounds=cfg.data.new_client_rounds if self.new_facts else 0)
        self.setup_seconds = time.time() - t0
        self.join_seconds = 0.0  # the new clients' join rounds (run_new_clients)
        self.round = 0
        self.current_round = 0  # the round being run (evaluation messages name it)

    def load_clients(self) -> None:
        """The clients' data: sets ``num_clients``, ``num_classes``, ``train_data`` / ``test_data``
        (tensors per client; "test_data" is what evaluation reads: the test split, or the validation
        split when tuning), ``client_facts`` (split sizes, domain, training label counts per client)
        and ``domain_names``. The Flower engine's server learns the facts from its clients instead."""
        cfg = self.cfg
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

    def client_tensors(self, dataset, split) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
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

    # ------------------------------------------------------------------------------------------
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

    # ------------------------------------------------------------------------------------------
    def communication(self) -> dict[str, Any]:
        k_d = self.prompt_tokens * self.dim if self.server.sends_prompts else 0
        bytes_per = torch.finfo(torch.float32).bits // 8
        per_round = [len(p) for p in self.schedule]
        return {
            "down_numbers_per_client_round": k_d,
            "up_numbers_per_client_round": k_d,
            "down_bytes_per_client_round": k_d * bytes_per,
            "up_bytes_per_client_round": k_d * bytes_per,
            "backbone_numbers": self.backbone_numbers,
            "ratio_vs_backbone": k_d / self.backbone_numbers,
            "total_numbers": 2 * k_d * sum(per_round),
            "server_shared_numbers": self.server.num_shared(),
        }

    # ------------------------------------------------------------------------------------------
    def train_participants(self, r: int, participants: list[int], sent: dict[int, torch.Tensor]) -> dict[int, dict[str, Any]]:
        """Round r's local training: one row per participant, its outgoing delta under ``_delta``
        (absent for methods that send nothing). A row with ``error`` is a client that failed (the
        Flower engine); the round goes on without its delta."""
        together = [n for n in participants if self.cfg.batched_clients and not self.hooks.has_local_training(n)]
        done = self.train_clients_batched(r, {n: sent.get(n, self.states[n].prompt) for n in together}) \
            if together else {}
        rows = {}
        for n in participants:
            row, delta = done[n] if n in done else self.train_client(n, r, sent.get(n, self.states[n].prompt))
            if delta is not None:
                row["_delta"] = delta
            rows[n] = row
        return rows

    def train_client(self, n: int, r: int, start_prompt: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor | None]:
        st = self.states[n]
        load_into(self.model, prompt=start_prompt, head_weight=st.head_weight, head_bias=st.head_bias)
        x, y = self.train_data[n]
        data = self.hooks.client_data(self.ctx, client=n, round=r, data=ClientData(x, y))
        job = LocalJob(client=n, round=r, model=self.model, data=data, generator=self.seeds.torch("local_train", client=n, round=r),
                       run_default=partial(sgd_local_training, cfg=self.cfg.client),
                       augment=self.augment_stream("augment", n, r))
        result = self.hooks.local_training(self.ctx, job)
        with torch.no_grad():
            final = {"prompt": self.model.prompt.prompt.detach().clone(),
                     "head_weight": self.model.head.weight.detach().clone(),
                     "head_bias": self.model.head.bias.detach().clone()}
        return self._finish_client(n, r, start_prompt, result, final)

    def train_clients_batched(self, r: int, starts: dict[int, torch.Tensor]) -> dict[int, tuple[dict[str, Any], torch.Tensor | None]]:
        """The round's clients in ``starts`` trained in one batch (``batched_clients: true``)."""
        from pfedpg.batched import batched_sgd_local_training

        clients = list(starts)
        jobs, init = [], []
        for n in clients:
            st = self.states[n]
            x, y = self.train_data[n]
            data = self.hooks.client_data(self.ctx, client=n, round=r, data=ClientData(x, y))
            jobs.append(LocalJob(client=n, round=r, model=self.model, data=data,
                                 generator=self.seeds.torch("local_train", client=n, round=r), run_default=None,
                                 augment=self.augment_stream("augment", n, r)))
            init.append({"prompt": starts[n], "head_weight": st.head_weight, "head_bias": st.head_bias})
        results, finals = batched_sgd_local_training(self.model, jobs, init, self.cfg.client)
        return {n: self._finish_client(n, r, starts[n], res, fin) for n, res, fin in zip(clients, results, finals)}

    def _finish_client(self, n: int, r: int, start_prompt: torch.Tensor, result, final: dict[str, torch.Tensor]):
        st = self.states[n]
        adapted = final["prompt"]
        st.prompt, st.head_weight, st.head_bias = adapted, final["head_weight"], final["head_bias"]
        st.rounds_joined += 1
        record = {"train_loss": result.loss, "local_steps": result.steps, **result.extra}
        if not self.server.sends_prompts:
            return record, None
        delta = self.hooks.outgoing_delta(self.ctx, client=n, round=r, delta=adapted - start_prompt)
        return record, delta

    def server_step(self, r: int, deltas: dict[int, torch.Tensor]) -> dict[str, Any]:
        deltas = self.hooks.incoming_deltas(self.ctx, round=r, deltas=deltas)
        for n, d in deltas.items():
            if not torch.isfinite(d).all():
                raise NonFiniteDeltaError(
                    f"client {n} sent a non-finite prompt delta in round {r}; add the hook "
                    "`{name: reject_nonfinite}` (defenses) to drop and log such deltas"
                )
        if not deltas:
            return {"aggregation_ms": 0.0, "clients_aggregated": 0}
        grads = self.hooks.shared_gradients(self.ctx, round=r, grads=self.server.client_gradients(deltas))
        t0 = time.perf_counter()
        update = self.hooks.aggregate(self.ctx, round=r, grads=grads, default=plain_aggregate)
        agg_ms = (time.perf_counter() - t0) * 1e3
        step = self.server.apply(update, grads)
        # The step itself can blow the state up (an attack, an unbounded step under DP noise): that
        # is the round it diverged in, even if no client ever sends a non-finite delta afterwards.
        if not all(bool(torch.isfinite(p).all()) for p in self.server.parameters()):
            raise NonFiniteDeltaError(f"the server state became non-finite in round {r}'s step "
                                      f"(update norm {step.get('server_update_norm', float('nan')):.3g}); "
                                      "bound it with server.update_bound or a robust rule")
        return {"aggregation_ms": agg_ms, "clients_aggregated": len(grads.clients), **step}

    def evaluate_client(self, n: int, x: torch.Tensor, y: torch.Tensor) -> float:
        """Accuracy of client n's personalised model (adapted prompt, head) on (x, y)."""
        st = self.states[n]
        load_into(self.model, prompt=st.prompt, head_weight=st.head_weight, head_bias=st.head_bias)
        return evaluate(self.model, x, y, batch_size=self.cfg.client.eval_batch_size)[0]

    def evaluate_one(self, n: int, generated: torch.Tensor | None) -> dict[str, Any]:
        """Client n's evaluation row: its adapted prompt with its head, and the generated prompt
        ``generated`` (None for methods that send nothing) with the same head."""
        st = self.states[n]
        x, y = self.test_data[n]
        bs = self.cfg.client.eval_batch_size
        load_into(self.model, prompt=st.prompt, head_weight=st.head_weight, head_bias=st.head_bias)
        acc, loss = evaluate(self.model, x, y, batch_size=bs)
        row = {"client": n, "acc_adapted": acc, "loss_adapted": loss, "acc_generated": None}
        row.update(self.hooks.client_metrics(self.ctx, client=n, evaluate=lambda xs, ys: self.evaluate_client(n, xs, ys)))
        if generated is not None:
            load_into(self.model, prompt=generated, head_weight=st.head_weight, head_bias=st.head_bias)
            row["acc_generated"], row["loss_generated"] = evaluate(self.model, x, y, batch_size=bs)
        return row

    def evaluate_clients(self, generated: dict[int, torch.Tensor]) -> list[dict[str, Any]]:
        """Every client's evaluation row (in-process; the Flower engine asks the clients)."""
        return [self.evaluate_one(n, generated.get(n)) for n in range(self.num_clients)]

    def evaluate_all(self) -> list[dict[str, Any]]:
        generated = self.server.prompts_for(list(range(self.num_clients))) if self.server.sends_prompts else {}
        rows = self.evaluate_clients(generated)
        if len(generated) > 1:
            p = torch.stack([generated[n].reshape(-1) for n in sorted(generated)])
            dist = torch.cdist(p, p)
            off = dist[~torch.eye(len(p), dtype=torch.bool, device=dist.device)]
            self._prompt_spread = float(off.mean() / p.norm(dim=1).mean().clamp_min(1e-12))
        else:
            self._prompt_spread = None
        return rows

    # ------------------------------------------------------------------------------------------
    def _checkpoint_path(self, r: int) -> Path:
        return self.run_dir / "checkpoints" / f"round_{r:04d}.pt"

    def checkpoint_clients(self) -> list[dict] | None:
        return [s.to_dict() for s in self.states]

    def save_checkpoint(self, r: int) -> None:
        path = self._checkpoint_path(r)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "version": CHECKPOINT_VERSION, "round": r,
            "server": {k: v.detach().cpu().clone() for k, v in self.server.state_dict().items()},
            "clients": to_cpu(self.checkpoint_clients()),  # (a checkpoint loads on any device)
            "hooks": to_cpu(self.hooks.state_dict()),
            "config": dump_config(self.cfg),
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path: Path) -> int:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConfigError(f"checkpoint {str(path)!r} is unreadable ({type(e).__name__}); delete it to resume from an earlier one") from None
        if state.get("version") != CHECKPOINT_VERSION:
            raise ConfigError(f"checkpoint {str(path)!r} has version {state.get('version')}, expected {CHECKPOINT_VERSION}")
        try:
            same = dump_config(saved_config(state["config"])) == dump_config(self.cfg)
        except ConfigError:
            same = False
        if not same:
            raise ConfigError(f"--resume: the config differs from the one {str(path)!r} was written with; "
                              "resume with the run's own config.yaml")
        if state["clients"] is None:
            raise ConfigError(f"checkpoint {str(path)!r} is from a Flower run and holds no client state (it stayed on the "
                              "clients); start a new run")
        self.server.load_state_dict(state["server"])
        self.states = [ClientState.from_dict(d).to(self.device) for d in state["clients"]]
        self.hooks.load_state_dict(state["hooks"])
        return int(state["round"])

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.run_dir)

    # ------------------------------------------------------------------------------------------
    def run(self, *, resume: bool = False, stop_after: int | None = None, restart: bool = False) -> dict[str, Any] | None:
        """Run to ``cfg.rounds`` (or stop after round ``stop_after``, leaving a checkpoint).

        A run directory holding an unfinished run (no summary.json): without a checkpoint there is
        nothing to resume, so the run starts again (its files moved to RUN_DIR/attempt-<k>/); with a
        checkpoint, ``resume`` continues it and ``restart`` starts it again the same way."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.run_dir / "metrics.jsonl"
        start = 0
        unfinished = metrics_path.exists() and not (self.run_dir / "summary.json").exists()
        if unfinished and not resume and (restart or self.latest_checkpoint() is None):
            kept = set_aside(self.run_dir)
            self.log(f"run directory {self.run_dir} held an unfinished run{'' if restart else ' without a checkpoint'}; "
                     f"starting it again (its files are in {kept})")
        if resume:
            ckpt = self.latest_checkpoint()
            if ckpt is None:
                raise ConfigError(f"--resume: no checkpoint in {str(self.run_dir / 'checkpoints')!r}; run the same command "
                                  "without --resume to start it again (the old files are kept under RUN_DIR/attempt-<k>/)")
            start = self.load_checkpoint(ckpt)
            if (self.run_dir / "summary.json").exists():
                self.log(f"--resume of a finished run: rewriting its summary from {ckpt.name}"
                         + (f" (the {len(self.new_facts)} new clients' join rounds run again, to the same numbers)"
                            if self.new_facts else ""))
            # Keep the records up to the checkpoint: the rounds after it are re-run identically.
            # (Join rounds run after the last round from the final state: they are re-run as well.)
            kept = [ln for ln in metrics_path.read_text().splitlines()
                    if ln and json.loads(ln)["round"] <= start and json.loads(ln)["type"] != "join"] \
                if metrics_path.exists() else []
            metrics_path.write_text("".join(ln + "\n" for ln in kept))
        else:
            if (self.run_dir / "summary.json").exists():
                raise ConfigError(f"run directory {str(self.run_dir)!r} holds a finished run; choose another --run-dir or "
                                  "run_name (or --resume to rewrite its summary)")
            if metrics_path.exists():
                ckpt = self.latest_checkpoint()
                raise ConfigError(f"run directory {str(self.run_dir)!r} holds an unfinished run (checkpoint {ckpt.name}); "
                                  f"continue it with --resume --run-dir {self.run_dir}, or pass --restart to start it again "
                                  "(its files are kept under RUN_DIR/attempt-<k>/)")
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
            (self.run_dir / "env.json").write_text(json.dumps(environment(self.device), indent=2))
            (self.run_dir / "seeds.json").write_text(json.dumps({
                "master_seed": cfg.seed,
                "streams": "numpy.random.SeedSequence(master, spawn_key=(crc32(component), client, round))",
                "participation": self.schedule,
                "clients": [{k: f.get(k) for k in ("client", "train", "test", "val", "domain")} for f in self.client_facts],
                # data.new_clients: their ids here, and every client's id in the partition
                **({"new_clients": [{k: f[k] for k in ("client", "train", "test", "val", "domain")} for f in self.new_facts],
                    "partition_ids": {"clients": [f["partition_id"] for f in self.client_facts],
                                      "new_clients": [f["partition_id"] for f in self.new_facts]}}
                   if self.new_facts else {}),
            }, indent=1))
            metrics_path.write_text("")
        self._log_file = open(self.run_dir / "log.txt", "a")
        self.hooks.setup(self.ctx)
        if cfg.batched_clients:
            alone = [n for n in range(self.num_clients) if self.hooks.has_local_training(n)]
            self.log("batched_clients: clients train in one batch" + (
                f"; clients {alone} run a local_training hook (e.g. dp_sgd) and train one after another" if alone else ""))
        self.log(f"{cfg.method}: {self.num_clients} clients, {cfg.rounds} rounds, backbone {self.backbone_numbers:,} numbers, "
                 f"on {self.device}{' (bf16 autocast)' if cfg.amp else ''}" + (f" (resuming after round {start})" if start else ""))
        rounds = range(start + 1, cfg.rounds + 1)
        if self.progress:
            from tqdm import tqdm

            rounds = tqdm(rounds, desc=cfg.method, unit="round", initial=start, total=cfg.rounds, file=sys.stderr)
        t_train = 0.0
        try:
            # Out of memory: one line naming the knobs, and nothing left behind that blocks the re-run
            # with a smaller setting (the unfinished run's files move to RUN_DIR/attempt-<k>/).
            with out_of_memory_as_error(str(self.device), on_error=self._set_aside_unfinished):
                for r in rounds:
                    try:
                        record = self.run_round(r)
                    except NonFiniteDeltaError as e:
                        self._record_divergence(r, e)
                        raise
                    t_train += record["time_round_s"]
                    with open(metrics_path, "a") as f:
                        for row in record.pop("clients"):
                            f.write(json.dumps(row) + "\n")
                        f.write(json.dumps(record) + "\n")
                    if self.progress and "acc_adapted_mean" in record:
                        rounds.set_postfix(acc=f"{record['acc_adapted_mean']:.3f}")
                    self.round = r
                    if (cfg.checkpoint_every and r % cfg.checkpoint_every == 0) or r == cfg.rounds:
                        self.save_checkpoint(r)
                    if stop_after is not None and r >= stop_after and r < cfg.rounds:
                        if not (cfg.checkpoint_every and r % cfg.checkpoint_every == 0):
                            self.save_checkpoint(r)
                        return None
                self.run_new_clients(metrics_path)
                summary = self.summarize(metrics_path)
                (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
                acc = summary["accuracy"]
                self.log(f"done: adapted mean {acc['mean']:.4f}, worst {acc['worst']:.4f}" if acc else
                         f"done: the clients kept their accuracies ({summary.get('client_metrics')})")
                return summary
        finally:
            self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _set_aside_unfinished(self) -> str:
        self._close_log()
        return f"this run's files were moved to {set_aside(self.run_dir)}"

    def _record_divergence(self, r: int, error: Exception) -> None:
        """A run that diverged is a result (an attack that makes training diverge has succeeded,
        DESIGN §7): ``diverged.json`` keeps the round and every client's accuracy as measured at that
        point, non-finite outputs counted wrong — with its own adapted prompt, and with the prompt the
        server would now send (``accuracy_generated_per_client``)."""
        out: dict[str, Any] = {"round": r, "error": f"{type(error).__name__}: {error}", "hook_state": {}}
        for h in self.hooks.hooks:  # what each hook knows so far (e.g. an attack's malicious clients)
            try:
                out["hook_state"][h.name] = json.loads(json.dumps(h.state_dict()))
            except (TypeError, ValueError):  # not JSON (tensors): left out
                pass
        try:
            generated = self.server.prompts_for(list(range(self.num_clients))) if self.server.sends_prompts else {}
            rows = self.evaluate_clients(generated)
            # The clients' own models as they stand, and what the server would now give them.
            out["accuracy_per_client"] = [row["acc_adapted"] for row in rows]
            if generated:
                out["accuracy_generated_per_client"] = [row["acc_generated"] for row in rows]
        except Exception as e:  # the measurement is best effort; the divergence itself is the result
            out["accuracy_error"] = f"{type(e).__name__}: {e}"
        (self.run_dir / "diverged.json").write_text(json.dumps(out, indent=2))
        self.log(f"diverged in round {r}: {error}")

    def run_round(self, r: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.current_round = r
        participants = self.schedule[r - 1]
        sent = self.server.prompts_for(participants)
        client_rows = self.train_participants(r, participants, sent)
        deltas: dict[int, torch.Tensor] = {}
        for n, row in client_rows.items():
            delta = row.pop("_delta", None)
            if delta is not None:
                deltas[n] = delta
                row["delta_norm"] = float(delta.norm())
        failed = {n: row["error"] for n, row in client_rows.items() if "error" in row}
        t_train = time.perf_counter() - t0
        server_info = self.server_step(r, deltas)
        record: dict[str, Any] = {"type": "round", "round": r, "participants": participants,
                                  **round_train_stats(client_rows.values()), **server_info}
        if failed:
            record["failed_clients"] = {str(n): e for n, e in sorted(failed.items())}
        rows = []
        t_eval = time.perf_counter()
        if r % self.cfg.eval_every == 0 or r == self.cfg.rounds:
            evals = self.evaluate_all()
            for e in evals:
                n = e["client"]
                rows.append({"type": "client", "round": r, "participated": n in client_rows, **client_rows.get(n, {}), **e})
            if all(e.get("withheld") for e in evals):  # kept by the clients (DESIGN §5, "What leaves a client")
                record["client_metrics"] = "withheld"
            elif not any(e.get("acc_adapted") is not None for e in evals):
                raise RuntimeError(f"round {r}: no client could be evaluated; see the errors in {self.run_dir / 'log.txt'}")
            else:
                record.update(round_eval_stats(evals))
            record["generated_prompt_spread"] = self._prompt_spread
        else:
            rows = [{"type": "client", "round": r, "client": n, "participated": True, **row} for n, row in client_rows.items()]
        record["time_eval_s"] = time.perf_counter() - t_eval
        record["clients"] = rows
        record.update(self.hooks.end_of_round(self.ctx, round=r, record=record))
        record["time_train_s"] = t_train
        record["time_round_s"] = time.perf_counter() - t0
        record["clients"] = record.pop("clients")  # keep it last (the run pops it into client records)
        return record

    # ------------------------------------------------------------------------------------------
    def run_new_clients(self, metrics_path: Path) -> None:
        """DESIGN §1, "New clients": after the last round each held-out client joins. Round 0: its head
        alone trains E epochs on the prompt it received; join rounds 1..R: prompt and head train E
        epochs (pfedpg: from G(P_base, d_new), returning ΔP_new; the server updates d_new only; G and
        P_base stay frozen). Every method spends the same (R + 1)·E epochs; rows go to metrics.jsonl
        as ``type: join``."""
        if not self.new_facts:
            return
        t0 = time.perf_counter()
        before = {k: v.detach().clone() for k, v in self.server.state_dict().items()}
        self.ctx.joins = {}
        rows = []
        for j in range(len(self.new_facts)):
            rows += self.join_client(j)
        changed = [k for k, v in self.server.state_dict().items() if not torch.equal(v, before[k])]
        if changed:  # an invariant of the protocol, checked on every run (not a user error)
            raise RuntimeError(f"join rounds changed the shared server state {changed}; this is a bug")
        with open(metrics_path, "a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        self.join_seconds = time.perf_counter() - t0

    def join_client(self, j: int) -> list[dict[str, Any]]:
        """New client ``j``'s rounds 0..R (rows for metrics.jsonl). Its streams (head init, VPT init,
        shuffling) are keyed by its id and the join round, the same for every method (paired)."""
        cfg, fact = self.cfg, self.new_facts[j]
        n, last, R = fact["client"], cfg.rounds, cfg.data.new_client_rounds
        x, y = self.new_train_data[j]
        xt, yt = self.new_test_data[j]
        w, b = self._fresh_head(self.seeds.torch("join.head", client=n))
        state = self.server.join_state()
        if state is None:
            prompt = self._vpt_prompt(self.seeds.torch("join.prompt", client=n))
        else:
            prompt = self.server.join_prompt(state)
        updates = self.server.joins_with_updates
        record = self.ctx.joins.setdefault(n, [])
        initial = state["descriptor"].cpu().clone() if state is not None and "descriptor" in state else None
        bs = cfg.client.eval_batch_size
        rows = []
        for jr in range(R + 1):
            r = last + jr
            start = self.server.join_prompt(state) if (updates and jr > 0) else prompt
            load_into(self.model, prompt=start, head_weight=w, head_bias=b)
            data = self.hooks.client_data(self.ctx, client=n, round=r, data=ClientData(x, y))
            job = LocalJob(client=n, round=r, model=self.model, data=data,
                           generator=self.seeds.torch("join.local_train", client=n, round=jr),
                           run_default=partial(sgd_local_training, cfg=cfg.client),
                           augment=self.augment_stream("join.augment", n, jr))
            with frozen_prompt(self.model) if jr == 0 else contextlib.nullcontext():  # round 0: the head alone
                result = self.hooks.local_training(self.ctx, job)
            with torch.no_grad():
                adapted = self.model.prompt.prompt.detach().clone()
                w, b = self.model.head.weight.detach().clone(), self.model.head.bias.detach().clone()
            row: dict[str, Any] = {"type": "join", "round": r, "join_round": jr, "client": n,
                                   "partition_id": fact["partition_id"], "train_loss": result.loss,
                                   "local_steps": result.steps, **result.extra}
            stop = False
            if updates and jr > 0:
                delta = self.hooks.outgoing_delta(self.ctx, client=n, round=r, delta=adapted - start)
                row["delta_norm"] = float(delta.norm())
                if torch.isfinite(delta).all():
                    row.update(self.server.join_step(state, delta))
                    # What the server saw, kept on the CPU for the probes (ctx.joins).
                    record.append({"round": r, "sent": start.cpu().clone(), "delta": delta.detach().cpu().clone(),
                                   "descriptor": state["descriptor"].cpu().clone(), "initial_descriptor": initial})
                else:  # recorded and logged; its remaining join rounds are not run
                    row["error"] = f"new client {n} sent a non-finite prompt delta in join round {jr}"
                    self.log(row["error"] + "; its join rounds stop here")
                    stop = True
            prompt = adapted
            load_into(self.model, prompt=adapted, head_weight=w, head_bias=b)
            row["acc_adapted"], row["loss_adapted"] = evaluate(self.model, xt, yt, batch_size=bs)
            if updates:
                load_into(self.model, prompt=self.server.join_prompt(state), head_weight=w, head_bias=b)
                row["acc_generated"], row["loss_generated"] = evaluate(self.model, xt, yt, batch_size=bs)
            rows.append(row)
            if stop:
                break
        name = self.client_names([fact])[0]
        self.log(f"new client {n} (partition id {fact['partition_id']}, {name}): accuracy after join round 0 (head only) "
                 f"{rows[0]['acc_adapted']:.4f} -> after join round {rows[-1]['join_round']} {rows[-1]['acc_adapted']:.4f}")
        return rows

    def new_clients_summary(self, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        """summary.json's ``new_clients``: accuracy after each join round 0..R, per new client, mean and
        worst (a round a client did not reach is None)."""
        if not self.new_facts:
            return None
        cfg, R = self.cfg, self.cfg.data.new_client_rounds
        ids = [f["client"] for f in self.new_facts]
        got = {(r["client"], r["join_round"]): r for r in rows if r["type"] == "join"}

        def curve(key):
            per = [[got.get((n, j), {}).get(key) for j in range(R + 1)] for n in ids]
            if all(v is None for p in per for v in p):
                return None
            full = [None if any(v is None for v in col) else col for col in zip(*per)]
            return {"mean": [None if col is None else float(np.mean(col)) for col in full],
                    "worst": [None if col is None else float(min(col)) for col in full], "per_client": per}

        acc = curve("acc_adapted")
        errors = [r["error"] for r in got.values() if "error" in r]
        k_d = self.prompt_tokens * self.dim
        # What one new client exchanges with the server over its join rounds: a prompt every round and a
        # delta every join round when the server updates it, else the one starting prompt (if any).
        updates = self.server.joins_with_updates
        down = (R + 1) * k_d if updates else (k_d if self.server.join_state() is not None else 0)
        up = R * k_d if updates else 0
        return {
            "clients": ids, "partition_ids": [f["partition_id"] for f in self.new_facts],
            "names": self.client_names(self.new_facts), "join_rounds": R, "local_epochs": cfg.client.local_epochs,
            "budget_epochs": (R + 1) * cfg.client.local_epochs,
            "start": self.server.join_description,
            "round_0": "the head alone, trained E local epochs on the received prompt",
            "train_per_client": [f["train"] for f in self.new_facts],
            "test_per_client": [f["evaluated"] for f in self.new_facts],
            "accuracy": acc, "accuracy_generated": curve("acc_generated"),
            "final": {"mean": acc["mean"][-1], "worst": acc["worst"][-1]} if acc else None,
            "communication": {"down_numbers_per_client": down, "up_numbers_per_client": up,
                              "bytes_per_client": 4 * (down + up)},
            **({"errors": errors} if errors else {}),
            "seconds": self.join_seconds,
        }

    def summarize(self, metrics_path: Path) -> dict[str, Any]:
        rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln]
        last = self.cfg.rounds
        final = sorted((r for r in rows if r["type"] == "client" and r["round"] == last and "acc_adapted" in r),
                       key=lambda r: r["client"])
        rounds = [r for r in rows if r["type"] == "round"]

        missing = [r["client"] for r in final if r["acc_adapted"] is None]
        summary = {
            "method": self.cfg.method, "seed": self.cfg.seed, "rounds": last,
            "num_clients": self.num_clients, "clients_per_round": len(self.schedule[0]),
            "generator": self.cfg.server.generator if self.cfg.method == "pfedpg" else None,
            # (clients that could not be evaluated, e.g. a Flower client that died, count as None, not 0)
            **accuracy_blocks(final),
            "communication": self.communication(),
            "data": {"source": self.cfg.data.source, "partition": self.cfg.data.partition,
                     "train_per_client": [f["train"] for f in self.client_facts],
                     "test_per_client": [f["evaluated"] for f in self.client_facts],
                     "client_names": self.client_names(),
                     # with data.new_clients the training clients are renumbered; their ids in the partition:
                     **({"partition_ids": [f["partition_id"] for f in self.client_facts]} if self.new_facts else {})},
            "evaluated_on": self.cfg.evaluate_on,
            "time": {"setup_s": self.setup_seconds, "rounds_s": sum(r["time_round_s"] for r in rounds),
                     "mean_round_s": float(np.mean([r["time_round_s"] for r in rounds])) if rounds else 0.0,
                     # training + server step only (rounds that also evaluate cost more)
                     "mean_train_round_s": float(np.mean([r["time_round_s"] - r.get("time_eval_s", 0.0) for r in rounds]))
                     if rounds else 0.0},
            "hooks": [h.name for h in self.hooks.hooks],
            "backbone": {"name": self.cfg.model.name, "weights": self.cfg.model.weights, "file": self.backbone_file},
            "device": {**describe(self.device), "amp": self.cfg.amp,
                       "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")},
        }
        if missing:
            summary["clients_missing"] = missing
        if any(r.get("client_metrics") == "withheld" for r in rounds):
            summary["client_metrics"] = (f"withheld: under {', '.join(self.hooks.privacy_mechanisms())} each client "
                                         "kept its losses, accuracies and measurements (privacy.release_metrics: false)")
        new = self.new_clients_summary(rows)
        if new is not None:
            summary["new_clients"] = new
        summary.update({"hook_results": self.hooks.end_of_run(self.ctx, summary=summary)})
        return summary
