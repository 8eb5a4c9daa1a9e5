"""Plots of a run directory (matplotlib, Agg backend: no display needed), and :func:`save_figure`,
with which every plot of the toolkit is written: a PNG for the reports and a PDF beside it for a paper."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

from pfedpg import jsonio

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, path: str | Path, **kw) -> Path:
    """``fig`` as ``path`` (PNG, for the Markdown and HTML reports) and as a vector PDF beside it (same
    name, ``.pdf``: for a paper). The PDF embeds its fonts as TrueType (Type 42, which publishers'
    checks accept where they refuse Type 3) and carries no creation date, so rewriting a plot from
    the same numbers gives the same file."""
    path = Path(path)
    fig.savefig(path, **kw)
    with matplotlib.rc_context({"pdf.fonttype": 42}):
        fig.savefig(path.with_suffix(".pdf"), metadata={"CreationDate": None}, **kw)
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    return jsonio.read_lines(Path(run_dir) / "metrics.jsonl")


def learning_curve(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Mean and worst per-client test accuracy per evaluated round, adapted and generated prompts;
    with new clients, theirs after each join round in a second panel."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    rounds = [r for r in rows if r["type"] == "round" and "acc_adapted_mean" in r]
    joins = [r for r in rows if r["type"] == "join"]  # data.new_clients
    out = Path(out) if out else run_dir / "learning_curve.png"
    fig, axes = plt.subplots(1, 2 if joins else 1, figsize=(10 if joins else 6, 4), dpi=120, squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]} if joins else None)
    ax = axes[0][0]
    xs = [r["round"] for r in rounds]
    ax.plot(xs, [r["acc_adapted_mean"] for r in rounds], "-o", ms=3, color="C0", label="adapted prompt P̃ (mean)")
    ax.plot(xs, [r["acc_adapted_worst"] for r in rounds], "--", color="C0", alpha=0.6, label="adapted (worst client)")
    if rounds and "acc_generated_mean" in rounds[0]:
        ax.plot(xs, [r["acc_generated_mean"] for r in rounds], "-s", ms=3, color="C1",
                label="generated prompt P (mean)")
        ax.plot(xs, [r["acc_generated_worst"] for r in rounds], "--", color="C1", alpha=0.6,
                label="generated (worst client)")
    ax.set_xlabel("round")
    ax.set_ylabel("per-client test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if joins:  # the new clients after each join round (0 = the head alone on the received prompt)
        jx = sorted({r["join_round"] for r in joins})
        acc = {j: [r["acc_adapted"] for r in joins if r["join_round"] == j] for j in jx}
        nx = axes[0][1]
        nx.plot(jx, [sum(acc[j]) / len(acc[j]) for j in jx], "-^", ms=4, color="C2", label="adapted (mean)")
        nx.plot(jx, [min(acc[j]) for j in jx], "--v", ms=3, color="C2", alpha=0.6, label="adapted (worst)")
        gen = {j: [r["acc_generated"] for r in joins if r["join_round"] == j and r.get("acc_generated") is not None]
               for j in jx}
        if all(gen[j] for j in jx):
            nx.plot(jx, [sum(gen[j]) / len(gen[j]) for j in jx], "-s", ms=3, color="C1",
                    label="generated G(P_base, d_new) (mean)")
        nx.set_xlabel("join round after the last round (0 = head only)")
        nx.set_ylim(0, 1)
        nx.set_xticks(jx)
        nx.grid(alpha=0.3)
        nx.legend(fontsize=8)
        nx.set_title(f"{len(acc[jx[0]])} new client{'s' if len(acc[jx[0]]) != 1 else ''}", fontsize=9)
    ax.set_title(run_dir.name, fontsize=9)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
    return out


def plot_tradeoff(path: Path, agg: list[dict[str, Any]], mechanisms: dict[str, str], units: dict[str, str]) -> None:
    """The privacy sweep's accuracy against ε (its aggregated rows ``agg``), one panel per privacy unit
    (client-level and record-level ε are not comparable), with the baselines as horizontal lines in
    every panel; ``mechanisms``: name -> label, ``units``: privacy unit -> axis label."""
    from matplotlib.ticker import NullFormatter

    mechs = [m for m in mechanisms if any(a["mechanism"] == m and a["epsilon_max"][0] is not None for a in agg)] \
        or list(mechanisms)[:1]
    fig, axes = plt.subplots(1, len(mechs), figsize=(5.2 * len(mechs) + 2.2, 4.2), dpi=120, sharey=True, squeeze=False)
    styles = {"nonprivate": ("k", "--", "non-private pFedPG (ε = ∞)"),
              "clip_only": ("C2", ":", "clip only (z = 0, ε = ∞)"), "local": ("C3", "-.", "local (sends nothing)")}
    for k, (ax, mech) in enumerate(zip(axes[0], mechs)):
        i = list(mechanisms).index(mech)
        pts = sorted((a["epsilon_max"][0], a["accuracy_mean"][0], a["accuracy_mean"][1] or 0.0) for a in agg
                     if a["mechanism"] == mech and a["epsilon_max"][0] is not None)
        if pts:
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, fmt="-o", ms=4, capsize=3, color=f"C{i}", label=mechanisms[mech])
        for base, (color, ls, label) in styles.items():
            a = next((a for a in agg if a["mechanism"] == base), None)
            if a is not None:
                ax.axhline(a["accuracy_mean"][0], color=color, ls=ls, lw=1,
                           label=label if k == len(mechs) - 1 else None)
        ax.set_xscale("log")
        ticks = sorted({round(a["epsilon_max"][0], 2) for a in agg if a["mechanism"] == mech
                        and a["epsilon_max"][0] is not None and math.isfinite(a["epsilon_max"][0])})
        if ticks:
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.xaxis.set_minor_formatter(NullFormatter())
        unit = next((a["unit"] for a in agg if a["mechanism"] == mech and a["unit"]), None)
        ax.set_xlabel(f"{units.get(unit, 'ε')} (max over clients)")
        ax.set_title(mechanisms[mech], fontsize=9)
        ax.grid(alpha=0.3, which="both")
        if k == 0:
            ax.set_ylabel("mean per-client test accuracy")
    handles = [h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]]
    labels = [lab for ax in axes[0] for lab in ax.get_legend_handles_labels()[1]]
    if handles:
        fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    save_figure(fig, path, bbox_inches="tight")
    plt.close(fig)
