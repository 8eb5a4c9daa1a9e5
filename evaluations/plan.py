"""``pfedpg-eval plan``: what a run, sweep, audit or matrix will cost, before any of it runs (DESIGN §9).

For a run config or a grid file (privacy, audit, robustness) the plan

* expands the grid into its runs (the grid's own cell builders) and, per seed, partitions the data as
  the runs will (split sizes only, no training);
* counts each run's work: local SGD steps (``E · ⌈|D_n| / B⌉`` per participant and round; new
  clients' join rounds included), records evaluated (adapted and generated prompt on every
  evaluation round), the audit's shadow and reference trainings (LiRA, RMIA), and what each client
  sends and receives per round;
* builds one run for real — its uint8 record store and the backbone on the chosen device, with
  random weights of the configured architecture (speed does not depend on the weights, and nothing is
  downloaded or pretrained) — and times a few real local steps (the clients' own recipe: input
  pipeline, augmentation, and DP-SGD when a cell uses it) and an evaluation batch;
* extrapolates: set-up + steps × seconds per step per run, and the wall time with ``--jobs N``
  (timed with a cell's threads there; the machine's load named: :mod:`evaluations.plan_timing`).

Memory is measured, not modelled: the resident set (and on a GPU the peak allocated device memory)
after building the run and taking the steps — what a run holds. Not counted: pretraining a backbone
not cached yet (its steps are stated), the server step (milliseconds), the audit's forward-only probes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from evaluations.plan_timing import CpuShare, cell_threads, machine_load, threads, time_note, wall_time
from evaluations.plan_timing import duration as _duration
from evaluations.plan_timing import size as _size
from evaluations.plan_timing import spread as _spread
from evaluations.sweep import Cell
from pfedpg.config import RunConfig, config_from_dict, load_config, load_yaml_file
from pfedpg.errors import ConfigError

GRID_KINDS = ("privacy", "audit", "robustness")


# ------------------------------------------------------------------------------------------------
# What runs: a run config, or a grid file's cells


def expand(path: str | Path, overrides: list[str] | None) -> tuple[str, list[Cell]]:
    """(kind, the cells that would run) for a run config (one cell) or a grid file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found; pass --config with a run config or a privacy, audit or "
                          "robustness file (see configs/)")
    tree = load_yaml_file(p) or {}
    # A grid file holds base / base_config and its section alone (a run config may have a privacy: section).
    kind = next((k for k in GRID_KINDS if isinstance(tree, dict) and k in tree
                 and set(tree) <= {"base", "base_config", k}), "train")
    if kind == "train":
        cfg = load_config(p, overrides)
        return kind, [Cell(name=cfg.run_name or cfg.method, config=cfg.to_dict())]
    if kind == "privacy":
        from evaluations.privacy import cells, load_sweep

        sweep, base = load_sweep(p, overrides)
        return kind, cells(sweep, base)
    if kind == "audit":
        from evaluations.leakage_sweep import load_audit, with_audit_hook
        from evaluations.privacy import cells

        grid, probes, base = load_audit(p, overrides)
        return kind, cells(grid, with_audit_hook(base, probes))
    from evaluations.robustness import _clients, cells, load_matrix

    matrix, base = load_matrix(p, overrides)
    return kind, [c for c in cells(matrix, base, *_clients(base)) if c.infeasible is None]


# ------------------------------------------------------------------------------------------------
# Counting a run's work


@dataclasses.dataclass
class Work:
    """One run's work in units the measured step times price."""

    train_steps: int = 0  # plain local SGD steps (and shadow / reference trainings)
    dp_steps: int = 0  # DP-SGD steps (per-sample gradients, clipping, noise)
    eval_records: int = 0  # records evaluated (forward only), every evaluation round and prompt
    pretrain_steps: int = 0  # backbone pretraining not cached yet (not timed; shared by runs of one key)
    pretrain_key: str | None = None
    numbers_sent: int = 0  # numbers the clients send over the run
    numbers_received: int = 0


