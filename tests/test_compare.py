"""``pfedpg-eval compare A B``: two real tiny grids (and their runs) compared, paired by seed and by
client, against the numbers computed here from the grids' own CSVs and summaries; bad input is one
line; the --out files parse and are never replaced by another comparison's."""
import csv
import json
import math
import shutil

import pytest
import yaml
from conftest import TINY_MODEL
from scipy.stats import t as student_t

from evaluations import api
from evaluations.cli import main
from evaluations.compare import compare
from evaluations.compare_report import text
from pfedpg import jsonio
from pfedpg.errors import ConfigError

# one worker: the module's grids are built once (a module fixture), not once per worker
pytestmark = pytest.mark.xdist_group("compare")

BASE = {"rounds": 1, "checkpoint_every": 0, "threads": 1,
        "data": {"image_size": 8, "num_domains": 3, "max_train_per_client": 24, "max_test_per_client": 20},
        "model": {"weights": "random", "kwargs": dict(TINY_MODEL), "num_prompts": 2},
        "client": {"batch_size": 16, "lr": 0.1}}
PRIVACY = {"seeds": [0, 1, 2], "mechanisms": {"dp_client": {"clip": 0.5}}, "target_epsilons": None,
           "noise_multipliers": [1.0], "baselines": ["nonprivate"]}


def silent(line):
    pass


def sweep(out, overrides=(), **privacy):
    return api.privacy_sweep({"base": BASE, "privacy": {**PRIVACY, **privacy}}, list(overrides), out, log=silent)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def grids(tmp_path_factory):
    """Two privacy sweeps of 3 seeds x {nonprivate, dp_client z = 1} that differ in client.lr alone."""
    root = tmp_path_factory.mktemp("compare")
    sweep(root / "A")
    sweep(root / "B", ["client.lr=1.0"])
    return root / "A", root / "B"


def test_two_grids_pair_cells_by_seed_as_computed_from_their_csvs(grids):
    a, b = grids
    c = compare(a, b)
    assert c.kind == "privacy sweep"
    assert [(ch.key, ch.a, ch.b) for ch in c.changes] == [("base.client.lr", 0.1, 1.0)]
    assert c.unpaired == () and not c.identical
    rows_a, rows_b = ({r["cell"]: r for r in read_csv(d / "tradeoff.csv")} for d in grids)
    assert {(r.setting, r.metric) for r in c.rows} == {(s, m) for s in ("nonprivate", "dp_client-z1")
                                                       for m in ("accuracy", "generated accuracy")}
    for row in c.rows:
        col = {"accuracy": "accuracy_mean", "generated accuracy": "accuracy_generated_mean"}[row.metric]
        diffs = [float(rows_b[f"{row.setting}-s{s}"][col]) - float(rows_a[f"{row.setting}-s{s}"][col])
                 for s in (0, 1, 2)]
        mean = sum(diffs) / 3
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
        half = student_t.ppf(0.975, 2) * sd / math.sqrt(3)
        d = row.difference
        assert d.paired == (0, 1, 2) and d.values == pytest.approx(diffs, abs=1e-15)
        assert d.mean == pytest.approx(mean, abs=1e-15) and d.sd == pytest.approx(sd, abs=1e-15)
        assert d.interval == pytest.approx((mean - half, mean + half), abs=1e-12)
        assert row.a == pytest.approx(sum(float(rows_a[f"{row.setting}-s{s}"][col]) for s in (0, 1, 2)) / 3)
        expected = ("identical" if all(abs(x) < 1e-12 for x in diffs)
                    else "no spread over the 3 seeds: no interval" if sd < 1e-9 else "B higher" if mean - half > 0
                    else "B lower" if mean + half < 0 else "level (interval holds 0)")
        assert row.verdict == expected
        if row.setting == "dp_client-z1":  # ε of each side's cells, from the CSV
            assert row.epsilon_a == max(float(rows_a[f"dp_client-z1-s{s}"]["epsilon_max"]) for s in (0, 1, 2))
        else:
            assert math.isinf(row.epsilon_a) and math.isinf(row.epsilon_b)
    assert all(r.verdict != "identical" for r in c.rows)  # the lr changed the numbers: not a test of zeros
    # the terminal shows the same numbers, in percent
    shown = text(c)
    acc = next(r for r in c.rows if r.setting == "nonprivate" and r.metric == "accuracy")
    assert f"{100 * acc.a:.2f}" in shown and f"{100 * acc.difference.mean:+.2f}" in shown
    assert "base.client.lr: 0.1 → 1.0" in shown


