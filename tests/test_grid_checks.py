"""A grid is checked whole before any cell runs (issue 32): a cell whose mechanism options cannot run
refuses the grid at once, and so does an --out holding runs of another config (results are never
replaced by failures); --set reaches the grid's own section (seeds, privacy levels)."""
import pytest
import yaml
from conftest import TINY_MODEL

from evaluations.cli import main
from evaluations.privacy import load_sweep

BASE = {"rounds": 1, "checkpoint_every": 0,
        "data": {"image_size": 8, "num_domains": 3, "max_train_per_client": 32, "max_test_per_client": 30},
        "model": {"weights": "random", "kwargs": dict(TINY_MODEL), "num_prompts": 2}, "client": {"batch_size": 16}}


def grid_file(tmp_path, section="privacy", **settings):
    body = {"seeds": [0], "mechanisms": {}, "baselines": ["nonprivate"], "out_dir": str(tmp_path / "out"), **settings}
    path = tmp_path / f"{section}.yaml"
    path.write_text(yaml.safe_dump({"base": BASE, section: body}))
    return path


@pytest.mark.parametrize("mechanisms, cell, message", [
    ({"dp_sgd": {"clip": 1.0, "delta": 1.0}}, "dp_sgd-eps8-s0",
     r"dp_sgd.delta=1.0 must be < 1/\|D_n\| for every client \(client 0 has \d+ records\); lower delta"),
    ({"dp_client": {"clip": 0.5, "delta": 1.5}}, "dp_client-eps8-s0", r"delta=1.5 must be in \(0, 1\)"),
    ({"dp_client": {"clip": -0.1}}, "dp_client-eps8-s0", r"clip"),
    ({"dp_sgd": {"clip": 1.0, "delta": -0.1}}, "dp_sgd-eps8-s0",
     r"dp_sgd.delta=-0.1 must be > 0 \(and < 1/\|D_n\| for every client\)"),
    ({"dp_sgd": {"clip": 1.0, "delta": float("nan")}}, "dp_sgd-eps8-s0", r"dp_sgd.delta=nan must be > 0"),
])
def test_a_cell_with_options_that_cannot_run_refuses_the_grid_before_any_cell_runs(tmp_path, capsys, mechanisms,
                                                                                   cell, message):
    path = grid_file(tmp_path, mechanisms=mechanisms, target_epsilons=[8.0])
    assert main(["privacy", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: cell {cell}: ")
    assert err.endswith("(every cell is checked before the first runs: none has run)")
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()  # the nonprivate cell, listed first, did not run either


def test_rerunning_into_an_out_with_another_config_refuses_and_keeps_the_results(tmp_path, capsys):
    path = grid_file(tmp_path)
    assert main(["privacy", "--config", str(path)]) == 0
    out = tmp_path / "out"
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    assert {"tradeoff.csv", "tradeoff.md", "sweep.yaml", "report.md", "report.html"} <= set(before)
    capsys.readouterr()
    assert main(["privacy", "--config", str(path), "--set", "rounds=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {out} holds a run of cell nonprivate-s0 with another config (rounds: 1 → 2); pass "
                   f"another --out, or delete {out} to run the grid again (nothing has run)")
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before
    # Another --out runs it; the same config again reuses the finished cell.
    assert main(["privacy", "--config", str(path), "--set", "rounds=2", "--out", str(tmp_path / "two")]) == 0
    capsys.readouterr()
    assert main(["privacy", "--config", str(path)]) == 0
    assert "done before, reused" in capsys.readouterr().err


def test_set_reaches_the_grids_own_section(tmp_path):
    from evaluations.leakage_sweep import load_audit
    from evaluations.robustness import load_matrix

    path = grid_file(tmp_path, mechanisms={"dp_client": {"clip": 0.5}}, target_epsilons=[8.0])
    sweep, base = load_sweep(path, ["privacy.seeds=[0, 1]", "privacy.target_epsilons=[1, 4]", "rounds=3",
                                    "privacy.release_metrics=true", "privacy.mechanisms.dp_client.clip=2"])
    assert sweep.seeds == [0, 1] and sweep.target_epsilons == [1, 4] and sweep.mechanisms["dp_client"]["clip"] == 2
    assert base["rounds"] == 3 and base["privacy"]["release_metrics"] is True  # a run config key stays one
    grid, probes, _ = load_audit(grid_file(tmp_path, "audit"), ["audit.seeds=[2]", "audit.probes.shadow_clients=1"])
    assert grid.seeds == [2] and probes["shadow_clients"] == 1
    matrix, _ = load_matrix(_matrix_file(tmp_path), ["robustness.seeds=[3, 4]", "robustness.malicious_fractions=[0.5]"])
    assert matrix.seeds == [3, 4] and matrix.malicious_fractions == [0.5]
    from pfedpg.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown config key privacy.seedz; valid keys in privacy: seeds"):
        load_sweep(path, ["privacy.seedz=[0]"])


def _matrix_file(tmp_path):
    path = tmp_path / "robustness.yaml"
    path.write_text(yaml.safe_dump({"base": BASE, "robustness": {"seeds": [0], "out_dir": str(tmp_path / "m")}}))
    return path


def test_plan_refuses_what_the_grid_refuses_and_an_audit_without_levels_says_how_to_set_them(tmp_path):
    from evaluations.leakage_sweep import load_audit
    from evaluations.plan import plan
    from pfedpg.errors import ConfigError

    path = grid_file(tmp_path, mechanisms={"dp_client": {"clip": 0.5, "delta": 0.5}}, target_epsilons=[8.0])
    with pytest.raises(ConfigError, match=r"cell dp_client-eps8-s0: dp_client.delta=0.5 must be < 1/N"):
        plan(path, log=lambda m: None)  # (the 3 clients' partition is all it builds)
    audit = grid_file(tmp_path, "audit", mechanisms={"dp_client": {"clip": 0.5}}, target_epsilons=[])
    with pytest.raises(ConfigError, match=r"^audit.target_epsilons is empty: list at least one privacy level, "
                                          r"e.g. target_epsilons: \[1.0, 8.0\]$"):
        load_audit(audit)


def test_quiet_still_says_which_cell_failed_and_why(tmp_path, capsys, monkeypatch):
    """-q hides the cells' progress lines, where a failed cell's error was the only word of it: the
    command then ends with one line naming each failed cell and its error (exit status 1)."""
    import evaluations.executors

    original = evaluations.executors.run_training

    def failing(cfg, run_dir, **kw):  # an error no check before the run can see
        if cfg.method == "local":
            raise RuntimeError("the local cell broke")
        return original(cfg, run_dir, **kw)

    monkeypatch.setattr(evaluations.executors, "run_training", failing)
    path = grid_file(tmp_path, baselines=["nonprivate", "local"])
    assert main(["-q", "privacy", "--config", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["1 cell(s) failed: local-s0: RuntimeError: the local cell broke (rows of "
                   f"{tmp_path / 'out'}'s table; rerunning the same command runs them again)"], err
