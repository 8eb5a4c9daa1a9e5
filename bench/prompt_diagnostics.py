"""Diagnostics of a finished run's prompts, for bench/real_data.py: how far the server's prompts moved
(``prompt_drift``) and how much the final prompt matters to each client's final head
(``prompt_ablation``)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def prompt_drift(rdir: Path) -> dict | None:
    """How far the server's prompts moved: ‖P_n(T) − P_n(0)‖ / ‖P_n(0)‖ averaged over clients, next to
    the mean ‖ΔP_n‖ / ‖P_n‖ the clients sent in the last round (pfedpg and fedvpt)."""
    import torch
    import yaml

    ckpts = sorted((rdir / "checkpoints").glob("round_*.pt"))
    if not ckpts:
        return None
    from pfedpg.config import config_from_dict
    from pfedpg.seeding import Seeds
    from pfedpg.server import SERVERS

    cfg = config_from_dict(yaml.safe_load((rdir / "config.yaml").read_text()))
    if cfg.method == "local":
        return None
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
    seeds = json.loads((rdir / "seeds.json").read_text())
    sizes = [c["train"] for c in seeds["clients"]]
    kw = cfg.model.kwargs
    patch = kw.get("patch_size", 16)
    dim = kw.get("embed_dim")
    init_bound = math.sqrt(6.0 / (3 * patch * patch + dim))  # pfedpg.models.vpt_init_bound
    tokens = cfg.model.num_prompts * (kw.get("depth", 12) if cfg.model.prompt_depth == "deep" else 1)
    make = lambda: SERVERS.get(cfg.method)(cfg.server, num_clients=len(sizes), num_prompts=tokens,
                                          dim=dim, init_bound=init_bound, seeds=Seeds(cfg.seed), train_sizes=sizes)
    s0, s1 = make(), make()
    s1.load_state_dict(state["server"])
    clients = list(range(len(sizes)))
    p0, p1 = s0.prompts_for(clients), s1.prompts_for(clients)
    moved = [float((p1[n] - p0[n]).norm() / p0[n].norm()) for n in clients]
    rows = [json.loads(ln) for ln in (rdir / "metrics.jsonl").read_text().splitlines() if ln]
    last = max(r["round"] for r in rows)
    deltas = [r["delta_norm"] / float(p1[r["client"]].norm()) for r in rows
              if r.get("type") == "client" and r["round"] == last and "delta_norm" in r]
    spread = [r.get("generated_prompt_spread") for r in rows if r.get("type") == "round" and r["round"] == last]
    return {"moved_rel": sum(moved) / len(moved), "delta_rel_last": sum(deltas) / max(1, len(deltas)),
            "prompt_norm": sum(float(p1[n].norm()) for n in clients) / len(clients),
            "spread": spread[0] if spread else None}


def prompt_ablation(rdir: Path) -> dict | None:
    """Diagnostic (not a tuning signal): each client's final head evaluated on its evaluation split with
    (a) its final adapted prompt — the reported accuracy — and (b) the prompt it started the run with
    (the server's initial P_n for pfedpg/fedvpt, the client's own init for local). A gap near zero
    means the prompt, the only thing the server influences, hardly matters at these settings."""
    import torch
    import yaml

    from pfedpg.client import evaluate, load_into
    from pfedpg.config import config_from_dict
    from pfedpg.run import Trainer

    ckpts = sorted((rdir / "checkpoints").glob("round_*.pt"))
    if not ckpts:
        return None
    cfg = config_from_dict(yaml.safe_load((rdir / "config.yaml").read_text()))
    cwd = os.getcwd()
    os.chdir(REPO)  # the configs' relative paths
    try:
        trainer = Trainer(cfg, run_dir=rdir / "_ablation_unused")
    finally:
        os.chdir(cwd)
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
    final, start = [], []
    for n, d in enumerate(state["clients"]):
        x, y = trainer.clients.records.test_data[n]
        init = trainer.clients.states[n].prompt
        load_into(trainer.clients.model, prompt=d["prompt"], head_weight=d["head_weight"], head_bias=d["head_bias"])
        final.append(evaluate(trainer.clients.model, x, y)[0])
        load_into(trainer.clients.model, prompt=init, head_weight=d["head_weight"], head_bias=d["head_bias"])
        start.append(evaluate(trainer.clients.model, x, y)[0])
    return {"acc_final_prompt": sum(final) / len(final), "acc_initial_prompt": sum(start) / len(start)}
