"""The Python API (evaluations.api): the documented example runs as it stands, and every typed result
holds what the files the CLI writes (and prints from) hold."""
import csv
import json
import math
import runpy
from pathlib import Path

import pytest
import yaml
from conftest import TINY_MODEL

from evaluations import api
from evaluations.cli import main
from pfedpg.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "api_tour.py"

TINY = {"rounds": 2, "checkpoint_every": 0, "threads": 1,
        "data": {"image_size": 8, "num_domains": 3, "max_train_per_client": 24, "max_test_per_client": 20},
        "model": {"weights": "random", "kwargs": dict(TINY_MODEL), "num_prompts": 2},
        "client": {"batch_size": 16, "lr": 0.1}}


def silent(line):
    pass


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_the_documented_example_runs_and_its_results_are_the_files(tmp_path, monkeypatch):
    assert f'--8<-- "{EXAMPLE.relative_to(ROOT)}"' in (ROOT / "docs" / "api.md").read_text()  # the page shows this file
    monkeypatch.chdir(tmp_path)
    lines = []
    example = runpy.run_path(str(EXAMPLE), run_name="api_tour")  # as imported: the __main__ guard stays shut
    run, sweep, cost = example["main"](log=lines.append)

    summary = json.loads((tmp_path / "runs/api/run/summary.json").read_text())
    assert run.run_dir == Path("runs/api/run") and run.report.is_file()
    assert (run.method, run.seed, run.rounds) == ("pfedpg", 0, 2)
    assert run.accuracy.mean == summary["accuracy"]["mean"] and run.accuracy.worst == summary["accuracy"]["worst"]
    assert run.accuracy.per_client == tuple(summary["accuracy"]["per_client"])
    assert run.privacy == () and run.epsilon is None  # no DP hook in this run

    assert [r.cell for r in cost.runs] == [c.name for c in sweep.cells]  # the plan expands the same grid
    assert cost.kind == "privacy" and cost.total_seconds > 0 and all(f"| {c.name} |" in cost.text for c in sweep.cells)

    assert [r.mechanism for r in sweep.rows] == ["local", "dp_client"]
    assert all(c.status == "ok" for c in sweep.cells) and len(sweep.cells) == 6
    csv_rows = read_csv(tmp_path / "runs/api/sweep/tradeoff.csv")
    dp, local = sweep.row("dp_client", 8.0), sweep.row("local")
    assert dp.privacy_unit == "client" and dp.seeds == 3 and 0 < dp.epsilon_max.mean <= 8.0 + 1e-9
    assert dp.accuracy_by_seed == {int(r["seed"]): float(r["accuracy_mean"]) for r in csv_rows
                                   if r["mechanism"] == "dp_client"}
    diffs = [dp.accuracy_by_seed[s] - local.accuracy_by_seed[s] for s in (0, 1, 2)]
    assert dp.vs_local.seeds == (0, 1, 2) and dp.vs_local.mean == pytest.approx(sum(diffs) / 3, abs=1e-12)
    assert local.vs_local is None and local.epsilon_max.mean is None
    md = (tmp_path / "runs/api/sweep/tradeoff.md").read_text()
    assert dp.verdict and dp.verdict in next(ln for ln in md.splitlines() if ln.startswith("| dp_client"))
    assert any("[6/6]" in ln for ln in lines)  # progress went to the given log


def test_a_run_from_the_api_is_the_cli_run(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "hooks": [{"name": "dp_client", "clip": 0.5, "noise_multiplier": 1.0}]}))
    assert main(["-q", "train", "--config", str(cfg), "--set", "rounds=1", "--run-dir", str(tmp_path / "cli")]) == 0
    res = api.run(cfg, ["rounds=1"], run_dir=tmp_path / "api", log=silent)
    cli_summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert res.summary["accuracy"] == cli_summary["accuracy"]  # same functions, same numbers
    assert res.rounds == 1 and res.report == tmp_path / "api" / "report.md" and res.report.is_file()
    (level,) = res.privacy
    assert (level.mechanism, level.privacy_unit) == ("dp_client", "client")
    assert res.epsilon == level.epsilon_max == cli_summary["hook_results"]["dp_client"]["epsilon_max"] > 0
    assert level.noise_multiplier == (1.0,) * 3
    # the file's content as a mapping is the same run
    again = api.run(yaml.safe_load(cfg.read_text()), ["rounds=1"], run_dir=tmp_path / "dict", log=silent)
    assert again.accuracy == res.accuracy


