"""The robustness matrix: grid, infeasible cells, benign-only metrics (DESIGN §7)."""
import csv

import pytest
import yaml
from conftest import TINY_MODEL

from evaluations.robustness import load_matrix, run_matrix
from pfedpg.errors import ConfigError


def matrix_file(tmp_path, **robustness):
    base = {"rounds": 2, "checkpoint_every": 0,
            "data": {"image_size": 8, "num_domains": 3, "max_train_per_client": 32, "max_test_per_client": 30},
            "model": {"weights": "random", "kwargs": dict(TINY_MODEL), "num_prompts": 2},
            "client": {"batch_size": 16}}
    rob = {"seeds": [0], "attacks": {"sign_flip": {"space": "grad"}, "backdoor": {"target": 0}},
           "defenses": {"sum": {}, "median": {}, "krum": {}}, "malicious_fractions": [0.0, 0.34],
           "out_dir": str(tmp_path / "matrix"), **robustness}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"base": base, "robustness": rob}))
    return path


def test_matrix_rows_infeasible_cells_and_outputs(tmp_path):
    matrix, base = load_matrix(matrix_file(tmp_path))
    out = run_matrix(matrix, base, log=lambda m: None)
    with open(out / "robustness.csv") as f:
        rows = list(csv.DictReader(f))
    # fraction 0: one cell per defense; fraction 0.34 of 3 clients = 1 malicious: 2 attacks x 3 defenses
    assert len(rows) == 3 + 6
    by = {(r["attack"], r["defense"], r["malicious_fraction"]): r for r in rows}
    # Krum with f = 1 needs m >= 5; three clients -> infeasible, recorded, not run.
    assert by[("sign_flip", "krum", "0.34")]["status"] == "infeasible" and \
        not by[("sign_flip", "krum", "0.34")]["run_dir"]
    assert by[("none", "krum", "0.0")]["status"] == "ok"  # f = 0: m >= 3 holds
    ok = by[("backdoor", "median", "0.34")]
    assert ok["status"] == "ok" and ok["asr"] != "" and 0 <= float(ok["asr"]) <= 1
    assert ok["num_malicious"] == "1"
    for r in rows:
        if r["status"] == "ok":
            assert 0 <= float(r["benign_accuracy_worst"]) <= float(r["benign_accuracy_mean"]) <= 1
    for name in ("robustness.md", "report.md", "report.html", "heatmap.png", "worst_case.png"):
        assert (out / name).is_file(), name
    from test_privacy_sweep import assert_self_contained_report

    assert_self_contained_report(out)
    # The LaTeX table and the PDFs, written again from the folder (infeasible cells included): the same bytes.
    from evaluations.cli import main

    before = {f: (out / f).read_bytes() for f in ("robustness.tex", "heatmap.pdf", "worst_case.pdf")}
    for f in before:
        (out / f).unlink()
    assert main(["report", str(out), "--format", "latex"]) == 0
    assert {f: (out / f).read_bytes() for f in before} == before


@pytest.mark.parametrize("robustness, message", [
    ({"attacks": {"teleport": {}}}, "unknown hook 'teleport'"),
    ({"defenses": {"average": {}}}, "unknown 'average'"),
    ({"malicious_fractions": [1.0]}, "must lie in"),
    ({"attacks": {"sign_flip": {"fraction": 0.1}}}, "not per-attack"),
])
def test_bad_matrix_files(tmp_path, robustness, message):
    with pytest.raises(ConfigError, match=message):
        load_matrix(matrix_file(tmp_path, **robustness))


def test_shipped_robustness_config_loads(monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).parents[1])
    matrix, base = load_matrix("configs/robustness.yaml")
    assert "sum" in matrix.defenses and base["data"]["clients_per_domain"] == 2


def test_an_attack_that_diverges_is_a_result_and_the_command_exits_0(tmp_path, capsys):
    """IPM with ε = 1e6 under the plain sum drives the generator to non-finite prompts: the cell is
    `diverged` (with its round and the benign accuracy measured then, non-finite outputs wrong), not
    `failed`; the command exits 0; running it again reuses the divergence and gives the same table."""
    from evaluations.cli import main

    path = matrix_file(tmp_path, attacks={"ipm": {"space": "grad", "magnitude": 1.0e6}},
                       defenses={"sum": {}, "median": {}}, malicious_fractions=[0.34])
    raw = yaml.safe_load(path.read_text())
    raw["base"]["server"] = {"lr": 1.0}
    raw["base"]["rounds"] = 3
    path.write_text(yaml.safe_dump(raw))
    assert main(["robustness", "--config", str(path)]) == 0
    first, lines = capsys.readouterr()
    with open(tmp_path / "matrix" / "robustness.csv") as f:
        rows = {r["defense"]: r for r in csv.DictReader(f)}
    div = rows["sum"]
    assert div["status"] == "diverged" and int(div["diverged_round"]) >= 1 and "NonFiniteDeltaError" in div["error"]
    assert float(div["benign_accuracy_mean"]) == 0.0  # every benign output non-finite: all wrong
    assert rows["median"]["status"] == "ok" and float(rows["median"]["benign_accuracy_mean"]) > 0  # it recovers
    assert "diverged 1/1" in first and "worst case" in first
    # The cell's line gives what its row gives: the benign clients' accuracy (in percent; the CSV keeps
    # the fraction), not all clients'; exclusions are counts of the updates sent (issue 32).
    med = rows["median"]
    line = next(ln for ln in lines.splitlines() if "ipm-median-frac0.34-s0:" in ln)
    assert f"benign accuracy {100 * float(med['benign_accuracy_mean']):.2f} % " in line
    assert int(med["malicious_updates"]) == 3 and int(med["benign_updates"]) == 6  # 1 and 2 clients, 3 rounds
    cell = f"{med['excluded_malicious_updates']} of 3 / {med['excluded_benign_updates']} of 6"
    assert f"updates excluded {cell} (malicious / benign)" in line and f"| {cell} |" in first
    assert "updates excluded, count: malicious / benign" in first
    from test_reporting import assert_strict_json

    assert assert_strict_json(tmp_path / "matrix") >= 8  # diverged.json and the NaN-prone rows included
    assert main(["robustness", "--config", str(path)]) == 0
    assert capsys.readouterr().out == first


def test_a_failed_cell_runs_again_cleanly(tmp_path):
    from evaluations.sweep import Cell, run_cells

    cell = Cell(name="c", config={"rounds": 1, "checkpoint_every": 0,
                                  "data": {"image_size": 8, "num_domains": 3, "max_train_per_client": 16,
                                           "max_test_per_client": 10},
                                  "model": {"weights": "random", "kwargs": dict(TINY_MODEL), "num_prompts": 2}})
    run_dir = tmp_path / "runs" / "c"
    run_dir.mkdir(parents=True)
    (run_dir / "error.txt").write_text("ValueError: something that was fixed since")
    (run_dir / "metrics.jsonl").write_text("")  # what a run that failed after starting leaves
    logs = []
    (res,) = run_cells([cell], tmp_path, log=logs.append)
    assert res.error is None and (run_dir / "summary.json").is_file() and not (run_dir / "error.txt").exists()
    assert any("failed before; running it again from scratch" in m for m in logs)
