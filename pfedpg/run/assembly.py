"""Assembling a run: from its surroundings (:class:`~pfedpg.run.env.RunEnv`) and its clients
(:class:`~pfedpg.run.clients.Clients`) to the :class:`~pfedpg.run.rounds.RoundLoop` — the backbone
(pretrained if asked) and prompted model, the method's server, the participation schedule and the
hooks' context, then the clients started on them."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from pfedpg.config import RunConfig
from pfedpg.context import RunContext
from pfedpg.data.pipeline import InputPipeline
from pfedpg.errors import ConfigError
from pfedpg.models import PromptedViT, backbone_num_params, build_backbone, vpt_init_bound
from pfedpg.run.clients import Clients, ModelShape, Roster
from pfedpg.run.env import RunEnv
from pfedpg.run.rounds import RoundLoop
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


def backbone_for(cfg: RunConfig, backbone_path: str | Path | None, *, dataset=None,
                 log: Callable[[str], None], progress: bool = False) -> str | Path | None:
    """The backbone file of the run: ``backbone_path`` if given, else for ``weights: pretrain`` the
    pretraining cache's entry (pretrained now on ``dataset`` if none is cached), else None."""
    if cfg.model.weights == "pretrain" and backbone_path is None:
        from pfedpg.pretrain import pretrain_backbone

        return pretrain_backbone(cfg, dataset=dataset, log=log, progress=progress)
    return backbone_path


def build_model(env: RunEnv, num_classes: int, backbone_path) -> tuple[PromptedViT, ModelShape]:
    """The frozen backbone (its init from the run's own stream) with its prompt and head, on the
    device, and its :class:`ModelShape`."""
    cfg = env.cfg
    with torch.random.fork_rng():  # timm's init reads torch's global generator; keep it ours
        torch.random.default_generator.manual_seed(int(env.seeds.sequence("init.backbone").generate_state(1)[0]))
        backbone = build_backbone(cfg.model, checkpoint=backbone_path)
    inputs = InputPipeline(image_size=cfg.data.image_size, mean=cfg.model.mean, std=cfg.model.std,
                           augment=cfg.data.augment)
    model = PromptedViT(backbone, num_prompts=cfg.model.num_prompts, num_classes=num_classes,
                        deep=cfg.model.prompt_depth == "deep", inputs=inputs, amp=cfg.amp).to(env.device)
    # K for shallow prompts, L·K for deep ones: the tokens a client trains, sends and the server generates.
    return model, ModelShape(prompt_tokens=model.num_prompt_tokens, dim=model.embed_dim,
                             init_bound=vpt_init_bound(backbone), num_classes=num_classes,
                             backbone_numbers=backbone_num_params(backbone))


def assemble(env: RunEnv, clients: Clients, *, backbone_path) -> RoundLoop:
    """The run's round loop over ``clients``: model, server, schedule and the hooks' context, built
    in that order from the clients' :class:`Roster`, then the clients started on them."""
    cfg, hooks = env.cfg, env.hooks
    roster = clients.facts()
    model, shape = build_model(env, roster.num_classes, backbone_path)
    train_sizes = [f.train for f in roster.clients]
    server_cls = SERVERS.get(cfg.method)
    # An audit's clients (canary clients) get the ids after the training and the new clients.
    audit_clients = hooks.assign_audit_clients(roster.num_clients + len(roster.new))
    audit_ids = [c for ids in audit_clients.values() for c in ids]
    if audit_ids and not server_cls.sends_prompts:
        raise ConfigError(f"hooks {sorted(audit_clients)} add clients whose releases the server takes in; "
                          f"method {cfg.method!r} sends nothing: use pfedpg or fedvpt")
    # Initialised on the CPU from its keyed streams (the same numbers on every device), then moved.
    server = server_cls(cfg.server, num_clients=roster.num_clients, num_prompts=shape.prompt_tokens, dim=shape.dim,
                        init_bound=shape.init_bound, seeds=env.seeds, train_sizes=train_sizes,
                        audit_clients=audit_ids).to(env.device)
    schedule = participation_schedule(num_clients=roster.num_clients, per_round=cfg.clients_per_round,
                                      rounds=cfg.rounds, seeds=env.seeds, held_out=len(roster.new))
    ctx = _context(env, roster, clients, model=model, server=server, schedule=schedule, audit_clients=audit_clients)
    clients.start(model=model, shape=shape, server=server, ctx=ctx)
    return RoundLoop(env, clients=clients, roster=roster, server=server, schedule=schedule, ctx=ctx, shape=shape,
                     audit_ids=audit_ids)


def _context(env: RunEnv, roster: Roster, clients: Clients, *, model, server, schedule,
             audit_clients) -> RunContext:
    cfg, views = env.cfg, clients.views()
    return RunContext(config=cfg, seeds=env.seeds, run_dir=env.run_dir, num_clients=roster.num_clients, log=env.log,
                      num_classes=roster.num_classes, server=server, schedule=schedule,
                      train_sizes=[f.train for f in roster.clients], eval_data=views.eval_data,
                      evaluate=views.evaluate, train_data=views.train_data, model=model,
                      client_states=views.client_states, client_info=roster.info(), hooks=list(env.hooks.hooks),
                      new_clients=[f.client for f in roster.new], new_train_sizes=[f.train for f in roster.new],
                      new_client_info=roster.info(roster.new),
                      join_rounds=cfg.data.new_client_rounds if roster.new else 0, audit_clients=audit_clients)