def test_cells_only_one_grid_holds_and_failed_cells_are_listed(grids, tmp_path, monkeypatch):
    import evaluations.executors

    a, _ = grids
    shutil.copytree(a, tmp_path / "C")
    original = evaluations.executors.run_training

    def failing(cfg, run_dir, **kw):  # the new seed's dp_client cell breaks while it runs
        if cfg.seed == 3 and cfg.hooks:
            raise RuntimeError("the dp cell broke")
        return original(cfg, run_dir, **kw)

    monkeypatch.setattr(evaluations.executors, "run_training", failing)
    sweep(tmp_path / "C", seeds=[0, 1, 2, 3])  # the first three seeds' cells are reused
    c = compare(a, tmp_path / "C")
    assert [str(ch) for ch in c.changes] == ["privacy.seeds: [0, 1, 2] → [0, 1, 2, 3]"]
    assert {(u.cell, u.a, u.b) for u in c.unpaired} == {("nonprivate-s3", None, "ok"),
                                                        ("dp_client-z1-s3", None, "failed")}
    assert "the dp cell broke" in next(u.error for u in c.unpaired if u.b == "failed")
    assert all(r.difference.paired == (0, 1, 2) and r.verdict == "identical" for r in c.rows)
    shown = text(c)
    assert "not compared (2 cells)" in shown and "dp_client-z1-s3: only in B (failed)" in shown


def test_two_runs_of_one_config_and_seed_compare_as_identical(tmp_path):
    cfg = {**BASE, "hooks": [{"name": "dp_client", "clip": 0.5, "noise_multiplier": 1.0}]}
    api.run(cfg, run_dir=tmp_path / "one", log=silent)
    api.run(cfg, run_dir=tmp_path / "two", log=silent)
    c = api.compare(tmp_path / "one", tmp_path / "two")
    assert c.kind == "run" and c.changes == () and c.identical
    assert [r.metric for r in c.rows] == ["accuracy", "generated accuracy"]
    for r in c.rows:
        assert r.difference.paired == (0, 1, 2) and r.difference.values == (0.0, 0.0, 0.0)
        assert r.difference.mean == 0.0 and r.verdict == "identical"
    assert all(s.a == s.b for s in c.side_by_side)
    assert "A and B are identical" in text(c)


def test_two_runs_side_by_side_and_paired_by_client(grids):
    a, b = grids
    seed = next(s for s in (0, 1, 2) if jsonio.read(a / "runs" / f"dp_client-z1-s{s}" / "summary.json")["accuracy"]
                != jsonio.read(b / "runs" / f"dp_client-z1-s{s}" / "summary.json")["accuracy"])  # one the lr changed
    ra, rb = a / "runs" / f"dp_client-z1-s{seed}", b / "runs" / f"dp_client-z1-s{seed}"
    sa, sb = jsonio.read(ra / "summary.json"), jsonio.read(rb / "summary.json")
    c = compare(ra, rb)
    assert [str(ch) for ch in c.changes] == ["client.lr: 0.1 → 1.0"]
    side = {s.metric: (s.a, s.b) for s in c.side_by_side}
    assert side["adapted accuracy mean"] == (sa["accuracy"]["mean"], sb["accuracy"]["mean"])
    assert side["generated accuracy worst"] == (sa["accuracy_generated"]["worst"], sb["accuracy_generated"]["worst"])
    assert side["ε dp_client (client)"] == (sa["hook_results"]["dp_client"]["epsilon_max"],
                                            sb["hook_results"]["dp_client"]["epsilon_max"])
    assert side["up bytes per client per round"][0] == sa["communication"]["up_bytes_per_client_round"]
    acc = next(r for r in c.rows if r.metric == "accuracy")
    expected = [y - x for x, y in zip(sa["accuracy"]["per_client"], sb["accuracy"]["per_client"])]
    assert acc.difference.values == pytest.approx(expected, abs=1e-15) and acc.setting == "clients" and any(expected)
    # two seeds: different partitions, so client n is not the same client in both — not paired, and said why
    other = compare(a / "runs" / "dp_client-z1-s0", a / "runs" / "dp_client-z1-s1")
    assert other.rows == () and any("clients not paired: the seeds differ (0 vs 1)" in n for n in other.notes)