def test_audit_and_matrix_results_are_their_files(tmp_path):
    audit = api.audit({"base": TINY, "audit": {
        "seeds": [0], "mechanisms": {"dp_client": {"clip": 0.1}}, "target_epsilons": [8.0],
        "baselines": ["nonprivate"], "probes": {"targets_per_client": 10, "probes": ["loss", "confidence"]}}},
        out_dir=tmp_path / "audit", log=silent)
    written = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert set(audit.groups) == set(written["groups"]) == {"nonprivate", "dp_client-eps8"}
    for name, group in audit.groups.items():
        for probe in ("loss", "confidence"):
            got, raw = group.probes[probe], written["groups"][name]["probes"][probe]
            assert got.auc == raw["auc"] and got.n_targets == raw["n_targets"] == 3 * 20
            assert got.threat_model == raw["threat_model"]
            rate = raw["tpr_at_1pct_fpr"]["value"]  # 30 negatives cannot resolve 1% FPR
            assert got.tpr_at_1pct_fpr.value is None and got.tpr_at_1pct_fpr.reason == rate
    assert math.isinf(audit.groups["nonprivate"].epsilon) and 0 < audit.groups["dp_client-eps8"].epsilon <= 8.0
    assert not audit.failed and audit.report.is_file()

    matrix = api.robustness({"base": TINY, "robustness": {
        "seeds": [0], "attacks": {"sign_flip": {"space": "grad"}}, "defenses": {"sum": {}, "krum": {}},
        "malicious_fractions": [0.0, 0.34]}}, out_dir=tmp_path / "matrix", log=silent)
    rows = read_csv(tmp_path / "matrix" / "robustness.csv")
    assert len(matrix.cells) == len(rows) == 4
    krum = next(r for r in matrix.rows if r.defense == "krum" and r.malicious_fraction > 0)
    assert krum.status == "infeasible" and krum.benign_accuracy.mean is None  # Krum needs m >= 2f + 3 = 5 > 3
    flip = next(r for r in matrix.rows if r.defense == "sum" and r.attack == "sign_flip")
    csv_flip = next(r for r in rows if r["cell"] == "sign_flip-sum-frac0.34-s0")
    assert flip.benign_accuracy.mean == float(csv_flip["benign_accuracy_mean"]) and flip.benign_accuracy.sd is None
    assert flip.space == "grad"
    # the plain sum excludes nothing: no exclusion counts, in the CSV or the typed row
    assert csv_flip["excluded_malicious_updates"] == csv_flip["malicious_updates"] == ""
    assert flip.excluded_malicious.mean is None and flip.malicious_updates.mean is None
    assert matrix.worst_case == (flip,)  # the only measured attacked row
    assert not matrix.failed


def test_the_plan_is_the_cli_plan(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert main(["-q", "plan", "--config", str(cfg), "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    p = api.plan(cfg, log=silent)
    assert p.kind == cli["kind"] == "train" and p.config == str(cfg)
    work = ("cell", "method", "seed", "rounds", "clients", "train_steps", "dp_steps", "eval_records")
    assert [tuple(getattr(r, k) for k in work) for r in p.runs] == [tuple(r[k] for k in work) for r in cli["runs"]]
    assert p.bytes_per_client_round == cli["communication"]["bytes_per_client_round"] == 4 * 2 * 16
    assert p.device == "cpu" and p.device_peak_bytes is None and p.host_peak_bytes > 0


@pytest.mark.parametrize("call, message", [
    (lambda: api.run(TINY, ["rounds=0"]), "rounds=0 must be a positive integer"),
    (lambda: api.run(TINY, resume=True), "resume needs run_dir"),
    (lambda: api.privacy_sweep({"base": TINY, "privacy": {"target_epsilons": [-1.0]}}), "must be a finite number > 0"),
    (lambda: api.privacy_sweep({"base": TINY, "privacy": {}}, jobs=0), "jobs=0 must be a positive integer"),
    (lambda: api.robustness({"base": TINY, "robustness": {}}, executor="slurm"), "executor='slurm': choose local"),
    (lambda: api.audit({"base": TINY, "audit": {}}, ray_address="h:1"), "ray_address needs executor='ray'"),
    (lambda: api.audit("no/such/audit.yaml"), "not found"),
    (lambda: api.plan(TINY, steps=0), "steps=0 must be a positive integer"),
])
def test_bad_input_raises_the_cli_s_one_line_error(call, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        call()
    assert not (tmp_path / "runs").exists()  # refused before anything was written
