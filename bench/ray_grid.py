"""A grid on Ray against the local executor: wall time and the same table.

Runs one privacy sweep (default: configs/privacy_demo.yaml at --rounds 3, threads 1 — 18 cells) four
ways, each into a fresh folder: ``--jobs 1`` and ``--jobs 2`` (the local executor), a local Ray
instance (``--executor ray`` without an address: what the CLI starts), and a two-node Ray cluster on
this machine (``ray.cluster_utils.Cluster``: a head that runs no cells and two nodes of
``--cpus-per-node`` CPUs each). Prints each wall time (the cluster's start-up apart), its ratio to
``--jobs 2``, and whether every tradeoff.csv equals ``--jobs 1``'s (run_dir aside).
Usage: python bench/ray_grid.py [--config FILE] [--rounds 3] [--cpus-per-node 1]
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def table(out: Path) -> list[dict]:
    with open(out / "tradeoff.csv") as f:
        return [{k: v for k, v in r.items() if k != "run_dir"} for r in csv.DictReader(f)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "privacy_demo.yaml"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpus-per-node", type=int, default=1)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import ray
    from ray.cluster_utils import Cluster

    from evaluations.privacy import load_sweep, run_sweep
    from evaluations.ray_executor import RayExecutor

    sweep, base = load_sweep(args.config, [f"rounds={args.rounds}", "threads=1"])
    times, tables = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        def timed(name: str, **kw) -> None:
            t = time.perf_counter()
            out = run_sweep(sweep, base, out_dir=Path(tmp) / name, log=lambda m: None, **kw)
            times[name], tables[name] = time.perf_counter() - t, table(out)
            print(f"{name}: {times[name]:.1f} s", flush=True)

        timed("jobs 1")
        timed("jobs 2", jobs=2)
        timed("ray, local instance", executor=RayExecutor())
        t = time.perf_counter()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        for _ in range(2):
            cluster.add_node(num_cpus=args.cpus_per_node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        start = time.perf_counter() - t
        try:
            timed("ray, two-node cluster", executor=RayExecutor())
        finally:
            ray.shutdown()
            cluster.shutdown()
    cells = len(tables["jobs 1"])
    print(f"\n{args.config} at rounds={args.rounds}, threads=1: {cells} rows; two-node cluster start-up {start:.1f} s")
    print("| executor | wall s | ÷ jobs 2 | table equals jobs 1 |\n|---|---|---|---|")
    for name, s in times.items():
        print(f"| {name} | {s:.1f} | {s / times['jobs 2']:.2f} | {tables[name] == tables['jobs 1']} |")


if __name__ == "__main__":
    main()
