"""The figures a round record and summary.json compute from client rows (every client counted once;
a client that failed or could not be evaluated is missing, not 0)."""
from __future__ import annotations

from typing import Any

import numpy as np


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
