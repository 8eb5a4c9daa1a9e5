"""Typed configs with one-line errors, and the pfedpg-eval CLI end to end."""
import json

import pytest
import yaml

from conftest import TINY_MODEL
from evaluations.cli import main
from pfedpg.config import config_from_dict, load_config
from pfedpg.errors import ConfigError


@pytest.mark.parametrize("values, message", [
    ({"rounds_": 3}, "unknown config key rounds_; valid keys: seed, method, rounds"),
    ({"client": {"learning_rate": 0.1}}, "unknown config key client.learning_rate; valid keys in client: lr"),
    ({"method": "fedprox"}, "unknown method 'fedprox'; choose one of: fedvpt, local, pfedpg"),
    ({"server": {"generator": "transformer"}}, "unknown generator 'transformer'; choose one of: adain, basis, cross_attention, mlp"),
    ({"rounds": 0}, "rounds=0 must be a positive integer"),
    ({"rounds": "ten"}, "rounds='ten' must be an integer"),
    ({"client": {"lr": -1}}, "client.lr=-1.0 must be a finite number >= 0"),
    ({"client": {"batch_size": 0}}, "client.batch_size=0 must be a positive integer"),
    ({"server": {"lr": 0}}, "server.lr=0.0 must be a positive number"),
    ({"model": {"weights": "imagenet"}}, "model.weights='imagenet' is not one of"),
    ({"data": {"image_size": 32}}, "model.kwargs.img_size=16 differs from data.image_size=32"),
    ({"clients_per_round": 0}, "clients_per_round=0 must be a positive integer or null"),
    ({"hooks": [{"name": "noop"}], "checkpoint_every": -1}, "checkpoint_every=-1"),
])
def test_bad_configs_give_a_one_line_error(values, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(values)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_overrides_and_round_trip(tmp_path):
    cfg = config_from_dict({}, ["client.lr=0.05", "rounds=3", "data.num_domains=2", "hooks=[{name: noop}]"])
    assert cfg.client.lr == 0.05 and cfg.rounds == 3 and cfg.data.num_domains == 2 and cfg.hooks == [{"name": "noop"}]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(path) == cfg
    with pytest.raises(ConfigError, match="key.sub=value"):
        config_from_dict({}, ["rounds"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("rounds: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_set_on_one_mapping_key_keeps_the_rest_of_the_mapping():
    """--set model.kwargs.depth=2 changes one architecture key; it used to replace the whole kwargs
    mapping with {depth: 2}, silently building timm's default ViT (patch 16, 12 blocks) instead."""
    default = load_config(None).model.kwargs
    cfg = load_config(None, ["model.kwargs.depth=2"])
    assert cfg.model.kwargs == {**default, "depth": 2}
    cfg = config_from_dict({"model": {"num_prompts": 4}}, ["model.kwargs.embed_dim=32"])  # section present
    assert cfg.model.kwargs == {**default, "embed_dim": 32} and cfg.model.num_prompts == 4
    # A mapping written out in a file is taken as written.
    assert config_from_dict({"model": {"kwargs": {"img_size": 16}}}).model.kwargs == {"img_size": 16}


def test_shipped_configs_load():
    from pathlib import Path

    paths = sorted(Path(__file__).parents[1].glob("configs/*.yaml"))
    sweeps = ("privacy", "robustness", "audit")  # sweep files: tested with their sweeps
    runs = [p for p in paths if not set(sweeps) & set(yaml.safe_load(p.read_text()))]
    assert len(runs) >= 4
    for path in runs:
        load_config(path)


def _tiny_args(tmp_path):
    kw = json.dumps(TINY_MODEL).replace('"', "")
    return ["--set", "rounds=2", "--set", "model.weights=random", "--set", f"model.kwargs={kw}",
            "--set", "data.image_size=8", "--set", "data.max_train_per_client=32", "--set", "model.num_prompts=2",
            "--set", f"output_dir={tmp_path}"]


def test_cli_train_report_and_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--no-progress", "--run-dir", str(run_dir), *_tiny_args(tmp_path)]) == 0
    for name in ("config.yaml", "seeds.json", "env.json", "metrics.jsonl", "summary.json", "learning_curve.png",
                 "report.md", "log.txt"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints").is_dir()
    report = (run_dir / "report.md").read_text()
    assert "adapted" in report and "Communication" in report
    (run_dir / "report.md").unlink()
    assert main(["report", str(run_dir)]) == 0 and (run_dir / "report.md").is_file()
    # A finished run resumes to the same summary (nothing left to do).
    before = json.loads((run_dir / "summary.json").read_text())["accuracy"]
    assert main(["train", "--no-progress", "--resume", "--run-dir", str(run_dir)]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["accuracy"] == before


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--set", "client.learning_rate=0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown config key client.learning_rate; valid keys in client: lr, head_lr, momentum, weight_decay, "
                   "batch_size, local_epochs, eval_batch_size"]
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2


def test_help_of_every_subcommand(capsys):
    for cmd in ([], ["train"], ["pretrain"], ["report"]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
        assert "usage: pfedpg-eval" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["privacy", "audit", "robustness"])
def test_jobs_must_be_positive_before_anything_is_written(tmp_path, command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--jobs", "0", "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "--jobs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("1E5", 1e5), (".5", 0.5), ("-2e-4", -2e-4), ("3", 3),
                                         ("1.0e-5", 1e-5), ("abc", "abc")])
def test_yaml_1_2_numbers_in_set_and_in_files(tmp_path, text, value):
    """YAML 1.1 (PyYAML's default) reads 1e-3 as a string; the README writes 1e-3 throughout."""
    from pfedpg.config import load_yaml

    assert load_yaml(text) == value and type(load_yaml(text)) is type(value)
    assert load_config(None, ["server.lr=1e-3"]).server.lr == 1e-3
    (tmp_path / "c.yaml").write_text("server: {lr: 1e-3}\nclient: {weight_decay: 1E-4}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.server.lr == 1e-3 and cfg.client.weight_decay == 1e-4