def test_two_matrices_pair_benign_accuracy_and_asr_and_a_divergence_is_paired(grids, tmp_path):
    """IPM at 1e6 under the plain sum diverges at server lr 1 (a result: paired, at the accuracy measured
    then, and said so) and not at 0.001; the backdoor's ASR is paired beside the benign accuracy."""
    rob = {"seeds": [0], "attacks": {"backdoor": {"target": 0}, "ipm": {"space": "grad", "magnitude": 1.0e6}},
           "defenses": {"sum": {}}, "malicious_fractions": [0.34]}
    for name, lr in (("M1", 1.0), ("M2", 0.001)):
        api.robustness({"base": {**BASE, "rounds": 3, "server": {"lr": lr}}, "robustness": rob},
                       out_dir=tmp_path / name, log=silent)
    c = compare(tmp_path / "M1", tmp_path / "M2")
    assert c.kind == "robustness matrix" and [str(ch) for ch in c.changes] == ["base.server.lr: 1.0 → 0.001"]
    m1, m2 = ({r["cell"]: r for r in read_csv(tmp_path / m / "robustness.csv")} for m in ("M1", "M2"))
    assert m1["ipm-sum-frac0.34-s0"]["status"] == "diverged" and m2["ipm-sum-frac0.34-s0"]["status"] == "ok"
    rows = {(r.setting, r.metric): r for r in c.rows}
    assert set(rows) == {("backdoor-sum-frac0.34", "benign accuracy"), ("backdoor-sum-frac0.34", "ASR"),
                         ("ipm-sum-frac0.34", "benign accuracy")} and c.unpaired == ()
    for (setting, metric), r in rows.items():
        col = {"benign accuracy": "benign_accuracy_mean", "ASR": "asr"}[metric]
        cell = f"{setting}-s0"
        assert r.difference.paired == (0,) and r.difference.interval is None  # one seed: no spread, no interval
        assert r.difference.mean == pytest.approx(float(m2[cell][col]) - float(m1[cell][col]), abs=1e-15)
        assert ("diverged" in r.note) == (setting == "ipm-sum-frac0.34")
    assert rows[("ipm-sum-frac0.34", "benign accuracy")].difference.mean > 0  # diverged: all outputs counted wrong
    assert "diverged (accuracy as measured then): A ipm-sum-frac0.34-s0" in text(c)
    with pytest.raises(ConfigError, match="is a robustness matrix and B .* a privacy sweep; compare two grids of one"):
        compare(tmp_path / "M1", grids[0])


def test_an_audit_compared_with_its_copy_pairs_each_probe_s_auc(tmp_path):
    api.audit({"base": BASE, "audit": {"seeds": [0], "mechanisms": {}, "baselines": ["nonprivate"],
                                       "probes": {"targets_per_client": 10, "probes": ["loss"]}}},
              out_dir=tmp_path / "X", log=silent)
    shutil.copytree(tmp_path / "X", tmp_path / "Y")
    c = compare(tmp_path / "X", tmp_path / "Y")
    written = json.loads((tmp_path / "X" / "audit.json").read_text())
    auc = next(r for r in c.rows if r.metric == "loss AUC")
    assert auc.a == written["cells"][0]["loss_auc"] and auc.verdict == "identical"
    pooled = written["groups"]["nonprivate"]["probes"]["loss"]
    assert auc.pooled_a == (pooled["auc"], *pooled["auc_interval"]) and c.identical


