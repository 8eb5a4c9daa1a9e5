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
    ({"server": {"generator": "transformer"}},
     "unknown generator 'transformer'; choose one of: adain, basis, cross_attention, mlp"),
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
    assert err == ["error: unknown config key client.learning_rate; valid keys in client: lr, head_lr, momentum, "
                   "weight_decay, batch_size, local_epochs, eval_batch_size"]
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a run directory (no config.yaml)" in capsys.readouterr().err
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text("rounds: 2\n")  # a run that has not finished
    assert main(["report", str(tmp_path / "unfinished")]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"finish it first: pfedpg-eval train --resume --run-dir {tmp_path / 'unfinished'}")


def test_help_of_every_subcommand_and_version(capsys):
    import evaluations.cli as cli_module
    from pfedpg import __version__

    assert cli_module.click is not None and hasattr(cli_module.cli, "commands")  # the CLI is a click group
    commands = ["train", "pretrain", "privacy", "audit", "robustness", "plan", "report", "compare", "flower-certs"]
    assert sorted(cli_module.cli.commands) == sorted(commands)
    for cmd in ([], *[[c] for c in commands]):
        assert main([*cmd, "--help"]) == 0
        out = capsys.readouterr().out
        assert "Usage: pfedpg-eval" in out and (not cmd or "Example: pfedpg-eval " + cmd[0] in out), cmd
    assert main(["--version"]) == 0 and __version__ in capsys.readouterr().out


def test_usage_errors_are_one_line_exit_2(capsys):
    for argv, text in ((["trian"], "No such command 'trian'"), (["train", "--jobs", "2"], "No such option '--jobs'"),
                       (["train", "--engine", "ray"], "'ray' is not one of 'inprocess', 'flower'"),
                       (["train", "--resume", "--restart", "--run-dir", "x"], "contradict"),
                       (["privacy", "-q"], "-q goes before the command: pfedpg-eval -q COMMAND ...")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and text in err[0], (argv, err)


def test_the_installed_console_script(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "pfedpg-eval"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "pfedpg-eval, version" in out.stdout
    out = subprocess.run([str(exe), "train", "--set", "rounds=0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == "error: rounds=0 must be a positive integer"


def test_click_runner_drives_the_group(tmp_path):
    from click.testing import CliRunner

    from evaluations.cli import cli

    res = CliRunner().invoke(cli, ["privacy", "--help"])
    assert res.exit_code == 0 and "--jobs" in res.output and "Example: pfedpg-eval privacy" in res.output


@pytest.mark.parametrize("command", ["privacy", "audit", "robustness"])
def test_jobs_must_be_positive_before_anything_is_written(tmp_path, command, capsys):
    assert main([command, "--jobs", "0", "--out", str(tmp_path / "out")]) == 2
    assert "--jobs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_rough_edges_are_one_line_before_anything_is_written(tmp_path, capsys):
    def one_line(argv, *texts):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(t in err[0] for t in texts), (argv, err)

    # YAML syntax errors in a grid file and a run file: the line and column.
    (tmp_path / "bad.yaml").write_text("privacy:\n  seeds: [0\n")
    one_line(["privacy", "--config", str(tmp_path / "bad.yaml")], "not valid YAML at line 3", "fix the file")
    (tmp_path / "badrun.yaml").write_text("rounds: 3\nclient: {lr: 0.1\n")
    one_line(["train", "--config", str(tmp_path / "badrun.yaml")], "not valid YAML at line")
    # Output directories that cannot be written: found before data or backbone are built.
    (tmp_path / "afile").write_text("x")
    one_line(["train", "--run-dir", str(tmp_path / "afile")], "is a file")
    one_line(["train", "--run-dir", str(tmp_path / "afile" / "run")], "lies under the file")
    one_line(["privacy", "--out", str(tmp_path / "afile")], "sweep directory", "is a file")
    # report on a sweep directory names the sweep's own report.
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "tradeoff.csv").write_text("")
    one_line(["report", str(tmp_path / "sweep")], "is a privacy sweep directory", "report.md")
    one_line(["report", str(tmp_path / "nodir")], "no such run directory")
    (tmp_path / "empty").mkdir()
    one_line(["report", str(tmp_path / "empty")], "is not a run directory (no config.yaml)")
    one_line(["train", "--resume", "--run-dir", str(tmp_path / "nodir")], "no run in", "drop --resume")
    # flower-certs: a host no node could dial, before any file is written.
    for host in ("", "bad host!", "x" * 70):
        one_line(["flower-certs", str(tmp_path / "certs"), "--host", host], "neither an IP address nor a DNS name")
    assert not (tmp_path / "certs").exists()


def test_a_checkpoint_of_another_architecture_is_one_line(tmp_path, capsys):
    import torch

    from pfedpg.models import ModelConfig, build_backbone

    kw = dict(TINY_MODEL)
    model = build_backbone(ModelConfig(weights="random", kwargs=kw))
    torch.save(model.state_dict(), tmp_path / "b.pth")
    cfg = ModelConfig(weights="checkpoint", checkpoint=str(tmp_path / "b.pth"), kwargs={**kw, "embed_dim": 32})
    with pytest.raises(ConfigError, match=r"does not fit .*size mismatch for .*set model.kwargs"):
        build_backbone(cfg)


def test_hub_weights_without_a_network_name_the_way_out(monkeypatch):
    from pfedpg.models import ModelConfig, build_backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"HF_HUB_OFFLINE=1 is set.*model.weights: checkpoint"):
        build_backbone(ModelConfig(name="vit_tiny_patch16_224", weights="pretrained", kwargs={}))


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("1E5", 1e5), (".5", 0.5), ("-2e-4", -2e-4), ("3", 3),
                                         ("1.0e-5", 1e-5), ("abc", "abc"), ("010", 10), ("0o17", 15), ("0x10", 16),
                                         ("1_000", "1_000"), ("yes", "yes"), ("on", "on"), ("true", True),
                                         ("1:30", "1:30")])
