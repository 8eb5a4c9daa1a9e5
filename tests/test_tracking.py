"""Run tracking (config section ``tracking``; evaluations/tracking.py): what is logged is read back
for real — MLflow through its client from a SQLite store, TensorBoard through its own event reader."""
import json
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_MODEL

from evaluations.cli import main

pytest.importorskip("mlflow", reason="the tracking extra: pip install '.[tracking]'")
pytest.importorskip("tensorboard", reason="the tracking extra: pip install '.[tracking]'")

BASE = {"seed": 0, "rounds": 2, "checkpoint_every": 1,
        "data": {"image_size": 8, "num_domains": 3, "public_fraction": 0.3, "max_train_per_client": 16,
                 "max_test_per_client": 16},
        "model": {"weights": "random", "kwargs": dict(TINY_MODEL), "num_prompts": 2},
        "client": {"batch_size": 16, "local_epochs": 1, "lr": 0.1}}
DP = [{"name": "dp_client", "clip": 1.0, "noise_multiplier": 1.0}]
QUICKSTART = Path(__file__).parents[1] / "configs" / "quickstart.yaml"


def config_file(tmp_path, **extra):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, **extra}))
    return path


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """One SQLite store for the module's tests (making its tables takes seconds); each test logs
    into an experiment of its own."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    MlflowClient(tracking_uri=uri).search_experiments()
    return uri


@pytest.fixture
def store(db, request):
    """(the store's URI, this test's experiment)"""
    return db, request.node.name.replace("[", "-").replace("]", "")


def tracked(store, tensorboard=True):
    return ["--set", f"tracking.tensorboard={str(tensorboard).lower()}", "--set", f"tracking.mlflow={store[0]}",
            "--set", f"tracking.experiment={store[1]}"]


def client(store):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store[0])


def runs(store):
    c = client(store)
    return c.search_runs([c.get_experiment_by_name(store[1]).experiment_id])


def history(store, run, key):
    return [(m.step, m.value) for m in sorted(client(store).get_metric_history(run.info.run_id, key),
                                              key=lambda m: (m.step, m.timestamp))]


def events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return acc


def round_records(run_dir):
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == "round"]


def test_train_logs_rounds_epsilon_config_and_files(tmp_path, store):
    """The issue's command (configs/quickstart.yaml, rounds=2, both trackers) at a reduced size — random
    backbone weights instead of the 300-epoch pretraining, one block, 16 records per client — with a
    DP hook."""
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(QUICKSTART), "--set", "rounds=2", *tracked(store),
                 "--set", "model.weights=random", "--set", "model.kwargs.depth=1",
                 "--set", "data.max_train_per_client=16", "--set", "data.max_test_per_client=16",
                 "--set", f"hooks={json.dumps(DP)}",
                 "--run-dir", str(run_dir), "--no-progress"]) == 0
    recs = round_records(run_dir)
    (run,) = runs(store)
    assert run.info.status == "FINISHED" and run.data.tags["pfedpg.outcome"] == "ok"
    assert run.info.run_name == "run"
    # every round, at its round, with the values metrics.jsonl holds — accuracy and the privacy level
    for key in ("acc_adapted_mean", "acc_adapted_worst", "train_loss_mean", "dp_client/epsilon_max"):
        assert history(store, run, key) == [(r["round"], r[key]) for r in recs]
    eps = [v for _, v in history(store, run, "dp_client/epsilon_max")]
    assert eps[0] < eps[1]  # composed over the rounds
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run.data.metrics["summary/accuracy/mean"] == summary["accuracy"]["mean"]
    params = run.data.params
    assert params["client.lr"] == "0.25" and params["rounds"] == "2" and params["model.weights"] == "random"
    assert json.loads(params["hooks"]) == DP
    artifacts = {a.path for a in client(store).list_artifacts(run.info.run_id)}
    assert {"report.md", "learning_curve.png", "config.yaml", "summary.json", "metrics.jsonl"} <= artifacts
    assert "tracking.json" not in artifacts
    # TensorBoard: the same numbers in the run folder's event files, read back by TensorBoard's reader
    tb = events(run_dir / "tensorboard")
    assert [(e.step, round(e.value, 5)) for e in tb.Scalars("acc_adapted_mean")] == \
        [(r["round"], round(r["acc_adapted_mean"], 5)) for r in recs]
    assert [e.step for e in tb.Scalars("dp_client/epsilon_max")] == [1, 2]
    assert "_hparams_/experiment" in tb.PluginTagToContent("hparams")


def test_resume_continues_the_same_runs_without_logging_a_round_twice(tmp_path, store, monkeypatch):
    from pfedpg.run.rounds import RoundLoop

    original = RoundLoop.run_round

    def cut(self, r):
        if r == 4:
            raise KeyboardInterrupt
        return original(self, r)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(RoundLoop, "run_round", cut)
    args = ["train", "--config", str(config_file(tmp_path, rounds=4, checkpoint_every=2)), "--run-dir", str(run_dir),
            "--no-progress", *tracked(store, tensorboard=False)]
    assert main(args) == 130  # interrupted in round 4: rounds 1-3 logged, the checkpoint holds round 2
    (run,) = runs(store)
    assert run.info.status == "KILLED" and run.data.tags["pfedpg.outcome"] == "interrupted"
    assert [s for s, _ in history(store, run, "acc_adapted_mean")] == [1, 2, 3]
    assert not (run_dir / "tensorboard").exists()
    monkeypatch.setattr(RoundLoop, "run_round", original)
    # Resumed from round 2 (round 3 runs again), with TensorBoard turned on: a tracking change is no
    # config change for the checkpoint; TensorBoard gets rounds 1-2 from metrics.jsonl, then 3-4.
    assert main(["train", "--resume", "--run-dir", str(run_dir), "--no-progress",
                 "--set", "tracking.tensorboard=true"]) == 0
    (again,) = runs(store)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    recs = round_records(run_dir)
    assert history(store, again, "acc_adapted_mean") == [(r["round"], r["acc_adapted_mean"]) for r in recs]
    assert [e.step for e in events(run_dir / "tensorboard").Scalars("acc_adapted_mean")] == [1, 2, 3, 4]


def test_a_flower_run_is_logged_from_its_metrics_file(tmp_path, store, monkeypatch):
    """engine: flower runs its rounds in Flower's ServerApp process: the tracker is told no round
    live and logs them all from metrics.jsonl when the run ends."""
    import evaluations.flower.app as app
    from pfedpg.run import Trainer

    seen = {}

    def elsewhere(cfg, run_dir, *, log, resume):
        seen["engine"] = cfg.engine
        return Trainer(cfg, run_dir=run_dir).run()  # (in-process here, without an observer)

    monkeypatch.setattr(app, "run_flower", elsewhere)
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config_file(tmp_path)), "--run-dir", str(run_dir), "--engine", "flower",
                 "--no-progress", *tracked(store)]) == 0
    assert seen == {"engine": "flower"}
    (run,) = runs(store)
    assert history(store, run, "acc_adapted_mean") == [(r["round"], r["acc_adapted_mean"])
                                                          for r in round_records(run_dir)]
    assert [e.step for e in events(run_dir / "tensorboard").Scalars("acc_adapted_mean")] == [1, 2]


def test_a_sweep_is_a_parent_run_with_a_child_per_cell(tmp_path, store):
    """A finished sweep rerun with tracking on: its cells are reused (tracking decides no number) and
    logged as children; a third run adds nothing."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"base": BASE, "privacy": {
        "seeds": [0], "mechanisms": {}, "baselines": ["nonprivate", "local"], "out_dir": str(tmp_path / "out")}}))
    assert main(["privacy", "--config", str(sweep)]) == 0
    for _ in range(2):
        assert main(["privacy", "--config", str(sweep), *tracked(store)]) == 0
    out = tmp_path / "out"
    all_runs = runs(store)
    (parent,) = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(all_runs) == 3 and sorted(r.info.run_name for r in children) == sorted(
        p.name for p in (out / "runs").iterdir())
    assert parent.info.status == "FINISHED" and parent.info.run_name == "out"
    assert {"tradeoff.csv", "tradeoff.md", "report.md", "sweep.yaml"} <= {
        a.path for a in client(store).list_artifacts(parent.info.run_id)}
    assert json.loads(parent.data.params["privacy.baselines"]) == ["nonprivate", "local"]
    for child in children:
        cell = out / "runs" / child.info.run_name
        assert child.info.status == "FINISHED"
        assert history(store, child, "acc_adapted_mean") == [(r["round"], r["acc_adapted_mean"])
                                                                for r in round_records(cell)]
        assert "report.md" in {a.path for a in client(store).list_artifacts(child.info.run_id)}
        assert [e.step for e in events(cell / "tensorboard").Scalars("acc_adapted_mean")] == [1, 2]


