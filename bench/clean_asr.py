"""Clean-ASR control for the robustness matrix's backdoor cells (``configs/robustness_digits_shared.yaml``).

For each seed, reruns the matrix's backdoor cell (rule ``sum``) with nobody poisoning (``backdoor``
with ``clients: []``: the same trigger and target, measured the same way), and compares each benign
client's attack success rate with and without the attackers. The difference is what the backdoor
itself adds; the clean rate is how often clean models already call triggered images the target.
Needs the matrix's runs in ``bench/out/robustness_digits`` (run the matrix first).
Usage: python bench/clean_asr.py [--seeds 0 1 2] [--fractions 0.2 0.4]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MATRIX = REPO / "bench" / "out" / "robustness_digits" / "runs"
OUT = REPO / "bench" / "out" / "robustness_digits_clean_asr"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fractions", nargs="+", default=["0.2", "0.4"])
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import yaml

    from evaluations.plugins import load_plugins
    from pfedpg.config import config_from_dict
    from pfedpg.run import Trainer

    load_plugins()
    print(f"{'f':>4} {'seed':>4} {'ASR attacked %':>15} {'ASR clean %':>12} {'added (pts)':>12}  benign clients")
    added = {f: [] for f in args.fractions}
    for seed in args.seeds:
        attacked = {f: MATRIX / f"backdoor-sum-frac{f}-s{seed}" for f in args.fractions}
        if not all((d / "summary.json").is_file() for d in attacked.values()):
            print(f"skipped seed {seed}: the matrix's backdoor runs are missing in {MATRIX}")
            continue
        values = yaml.safe_load((attacked[args.fractions[0]] / "config.yaml").read_text())
        (hook,) = [h for h in values["hooks"] if h["name"] == "backdoor"]
        values["hooks"] = [{**{k: v for k, v in hook.items() if k != "fraction"}, "clients": []}]
        run_dir = OUT / f"clean-s{seed}"
        summary = run_dir / "summary.json"
        if not summary.is_file():
            Trainer(config_from_dict(values), run_dir=run_dir).run()
        clean = json.loads(summary.read_text())["hook_results"]["backdoor"]["asr_per_client"]
        for f, d in attacked.items():
            hit = json.loads((d / "summary.json").read_text())["hook_results"]["backdoor"]["asr_per_client"]
            a = statistics.mean(hit.values())
            c = statistics.mean(clean[k] for k in hit)  # the same benign clients
            added[f].append(a - c)
            print(f"{f:>4} {seed:>4} {100 * a:>15.1f} {100 * c:>12.1f} {100 * (a - c):>12.1f}  {sorted(map(int, hit))}")
    for f, v in added.items():
        if v:
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            print(f"f = {f}: the backdoor adds {100 * statistics.mean(v):.1f} ± {100 * sd:.1f} points "
                  "over the clean rate")


if __name__ == "__main__":
    main()
