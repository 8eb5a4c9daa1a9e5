"""The privacy sweep: grid, resume, failed cells, outputs (DESIGN §5)."""
import csv
import json

import pytest
import yaml
from conftest import TINY_MODEL

from evaluations.cli import main
from evaluations.privacy import load_sweep, run_sweep
from pfedpg.errors import ConfigError


def sweep_file(tmp_path, **privacy):
    base = {"rounds": 2, "checkpoint_every": 1,
            "data": {"image_size": 8, "num_domains": 3, "max_train_per_client": 32, "max_test_per_client": 30},
            "model": {"weights": "random", "kwargs": dict(TINY_MODEL), "num_prompts": 2},
            "client": {"batch_size": 16}}
    priv = {"seeds": [0], "mechanisms": {"dp_client": {"clip": 0.5}}, "target_epsilons": None,
            "noise_multipliers": [1.0], "baselines": ["nonprivate", "clip_only", "local"],
            "out_dir": str(tmp_path / "sweep"), **privacy}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": base, "privacy": priv}))
    return path


def read_csv(path):
    with open(path) as f:
        return [{k: v for k, v in r.items() if k != "run_dir"} for r in csv.DictReader(f)]


def test_interrupted_sweep_resumes_to_the_same_table(tmp_path, monkeypatch):
    import pfedpg.run

    # Uninterrupted reference.
    sweep, base = load_sweep(sweep_file(tmp_path))
    ref = run_sweep(sweep, base, out_dir=tmp_path / "ref", log=lambda m: None)
    assert [r["status"] for r in read_csv(ref / "tradeoff.csv")] == ["ok"] * 4
    # Interrupted: the third cell's run is killed (not an error the sweep may swallow).
    original = pfedpg.run.Trainer.run
    calls = {"n": 0}

    def flaky(self, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, **kw)

    monkeypatch.setattr(pfedpg.run.Trainer, "run", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, base, out_dir=tmp_path / "cut", log=lambda m: None)
    monkeypatch.setattr(pfedpg.run.Trainer, "run", original)
    logs = []
    run_sweep(sweep, base, out_dir=tmp_path / "cut", log=logs.append)
    assert sum("reused" in m for m in logs) == 2  # the finished runs were not redone
    assert read_csv(tmp_path / "cut" / "tradeoff.csv") == read_csv(ref / "tradeoff.csv")
    assert (tmp_path / "cut" / "tradeoff.md").read_text() == (ref / "tradeoff.md").read_text()
    for name in ("report.md", "report.html", "accuracy_vs_epsilon.png"):
        assert (ref / name).is_file()
    assert_self_contained_report(ref)


