"""Real-data benchmark: pfedpg vs fedvpt vs local (SingleSet-VPT) on the shared datasets.

Runs every (dataset, method, seed) through the toolkit's own CLI
(``python -m evaluations.cli train --config ... --run-dir ... --no-progress``), one process per run,
collects each run's ``summary.json`` and prints + writes a Markdown table (``OUT/results.md``):
adapted-prompt accuracy mean ± std over seeds, worst client mean ± std, generated-prompt accuracy,
seconds per round. Resumable: a run whose ``summary.json`` exists is not run again unless its ``config.yaml`` differs
from what the command would run now (e.g. a learning rate changed in the YAML); an interrupted run
directory without a summary is deleted and re-run.

Datasets (configs relative to the repository root, where every run is started):

* ``digits``  — configs/digits_shared.yaml (MNIST / MNIST-M / USPS, one client per domain)
* ``cifar10`` — configs/cifar10_dir01_shared.yaml (CIFAR-10 private half, Dir(0.1), 10 clients)

A dataset whose npz or the shared backbone is missing is skipped with a message.

``--validation`` is the tuning mode: it adds ``--set evaluate_on=val --set data.val_fraction=F``
(F per dataset, ``VAL_FRACTION`` below), so the toolkit evaluates each client on its *validation*
split (F of its own records, stratified, disjoint from its train and test records) instead of its
test split, and hyperparameters are chosen without looking at the test split. Use it with a tuning
seed (e.g. ``--seeds 100``) and ``--set`` overrides; run directories then go under ``OUT/validation/``.

Examples::

    python bench/real_data.py --jobs 2                        # the benchmark (bench/README.md)
    python bench/real_data.py --datasets digits --seeds 0 --rounds 3
    python bench/real_data.py --validation --seeds 100 --rounds 10 --methods local pfedpg \\
        --set client.lr=0.03 --jobs 2                            # one tuning cell
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prompt_diagnostics import prompt_ablation, prompt_drift  # bench/, beside this script

REPO = Path(__file__).resolve().parents[1]

DATASETS = {
    "digits": "configs/digits_shared.yaml",
    "cifar10": "configs/cifar10_dir01_shared.yaml",
}
METHODS = ("pfedpg", "fedvpt", "local")
# --validation: data.val_fraction per dataset. The toolkit does not cap the validation split, so these
# are sized to give ~300 records per digits client (of ~9,000-10,000) and 10-500+ per cifar10 client
# (10% of its train records; Dir(0.1) sizes vary a lot), keeping the one final evaluation cheap.
VAL_FRACTION = {"digits": 0.03, "cifar10": 0.1}


# ------------------------------------------------------------------------------------------------
# Runs


def _load_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def missing_inputs(dataset: str, overrides: list[str]) -> list[str]:
    """Input files (data, backbone) the dataset's config needs and this machine lacks."""
    cfg = _load_yaml(REPO / DATASETS[dataset])
    data_path = cfg.get("data", {}).get("path")
    ckpt = cfg.get("model", {}).get("checkpoint")
    for o in overrides:  # honour --set data.path=... / model.checkpoint=...
        key, _, val = o.partition("=")
        if key.strip() == "data.path":
            data_path = val
        elif key.strip() == "model.checkpoint":
            ckpt = val
    out = []
    for p in (data_path, ckpt):
        if p and not (REPO / Path(p).expanduser()).is_file():  # relative paths: to the repo root
            out.append(str(p))
    return out


def run_dir(out: Path, dataset: str, method: str, seed: int, rounds: int | None, overrides: list[str],
            validation: bool) -> Path:
    tag = f"seed{seed}" + (f"-r{rounds}" if rounds else "")
    if overrides:
        tag += "-" + hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:8]
    base = out / "validation" if validation else out
    return base / dataset / method / tag


def run_sets(dataset: str, method: str, seed: int, rounds: int | None, overrides: list[str],
             validation: bool) -> list[str]:
    sets = [f"method={method}", f"seed={seed}", "threads=1"]
    if rounds:
        sets += [f"rounds={rounds}", f"eval_every={rounds}"]
    sets += overrides
    if validation:
        sets += ["evaluate_on=val", f"data.val_fraction={VAL_FRACTION[dataset]}"]
    return sets


def build_command(dataset: str, method: str, seed: int, rounds: int | None, overrides: list[str],
                  rdir: Path, validation: bool) -> list[str]:
    sets = run_sets(dataset, method, seed, rounds, overrides, validation)
    cmd = [sys.executable, "-m", "evaluations.cli", "train", "--no-progress"]
    cmd += ["--config", DATASETS[dataset], "--run-dir", str(rdir)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _config_changes(job: dict) -> list[str]:
    """Keys where the finished run's config.yaml differs from what the command would run now
    (``server`` is ignored for fedvpt/local, which do not read it)."""
    import yaml

    from pfedpg.config import load_config

    old = yaml.safe_load((job["run_dir"] / "config.yaml").read_text())
    new = load_config(REPO / DATASETS[job["dataset"]], job["sets"]).to_dict()
    if job["method"] != "pfedpg":
        old.pop("server", None)
        new.pop("server", None)

    def flat(d, prefix=""):
        return {k2: v2 for k, v in d.items()
                for k2, v2 in (flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(f"{prefix}{k}", v)])}

    fo, fn = flat(old), flat(new)
    return sorted(k for k in set(fo) | set(fn) if fo.get(k) != fn.get(k))


