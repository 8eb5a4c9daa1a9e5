"""Thin parallel wrapper around ``pfedpg-eval privacy`` (the privacy trade-off sweep).

The toolkit's sweep runs its cells one after another in one process. This wrapper splits the grid of
a sweep file into ``--jobs`` parts (part 0: the baselines + ``dp_client``; part 1: ``dp_sgd``; with
more jobs the seeds are dealt round-robin as well), runs each part as its own
``python -m evaluations.cli privacy`` process (``threads: 1`` each) into the **same** sweep directory
— cell names are unique, so the parts never write the same run — and finally runs the full sweep file
— and finally writes the complete ``tradeoff.csv`` / ``tradeoff.md`` / ``report.md`` / plot itself from
the cells' run directories (a failed cell, one with ``error.txt`` and no ``summary.json``, becomes a
``failed`` row; it is not run a third time). ``--tables-only`` does just that last step.

``--reuse-from DIR`` (optional) copies finished runs of ``bench/real_data.py`` (``DIR/<method>/seed<k>``,
e.g. ``bench/out/real_data/digits``) into the sweep as its ``nonprivate`` (pfedpg) and ``local`` cells,
but only when the run's ``config.yaml`` equals what the sweep cell would run (so the runs are identical
by determinism); otherwise the sweep runs the cell itself.

Resumable like the sweep itself: finished cells are reused (the sweep does not compare configs, so
delete the directory after changing the sweep file).

    PYTHONPATH=. HF_HUB_OFFLINE=1 python bench/privacy_sweep.py --config configs/privacy_digits_shared.yaml \\
        --jobs 2 --reuse-from bench/out/real_data/digits
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def split(tree: dict, jobs: int) -> list[dict]:
    """Sub-sweep files (same base) whose grids partition the full grid."""
    if jobs <= 1:
        return [tree]
    priv = tree["privacy"]
    mechs = priv.get("mechanisms") or {}
    groups = [({k: v for k, v in mechs.items() if k == "dp_client"}, list(priv.get("baselines", []))),
              ({k: v for k, v in mechs.items() if k != "dp_client"}, [])]
    groups = [g for g in groups if g[0] or g[1]]
    seeds = list(priv["seeds"])
    n_seed_parts = max(1, min(len(seeds), jobs // max(1, len(groups))))
    parts = []
    for i in range(n_seed_parts):
        for mech, base in groups:
            t = copy.deepcopy(tree)
            t["privacy"].update(seeds=seeds[i::n_seed_parts], mechanisms=mech, baselines=base)
            parts.append(t)
    return parts


def reuse(cells: list, out: Path, src: Path) -> list[str]:
    from pfedpg.config import config_from_dict

    done = []
    norm = lambda d: {k: v for k, v in config_from_dict(d).to_dict().items() if k not in ("run_name", "output_dir")}
    for cell in cells:
        method = {"nonprivate": "pfedpg", "local": "local"}.get(cell.mechanism)
        if method is None:
            continue
        run, dest = src / method / f"seed{cell.seed}", out / "runs" / cell.name
        if dest.exists() or not (run / "summary.json").is_file():
            continue
        if norm(yaml.safe_load((run / "config.yaml").read_text())) != norm(cell.config):
            print(f"reuse: {run} differs from cell {cell.name}; the sweep runs it", flush=True)
            continue
        shutil.copytree(run, dest)
        done.append(cell.name)
    return done


def write_tables(sweep, base, out: Path) -> int:
    """tradeoff.csv / .md / report.md / plot of the whole grid from the cells' run directories."""
    from evaluations.privacy import _row, cells, write_outputs
    from pfedpg import jsonio

    rows = []
    for cell in cells(sweep, base):
        rd = out / "runs" / cell.name
        if (rd / "summary.json").is_file():
            rows.append(_row(cell, rd, jsonio.read(rd / "summary.json"), None))
        else:
            err = (rd / "error.txt").read_text().strip().splitlines()[-1] if (rd / "error.txt").is_file() else "not run"
            rows.append(_row(cell, rd, None, err))
    write_outputs(out, rows, sweep)
    print((out / "tradeoff.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="sweep file (see configs/privacy.yaml)")
    p.add_argument("--out", help="sweep directory (default: the file's privacy.out_dir)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--reuse-from", type=Path, help="bench/real_data.py dataset directory with pfedpg/ and local/ runs")
    p.add_argument("--tables-only", action="store_true", help="only (re)write the tables from the run directories")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the base run config (passed to every part)")
    a = p.parse_args(argv)
    os.chdir(REPO)  # the configs' relative paths
    from evaluations.privacy import cells, load_sweep

    tree = yaml.safe_load(Path(a.config).read_text())
    sweep, base = load_sweep(a.config, a.overrides)
    out = Path(a.out or sweep.out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if a.tables_only:
        return write_tables(sweep, base, out)
    if a.reuse_from:
        print("reused from bench/real_data.py:", ", ".join(reuse(cells(sweep, base), out, a.reuse_from)) or "none",
              flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    sets = [x for o in a.overrides for x in ("--set", o)]
    cmd = lambda f: [sys.executable, "-m", "evaluations.cli", "privacy", "--config", f, "--out", str(out), *sets]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i, part in enumerate(split(tree, a.jobs)):
            f = Path(tmp) / f"part{i}.yaml"
            f.write_text(yaml.safe_dump(part, sort_keys=False))
            log = open(out / f"part{i}.log", "w")
            print(f"part {i}: seeds {part['privacy']['seeds']}, mechanisms {list(part['privacy']['mechanisms'])}, "
                  f"baselines {part['privacy']['baselines']} -> {out / f'part{i}.log'}", flush=True)
            procs.append((subprocess.Popen(cmd(str(f)), env=env, stdout=log, stderr=subprocess.STDOUT), log))
        rcs = [pr.wait() for pr, _ in procs]
        for _, log in procs:
            log.close()
    wall = time.time() - t0
    print(f"parts done in {wall / 60:.1f} min (exit codes {rcs}); writing the full tables", flush=True)
    (out / "WALL.txt").write_text(f"parts: {wall / 60:.1f} min wall with {len(procs)} processes\n")
    return write_tables(sweep, base, out) or max(rcs, default=0)

if __name__ == "__main__":
    sys.exit(main())
