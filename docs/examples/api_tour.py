"""The Python API in one script: a run, then a privacy sweep over three seeds and its plan.

A toy size (8x8 digits, a one-block ViT with random weights) so that it runs in seconds; for real
numbers pass the shipped configs instead (configs/quickstart.yaml, configs/privacy_demo.yaml).
The calls sit under `if __name__ == "__main__":`: with `jobs=2` the sweep starts worker processes,
which import this file again (Python's spawn start method); a notebook needs no such guard. The test
suite runs this file as it stands (tests/test_api.py).
"""
from evaluations import api

toy = {
    "rounds": 2,
    "threads": 1,  # torch threads per run: numbers that do not depend on the machine's cores
    "data": {"image_size": 8, "num_domains": 3, "max_train_per_client": 24, "max_test_per_client": 20},
    "model": {"weights": "random", "num_prompts": 2,
              "kwargs": {"img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2,
                         "mlp_ratio": 1.0}},
    "client": {"batch_size": 16, "lr": 0.1},
}
sweep_file = {"base": toy, "privacy": {"seeds": [0, 1, 2], "mechanisms": {"dp_client": {"clip": 0.5}},
                                        "target_epsilons": [8.0], "baselines": ["local"]}}


def main(log=print):  # log: where progress lines go; `lambda line: None` silences them
    # One run: the same as `pfedpg-eval train --config FILE --set server.lr=0.1 --run-dir runs/api/run`.
    run = api.run(toy, ["server.lr=0.1"], run_dir="runs/api/run", log=log)
    print(f"{run.method}: accuracy mean {run.accuracy.mean:.3f}, worst client {run.accuracy.worst:.3f}")
    print("report:", run.report)

    # What the sweep will cost, before running it: the same as `pfedpg-eval plan`.
    cost = api.plan(sweep_file, log=log)
    print(f"{len(cost.runs)} runs, about {cost.total_seconds:.0f} s one after another on {cost.device}")

    # The sweep (a sweep file's content as a mapping; a path works too); jobs=2 would run two cells at a time.
    sweep = api.privacy_sweep(sweep_file, out_dir="runs/api/sweep", jobs=1, log=log)
    for row in sweep.rows:
        eps = "—" if row.epsilon_max.mean is None else f"{row.epsilon_max.mean:.2f}"
        diff = "" if row.vs_local is None else f"{100 * row.vs_local.mean:+.1f} points vs local"
        print(f"{row.mechanism:>10}  ε {eps:>5}  accuracy {100 * row.accuracy.mean:.1f} ± {100 * row.accuracy.sd:.1f}"
              f"  {diff}  {row.verdict}")
    assert not sweep.failed, sweep.failed
    return run, sweep, cost


if __name__ == "__main__":
    main()