def run_cli(cmd: list[str], rdir: Path) -> tuple[int, float, Path]:
    """Run one CLI command for run directory ``rdir`` (an interrupted one is started over) from the
    repository root, one thread, output to ``<rdir>.log``; returns (exit code, seconds, log path)."""
    if rdir.exists():  # interrupted before the summary: start it over
        shutil.rmtree(rdir)
    rdir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.time()
    log = rdir.parent / f"{rdir.name}.log"
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    return rc, time.time() - t0, log


def execute(job: dict) -> dict:
    rdir: Path = job["run_dir"]
    summary = rdir / "summary.json"
    if summary.exists():
        changed = _config_changes(job)
        if not changed:
            return {**job, "status": "cached"}
        print(f"  [stale] {job['dataset']} {job['method']} seed {job['seed']}: config changed ({', '.join(changed)}); "
              "re-running", flush=True)
    rc, wall, log = run_cli(job["cmd"], rdir)
    status = "ok" if rc == 0 and summary.exists() else f"failed (exit {rc}, see {log})"
    print(f"  [{status}] {job['dataset']} {job['method']} seed {job['seed']}: {wall:.0f} s", flush=True)
    return {**job, "status": status, "wall_s": wall}


# ------------------------------------------------------------------------------------------------
# Results


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def _train_seconds_per_round(summary: dict) -> float | None:
    """Mean round time without evaluation (local training + server step), from summary.json."""
    return summary.get("time", {}).get("mean_train_round_s")


