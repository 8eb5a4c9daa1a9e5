"""Where does pFedPG's federation matter? A grid over the regime knobs (issue 11), paired by seed.

Each *cell* of a grid is one setting of data, model and client knobs (prompt depth, records per
client, clients per domain, local epochs, K, ...); inside a cell every *arm* is run on the same
seeds: ``local``, ``fedvpt`` and pfedpg under one or more server settings (α, bound, residual).
The report compares arms **paired by seed**: per-seed pfedpg − local and pfedpg − fedvpt, their
mean, the std of the difference and a 95% t-interval (n seeds), so a difference is read against
the seed-to-seed noise of the same splits, not against the spread of two unrelated means.

Two phases, so that nothing is chosen on test data:

* ``--phase val`` (tuning): evaluation on each client's *validation* split (``evaluate_on: val``,
  ``data.val_fraction`` of the grid) with tuning seeds (default 100, 101) that are never reported;
* ``--phase test``: the chosen cells on the test split with seeds 0, 1, 2 (``--cells`` picks them).

Every run goes through the toolkit's CLI (``python -m evaluations.cli train``) into
``OUT/<grid>/<phase>/<cell>/<arm>/seed<k>-<hash>/``; a run whose ``summary.json`` exists is reused
(the hash covers the config file's values and the overrides, so a changed value runs anew and an edited
comment does not).
Grids that need ``../shared`` files skip with a message when they are absent.

Examples::

    python bench/regime.py --grid positive_control --phase val --jobs 2
    python bench/regime.py --grid positive_control --phase test --cells base --jobs 2
    python bench/regime.py --grid digits --phase val --jobs 2 --cells base deep
    python bench/regime.py --list
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from real_data import run_cli  # noqa: E402  (one way to run a CLI job and keep its log)

SHARED = REPO.parent / "shared"
TIN4 = "../shared/models/vit_p4_d192_l6_cifar10pub_tin4.safetensors"

# pfedpg server arms: the paper's plain step at its α, a larger α, and the bounded step (DESIGN §1).
# Every arm sets all three knobs, so a grid's base config cannot leak into an arm's meaning.
PFEDPG_ARMS = {
    "pfedpg_a1e-3": ["server.residual=false", "server.lr=0.001", "server.update_bound=null"],
    "pfedpg_a0.1": ["server.residual=false", "server.lr=0.1", "server.update_bound=null"],
    "pfedpg_a1_b1": ["server.residual=false", "server.lr=1.0", "server.update_bound=1.0"],
    "pfedpg_res_a0.1": ["server.residual=true", "server.lr=0.1", "server.update_bound=null"],
    "pfedpg_res_a1_b1": ["server.residual=true", "server.lr=1.0", "server.update_bound=1.0"],
}
BASELINE_ARMS = {"local": ["method=local"], "fedvpt": ["method=fedvpt"]}

# A grid: base config, what every run of it adds, the cells (name -> overrides), the val fraction
# used in the tuning phase, and files it needs.
GRIDS: dict[str, dict] = {
    "positive_control": {
        "config": "configs/positive_control.yaml",
        "common": [],
        "cells": {
            "base": [],  # E = 1
            "E2": ["client.local_epochs=2"],
            "E5": ["client.local_epochs=5"],
            "shallow_E2": ["model.prompt_depth=shallow", "client.local_epochs=2"],
            "cpd12_E2": ["data.clients_per_domain=12", "client.local_epochs=2"],
        },
        "needs": [],
    },
    "digits": {
        "config": "configs/digits_shared.yaml",
        # The Tiny-ImageNet-continued backbone (../shared/models/README.md): measurably better.
        "common": ["model.checkpoint=" + TIN4, "data.clients_per_domain=4", "data.max_train_per_client=25",
                   "eval_every=20", "data.max_test_per_client=200", "data.max_val_per_client=100"],
        "cells": {
            "base": [],
            "deep": ["model.prompt_depth=deep"],
            "deep_n100": ["model.prompt_depth=deep", "data.max_train_per_client=100"],
            "deep_cpd1_n100": ["model.prompt_depth=deep", "data.clients_per_domain=1", "data.max_train_per_client=100"],
            "deep_E5": ["model.prompt_depth=deep", "client.local_epochs=5"],
            "deep_K50": ["model.prompt_depth=deep", "model.num_prompts=50"],
        },
        "needs": ["data/digits_32.npz", "models/vit_p4_d192_l6_cifar10pub_tin4.safetensors"],
    },
    "cifar10": {
        "config": "configs/cifar10_dir01_shared.yaml",
        "common": ["model.checkpoint=" + TIN4, "data.num_clients=20", "data.max_train_per_client=25",
                   "data.min_size=40", "rounds=20", "eval_every=20"],
        "cells": {
            "base": [],
            "deep": ["model.prompt_depth=deep"],
            "deep_classes2": ["model.prompt_depth=deep", "data.partition=classes", "data.classes_per_client=2"],
        },
        "needs": ["data/cifar10_32.npz", "models/vit_p4_d192_l6_cifar10pub_tin4.safetensors"],
    },
}
VAL_FRACTION = {"positive_control": None, "digits": 0.1, "cifar10": 0.2}  # None: the config's own
PHASE_SEEDS = {"val": [100, 101], "test": [0, 1, 2]}


def arms(selected: list[str] | None) -> dict[str, list[str]]:
    every = {**BASELINE_ARMS, **{k: ["method=pfedpg", *v] for k, v in PFEDPG_ARMS.items()}}
    if not selected:
        return every
    unknown = [a for a in selected if a not in every]
    if unknown:
        raise SystemExit(f"error: unknown arm {unknown[0]}; arms: {', '.join(every)}")
    return {a: every[a] for a in ("local", "fedvpt", *selected) if a in every}


def run_sets(grid: str, phase: str, cell: list[str], arm: list[str], seed: int) -> list[str]:
    g = GRIDS[grid]
    sets = [*g["common"], *cell, *arm, f"seed={seed}", "threads=1", "checkpoint_every=0"]
    if phase == "val":
        sets.append("evaluate_on=val")
        if VAL_FRACTION[grid] is not None:
            sets.append(f"data.val_fraction={VAL_FRACTION[grid]}")
    return sets


def run_key(config: str, sets: list[str]) -> str:
    """What the run-directory hash covers: the config file's values (parsed, so comments do not count)
    and the overrides. Config keys the toolkit adds later, with their defaults, do not change it."""
    import yaml

    values = yaml.safe_load((REPO / config).read_text()) or {}
    return json.dumps({"config": values, "sets": sets}, sort_keys=True, default=str)


def job(grid: str, phase: str, out: Path, cell: str, arm: str, arm_sets: list[str], seed: int) -> dict:
    g = GRIDS[grid]
    sets = run_sets(grid, phase, g["cells"][cell], arm_sets, seed)
    key = hashlib.sha1(run_key(g["config"], sets).encode()).hexdigest()[:8]
    rdir = out / grid / phase / cell / arm / f"seed{seed}-{key}"
    cmd = [sys.executable, "-m", "evaluations.cli", "train", "--no-progress", "--config", g["config"],
           "--run-dir", str(rdir)]
    for s in sets:
        cmd += ["--set", s]
    return {"cell": cell, "arm": arm, "seed": seed, "run_dir": rdir, "cmd": cmd}


def execute(j: dict) -> dict:
    rdir: Path = j["run_dir"]
    if (rdir / "summary.json").exists():
        return {**j, "status": "cached"}
    rc, wall, log = run_cli(j["cmd"], rdir)
    ok = rc == 0 and (rdir / "summary.json").exists()
    status = "ok" if ok else f"failed (exit {rc}: {log})"
    print(f"  [{status}] {j['cell']} {j['arm']} seed {j['seed']}: {wall:.0f} s", flush=True)
    return {**j, "status": status, "wall_s": wall}


# ------------------------------------------------------------------------------------------------
# Paired statistics

from evaluations.stats import paired  # noqa: E402  (a − b paired by seed, 95% t-interval)


def collect(jobs: list[dict]) -> tuple[dict, dict]:
    """({cell: {arm: {seed: summary}}} of the runs that finished, {(cell, arm): [seed: why]} of those
    that did not — a run whose generator diverged is a result of its arm, not a gap in the table)."""
    out: dict = {}
    failed: dict = {}
    for j in jobs:
        p = j["run_dir"] / "summary.json"
        log = j["run_dir"].parent / f"{j['run_dir'].name}.log"
        if p.exists():
            out.setdefault(j["cell"], {}).setdefault(j["arm"], {})[j["seed"]] = json.loads(p.read_text())
        elif log.exists() and "error:" in log.read_text():
            err = [ln for ln in log.read_text().splitlines() if ln.startswith("error:")][-1]
            why = f"diverged (round {err.split('round ')[1].split(';')[0]})" if "non-finite" in err else err[:80]
            failed.setdefault((j["cell"], j["arm"]), []).append(f"seed {j['seed']}: {why}")
    return out, failed


def _pct(x: float | None, sign: bool = False) -> str:
    return "—" if x is None else (f"{100 * x:+.1f}" if sign else f"{100 * x:.1f}")


def _diff_text(p: dict | None) -> str:
    if p is None:
        return "—"
    per = " / ".join(_pct(x, True) for x in p["diffs"])
    if p["ci"] is None:
        return f"{per} (n = 1)"
    return (f"{per}; mean {_pct(p['mean'], True)}, sd {100 * p['std']:.1f}, "
            f"95% CI [{_pct(p['ci'][0], True)}, {_pct(p['ci'][1], True)}]")


def markdown(grid: str, phase: str, collected: tuple[dict, dict]) -> str:
    results, failed = collected
    g = GRIDS[grid]
    split = "validation" if phase == "val" else "test"
    lines = [f"Grid `{grid}` ({g['config']} + {' '.join(g['common']) or 'nothing'}), {split} split. Accuracy % "
             "(mean over clients, then over seeds); differences in points, paired by seed "
             "(per seed; mean, sd, 95% t-CI).",
             "", "| cell | overrides | arm | acc % | per seed | − local | − fedvpt | s / run |",
             "|---|---|---|---|---|---|---|---|"]
    for cell, by_arm in results.items():
        acc = {a: {s: v["accuracy"]["mean"] for s, v in runs.items()} for a, runs in by_arm.items()}
        for arm, runs in by_arm.items():
            vals = [acc[arm][s] for s in sorted(runs)]
            wall = [v["time"]["setup_s"] + v["time"]["rounds_s"] for v in runs.values()]
            is_pfedpg = arm.startswith("pfedpg")
            lines.append(
                f"| {cell} | {' '.join(g['cells'][cell]) or '—'} | {arm} | {_pct(sum(vals) / len(vals))} | "
                f"{' / '.join(_pct(v) for v in vals)} | "
                f"{_diff_text(paired(acc[arm], acc['local'])) if is_pfedpg and 'local' in acc else ''} | "
                f"{_diff_text(paired(acc[arm], acc['fedvpt'])) if is_pfedpg and 'fedvpt' in acc else ''} | "
                f"{sum(wall) / len(wall):.0f} |")
    if failed:
        lines += ["", "Runs without a result (the other seeds of the arm are in the table above):", ""]
        lines += [f"- {cell} / {arm}: {'; '.join(why)}" for (cell, arm), why in failed.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", choices=list(GRIDS), default="positive_control")
    p.add_argument("--phase", choices=list(PHASE_SEEDS), default="val",
                   help="val: tuning seeds on the validation split; test: seeds 0 1 2 on the test split")
    p.add_argument("--cells", nargs="+", help="cells of the grid to run (default all; see --list)")
    p.add_argument("--arms", nargs="+", help="pfedpg arms to run besides local and fedvpt (default all)")
    p.add_argument("--seeds", nargs="+", type=int, help="override the phase's seeds")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, one thread each")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "regime")
    p.add_argument("--list", action="store_true", help="print the grids, cells and arms")
    a = p.parse_args(argv)
    if a.list:
        for name, g in GRIDS.items():
            print(f"{name}: {g['config']} + {' '.join(g['common'])}")
            for cell, sets in g["cells"].items():
                print(f"  {cell}: {' '.join(sets) or '(the base)'}")
        print("arms:", ", ".join(arms(None)))
        return 0
    g = GRIDS[a.grid]
    missing = [n for n in g["needs"] if not (SHARED / n).is_file()]
    if missing:
        print(f"SKIP {a.grid}: missing {', '.join(str(SHARED / n) for n in missing)} (see ../shared/*/README.md)")
        return 0
    cells = a.cells or list(g["cells"])
    bad = [c for c in cells if c not in g["cells"]]
    if bad:
        raise SystemExit(f"error: grid {a.grid} has no cell {bad[0]}; cells: {', '.join(g['cells'])}")
    seeds = a.seeds or PHASE_SEEDS[a.phase]
    out = a.out if a.out.is_absolute() else Path.cwd() / a.out
    jobs = [job(a.grid, a.phase, out, c, arm, sets, s)
            for c in cells for arm, sets in arms(a.arms).items() for s in seeds]
    print(f"{len(jobs)} runs ({sum((j['run_dir'] / 'summary.json').exists() for j in jobs)} cached), "
          f"{a.jobs} at a time", flush=True)
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        done = list(pool.map(execute, jobs))
    md = markdown(a.grid, a.phase, collect(jobs))
    target = out / a.grid / a.phase
    target.mkdir(parents=True, exist_ok=True)
    (target / "results.md").write_text(f"<!-- bench/regime.py {' '.join(argv or sys.argv[1:])} | "
                                       f"wall {(time.time() - t0) / 60:.1f} min -->\n" + md)
    print(md)
    failed = [d for d in done if d["status"] not in ("ok", "cached")]
    if failed:
        print(f"{len(failed)} runs failed: " + "; ".join(f"{d['cell']} {d['arm']} seed {d['seed']}" for d in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
