"""Per-message overhead of a Flower deployment, with and without the node's long-running worker.

A SuperLink and 2 SuperNodes on 127.0.0.1 (``evaluations.flower.local``, plaintext), the embedded
digits, the positive control's backbone shape with random weights (16 px, patch 4, width 64,
depth 4), pFedPG, R rounds, one evaluation at the end, ``threads: 1``. Run once with every
SuperNode building its client in each ClientApp process (Flower 1.42's default: a fresh process
per message), once with ``--node-config "... worker=<socket>"`` (the client is built once in a
long-running worker, ``evaluations.flower.worker``), and once more with the worker and
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.05`` in the SuperNodes' environment (their SuperExec looks
for a new message's task every 0.05 s instead of every 1 s).

Prints, per mode: the set-up query's reply time (the first message), the train messages' reply
time at the server and what the client spent training in it, their difference (the overhead of a
message), messages per second per node, and whether the per-client accuracies equal an in-process
run of the same config.
Usage: python bench/flower_messages.py [--rounds 8]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def config(rounds: int):
    from pfedpg.config import config_from_dict

    return config_from_dict({
        "rounds": rounds, "eval_every": 10_000, "checkpoint_every": 0, "threads": 1,
        "data": {"source": "embedded", "image_size": 16, "num_domains": 2, "clients_per_domain": 1},
        "model": {"weights": "random", "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 4,
                                                  "num_heads": 4, "mlp_ratio": 2.0}},
    })


#: mode -> (node's long-running worker, the SuperNodes' environment)
MODES = {
    "a fresh client per message (Flower's default)": (False, {}),
    "worker=<socket>": (True, {}),
    "worker=<socket>, SuperExec polls every 0.05 s": (True, {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.05"}),
}


def measure(cfg, work: Path, worker: bool, env: dict[str, str]) -> dict:
    from evaluations.flower.local import Federation

    work.mkdir(parents=True)
    nodes = [{"partition-id": n, **({"worker": f"/tmp/pfedpg-bench-{int(time.time())}-{n}.sock"} if worker else {})}
             for n in range(2)]
    fed = Federation(work, clients=2, node_configs=nodes, env=env)
    t0 = time.perf_counter()
    try:
        proc = fed.train(cfg, work / "run", timeout=3600)
    finally:
        fed.shutdown()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the deployment failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["type"] == "client" and r.get("message_s") is not None]
    over = [r["message_s"] - r["client_work_s"] for r in train]
    later = [r["message_s"] - r["client_work_s"] for r in train if r["round"] > 1]
    summary = json.loads((work / "run" / "summary.json").read_text())
    query = summary["communication"].get("flower_setup_query_s")
    return {"query_s": max(query) if query else None,
            "train_reply_s": statistics.mean(r["message_s"] for r in train),
            "client_work_s": statistics.mean(r["client_work_s"] for r in train),
            "overhead_round1_s": statistics.mean(o for r, o in zip(train, over) if r["round"] == 1),
            "overhead_later_s": statistics.mean(later), "overhead_later_max_s": max(later),
            "messages_per_s": 1.0 / statistics.mean(r["message_s"] for r in train if r["round"] > 1),
            "wall_s": wall, "per_client": summary["accuracy"]["per_client"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    from evaluations.plugins import load_plugins
    from pfedpg.config import config_from_dict
    from pfedpg.run import Trainer

    load_plugins()
    cfg = config(args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        ref = Trainer(cfg, run_dir=Path(tmp) / "inprocess").run()["accuracy"]["per_client"]
        d = cfg.to_dict()
        d["engine"] = "flower"
        fcfg = config_from_dict(d)
        results = {mode: measure(fcfg, Path(tmp) / f"mode{i}", *MODES[mode]) for i, mode in enumerate(MODES)}
    print(f"R = {args.rounds} rounds, 2 SuperNodes on 127.0.0.1, Flower 1.42, threads 1")
    print("| mode | set-up query s | train reply s | client work s | overhead round 1 s | overhead later s (max) "
          "| messages/s per node | wall s | accuracies = in-process |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        q = "—" if r["query_s"] is None else f"{r['query_s']:.2f}"
        print(f"| {mode} | {q} | {r['train_reply_s']:.2f} | {r['client_work_s']:.3f} | "
              f"{r['overhead_round1_s']:.2f} | {r['overhead_later_s']:.2f} ({r['overhead_later_max_s']:.2f}) | "
              f"{r['messages_per_s']:.2f} | {r['wall_s']:.0f} | {r['per_client'] == ref} |")
    a, *rest = [r["overhead_later_s"] for r in results.values()]
    print("overhead per later message: " + " -> ".join(f"{x:.2f} s" for x in [a, *rest])
          + f" ({a / rest[-1]:.1f}x less)")


if __name__ == "__main__":
    main()