def assert_self_contained_report(out):
    """The HTML report a reviewer pastes: every image embedded, a header saying what was run."""
    import re

    page = (out / "report.html").read_text()
    srcs = re.findall(r"src='([^']*)'", page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "What was run: method" in page and "seeds" in page and "pfedpg-eval" in page
    assert "What was run: method" in (out / "report.md").read_text()


def test_rows_carry_the_privacy_columns(tmp_path):
    sweep, base = load_sweep(sweep_file(tmp_path))
    out = run_sweep(sweep, base, log=lambda m: None)
    rows = {r["mechanism"]: r for r in read_csv(out / "tradeoff.csv")}
    assert set(rows) == {"nonprivate", "clip_only", "local", "dp_client"}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["nonprivate"]["epsilon_max"] == "inf" and rows["clip_only"]["epsilon_max"] == "inf"
    dp = rows["dp_client"]
    assert float(dp["noise_multiplier"]) == 1.0 and float(dp["epsilon_max"]) > 0 and float(dp["delta"]) == 1e-5
    assert 0 <= float(dp["accuracy_worst"]) <= float(dp["accuracy_mean"]) <= 1
    report = (out / "report.md").read_text()
    for phrase in ("privacy unit", "adjacency", "threat model", "sampling", "accountant", "delta"):
        assert phrase in report


def test_a_cell_that_fails_while_it_runs_is_a_failed_row_and_the_sweep_goes_on(tmp_path, monkeypatch):
    import evaluations.executors

    original = evaluations.executors.run_training

    def failing(cfg, run_dir, **kw):  # an error the checks before the run cannot see (not a ConfigError)
        if cfg.method == "local":
            raise RuntimeError("the local cell broke")
        return original(cfg, run_dir, **kw)

    monkeypatch.setattr(evaluations.executors, "run_training", failing)
    path = sweep_file(tmp_path, mechanisms={}, baselines=["nonprivate", "local"])
    assert main(["privacy", "--config", str(path)]) == 1
    rows = {r["mechanism"]: r for r in read_csv(tmp_path / "sweep" / "tradeoff.csv")}
    assert rows["nonprivate"]["status"] == "ok"
    assert rows["local"]["status"] == "failed" and "the local cell broke" in rows["local"]["error"]
    assert (tmp_path / "sweep" / "FAILED").read_text() == "local-s0: RuntimeError: the local cell broke\n"
    # The rerun runs the failed cell again (the error gone): no stale FAILED, exit status 0.
    monkeypatch.setattr(evaluations.executors, "run_training", original)
    assert main(["privacy", "--config", str(path)]) == 0
    assert [r["status"] for r in read_csv(tmp_path / "sweep" / "tradeoff.csv")] == ["ok", "ok"]
    assert not (tmp_path / "sweep" / "FAILED").exists()


@pytest.mark.parametrize("privacy, message", [
    ({"mechanisms": {"dp_foo": {}}}, "unknown mechanism 'dp_foo'"),
    ({"target_epsilons": [1.0], "noise_multipliers": [1.0]}, "exactly one of"),
    ({"mechanisms": {"dp_client": {"clip": 1, "noise_multiplier": 2}}}, "not per mechanism"),
    ({"baselines": ["oracle"]}, "unknown 'oracle'"),
    ({"seedz": [0]}, "unknown config key privacy.seedz"),
    ({"target_epsilons": [], "noise_multipliers": None}, r"privacy.target_epsilons is empty: list at least one "
                                                         r"privacy level, e.g. target_epsilons: \[1.0, 8.0\]"),
    ({"target_epsilons": None, "noise_multipliers": None}, "both null: set exactly one of them"),
])
def test_bad_sweep_files_are_config_errors(tmp_path, privacy, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(sweep_file(tmp_path, **privacy))


def test_shipped_privacy_config_loads():
    from pathlib import Path

    root = Path(__file__).parents[1]
    import os

    cwd = os.getcwd()
    os.chdir(root)
    try:
        sweep, base = load_sweep("configs/privacy.yaml")
        demo, demo_base = load_sweep("configs/privacy_demo.yaml")  # what make demo runs
    finally:
        os.chdir(cwd)
    assert set(sweep.mechanisms) == {"dp_client", "dp_sgd"} and base["method"] == "pfedpg"
    assert set(demo.mechanisms) == {"dp_client", "dp_sgd"} and len(demo.seeds) >= 2
    assert demo_base["data"]["composite"] == "overlay" and demo_base["threads"] == 1


def test_a_cell_with_a_changed_config_is_not_reused(tmp_path):
    sweep, base = load_sweep(sweep_file(tmp_path, baselines=["nonprivate"], mechanisms={}))
    out = run_sweep(sweep, base, log=lambda m: None)
    before = {f: (out / f).read_bytes() for f in ("tradeoff.csv", "sweep.yaml", "report.md")}
    base["client"]["lr"] = 0.05
    with pytest.raises(ConfigError, match=r"holds a run of cell nonprivate-s0 with another config "
                                          r"\(client.lr: 0.25 → 0.05\); pass another --out, or delete"):
        run_sweep(sweep, base, log=lambda m: None)
    assert {f: (out / f).read_bytes() for f in before} == before  # the results stay as they were


def test_base_overrides_merge_into_base_config_sections(tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"server": {"generator": "mlp", "lr": 0.1}, "rounds": 3}))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"base_config": str(tmp_path / "run.yaml"),
                                                     "base": {"server": {"lr": 0.001}}}))
    _, base = load_sweep(tmp_path / "s.yaml")
    assert base["server"]["generator"] == "mlp" and base["server"]["lr"] == 0.001 and base["rounds"] == 3


