"""Scale: N = 10, 50, 100, 500 clients with m = 10 sampled per round (DESIGN §9).

Real digits (``../shared/data/digits_32.npz``, Dirichlet(10) label split over all three domains) into N
clients with (at most) 16 training and 8 test records each, the shared backbone's shape (32x32, patch 4,
width 192, depth 6; random weights — speed and memory do not depend on them), pFedPG with the
cross-attention generator, m = 10 clients per round from the seeded schedule. Each N runs in its own
process (so peak memory is that run's): seconds per round (training + server step, no evaluation),
peak RSS, and the bytes of per-client state (prompt, head, descriptor) and of per-client data
tensors. Skips with a message when the data file is absent.
Usage: python bench/scale.py [--clients 10 50 100 500] [--rounds 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "digits_32.npz"


def one(n: int, rounds: int, threads: int) -> dict:
    sys.path.insert(0, str(REPO))
    from pfedpg.config import config_from_dict
    from pfedpg.run import Trainer

    cfg = config_from_dict({
        "rounds": rounds, "clients_per_round": 10, "eval_every": 10_000, "checkpoint_every": 0, "threads": threads,
        "data": {"source": "npz", "path": str(DATA), "image_size": 32, "partition": "dirichlet", "num_clients": n,
                 "alpha": 10.0, "min_size": 24, "max_train_per_client": 16, "max_test_per_client": 8,
                 "public_fraction": 0.0},
        "model": {"weights": "random", "kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 6,
                                                  "num_heads": 3, "mlp_ratio": 4.0}},
    })
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as d:
        t = Trainer(cfg, run_dir=Path(d) / "run")
        rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t.run()
        rows = [json.loads(line) for line in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
    per_round = [r["time_round_s"] - r["time_eval_s"] for r in rows if r["type"] == "round" and r["round"] > 1]
    state = sum(v.numel() * v.element_size() for s in t.clients.states for v in (s.prompt, s.head_weight, s.head_bias))
    state += t.server.descriptors.numel() * t.server.descriptors.element_size()
    records = t.clients.records
    data = sum(x.numel() * x.element_size() + y.numel() * y.element_size()
               for x, y in [*records.train_data, *records.test_data])
    return {"clients": n, "s_per_round": statistics.mean(per_round),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_setup_mb": rss_built / 1024, "rss_at_import_mb": rss_before / 1024,
            "client_state_bytes": state, "client_data_bytes": data,
            "backbone_bytes": sum(p.numel() * p.element_size() for p in t.clients.model.backbone.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100, 500])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.rounds, args.threads)))
        return
    if not DATA.is_file():
        print(f"skipped: {DATA} not found (see ../shared/data/README.md)")
        return
    results = []
    for n in args.clients:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--rounds", str(args.rounds),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| N | m | s/round | peak RSS MB | client state KB (all N) | client data MB (all N) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['clients']} | 10 | {r['s_per_round']:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r['client_state_bytes'] / 1024:.0f} | {r['client_data_bytes'] / 2**20:.1f} |")
    a, b = results[0], results[-1]
    dn = b["clients"] - a["clients"]
    print(f"\ngrowth per client ({a['clients']} -> {b['clients']}): peak RSS "
          f"{(b['peak_rss_mb'] - a['peak_rss_mb']) * 1024 / dn:.1f} KB, of which state "
          f"{(b['client_state_bytes'] - a['client_state_bytes']) / dn / 1024:.1f} KB and data tensors "
          f"{(b['client_data_bytes'] - a['client_data_bytes']) / dn / 1024:.1f} KB; backbone "
          f"{b['backbone_bytes'] / 2**20:.1f} MB once; s/round ratio N={b['clients']} / N={a['clients']}: "
          f"{b['s_per_round'] / a['s_per_round']:.2f}")


if __name__ == "__main__":
    main()
