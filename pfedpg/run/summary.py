"""What a run reports: the environment record (env.json) and ``summary.json`` — communication,
accuracies (:mod:`pfedpg.run.stats`), timings, the new clients' block and the hooks' results."""
from __future__ import annotations

import functools
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pfedpg import __version__, jsonio
from pfedpg.models.device import describe
from pfedpg.run.joins import new_clients_summary
from pfedpg.run.rounds import RoundLoop
from pfedpg.run.stats import accuracy_blocks


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """env.json: the toolkit's version and git commit, the versions of what computes the numbers
    (flwr and ray where installed), the machine, threads, command line and device."""
    import timm

    return {
        "pfedpg_eval": __version__, "git": source_revision(),
        "python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "timm": timm.__version__, "numpy": np.__version__, **_versions(), "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "argv": _redacted(sys.argv),
        "cwd": os.getcwd(),  # where relative paths in the config were read from (--resume reads them there too)
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        **(describe(device) if device is not None else {}),
    }


def _pretrain_record(cfg, backbone_file: str | None) -> dict[str, Any]:
    """For a backbone from the pretraining cache: its key (a hash of the recipe, the model and the
    public split's data by content, ``pfedpg.pretrain.pretrain_key``), so two runs' backbones compare."""
    if cfg.model.weights != "pretrain" or backbone_file is None:
        return {}
    from pfedpg.pretrain import cached_path, pretrain_key

    return {"pretrain_key": pretrain_key(cfg)} if Path(backbone_file) == cached_path(cfg) else {}


#: recorded in env.json besides torch, timm and numpy; an optional one only where installed
_PACKAGES = {"opacus": True, "scikit-learn": True, "scipy": True, "flwr": False, "ray": False}


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str | None]:
    """Installed versions, read from the packages' metadata (nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name, always in _PACKAGES.items():
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            if always:
                out[name] = None
    return out


@functools.lru_cache(maxsize=1)
def source_revision() -> dict[str, Any] | None:
    """``{commit, dirty}`` of the git checkout this toolkit runs from (once per process: two git
    commands of a few milliseconds); None for an install outside a git checkout or without git.
    ``dirty``: tracked files differ from the commit (untracked files do not count)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def _redacted(argv: list[str]) -> list[str]:
    """argv for the record, without secrets (a Flower process's one-use ``--token``)."""
    out = list(argv)
    for i, a in enumerate(out[:-1]):
        if a == "--token":
            out[i + 1] = "<redacted>"
    return out


def communication(loop: RoundLoop) -> dict[str, Any]:
    """Numbers and bytes sent down and up per client and round, against the whole backbone (DESIGN §1)."""
    k_d = loop.shape.prompt_tokens * loop.shape.dim if loop.server.sends_prompts else 0
    bytes_per = torch.finfo(torch.float32).bits // 8
    per_round = [len(p) for p in loop.schedule]
    return {
        "down_numbers_per_client_round": k_d,
        "up_numbers_per_client_round": k_d,
        "down_bytes_per_client_round": k_d * bytes_per,
        "up_bytes_per_client_round": k_d * bytes_per,
        "backbone_numbers": loop.shape.backbone_numbers,
        "ratio_vs_backbone": k_d / loop.shape.backbone_numbers,
        "total_numbers": 2 * k_d * sum(per_round),
        "server_shared_numbers": loop.server.num_shared(),
        **loop.clients.communication(),
    }


def summarize(loop: RoundLoop, metrics_path: Path, *, setup_seconds: float, join_seconds: float,
              backbone_file: str | None) -> dict[str, Any]:
    """summary.json from the run's metrics.jsonl (final round only: no best-round selection)."""
    cfg, facts = loop.cfg, loop.roster.clients
    rows = jsonio.read_lines(metrics_path)
    last = cfg.rounds
    final = sorted((r for r in rows if r["type"] == "client" and r["round"] == last and "acc_adapted" in r),
                   key=lambda r: r["client"])
    rounds = [r for r in rows if r["type"] == "round"]
    missing = [r["client"] for r in final if r["acc_adapted"] is None]
    summary = {
        "method": cfg.method, "seed": cfg.seed, "rounds": last,
        "num_clients": loop.num_clients, "clients_per_round": len(loop.schedule[0]),
        "generator": cfg.server.generator if cfg.method == "pfedpg" else None,
        # (clients that could not be evaluated, e.g. a Flower client that died, count as None, not 0)
        **accuracy_blocks(final),
        "communication": communication(loop),
        "data": {"source": cfg.data.source, "partition": cfg.data.partition,
                 "train_per_client": [f.train for f in facts],
                 "test_per_client": [f.evaluated for f in facts],
                 "client_names": loop.roster.names(cfg.data.partition),
                 # with data.new_clients the training clients are renumbered; their ids in the partition:
                 **({"partition_ids": [f.partition_id for f in facts]} if loop.roster.new else {})},
        "evaluated_on": cfg.evaluate_on,
        "time": {"setup_s": setup_seconds, "rounds_s": sum(r["time_round_s"] for r in rounds),
                 "mean_round_s": float(np.mean([r["time_round_s"] for r in rounds])) if rounds else 0.0,
                 # training + server step only (rounds that also evaluate cost more)
                 "mean_train_round_s": float(np.mean([r["time_round_s"] - r.get("time_eval_s", 0.0)
                                                      for r in rounds])) if rounds else 0.0},
        "hooks": [h.name for h in loop.hooks.hooks],
        "backbone": {"name": cfg.model.name, "weights": cfg.model.weights, "file": backbone_file,
                     **_pretrain_record(cfg, backbone_file)},
        "device": {**describe(loop.device), "amp": cfg.amp,
                   "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")},
    }
    if missing:
        summary["clients_missing"] = missing
    if any(r.get("client_metrics") == "withheld" for r in rounds):
        summary["client_metrics"] = (f"withheld: under {', '.join(loop.hooks.privacy_mechanisms())} each client "
                                     "kept its losses, accuracies and measurements (privacy.release_metrics: false)")
    new = new_clients_summary(loop, rows, join_seconds)
    if new is not None:
        summary["new_clients"] = new
    summary.update({"hook_results": loop.hooks.end_of_run(loop.ctx, summary=summary)})
    return summary
