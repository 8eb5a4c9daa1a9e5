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
    assert by[("sign_flip", "krum", "0.34")]["status"] == "infeasible" and not by[("sign_flip", "krum", "0.34")]["run_dir"]
    assert by[("none", "krum", "0.0")]["status"] == "ok"  # f = 0: m >= 3 holds
    ok = by[("backdoor", "median", "0.34")]
    assert ok["status"] == "ok" and ok["asr"] != "" and 0 <= float(ok["asr"]) <= 1
    assert ok["num_malicious"] == "1"
    for r in rows:
        if r["status"] == "ok":
            assert 0 <= float(r["benign_accuracy_worst"]) <= float(r["benign_accuracy_mean"]) <= 1
    for name in ("robustness.md", "report.md", "report.html", "heatmap.png", "worst_case.png"):
        assert (out / name).is_file(), name


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
