"""What a run reports: per-round statistics, the final accuracy blocks, the environment record and
``summary.json``."""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pfedpg.models.device import describe


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


class Summary:
    """The Trainer's ``summary.json``: communication, accuracies, timings, hook results."""

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
                     "mean_train_round_s": float(np.mean([r["time_round_s"] - r.get("time_eval_s", 0.0)
                                                          for r in rounds]))
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
                                         "kept its losses, accuracies and measurements "
                                         "(privacy.release_metrics: false)")
        new = self.new_clients_summary(rows)
        if new is not None:
            summary["new_clients"] = new
        summary.update({"hook_results": self.hooks.end_of_run(self.ctx, summary=summary)})
        return summary