def test_yaml_1_2_numbers_in_set_and_in_files(tmp_path, text, value):
    """YAML 1.1 (PyYAML's default) reads 1e-3 as a string; the README writes 1e-3 throughout."""
    from pfedpg.config import load_yaml

    assert load_yaml(text) == value and type(load_yaml(text)) is type(value)
    assert load_config(None, ["server.lr=1e-3"]).server.lr == 1e-3
    (tmp_path / "c.yaml").write_text("server: {lr: 1e-3}\nclient: {weight_decay: 1E-4}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.server.lr == 1e-3 and cfg.client.weight_decay == 1e-4


def test_ctrl_c_ends_with_the_resume_command(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    run_dir = tmp_path / "run"
    exe = Path(sys.executable).parent / "pfedpg-eval"
    proc = subprocess.Popen([str(exe), "train", "--no-progress", "--run-dir", str(run_dir), *_tiny_args(tmp_path),
                             "--set", "rounds=200", "--set", "checkpoint_every=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((run_dir / "checkpoints").glob("round_*.pt")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted; resume with: "
                                                   f"pfedpg-eval train --resume --run-dir {run_dir}")


def test_the_interrupt_hint_says_resume_only_once_a_checkpoint_exists(tmp_path):
    from evaluations.cli import train_resume_hint

    run_dir = tmp_path / "run"
    assert train_resume_hint(run_dir).startswith("the same command (no checkpoint in")
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "round_0001.pt").write_bytes(b"")
    assert train_resume_hint(run_dir) == f"pfedpg-eval train --resume --run-dir {run_dir}"


def test_a_misspelt_hook_option_lists_the_hooks_options():
    from evaluations.plugins import load_plugins

    load_plugins()
    from pfedpg.hooks import build_hooks

    with pytest.raises(ConfigError,
                       match=r"hooks\[0\] \(dp_client\): unknown option 'delt'; its options are clip, .*delta"):
        build_hooks([{"name": "dp_client", "clip": 1.0, "delt": 1e-5}])


def test_pretraining_on_too_few_public_records_is_refused_with_the_numbers(tmp_path):
    from conftest import tiny_config

    from pfedpg.pretrain import pretrain_backbone

    cfg = tiny_config(**{"model.weights": "pretrain", "data.public_fraction": 0.01,
                         "pretrain.cache_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"pretraining on \d+ public split records for 10 classes: "
                                          r"fewer than 5 per class \(50\).*data.public_fraction"):
        pretrain_backbone(cfg, log=lambda m: None)


def test_renamed_keys_keep_working_for_one_release_with_a_one_line_warning(tmp_path, capsys):
    """server.max_grad_norm -> server.update_bound, new_client_rounds -> data.new_client_rounds,
    alie.z -> alie.num_std, ipm.epsilon -> ipm.magnitude, robust_aggregation.clip -> radius: the old
    name gives the same config (in a file, a --set, or a sweep's base over a base_config that uses
    the new name), warns once, and both names at once is an error."""
    import attacks.malicious  # noqa: F401  (registers alie, ipm)
    from pfedpg.deprecation import RenamedKeyWarning
    from pfedpg.hooks import build_hooks

    new = config_from_dict({"server": {"update_bound": 2.0}, "data": {"new_client_rounds": 3}})
    with pytest.warns(RenamedKeyWarning) as seen:
        old = config_from_dict({"server": {"max_grad_norm": 2.0}, "new_client_rounds": 3})
    assert [str(w.message).split(" is renamed ")[0] for w in seen] == ["new_client_rounds", "server.max_grad_norm"]
    assert old == new
    with pytest.warns(RenamedKeyWarning) as seen:
        assert config_from_dict({}, ["server.max_grad_norm=2.0", "new_client_rounds=3"]).server.update_bound == 2.0
    assert sorted(str(w.message).split(" is renamed ")[0] for w in seen) == \
        ["new_client_rounds", "server.max_grad_norm"]
    for values in ({"server": {"max_grad_norm": 1.0, "update_bound": 2.0}},
                   {"new_client_rounds": 1, "data": {"new_client_rounds": 2}}):
        with pytest.raises(ConfigError, match="keep only"):
            config_from_dict(values)
    with pytest.warns(RenamedKeyWarning) as seen:
        (alie, ipm) = build_hooks([{"name": "alie", "z": 1.5}, {"name": "ipm", "epsilon": 100.0}]).hooks
    assert [str(w.message).split(";")[0] for w in seen] == ["alie.z is renamed alie.num_std",
                                                            "ipm.epsilon is renamed ipm.magnitude"]
    assert (alie.num_std, ipm.magnitude) == (1.5, 100.0)
    # A sweep's base with an old key over a base_config that writes the new one: each layer is
    # read under today's names before they are merged, so this is not "both given".
    (tmp_path / "base.yaml").write_text("data: {new_client_rounds: 5}\nserver: {update_bound: 1.0}\n")
    sweep = tmp_path / "grid.yaml"
    sweep.write_text("base_config: base.yaml\n"
                     "base: {new_client_rounds: 2, server: {max_grad_norm: 3.0}}\nprivacy: {}\n")
    from evaluations.sweep import load_grid_file

    with pytest.warns(RenamedKeyWarning):
        _, cfg = load_grid_file(sweep, "privacy", None, example="configs/privacy_demo.yaml")
    assert (cfg.data.new_client_rounds, cfg.server.update_bound) == (2, 3.0)
    # The CLI prints it as one line, even under --quiet.
    (tmp_path / "old.yaml").write_text("new_client_rounds: 3\n")
    main(["--quiet", "plan", "--config", str(tmp_path / "old.yaml"), "--set", "data.unknown=1"])
    err = capsys.readouterr().err
    assert "warning: new_client_rounds is renamed data.new_client_rounds" in err and "Traceback" not in err
