"""Plots of a run directory (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if ln]


def learning_curve(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Mean and worst per-client test accuracy per evaluated round, adapted and generated prompts;
    with new clients, theirs after each join round (round T + j = join round j)."""
    run_dir = Path(run_dir)
    rounds = [r for r in read_metrics(run_dir) if r["type"] == "round" and "acc_adapted_mean" in r]
    out = Path(out) if out else run_dir / "learning_curve.png"
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs = [r["round"] for r in rounds]
    ax.plot(xs, [r["acc_adapted_mean"] for r in rounds], "-o", ms=3, color="C0", label="adapted prompt P̃ (mean)")
    ax.plot(xs, [r["acc_adapted_worst"] for r in rounds], "--", color="C0", alpha=0.6, label="adapted (worst client)")
    if rounds and "acc_generated_mean" in rounds[0]:
        ax.plot(xs, [r["acc_generated_mean"] for r in rounds], "-s", ms=3, color="C1", label="generated prompt P (mean)")
        ax.plot(xs, [r["acc_generated_worst"] for r in rounds], "--", color="C1", alpha=0.6, label="generated (worst client)")
    joins = [r for r in read_metrics(run_dir) if r["type"] == "join"]
    if joins:  # data.new_clients: their accuracy after each join round, after the last training round
        by_round: dict[int, list[float]] = {}
        for r in joins:
            by_round.setdefault(r["round"], []).append(r["acc_adapted"])
        jx = sorted(by_round)
        ax.axvline(jx[0], color="grey", ls=":", lw=1)
        ax.plot(jx, [sum(by_round[x]) / len(by_round[x]) for x in jx], "-^", ms=3, color="C2",
                label="new clients (mean; join rounds after the last round)")
        ax.plot(jx, [min(by_round[x]) for x in jx], "--", color="C2", alpha=0.6, label="new clients (worst)")
    ax.set_xlabel("round")
    ax.set_ylabel("per-client test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(run_dir.name, fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
