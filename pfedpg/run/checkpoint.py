"""Checkpoints of a run (``RUN_DIR/checkpoints/round_XXXX.pt``) and ``--resume`` from them; setting
aside an unfinished run's files (``RUN_DIR/attempt-<k>/``)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from pfedpg.client import ClientState
from pfedpg.config import dump_config, saved_config
from pfedpg.errors import ConfigError
from pfedpg.models.device import to_cpu

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


class Checkpoints:
    """The Trainer's checkpoint/resume: what a checkpoint holds and how a run continues from one."""

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
            raise ConfigError(f"checkpoint {str(path)!r} is unreadable ({type(e).__name__}); "
                              "delete it to resume from an earlier one") from None
        if state.get("version") != CHECKPOINT_VERSION:
            raise ConfigError(f"checkpoint {str(path)!r} has version {state.get('version')}, "
                              f"expected {CHECKPOINT_VERSION}")
        try:
            same = dump_config(saved_config(state["config"])) == dump_config(self.cfg)
        except ConfigError:
            same = False
        if not same:
            raise ConfigError(f"--resume: the config differs from the one {str(path)!r} was written with; "
                              "resume with the run's own config.yaml")
        if state["clients"] is None:
            raise ConfigError(f"checkpoint {str(path)!r} is from a Flower run and holds no client state "
                              "(it stayed on the clients); start a new run")
        self.server.load_state_dict(state["server"])
        self.states = [ClientState.from_dict(d).to(self.device) for d in state["clients"]]
        self.hooks.load_state_dict(state["hooks"])
        return int(state["round"])

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.run_dir)
