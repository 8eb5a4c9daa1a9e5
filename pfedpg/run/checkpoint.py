"""Checkpoints of a run (``RUN_DIR/checkpoints/round_XXXX.pt``) and ``--resume`` from them; setting
aside an unfinished run's files (``RUN_DIR/attempt-<k>/``)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from pfedpg.config import difference, dump_config, saved_config
from pfedpg.errors import ConfigError
from pfedpg.models.device import to_cpu
from pfedpg.run.rounds import RoundLoop

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
        saved = saved_config(state["config"])
    except ConfigError as e:
        raise ConfigError(f"checkpoint {str(path)!r} holds a config that does not load ({e}); "
                          "delete it to resume from an earlier one") from None
    # (rounds: check_new_rounds below; tracking decides no number: a run may be resumed with it turned on or moved)
    diff = difference(saved, loop.cfg, ignore=("rounds", "tracking"))
    if diff is not None:
        raise ConfigError(f"--resume: the config differs from the one {str(path)!r} was written with ({diff}); "
                          "resume with the run's own config.yaml")
    if saved.rounds != loop.cfg.rounds:
        check_new_rounds(loop, saved.rounds, int(state["round"]))
    if state["clients"] is None:
        raise ConfigError(f"checkpoint {str(path)!r} is from a Flower run and holds no client state "
                          "(it stayed on the clients); start a new run")
    loop.server.load_state_dict(state["server"])
    loop.clients.load_state_dict(state["clients"])
    loop.hooks.load_state_dict(state["hooks"])
    return int(state["round"])


def check_new_rounds(loop: RoundLoop, old: int, at: int) -> None:
    """A run resumed with another ``rounds`` continues from its checkpoint (after round ``at``) to
    the new last round, to the numbers a run of that many rounds gives (the schedule and every
    stream are per round): refused below the checkpoint, and under a hook whose work depends on the
    number of rounds (``Hook.fixes_rounds``: noise calibrated to a target ε over them, an audit)."""
    new = loop.cfg.rounds
    if new < at:
        raise ConfigError(f"--resume: rounds={new} is below round {at} of the latest checkpoint; set rounds >= {at}")
    fixed = [h.name for h in loop.hooks.hooks if h.fixes_rounds()]
    if fixed:
        raise ConfigError(f"--resume: rounds cannot change ({old} → {new}) under hook {fixed[0]}, whose work depends "
                          "on the number of rounds; start a new run with rounds set (another --run-dir)")
