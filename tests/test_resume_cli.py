"""``train --resume`` (issue 32): the run's own config (``--config`` refused, a changed key named),
``--set rounds=N`` continues to N rounds with the numbers of an uninterrupted N-round run, and
relative paths are read where the run started."""
import json

import numpy as np
import pytest
import yaml
from conftest import TINY_MODEL

from evaluations.cli import main

RUN = {"seed": 0, "rounds": 2, "checkpoint_every": 1, "threads": 1,
       "data": {"image_size": 8, "num_domains": 3, "max_train_per_client": 32, "max_test_per_client": 30},
       "model": {"weights": "random", "kwargs": dict(TINY_MODEL), "num_prompts": 2},
       "client": {"batch_size": 16, "lr": 0.1}}


def config_file(tmp_path, **changes):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**RUN, **changes}))
    return path


def final_rows(run_dir):
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = max(r["round"] for r in rows)
    return [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows
            if r["round"] == last and r["type"] == "client"]


def test_resume_refuses_config_and_names_a_changed_key(tmp_path, capsys):
    path = config_file(tmp_path)
    assert main(["-q", "train", "--config", str(path), "--run-dir", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--run-dir", str(tmp_path / "r"), "--config", str(path)]) == 2
    assert "drop --config (--set rounds=N continues it to N rounds)" in capsys.readouterr().err
    assert main(["train", "--resume", "--run-dir", str(tmp_path / "r"), "--set", "client.lr=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --resume: --set changes client.lr: 0.1 → 0.5, and a resumed run keeps its config (only "
                   "rounds and tracking may change); drop that --set, or start a new run with it (another --run-dir)")


def test_resume_with_more_rounds_gives_the_uninterrupted_runs_numbers(tmp_path, capsys):
    path = config_file(tmp_path)
    assert main(["-q", "train", "--config", str(path), "--run-dir", str(tmp_path / "two")]) == 0
    assert main(["train", "--resume", "--run-dir", str(tmp_path / "two"), "--set", "rounds=3"]) == 0
    err = capsys.readouterr().err
    assert "--resume: rounds 2 → 3: continuing after round 2 to round 3 (config.yaml updated)" in err
    assert main(["-q", "train", "--config", str(path), "--set", "rounds=3", "--run-dir", str(tmp_path / "three")]) == 0
    resumed = json.loads((tmp_path / "two" / "summary.json").read_text())
    straight = json.loads((tmp_path / "three" / "summary.json").read_text())
    assert resumed["rounds"] == straight["rounds"] == 3
    assert resumed["accuracy"] == straight["accuracy"]
    assert final_rows(tmp_path / "two") == final_rows(tmp_path / "three")
    assert yaml.safe_load((tmp_path / "two" / "config.yaml").read_text())["rounds"] == 3
    # Fewer rounds than the latest checkpoint holds cannot be resumed.
    assert main(["train", "--resume", "--run-dir", str(tmp_path / "two"), "--set", "rounds=1"]) == 2
    assert "rounds=1 is below round 3 of the latest checkpoint; set rounds >= 3" in capsys.readouterr().err


def test_rounds_cannot_change_under_noise_calibrated_to_the_rounds(tmp_path, capsys):
    path = config_file(tmp_path, hooks=[{"name": "dp_client", "clip": 0.5, "target_epsilon": 8.0}])
    assert main(["-q", "train", "--config", str(path), "--run-dir", str(tmp_path / "r")]) == 0
    assert main(["train", "--resume", "--run-dir", str(tmp_path / "r"), "--set", "rounds=3"]) == 2
    assert ("rounds cannot change (2 → 3) under hook dp_client, whose work depends on the number of rounds"
            in capsys.readouterr().err)


def test_resume_from_another_directory_reads_relative_paths_where_the_run_started(tmp_path, monkeypatch, capsys):
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    (start / "data").mkdir(parents=True)
    elsewhere.mkdir()
    rng = np.random.default_rng(0)
    np.savez(start / "data" / "d.npz", images=rng.integers(0, 256, (90, 8, 8, 3), dtype=np.uint8),
             labels=(np.arange(90) % 3).astype(np.int64), domains=(np.arange(90) // 30).astype(np.int64),
             class_names=np.array(["a", "b", "c"]), domain_names=np.array(["d0", "d1", "d2"]))
    path = config_file(tmp_path, data={"source": "npz", "path": "data/d.npz", "image_size": 8, "public_fraction": 0.0})
    monkeypatch.chdir(start)
    assert main(["-q", "train", "--config", str(path), "--run-dir", "runs/r"]) == 0
    assert json.loads((start / "runs" / "r" / "env.json").read_text())["cwd"] == str(start)
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--resume", "--run-dir", "../start/runs/r", "--set", "rounds=3"]) == 0
    assert (f"--resume: relative paths in the run's config are read from {start}, where it started"
            in capsys.readouterr().err)
    assert json.loads((start / "runs" / "r" / "summary.json").read_text())["rounds"] == 3
    import os

    assert os.getcwd() == str(elsewhere)  # the command's own directory again


@pytest.mark.parametrize("partial", ['{"round": 3, "ty', ""])
def test_resume_drops_a_last_metrics_line_cut_short(tmp_path, partial):
    """A worker killed mid-write leaves a partial last line: the rounds after the checkpoint run again."""
    path = config_file(tmp_path)
    assert main(["-q", "train", "--config", str(path), "--run-dir", str(tmp_path / "r"), "--set", "rounds=3"]) == 0
    ref = final_rows(tmp_path / "r")
    metrics = tmp_path / "r" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + partial)
    (tmp_path / "r" / "checkpoints" / "round_0003.pt").unlink()
    (tmp_path / "r" / "summary.json").unlink()
    assert main(["-q", "train", "--resume", "--run-dir", str(tmp_path / "r")]) == 0
    assert final_rows(tmp_path / "r") == ref


def test_the_api_resumes_by_the_same_rules(tmp_path):
    from evaluations import api
    from pfedpg.errors import ConfigError

    path = config_file(tmp_path)
    api.run(path, run_dir=tmp_path / "r", log=lambda m: None)
    with pytest.raises(ConfigError, match=r"--set changes client.lr: 0.1 → 0.5"):
        api.run(path, ["client.lr=0.5"], run_dir=tmp_path / "r", resume=True, log=lambda m: None)
    assert api.run(path, ["rounds=3"], run_dir=tmp_path / "r", resume=True, log=lambda m: None).rounds == 3