def _facts(cfg: RunConfig, cache: dict) -> dict[str, Any]:
    """Split sizes of cfg's partition (cached per seed and data config): training clients' train and
    evaluated sizes, new clients' too."""
    from pfedpg.run import client_indices, partition_run

    key = json.dumps([cfg.seed, dataclasses.asdict(cfg.data), cfg.evaluate_on], sort_keys=True, default=str)
    if key not in cache:
        dataset, splits, new = partition_run(cfg)
        sizes = [(len(s.train), len(client_indices(cfg, s)[1])) for s in splits]
        new_sizes = [(len(s.train), len(client_indices(cfg, s)[1])) for s in new]
        cache[key] = {"train": [a for a, _ in sizes], "eval": [b for _, b in sizes],
                      "new_train": [a for a, _ in new_sizes], "new_eval": [b for _, b in new_sizes],
                      "public": int(dataset.public.sum()) if dataset.public is not None else 0,
                      "store_bytes": int(sum(a + b for a, b in sizes + new_sizes)) * 3 * dataset.image_size ** 2,
                      "storage_size": dataset.image_size, "classes": dataset.num_classes}
        del dataset
    return cache[key]


def count(cfg: RunConfig, facts: dict[str, Any], *, prompt_numbers: int) -> Work:
    """The work of one run with config ``cfg`` on a partition with ``facts``."""
    from pfedpg.run import participation_schedule
    from pfedpg.seeding import Seeds
    from pfedpg.server import SERVERS

    w = Work()
    bs, e = cfg.client.batch_size, cfg.client.local_epochs
    names = [s.name for s in cfg.hook_specs]
    dp_sgd = "dp_sgd" in names
    sends = SERVERS.get(cfg.method).sends_prompts
    n = len(facts["train"])
    schedule = participation_schedule(num_clients=n, per_round=cfg.clients_per_round, rounds=cfg.rounds,
                                      seeds=Seeds(cfg.seed), held_out=len(facts["new_train"]))
    steps = [e * math.ceil(t / bs) for t in facts["train"]]
    evals = sum(facts["eval"]) * (2 if sends else 1)  # adapted prompt, and the generated one where sent
    for r, participants in enumerate(schedule, start=1):
        local = sum(steps[c] for c in participants)
        if dp_sgd:
            w.dp_steps += local
        else:
            w.train_steps += local
        if sends:
            w.numbers_sent += len(participants) * prompt_numbers
            w.numbers_received += len(participants) * prompt_numbers
        if r % cfg.eval_every == 0 or r == cfg.rounds:
            w.eval_records += evals
    joins = cfg.data.new_client_rounds + 1 if facts["new_train"] else 0
    for t, v in zip(facts["new_train"], facts["new_eval"]):
        if dp_sgd:
            w.dp_steps += joins * e * math.ceil(t / bs)
        else:
            w.train_steps += joins * e * math.ceil(t / bs)
        w.eval_records += joins * v * (2 if sends else 1)
    for spec in cfg.hook_specs:
        if spec.name == "leakage_audit":
            w.train_steps += _audit_steps(spec.options, facts, cfg)
    if cfg.model.weights == "pretrain":
        from pfedpg.pretrain import cached_path

        if not cached_path(cfg).is_file():
            # Records of the public split; of an external set only where max_records says (else unknown: 0).
            records = facts["public"] if cfg.pretrain.data.path is None else (cfg.pretrain.data.max_records or 0)
            w.pretrain_steps = cfg.pretrain.epochs * math.ceil(records / cfg.pretrain.batch_size)
            w.pretrain_key = str(cached_path(cfg))
    return w


