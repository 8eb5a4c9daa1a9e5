"""Golden outputs for a refactor that must change nothing: make them before, check them after.

    python bench/golden.py make DIR     # runs the set below into DIR/runs and keeps the outputs in DIR
    python bench/golden.py check DIR    # runs the set again into a fresh folder and compares, bit for bit
    python bench/golden.py check DIR --ignore loss_adapted loss_generated --keep NEW
        # a change meant to move only these keys: everything else bit for bit; NEW: the new goldens

The set (issue 25): configs/quickstart.yaml's summary.json, metrics.jsonl and final server state; the
demo sweep's tradeoff.csv (configs/privacy_demo.yaml); configs/audit.yaml's audit.json (seed 0 of its
three); and configs/robustness.yaml's robustness.csv. Compared after dropping what cannot repeat — wall times,
absolute paths of the run folders, the environment — and nothing else: every accuracy, loss, ε,
AUC and tensor must be equal. About 8 minutes on 2 cores with the backbones cached (7.8 min, 2026-12-06).
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pfedpg import jsonio  # strict JSON: "Infinity" strings read back as floats, as bare Infinity was

CLI = [sys.executable, "-m", "evaluations.cli"]
#: keys whose values are times, paths or other facts of the machine, not results
VOLATILE = {"seconds", "setup_s", "rounds_s", "mean_round_s", "mean_train_round_s", "time_eval_s", "time_train_s",
            "time_round_s", "aggregation_ms", "seconds_per_training_round", "mean_train_round_s", "run_dir",
            "audit_dir", "file", "cost_in_training_rounds", "flower_setup_query_s", "device"}


def _run(args: list[str]) -> None:
    subprocess.run([*CLI, "-q", *args], cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def produce(work: Path) -> dict[str, Path]:
    """Run the set into ``work``; returns the files to compare."""
    runs = work / "runs"
    _run(["train", "--config", "configs/quickstart.yaml", "--run-dir", str(runs / "quickstart"), "--no-progress"])
    _run(["privacy", "--config", "configs/privacy_demo.yaml", "--out", str(runs / "demo"), "--jobs", "2"])
    # one of configs/audit.yaml's three seeds: the check stays ~10 minutes and still covers every probe
    _run(["audit", "--config", "configs/audit.yaml", "--set", "audit.seeds=[0]", "--out", str(runs / "audit"),
          "--jobs", "2"])
    _run(["robustness", "--config", "configs/robustness.yaml", "--out", str(runs / "robustness"), "--jobs", "2"])
    q = runs / "quickstart"
    final = sorted((q / "checkpoints").glob("round_*.pt"))[-1]
    return {"quickstart/summary.json": q / "summary.json", "quickstart/metrics.jsonl": q / "metrics.jsonl",
            "quickstart/server.pt": final, "demo/tradeoff.csv": runs / "demo" / "tradeoff.csv",
            "audit/audit.json": runs / "audit" / "audit.json",
            "robustness/robustness.csv": runs / "robustness" / "robustness.csv"}


def _clean(obj, skip=frozenset()):
    if isinstance(obj, dict):
        return {k: _clean(v, skip) for k, v in obj.items() if k not in VOLATILE and k not in skip}
    if isinstance(obj, list):
        return [_clean(v, skip) for v in obj]
    return obj


def load(name: str, path: Path, skip=frozenset()):
    """A golden file as comparable data (without the keys in ``skip``)."""
    if name.endswith(".pt"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {"server": state["server"], "clients": state["clients"]}
    if name.endswith(".jsonl"):
        return [_clean(jsonio.loads(ln), skip) for ln in path.read_text().splitlines() if ln]
    if name.endswith(".json"):
        return _clean(jsonio.loads(path.read_text()), skip)
    with open(path) as fh:
        return [_clean(row, skip) for row in csv.DictReader(fh)]


def first_difference(a, b, where: str = "") -> str | None:
    """Where two loaded files first differ (a key path), for the report."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where} keys {sorted(set(a) ^ set(b))}"
        return next((d for k in a if (d := first_difference(a[k], b[k], f"{where}.{k}")) is not None), None)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := first_difference(x, y, f"{where}[{i}]"))
                     is not None), None)
    return None if same(a, b) else f"{where}: {str(a)[:60]} != {str(b)[:60]}"


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["make", "check"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--ignore", nargs="*", default=[], metavar="KEY", help="keys a change is meant to move")
    ap.add_argument("--keep", type=Path, metavar="NEW", help="check: also keep the new outputs as goldens in NEW")
    args = ap.parse_args()
    skip = frozenset(args.ignore)
    if args.mode == "make":
        files = produce(args.dir)
        for name, path in files.items():
            (args.dir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, args.dir / name)
        print(f"golden files in {args.dir}: {', '.join(files)}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        files = produce(Path(tmp))
        diff = {name: first_difference(load(name, args.dir / name, skip), load(name, path, skip))
                for name, path in files.items()}
        if args.keep:
            for name, path in files.items():
                (args.keep / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, args.keep / name)
    for name in files:
        print(f"{name}: {'DIFFERS at ' + diff[name] if diff[name] else 'identical'}"
              + (f" (ignoring {', '.join(sorted(skip))})" if skip else ""))
    sys.exit(1 if any(diff.values()) else 0)


if __name__ == "__main__":
    main()
