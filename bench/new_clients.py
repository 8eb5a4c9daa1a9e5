"""New clients (issue 16, DESIGN §1 "New clients"): what a client that joins after training gets from
each method, in the positive control's regime (``configs/positive_control.yaml``), paired by seed.

``data.new_clients`` of the control's 24 clients are held out of training; after the last round each
joins for ``data.new_client_rounds`` join rounds with the same budget in every method: round 0 trains the
head alone on the prompt it received (pfedpg: G(P_base, mean descriptor); fedvpt: the final global
prompt; local: the VPT init), then each join round trains prompt and head E epochs (pfedpg: from the
prompt generated from its current descriptor, which the server updates from ΔP_new alone).

The table: the new clients' accuracy after each join round (mean over new clients, then over seeds),
and pfedpg − local, pfedpg − fedvpt paired by seed with a 95% t-interval. Runs go through the CLI
(``bench/regime.py``'s runner; finished runs are reused)::

    python bench/new_clients.py --jobs 2                 # seeds 0 1 2, 4 new clients, 5 join rounds
    python bench/new_clients.py --seeds 0 1 2 3 4 --jobs 2
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))
import regime  # noqa: E402

from evaluations.stats import paired  # noqa: E402

ARMS = ("local", "fedvpt", "pfedpg_res_a1_b1")  # pfedpg_res_a1_b1 = the control's own server settings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--new-clients", type=int, default=4, help="clients held out of the 24 (default 4)")
    p.add_argument("--join-rounds", type=int, default=5, help="data.new_client_rounds R (default 5)")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "new_clients")
    a = p.parse_args(argv)
    extra = [f"data.new_clients={a.new_clients}", f"data.new_client_rounds={a.join_rounds}"]
    grid = "positive_control"
    regime.GRIDS[grid]["cells"]["new_clients"] = extra
    every = regime.arms(None)
    out = a.out if a.out.is_absolute() else Path.cwd() / a.out
    jobs = [regime.job(grid, "test", out, "new_clients", arm, every[arm], s) for arm in ARMS for s in a.seeds]
    print(f"{len(jobs)} runs, {a.jobs} at a time", flush=True)
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        done = list(pool.map(regime.execute, jobs))
    results, failed = regime.collect(jobs)
    runs = results.get("new_clients", {})
    md = table(runs, a.join_rounds, a.seeds)
    if failed:
        md += "\nRuns without a result: " + "; ".join(f"{arm}: {', '.join(w)}" for (_, arm), w in failed.items()) + "\n"
    (out / "results.md").parent.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(f"<!-- bench/new_clients.py {' '.join(argv or sys.argv[1:])} | "
                                    f"wall {(time.time() - t0) / 60:.1f} min -->\n" + md)
    print(md)
    return 1 if [d for d in done if d["status"] not in ("ok", "cached")] else 0


def table(runs: dict, rounds: int, seeds: list[int]) -> str:
    def curve(arm, key="accuracy"):
        return {s: v["new_clients"][key] for s, v in runs.get(arm, {}).items() if v["new_clients"].get(key)}

    def at(c, j, stat="mean"):
        return {s: v[stat][j] for s, v in c.items() if v[stat][j] is not None}

    any_run = next((v for arm in runs.values() for v in arm.values()), None)
    if any_run is None:
        return "no finished runs\n"
    nc = any_run["new_clients"]
    lines = [f"New clients {nc['partition_ids']} (seed {any_run['seed']}; each seed draws its own) of the control's "
             f"{any_run['num_clients'] + len(nc['clients'])} clients; {nc['test_per_client']} test records each; "
             f"budget (R + 1)·E = {nc['budget_epochs']} epochs. Accuracy % of the new clients (mean over them, then "
             f"over seeds {', '.join(map(str, sorted(seeds)))}); differences in points, paired by seed, "
             "95% t-interval.",
             "", "| join round | " + " | ".join(ARMS) + " | pfedpg generated | pfedpg − local | pfedpg − fedvpt |",
             "|---|" + "---|" * (len(ARMS) + 3)]
    curves = {arm: curve(arm) for arm in ARMS}
    gen = curve("pfedpg_res_a1_b1", "accuracy_generated")
    for j in range(rounds + 1):
        cells = []
        for arm in ARMS:
            v = at(curves[arm], j)
            cells.append(f"{100 * sum(v.values()) / len(v):.1f}" if v else "—")
        g = at(gen, j)
        cells.append(f"{100 * sum(g.values()) / len(g):.1f}" if g else "—")
        for base in ("local", "fedvpt"):
            cells.append(regime._diff_text(paired(at(curves["pfedpg_res_a1_b1"], j), at(curves[base], j))))
        lines.append(f"| {j} | " + " | ".join(cells) + " |")
    worst = {arm: at(curves[arm], rounds, "worst") for arm in ARMS}
    lines += ["", "Worst new client after round R: " + "; ".join(
        f"{arm} {100 * sum(w.values()) / len(w):.1f}" for arm, w in worst.items() if w) + ".",
        "Trained clients (the federation the newcomers join), accuracy % after the last training round: " + "; ".join(
            f"{arm} {100 * sum(v['accuracy']['mean'] for v in runs[arm].values()) / len(runs[arm]):.1f}"
            for arm in ARMS if runs.get(arm)) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