def _unfinished(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(BASE))
    return str(tmp_path / "run")


@pytest.mark.parametrize("which, message", [
    ("missing", "A: no such folder .*; pass a run's folder"),
    ("file", "A: .* is a file; pass the run or grid folder that holds it"),
    ("empty", "A: .* is neither a run folder .* nor a grid folder"),
    ("unfinished", "A: the run in .* has not finished \\(no summary.json\\); finish it with pfedpg-eval train "
                   "--resume"),
    ("mixed", "A .* is a run and B .* a privacy sweep; compare two runs \\(a grid's runs are its runs/CELL"),
    ("no table", "B: .* holds no tradeoff.csv: the privacy sweep has not finished; rerun its command"),
])
def test_bad_input_is_one_line_naming_the_fix(grids, tmp_path, capsys, which, message):
    import re

    a, b = grids
    if which == "no table":
        shutil.copytree(b, tmp_path / "cut")
        (tmp_path / "cut" / "tradeoff.csv").unlink()
    args = {"missing": [str(tmp_path / "nope"), str(b)], "file": [str(a / "tradeoff.csv"), str(b)],
            "empty": [str(tmp_path), str(b)], "unfinished": [_unfinished(tmp_path), str(a / "runs" / "nonprivate-s0")],
            "mixed": [str(a / "runs" / "nonprivate-s0"), str(b)], "no table": [str(a), str(tmp_path / "cut")]}[which]
    assert main(["compare", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and re.search(message, err), err
    with pytest.raises(ConfigError, match=message.replace("^A", "")):  # the API raises the same line
        api.compare(*args)


def test_the_out_files_parse_and_another_comparison_is_never_replaced(grids, tmp_path, capsys):
    a, b = grids
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    c = compare(a, b)
    assert printed.startswith(text(c))  # the CLI prints the API's object
    rows = read_csv(out / "compare.csv")
    paired = [r for r in rows if r["row"] == "paired"]
    assert len(paired) == len(c.rows) == 4
    for r, row in zip(paired, c.rows):  # fractions in the file
        assert float(r["difference"]) == row.difference.mean and float(r["a"]) == row.a <= 1
        assert (float(r["ci_low"]), float(r["ci_high"])) == row.difference.interval and r["n"] == "3"
    strict = json.loads((out / "compare.json").read_text(), parse_constant=lambda s: pytest.fail(f"bare {s}"))
    assert strict["rows"][0]["epsilon_a"] == "Infinity"  # nonprivate's ε, strict JSON
    assert jsonio.read(out / "compare.json")["changes"] == [{"key": "base.client.lr", "a": 0.1, "b": 1.0}]
    md = (out / "compare.md").read_text()
    assert "| setting | metric | n |" in md and "`base.client.lr`: 0.1 → 1.0" in md
    tex = (out / "compare.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "\\label{tab:pfedpg-compare}" in tex
    # the same A and B: written again; another B: refused, the files untouched
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    capsys.readouterr()
    assert main(["compare", str(a), str(a), "--out", str(out)]) == 2
    refused = capsys.readouterr()
    assert "holds the comparison of A" in refused.err and refused.err.count("\n") == 1
    assert refused.out == ""  # one line, not the comparison's table before it
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_help_ends_with_an_example(capsys):
    assert main(["compare", "--help"]) == 0
    tail = " ".join(capsys.readouterr().out.split()[-8:])  # (click wraps the epilog to the terminal)
    assert tail.endswith("Example: pfedpg-eval compare runs/privacy-lr0.25 runs/privacy-lr0.5 --out runs/compare")