def _audit_steps(options: dict[str, Any], facts: dict[str, Any], cfg: RunConfig) -> int:
    """LiRA shadows and RMIA references: prompt-and-head trainings on halves of the auxiliary records
    (the shadow clients' training and held-out records)."""
    from attacks.leakage import LeakageAudit

    audit = LeakageAudit(**options)
    n = len(facts["train"])
    shadows = audit.shadow_ids if audit.shadow_ids is not None else list(range(n - audit.shadow_count, n))
    aux = sum(facts["train"][s] + facts["eval"][s] for s in shadows if s < n)
    bs = cfg.client.batch_size
    steps = 0
    if "lira" in audit.probes:
        steps += audit.lira["shadows"] * audit.lira["epochs"] * math.ceil((aux // 2) / bs)
    if "rmia" in audit.probes:
        pool = aux - min(audit.rmia["population"], aux // 4)
        steps += audit.rmia["references"] * audit.rmia["epochs"] * math.ceil((pool // 2) / bs)
    return steps


# ------------------------------------------------------------------------------------------------
# Measuring one run for real


def _rss_bytes() -> int:
    """Peak resident set of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timer(device: torch.device) -> Callable[[], float]:
    """perf_counter that waits for the device's queued work first."""
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
    return now


def _time_steps(trainer, cfg: RunConfig, steps: int) -> dict[str, Any]:
    """Seconds per local step (plain; DP-SGD through the hook chain when ``cfg`` has it) on client
    0's records, after one warm-up step, and seconds per evaluated record."""
    from pfedpg.client import evaluate, load_into, sgd_local_training
    from pfedpg.jobs import ClientData, LocalJob

    now = _timer(trainer.device)
    clients = trainer.clients  # (in-process: their records, states and the shared model)
    bs, ebs = cfg.client.batch_size, cfg.client.eval_batch
    x, y = clients.records.train_data[0]
    m = min(len(y), (steps + 1) * bs)
    st = clients.states[0]
    plain = partial(sgd_local_training, cfg=trainer.cfg.client)  # (E = 1 in the timing build)

    def local(records: int, through_hooks: bool) -> float:
        load_into(clients.model, prompt=st.prompt, head_weight=st.head_weight, head_bias=st.head_bias)
        job = LocalJob(client=0, round=1, model=clients.model, data=ClientData(x[:records], y[:records]),
                       generator=trainer.seeds.torch("plan", client=0), run_default=plain,
                       augment=clients.augment_stream("plan.augment", 0, 1))
        return trainer.hooks.local_training(trainer.ctx, job) if through_hooks else plain(job)

    def per_step(through_hooks: bool) -> float:
        local(min(m, bs), through_hooks)  # warm-up: allocator, kernels, first touch
        t = now()
        result = local(m, through_hooks)
        return (now() - t) / max(1, result.steps)

    out = {"train_step_s": per_step(False), "measured_records": m, "batch_size": bs, "eval_batch_size": ebs}
    if any(s.name == "dp_sgd" for s in cfg.hook_specs):
        out["dp_step_s"] = per_step(True)
    xe, ye = clients.records.test_data[0]
    k = min(ebs * -(-32 // ebs), len(ye))  # at least 32 records (a small batch alone times noisily), in batches of ebs
    evaluate(clients.model, xe[:min(k, ebs)], ye[:min(k, ebs)], batch_size=ebs)  # warm-up
    t = now()
    evaluate(clients.model, xe[:k], ye[:k], batch_size=ebs)
    out.update(eval_record_s=(now() - t) / max(1, k), eval_records_timed=k)
    return out


def measure(cfg: RunConfig, *, steps: int, jobs: int = 1, log: Callable[[str], None] = lambda m: None
            ) -> dict[str, Any]:
    """Build the run (random weights of the configured backbone, its uint8 records, on its device),
    time ``steps`` local steps and an evaluation batch with the torch threads a cell gets under
    ``--jobs jobs``, and read the memory it took."""
    n = cell_threads(cfg, jobs)
    with threads(n):
        return {**_measure(cfg, steps=steps, log=log, n_threads=n), "threads": n}


def _measure(cfg: RunConfig, *, steps: int, log: Callable[[str], None], n_threads: int) -> dict[str, Any]:
    import tempfile

    from pfedpg.models.device import out_of_memory_as_error
    from pfedpg.run import Trainer

    timing = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights="random", checkpoint=None),
                                 client=dataclasses.replace(cfg.client, local_epochs=1), rounds=1,
                                 data=dataclasses.replace(cfg.data, new_clients=None))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        log(f"plan: loading the data and building the run ({cfg.data.source}, {cfg.model.name}, random weights) ...")
        with out_of_memory_as_error(cfg.device):
            trainer = Trainer(timing, run_dir=tmp, log=lambda m: None)
        device = trainer.device
        out: dict[str, Any] = {"device": str(device), "build_s": time.perf_counter() - t0}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.hooks.setup(trainer.ctx)  # (a hook whose setup fails would fail the run too)
        log(f"plan: built in {out['build_s']:.1f} s; timing {steps} local step(s) after a warm-up and an evaluation "
            f"batch on {device} with {n_threads} torch thread(s) ...")
        with out_of_memory_as_error(str(device)), CpuShare() as busy:
            out.update(_time_steps(trainer, cfg, steps))
        out["cpu_share"] = busy.share(n_threads) if device.type == "cpu" else None
        shape, clients = trainer.loop.shape, trainer.clients
        out.update(backbone_numbers=shape.backbone_numbers, prompt_numbers=shape.prompt_tokens * shape.dim,
                   model_bytes=sum(p.numel() * p.element_size() for p in clients.model.parameters()),
                   records_bytes=sum(t.numel() * t.element_size()
                                     for pair in (*clients.records.train_data, *clients.records.test_data)
                                     for t in pair))
        if device.type == "cuda":
            out["device_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        out["host_peak_bytes"] = _rss_bytes()
        del trainer
    return out


# ------------------------------------------------------------------------------------------------


def plan(path: str | Path, overrides: list[str] | None = None, *, steps: int = 3,
         log: Callable[[str], None] = print, jobs: int = 1, name: str | None = None) -> dict[str, Any]:
    """The plan of a config file, as a dict (:func:`render` writes it for a reader); ``jobs``: the
    ``--jobs`` the grid will run with (its cells' threads and the wall time); ``name``: what the
    lines call the config (default: its path)."""
    if not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs={jobs!r} must be a positive integer")
    from evaluations.plugins import load_plugins

    load_plugins()  # the hooks the cells name (as the CLI does)
    load = os.getloadavg()[0]  # before the plan's own work adds to it
    log(f"plan: reading {name or path} ...")
    kind, grid = expand(path, overrides)
    configs = [config_from_dict(c.config) for c in grid]
    if not configs:
        raise ConfigError(f"{name or path}: the grid has no runnable cell")
    from evaluations.preflight import check_cells

    check_cells([(c.name, cfg) for c, cfg in zip(grid, configs)])  # every cell's hooks, as the grid checks them
    # Time the recipe with the most expensive local training: a DP-SGD cell if there is one.
    probe = next((c for c in configs if any(s.name == "dp_sgd" for s in c.hook_specs)), configs[0])
    from pfedpg.models.device import resolve_device

    device = resolve_device(probe.device, amp=probe.amp)
    log(f"plan: {len(grid)} run(s); measuring {'a DP-SGD one' if probe is not configs[0] else 'one'} on {device}")
    m = measure(probe, steps=steps, jobs=jobs, log=log)
    m.update(machine_load(load, jobs, m["threads"]))
    cache: dict = {}
    runs = []
    log(f"plan: partitioning the data of {len({c.seed for c in configs})} seed(s) and counting each run's work ...")
    for cell, cfg in zip(grid, configs):
        facts = _facts(cfg, cache)
        w = count(cfg, facts, prompt_numbers=m["prompt_numbers"])
        seconds = (m["build_s"] + w.train_steps * m["train_step_s"]  # set-up, as measured, then the work
                   + w.dp_steps * m.get("dp_step_s", m["train_step_s"]) + w.eval_records * m["eval_record_s"])
        runs.append({"cell": cell.name, "method": cfg.method, "seed": cfg.seed, "rounds": cfg.rounds,
                     "clients": len(facts["train"]), "new_clients": len(facts["new_train"]),
                     **dataclasses.asdict(w), "seconds": seconds})
    facts = _facts(configs[0], cache)
    first = configs[0]
    return {
        "kind": kind, "config": str(path), "runs": runs, "measured": m,
        "data": {"source": first.data.source, "clients": len(facts["train"]), "new_clients": len(facts["new_train"]),
                 "train_per_client": facts["train"], "eval_per_client": facts["eval"],
                 "image_size": first.data.image_size, "storage_size": facts["storage_size"],
                 "store_bytes": facts["store_bytes"], "augment": first.data.augment},
        "communication": {"numbers_per_client_round": m["prompt_numbers"],
                          "bytes_per_client_round": 4 * m["prompt_numbers"],
                          "ratio_vs_backbone": m["prompt_numbers"] / m["backbone_numbers"]},
        "total_seconds": sum(r["seconds"] for r in runs), "jobs": jobs,
        "wall_seconds": wall_time([r["seconds"] for r in runs],
                                  jobs if device.type != "cuda" else min(jobs, max(1, torch.cuda.device_count()))),
        # A backbone is pretrained once for every run that shares its cache key.
        "pretrain_steps": sum({r["pretrain_key"]: r["pretrain_steps"] for r in runs if r["pretrain_key"]}.values()),
        "pretrain_backbones": len({r["pretrain_key"] for r in runs if r["pretrain_key"]}),
    }


def render(p: dict[str, Any]) -> str:
    m, d, c = p["measured"], p["data"], p["communication"]
    lines = [f"plan of {p['config']} ({p['kind']}: {len(p['runs'])} run{'s' if len(p['runs']) != 1 else ''})", ""]
    lines += [f"data       {d['source']}: {d['clients']} clients"
              + (f" + {d['new_clients']} new" if d["new_clients"] else ""),
              f"           training records per client {_spread(d['train_per_client'])}",
              f"           evaluated records per client {_spread(d['eval_per_client'])}",
              f"           stored uint8 at {d['storage_size']}×{d['storage_size']}, "
              f"model input {d['image_size']}×{d['image_size']}"
              f" (resized per batch on the device), augment: {d['augment']}"]
    lines += [f"sends      {c['numbers_per_client_round']:,} numbers ({_size(c['bytes_per_client_round'])}) "
              f"down and up per client and round; {c['ratio_vs_backbone']:.2e} of the backbone's "
              f"{m['backbone_numbers']:,}"]
    mem = [f"memory     resident {_size(m['host_peak_bytes'])} measured (records {_size(m['records_bytes'])}, "
           f"model {_size(m['model_bytes'])}, plus the runtime and a few batches)"]
    if "device_peak_bytes" in m:
        mem.append(f"           {m['device']}: {_size(m['device_peak_bytes'])} allocated at peak")
    lines += mem
    lines.append(f"time       on {m['device']}: {m['train_step_s'] * 1e3:.1f} ms per local step "
                 f"(batch size {m['batch_size']}), {m['eval_record_s'] * 1e3:.2f} ms per evaluated record "
                 f"({m['eval_records_timed']} records in batches of {m['eval_batch_size']})"
                 + (f", {m['dp_step_s'] * 1e3:.1f} ms per DP-SGD step "
                    f"({m['dp_step_s'] / m['train_step_s']:.2f}× a plain step)"
                    if "dp_step_s" in m else "") + f" (timed on {m['measured_records']} records of client 0); "
                 f"set-up {_duration(m['build_s'])} per run")
    lines.append("")
    lines.append("| run | method | seed | rounds | local steps | DP-SGD steps "
                 "| records evaluated | numbers sent | time |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in p["runs"]:
        lines.append(f"| {r['cell']} | {r['method']} | {r['seed']} | {r['rounds']} | {r['train_steps']:,} | "
                     f"{r['dp_steps']:,} | {r['eval_records']:,} | {r['numbers_sent']:,} | {_duration(r['seconds'])} |")
    lines.append("")
    total, jobs = p["total_seconds"], p.get("jobs", 1)
    lines.append(f"total      {_duration(total)} for {len(p['runs'])} run(s) one after another"
                 + (f"; about {_duration(p['wall_seconds'])} with --jobs {jobs}" if jobs > 1 and len(p["runs"]) > 1
                    else "; plan --jobs N gives the wall time with N at once" if len(p["runs"]) > 1 else ""))
    lines += time_note(m, jobs, m["device"].split(":")[0])
    if p["pretrain_backbones"]:
        lines.append(f"           plus pretraining {p['pretrain_backbones']} backbone(s) not cached yet: "
                     f"{p['pretrain_steps']:,} steps of the whole backbone (not timed)")
    lines.append("not counted: the server step (milliseconds), the audit's forward-only probes, writing reports")
    return "\n".join(lines)


__all__ = ["count", "expand", "measure", "plan", "render"]
