"""`pfedpg-eval plan` against the real run: does the estimate hold?

Plans a grid file (default configs/privacy.yaml) for ``--jobs N`` — timed with the torch threads a
cell gets there — then runs the same grid with ``--jobs N`` into a fresh folder and prints, per
cell, the predicted seconds (set-up + local steps + DP-SGD steps + evaluated records at the measured
rates) beside the real ones (summary.json: set-up + rounds + join rounds), their ratio, and the
grid's predicted and real wall time. Both are measured on this machine at this moment: the load
average before and after is printed, and the plan says how much of its threads' CPU it got.
Usage: python bench/plan_accuracy.py [--config FILE] [--jobs 2] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "privacy.yaml"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    from evaluations.cli import main as cli
    from evaluations.plan import plan
    from pfedpg import jsonio

    load = os.getloadavg()[0]
    p = plan(args.config, args.overrides, jobs=args.jobs, log=lambda m: None)
    m = p["measured"]
    print(f"plan ({sys.argv[1:]}): {m['train_step_s'] * 1e3:.1f} ms per local step, "
          f"{m['eval_record_s'] * 1e3:.2f} ms per evaluated record, set-up {m['build_s']:.1f} s, with "
          f"{m['threads']} thread(s) (CPU share while timing {m['cpu_share']:.2f}; load average {load:.1f})",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        kind = p["kind"]
        argv = [kind, "--config", args.config, "--out", tmp, "--jobs", str(args.jobs)]
        for o in args.overrides:
            argv += ["--set", o]
        t0 = time.perf_counter()
        code = cli(["-q", *argv]) if kind != "train" else None
        wall = time.perf_counter() - t0
        if code is None:
            raise SystemExit("bench/plan_accuracy.py compares grids; pass a privacy, audit or robustness file")
        print("\n| cell | predicted s | real s | real ÷ predicted |\n|---|---|---|---|")
        ratios = []
        for r in p["runs"]:
            s = jsonio.read(Path(tmp) / "runs" / r["cell"] / "summary.json")
            t = s["time"]
            real = t["setup_s"] + t["rounds_s"] + ((s.get("new_clients") or {}).get("seconds") or 0.0)
            ratios.append(real / r["seconds"])
            print(f"| {r['cell']} | {r['seconds']:.1f} | {real:.1f} | {ratios[-1]:.2f} |")
    loaded = p["wall_seconds"] * m["slowdown"]
    print(f"\ngrid with --jobs {args.jobs}: predicted {p['wall_seconds']:.1f} s as timed ({loaded:.1f} s at the load "
          f"before the plan, × {m['slowdown']:.2f}), real {wall:.1f} s "
          f"(real ÷ predicted {wall / p['wall_seconds']:.2f}, "
          f"÷ the load-adjusted {wall / loaded:.2f}); per cell real ÷ predicted {min(ratios):.2f}–{max(ratios):.2f}; "
          f"exit status {code}; load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