def collect(jobs: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for j in jobs:
        groups.setdefault((j["dataset"], j["method"]), []).append(j)
    table = []
    for (dataset, method), js in groups.items():
        summaries = []
        for j in js:
            p = j["run_dir"] / "summary.json"
            if p.exists():
                s = json.loads(p.read_text())
                s["_sec_per_round"] = _train_seconds_per_round(s)
                s["_run_dir"] = j["run_dir"]
                summaries.append(s)
        if not summaries:
            continue
        acc = [s["accuracy"]["mean"] for s in summaries]
        worst = [s["accuracy"]["worst"] for s in summaries]
        gen = [s["accuracy_generated"]["mean"] for s in summaries if s.get("accuracy_generated")]
        secs = [s["_sec_per_round"] for s in summaries if s["_sec_per_round"] is not None]
        drift = [d for d in (prompt_drift(s["_run_dir"]) for s in summaries) if d]
        first = summaries[0]
        evaluated = first["data"]["test_per_client"]  # sizes of the evaluated split (val under evaluate_on=val)
        assert all(s.get("evaluated_on", "test") == first.get("evaluated_on", "test") for s in summaries)
        table.append({
            "dataset": dataset, "method": method, "seeds": sorted(s["seed"] for s in summaries),
            "acc": _mean_std(acc), "worst": _mean_std(worst), "gen": _mean_std(gen) if gen else None,
            "sec_per_round": sum(secs) / len(secs) if secs else math.nan,
            "evaluated_on": first.get("evaluated_on", "test"),
            "wall_s": [s["time"]["setup_s"] + s["time"]["rounds_s"] for s in summaries],
            "per_seed": acc, "rounds": first["rounds"], "clients": first["num_clients"],
            "train": first["data"]["train_per_client"], "test": evaluated,
            "drift": {k: sum(d[k] for d in drift if d[k] is not None) / len(drift) for k in drift[0]}
            if drift else None,
        })
    order = {m: i for i, m in enumerate(METHODS)}
    table.sort(key=lambda r: (list(DATASETS).index(r["dataset"]), order.get(r["method"], 99)))
    return table


def markdown(table: list[dict], *, validation: bool) -> str:
    split = "validation" if validation else "test"
    pct = lambda ms: f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"
    lines = [
        f"| dataset | method | adapted acc % ({split}, mean ± std over seeds) | worst client % | generated acc % "
        "| s / round | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        gen = f"{100 * r['gen'][0]:.1f}" if r["gen"] else "—"
        lines.append(f"| {r['dataset']} | {r['method']} | {pct(r['acc'])} | {pct(r['worst'])} | {gen} | "
                     f"{r['sec_per_round']:.1f} | {','.join(map(str, r['seeds']))} |")
    lines += ["", ("Per seed (adapted mean %), sizes, and how far the server's prompts moved "
              "(‖P(T)−P(0)‖/‖P(0)‖; last-round ‖ΔP‖/‖P‖; pairwise spread of the generated prompts):"), "",
              f"| dataset | method | per seed | rounds | clients | train / client | {split} / client | prompt moved "
              "| last ΔP | spread |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        d = r["drift"]
        fmt = lambda v: "—" if v is None else f"{v:.3f}"
        rng = lambda xs: f"{min(xs)}–{max(xs)}" if min(xs) != max(xs) else str(xs[0])
        lines.append(f"| {r['dataset']} | {r['method']} | {' / '.join(f'{100 * a:.1f}' for a in r['per_seed'])} | "
                     f"{r['rounds']} | {r['clients']} | {rng(r['train'])} | {rng(r['test'])} | "
                     f"{fmt(d and d['moved_rel'])} | {fmt(d and d['delta_rel_last'])} | {fmt(d and d['spread'])} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=None, help="override the configs' rounds (default: theirs)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, 1 thread each (default 1)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "real_data",
                   help="run directories and results.md go here (default bench/out/real_data, git-ignored)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every run (part of the run-directory name)")
    p.add_argument("--validation", action="store_true",
                   help="tuning mode: evaluate on each client's validation split instead of its test split")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--ablate-prompt", action="store_true",
                   help="diagnostic after the runs: final heads with the initial instead of the final prompt")
    return p


def _plan_jobs(a: argparse.Namespace, out: Path) -> list[dict]:
    """One job per dataset × seed × method; a dataset whose inputs are missing is skipped, with why."""
    jobs = []
    for dataset in a.datasets:
        missing = missing_inputs(dataset, a.overrides)
        if missing:
            print(f"SKIP {dataset}: missing {', '.join(missing)} (see ../shared/data/README.md and "
                  f"../shared/models/README.md; paths are relative to {REPO})", flush=True)
            continue
        for seed in a.seeds:
            for method in a.methods:
                rdir = run_dir(out, dataset, method, seed, a.rounds, a.overrides, a.validation)
                cmd = build_command(dataset, method, seed, a.rounds, a.overrides, rdir, a.validation)
                jobs.append({"dataset": dataset, "method": method, "seed": seed, "run_dir": rdir, "cmd": cmd,
                             "sets": run_sets(dataset, method, seed, a.rounds, a.overrides, a.validation)})
    return jobs


def _ablation_lines(jobs: list[dict]) -> list[str]:
    lines = ["", ("Prompt ablation (final heads; accuracy % on the evaluation split with the final prompt vs the "
             "prompt each client started the run with):"), "",
             "| dataset | method | seed | final prompt | initial prompt | gap |", "|---|---|---|---|---|---|"]
    for j in sorted(jobs, key=lambda j: (j["dataset"], METHODS.index(j["method"]), j["seed"])):
        r = prompt_ablation(j["run_dir"])
        if r:
            lines.append(f"| {j['dataset']} | {j['method']} | {j['seed']} | {100 * r['acc_final_prompt']:.1f} | "
                         f"{100 * r['acc_initial_prompt']:.1f} | "
                         f"{100 * (r['acc_final_prompt'] - r['acc_initial_prompt']):+.1f} |")
            print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = _parser()
    a = p.parse_args(argv)
    out = a.out if a.out.is_absolute() else (Path.cwd() / a.out)
    if a.jobs < 1:
        p.error("--jobs must be >= 1")
    jobs = _plan_jobs(a, out)
    if not jobs:
        print("nothing to run")
        return 0
    if a.dry_run:
        for j in jobs:
            print(" ".join(j["cmd"]))
        return 0
    todo = sum(not (j["run_dir"] / "summary.json").exists() for j in jobs)
    print(f"{len(jobs)} runs ({len(jobs) - todo} with a summary, reused unless stale), {a.jobs} at a time -> {out}",
          flush=True)
    t0 = time.time()
    # Longest runs first (cifar10 has more clients), so parallel slots finish together.
    ordered = sorted(jobs, key=lambda j: (j["dataset"] != "cifar10", j["seed"], METHODS.index(j["method"])))
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        results = list(pool.map(execute, ordered))
    wall = time.time() - t0
    failed = [r for r in results if r["status"] not in ("ok", "cached")]
    todo = sum(r["status"] != "cached" for r in results)  # stale runs were re-run too

    table = collect(jobs)
    md = markdown(table, validation=a.validation)
    header = (f"<!-- bench/real_data.py {' '.join(argv)} | {len(jobs)} runs, {len(jobs) - todo} cached, "
              f"{a.jobs} parallel, wall {wall / 60:.1f} min -->\n")
    out.mkdir(parents=True, exist_ok=True)
    name = "results_validation.md" if a.validation else "results.md"
    (out / name).write_text(header + md)
    (out / name.replace(".md", ".json")).write_text(json.dumps(
        [{k: v for k, v in r.items()} for r in table], indent=1, default=str))
    print()
    print(md)
    if a.ablate_prompt:
        md += "\n".join(_ablation_lines(jobs)) + "\n"
        (out / name).write_text(header + md)
    print(f"wall {wall / 60:.1f} min for {todo} new runs; table written to {out / name}")
    if failed:
        print(f"{len(failed)} runs failed: " + "; ".join(f"{r['dataset']} {r['method']} seed {r['seed']}: {r['status']}"
                                                         for r in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