def test_a_relative_base_config_is_read_from_the_sweep_files_folder(tmp_path, monkeypatch):
    from pfedpg.errors import ConfigError

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "run.yaml").write_text(yaml.safe_dump({"rounds": 3}))
    (tmp_path / "cfg" / "s.yaml").write_text(yaml.safe_dump({"base_config": "run.yaml"}))
    monkeypatch.chdir(tmp_path)  # not the file's folder
    _, base = load_sweep("cfg/s.yaml")
    assert base["rounds"] == 3
    (tmp_path / "cfg" / "bad.yaml").write_text(yaml.safe_dump({"base_config": "gone.yaml"}))
    with pytest.raises(ConfigError, match=r"base_config 'gone.yaml' not found as 'cfg/gone.yaml'.*sweep file's folder"):
        load_sweep("cfg/bad.yaml")
    # And the shipped sweep files work from outside the repository root.
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1]
    _, base = load_sweep(root / "configs" / "privacy.yaml")
    assert base["rounds"] >= 1


def test_a_saved_config_equal_after_defaults_is_reused(tmp_path):
    """Key order and keys added later (with their defaults) do not make a finished cell stale."""
    from evaluations.sweep import _same_config
    from pfedpg.config import config_from_dict, dump_config

    cfg = config_from_dict({"rounds": 3, "hooks": [{"name": "noop"}]})
    tree = yaml.safe_load(dump_config(cfg))
    del tree["batched_clients"]
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(tree, sort_keys=True))
    assert _same_config(saved, cfg)
    assert not _same_config(saved, config_from_dict({"rounds": 4, "hooks": [{"name": "noop"}]}))
    # Flower settings do not touch an in-process run: a changed Flower default keeps the cell.
    tree["flower"]["insecure"] = not tree["flower"]["insecure"]
    saved.write_text(yaml.safe_dump(tree, sort_keys=True))
    assert _same_config(saved, cfg)
    assert not _same_config(saved, config_from_dict({"rounds": 3, "hooks": [{"name": "noop"}], "engine": "flower"}))


def test_cells_in_parallel_give_the_sequential_table_and_pretrain_each_backbone_once(tmp_path, monkeypatch):
    """--jobs 2: worker processes, same rows as one after another (threads fixed in the config);
    the pretrained backbone the cells share is trained once, before the cells start. With a stubbed
    count of 2 GPUs each worker sees one of them (round-robin), and each cell records which."""
    import torch

    from evaluations.executors import gpu_slots

    assert gpu_slots(3, 2) == [0, 1, 0] and gpu_slots(2, 4) == [0, 1] and gpu_slots(2, 0) == []
    path = sweep_file(tmp_path)
    tree = yaml.safe_load(path.read_text())
    tree["base"].update({"threads": 1, "device": "cpu", "model": {**tree["base"]["model"], "weights": "pretrain"},
                         "pretrain": {"epochs": 1, "cache_dir": str(tmp_path / "cache")}})
    path.write_text(yaml.safe_dump(tree))
    sweep, base = load_sweep(path)
    logs = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # the parent counts 2 GPUs; the cells run on the CPU
    par = run_sweep(sweep, base, out_dir=tmp_path / "par", log=logs.append, jobs=2)
    monkeypatch.undo()
    assert sum("2 workers on 2 GPU(s)" in m for m in logs) == 1
    seen = {json.loads((d / "env.json").read_text())["cuda_visible_devices"] for d in (par / "runs").iterdir()}
    assert seen <= {"0", "1"} and seen  # every cell ran in a worker that saw one GPU
    assert sum("pretraining 1 backbone" in m for m in logs) == 1
    # the worker's pretraining lines reach the grid's log (start with epochs and cache path, end)
    assert any(m.startswith("pretraining vit") and "for 1 epochs" in m and str(tmp_path / "cache") in m for m in logs)
    assert any(m.startswith("pretraining done") for m in logs)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    seq = run_sweep(sweep, base, out_dir=tmp_path / "seq", log=lambda m: None)
    rows = read_csv(par / "tradeoff.csv")
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert rows == read_csv(seq / "tradeoff.csv")
    with pytest.raises(ConfigError, match="--jobs"):
        run_sweep(sweep, base, out_dir=tmp_path / "bad", log=lambda m: None, jobs=0)
