"""A run's directory (DESIGN §8): opened fresh (``config.yaml``, ``env.json``, ``seeds.json``, an empty
``metrics.jsonl``), continued from its latest checkpoint (``--resume``), or — an unfinished run —
set aside into ``RUN_DIR/attempt-<k>/`` and started again."""
from __future__ import annotations

from pathlib import Path

from pfedpg import jsonio
from pfedpg.config import dump_config, saved_config
from pfedpg.errors import ConfigError
from pfedpg.run.checkpoint import latest_checkpoint, load_checkpoint, set_aside
from pfedpg.run.rounds import RoundLoop
from pfedpg.run.summary import environment


def open_run_dir(loop: RoundLoop, metrics_path: Path, *, resume: bool, restart: bool) -> int:
    """Prepare the run directory: continue from its latest checkpoint (``resume``; returns the
    round it holds), or start afresh — an unfinished run without a checkpoint (or with
    ``restart``) set aside first, a finished or resumable one refused. Returns the last round done."""
    run_dir = loop.run_dir
    unfinished = metrics_path.exists() and not (run_dir / "summary.json").exists()
    if unfinished and not resume and (restart or latest_checkpoint(run_dir) is None):
        kept = set_aside(run_dir)
        loop.log(f"run directory {run_dir} held an unfinished run"
                 f"{'' if restart else ' without a checkpoint'}; starting it again (its files are in {kept})")
    if resume:
        return resume_run(loop, metrics_path)
    if (run_dir / "summary.json").exists():
        raise ConfigError(f"run directory {str(run_dir)!r} holds a finished run; choose another --run-dir or "
                          "run_name (or --resume to rewrite its summary)")
    if metrics_path.exists():
        ckpt = latest_checkpoint(run_dir)
        raise ConfigError(f"run directory {str(run_dir)!r} holds an unfinished run (checkpoint {ckpt.name}); "
                          f"continue it with --resume --run-dir {run_dir}, or pass --restart to start it "
                          "again (its files are kept under RUN_DIR/attempt-<k>/)")
    write_run_files(loop)
    metrics_path.write_text("")
    return 0


def resume_run(loop: RoundLoop, metrics_path: Path) -> int:
    """The run restored from its latest checkpoint, metrics.jsonl cut back to it; returns its round."""
    run_dir = loop.run_dir
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise ConfigError(f"--resume: no checkpoint in {str(run_dir / 'checkpoints')!r}; run the same command "
                          "without --resume to start it again (the old files are kept under RUN_DIR/attempt-<k>/)")
    start = load_checkpoint(loop, ckpt)
    new = loop.roster.new
    before = saved_config((run_dir / "config.yaml").read_text()).rounds
    if before != loop.cfg.rounds:  # --set rounds=N (load_checkpoint allowed it): the run is now one of N rounds
        (run_dir / "config.yaml").write_text(dump_config(loop.cfg))
        loop.log(f"--resume: rounds {before} → {loop.cfg.rounds}: continuing after round {start} to round "
                 f"{loop.cfg.rounds} (config.yaml updated)")
    elif (run_dir / "summary.json").exists():
        loop.log(f"--resume of a finished run: rewriting its summary from {ckpt.name}"
                 + (f" (the {len(new)} new clients' join rounds run again, to the same numbers)" if new else ""))
    # Keep the records up to the checkpoint: the rounds after it are re-run identically.
    # (Join rounds run after the last round from the final state: they are re-run as well.)
    lines = [ln for ln in metrics_path.read_text().splitlines() if ln] if metrics_path.exists() else []
    if lines and not _is_json(lines[-1]):  # a last line cut short by a kill: a round after the checkpoint
        lines.pop()
    kept = [ln for ln in lines if jsonio.loads(ln)["round"] <= start and jsonio.loads(ln)["type"] != "join"]
    metrics_path.write_text("".join(ln + "\n" for ln in kept))
    return start


def _is_json(line: str) -> bool:
    try:
        jsonio.loads(line)
    except ValueError:  # json.JSONDecodeError is one
        return False
    return True


def write_run_files(loop: RoundLoop) -> None:
    """config.yaml, env.json and seeds.json of a new run."""
    cfg, run_dir, facts, new = loop.cfg, loop.run_dir, loop.roster.clients, loop.roster.new
    keys = ("client", "train", "test", "val", "domain")
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    (run_dir / "env.json").write_text(jsonio.dumps(environment(loop.device), indent=2))
    (run_dir / "seeds.json").write_text(jsonio.dumps({
        "master_seed": cfg.seed,
        "streams": "numpy.random.SeedSequence(master, spawn_key=(crc32(component), client, round))",
        "participation": loop.schedule,
        "clients": [{k: getattr(f, k) for k in keys} for f in facts],
        # data.new_clients: their ids here, and every client's id in the partition
        **({"new_clients": [{k: getattr(f, k) for k in keys} for f in new],
            "partition_ids": {"clients": [f.partition_id for f in facts],
                              "new_clients": [f.partition_id for f in new]}}
           if new else {}),
    }, indent=1))


def log_start(loop: RoundLoop, start: int) -> None:
    """The run's first log lines: what trains how, on which device (and from which round)."""
    cfg = loop.cfg
    if cfg.batched_clients:
        alone = [n for n in range(loop.num_clients) if loop.hooks.has_local_training(n)]
        loop.log("batched_clients: clients train in one batch" + (
            f"; clients {alone} run a local_training hook (e.g. dp_sgd) and train one after another"
            if alone else ""))
    loop.log(f"{cfg.method}: {loop.num_clients} clients, {cfg.rounds} rounds, "
             f"backbone {loop.shape.backbone_numbers:,} numbers, on {loop.device}"
             f"{' (bf16 autocast)' if cfg.amp else ''}" + (f" (resuming after round {start})" if start else ""))
