"""Checkpoints of a run (``RUN_DIR/checkpoints/round_XXXX.pt``) and ``--resume`` from them; setting
aside an unfinished run's files (``RUN_DIR/attempt-<k>/``)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from pfedpg.config import dump_config, saved_config
from pfedpg.errors import ConfigError
from pfedpg.models.device import to_cpu
from pfedpg.run.rounds import RoundLoop
from pfedpg.tracking import untracked

#: The checkpoint format: unchanged by the client seam (issue 30) — the same keys, the clients'
#: states as ``ClientState.to_dict()`` (None for a Flower run) — so checkpoints written before it resume.
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


def checkpoint_path(run_dir: str | Path, r: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"round_{r:04d}.pt"


def save_checkpoint(loop: RoundLoop, r: int) -> None:
    """The run after round ``r``: server, clients (None where they keep their own state), hooks, config."""
    path = checkpoint_path(loop.run_dir, r)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "version": CHECKPOINT_VERSION, "round": r,
        "server": {k: v.detach().cpu().clone() for k, v in loop.server.state_dict().items()},
        "clients": to_cpu(loop.clients.state_dict()),  # (a checkpoint loads on any device)
        "hooks": to_cpu(loop.hooks.state_dict()),
        "config": dump_config(loop.cfg),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(loop: RoundLoop, path: Path) -> int:
    """Restore server, clients and hooks from ``path``; returns the round it holds."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"checkpoint {str(path)!r} is unreadable ({type(e).__name__}); "
                          "delete it to resume from an earlier one") from None
    if state.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(f"checkpoint {str(path)!r} has version {state.get('version')}, "
                          f"expected {CHECKPOINT_VERSION}")
    try:
        # (the tracking section decides no number: a run may be resumed with tracking turned on or moved)
        same = dump_config(untracked(saved_config(state["config"]))) == dump_config(untracked(loop.cfg))
    except ConfigError:
        same = False
    if not same:
        raise ConfigError(f"--resume: the config differs from the one {str(path)!r} was written with; "
                          "resume with the run's own config.yaml")
    if state["clients"] is None:
        raise ConfigError(f"checkpoint {str(path)!r} is from a Flower run and holds no client state "
                          "(it stayed on the clients); start a new run")
    loop.server.load_state_dict(state["server"])
    loop.clients.load_state_dict(state["clients"])
    loop.hooks.load_state_dict(state["hooks"])
    return int(state["round"])