@pytest.mark.parametrize("blocked, key", [("mlflow", "tracking.mlflow=sqlite:///{tmp}/m.db"),
                                          ("tensorboard", "tracking.tensorboard=true")])
def test_a_missing_extra_is_one_line_before_anything_runs(tmp_path, monkeypatch, capsys, blocked, key):
    monkeypatch.setitem(sys.modules, blocked, None)  # as on a core install: `import <blocked>` fails
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config_file(tmp_path)), "--run-dir", str(run_dir),
                 "--set", key.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"tracking.{blocked} needs the tracking extra" in err
    assert "pip install '.[tracking]'" in err and not run_dir.exists()


@pytest.mark.parametrize("setting, message", [
    ("tracking.mlflow=runs/mlflow.db", "write sqlite:///runs/mlflow.db for a SQLite store"),
    ("tracking.mlflow=nosuch://host", "MLflow cannot use it"),
    ("tracking.mlflow=http://127.0.0.1:9", "no MLflow server answers there"),  # (port 9: discard, closed)
    ("tracking.mlflow=sqlite:///{tmp}/notes.txt", "notes.txt' is not a SQLite database; give a SQLite file"),
    ("tracking.mlflow=sqlite:///{tmp}/notes.txt/m.db", "cannot make the folder"),
    ("tracking.tensorboard=maybe", "tracking.tensorboard='maybe' must be true or false"),
    ("tracking.wandb=true", "unknown config key tracking.wandb; valid keys in tracking: tensorboard, mlflow, "
                            "experiment"),
])
def test_bad_tracking_settings_are_one_line_errors(tmp_path, capsys, setting, message):
    (tmp_path / "notes.txt").write_text("not a database")
    assert main(["train", "--config", str(config_file(tmp_path)), "--run-dir", str(tmp_path / "run"),
                 "--set", setting.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and not (tmp_path / "run").exists()


def test_the_python_api_tracks_a_run_too(tmp_path):
    from evaluations import api

    res = api.run({**BASE, "tracking": {"tensorboard": True}}, run_dir=tmp_path / "run", log=lambda m: None)
    assert [e.step for e in events(res.run_dir / "tensorboard").Scalars("acc_adapted_worst")] == [1, 2]
