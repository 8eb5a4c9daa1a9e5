"""What a researcher reads (issue 32): strict JSON, an attribute probe's AUC with its interval and
p-value, accuracy in percent on the terminal, progress lines with an estimate of the time left,
pretraining that announces itself inside a grid, plan timed with a cell's threads, and one line
where the browser check cannot run. The grids' own files are checked where those grids already run:
tests/test_leakage.py (the audit: strict JSON, env.json, AUC intervals, unresolved TPRs in words,
the cell lines) and tests/test_robustness_matrix.py (the line that shows what the table shows)."""
import json
import math
from pathlib import Path

import pytest
from conftest import TINY_MODEL

from evaluations.progress import GridProgress
from pfedpg import jsonio


def _reject(constant):
    raise ValueError(f"non-standard JSON constant {constant}")


def assert_strict_json(root: Path) -> int:
    """Every .json / .jsonl file under ``root`` parses with a strict parser; returns how many."""
    files = sorted(p for p in root.rglob("*") if p.suffix in (".json", ".jsonl"))
    for f in files:
        lines = f.read_text().splitlines() if f.suffix == ".jsonl" else [f.read_text()]
        for ln in lines:
            if ln.strip():
                json.loads(ln, parse_constant=_reject)  # (what JSON.parse, jq or serde would do)
    return len(files)


def test_non_finite_floats_are_written_as_strings_and_read_back():
    import numpy as np

    text = jsonio.dumps({"eps": math.inf, "low": -math.inf, "loss": math.nan, "z": np.float32(0.5),
                         "n": np.int64(3), "v": np.array([1.0, np.inf]), "name": "Infinity-free"})
    raw = json.loads(text, parse_constant=_reject)
    assert raw["eps"] == "Infinity" and raw["low"] == "-Infinity" and raw["loss"] == "NaN"
    assert raw["v"] == [1.0, "Infinity"]
    back = jsonio.loads(text)
    assert back["eps"] == math.inf and back["low"] == -math.inf and math.isnan(back["loss"])
    assert back["z"] == 0.5 and back["n"] == 3 and back["name"] == "Infinity-free"
    assert float(raw["eps"]) == math.inf  # what float() (and JavaScript's Number()) reads
    assert jsonio.loads('{"eps": Infinity}')["eps"] == math.inf  # files written before read as before


# --- the audit's readings ---------------------------------------------------------------------------
def test_an_auc_reads_with_its_interval_and_an_attribute_probe_with_its_null_and_p_value():
    from evaluations.leakage_pooling import auc_reading
    from evaluations.leakage_sweep import group_line

    attr = {"auc": 0.337, "auc_interval": [0.29, 0.384], "permutation_p_value_per_seed": [0.67, 0.048],
            "null_auc_mean_per_seed": [0.35, 0.36]}
    assert auc_reading(attr) == "0.337 [0.290, 0.384] (null 0.355, p 0.67, 0.048)"
    assert auc_reading({"auc": 0.5}) == "0.500"  # an audit.json written before intervals existed
    line = group_line("g", {"probes": {"attribute_prompt": attr, "loss": {"auc": 0.6, "auc_interval": [0.5, 0.7]}}})
    assert line == "g: AUC attribute_prompt 0.337 [0.290, 0.384] (null 0.355, p 0.67, 0.048), loss 0.600 [0.500, 0.700]"


# --- accuracy: percent where a person reads it, a fraction in the files ---------------------------
def test_train_prints_accuracy_in_percent(tmp_path, capsys):
    from evaluations.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"rounds": 1, "checkpoint_every": 0, "model": {"weights": "random", "kwargs": TINY_MODEL},
                               "data": {"image_size": 8, "max_train_per_client": 16, "max_test_per_client": 10}}))
    assert main(["train", "--config", str(cfg), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 0
    acc = jsonio.read(tmp_path / "run" / "summary.json")["accuracy"]
    assert f"mean {100 * acc['mean']:.2f} %, worst {100 * acc['worst']:.2f} %" in capsys.readouterr().out


# --- progress ----------------------------------------------------------------------------------------
def test_grid_progress_estimates_from_the_cells_run_so_far():
    t = iter([0.0, 10.0, 12.0, 22.0, 24.0])
    p = GridProgress(4, concurrency=2, clock=lambda: next(t))
    # 2 at a time: cells 1 and 2 started at 0 and took 10 and 12 s; cell 3 started at 10, cell 4 at 12
    assert p.finished() == "1/4 run; about 15 s left (estimate: 10 s per cell over the 1 cell run so far, 2 at a time)"
    assert p.finished() == "2/4 run; about 11 s left (estimate: 11 s per cell over the 2 cells run so far, 2 at a time)"
    assert p.finished() == "3/4 run; about 6 s left (estimate: 11 s per cell over the 3 cells run so far, 2 at a time)"
    assert p.finished() == "4/4 run, 24 s in all"
    t = iter([0.0, 30.0])
    ray = GridProgress(3, concurrency=None, clock=lambda: next(t))  # the cluster decides: the rate so far
    assert ray.finished() == "1/3 run; about 60 s left (estimate: the rate of the 1 cell run so far)"


def test_a_grid_announces_pretraining_with_its_epochs_and_cache_path(tmp_path, monkeypatch):
    """Run inside a grid cell, pretraining used to print nothing for its whole length: now the grid
    pretrains first, through its own log — the start (epochs, cache path), a line at least every
    ANNOUNCE_EVERY_S with an estimate of the time left, the end."""
    import pfedpg.pretrain_loop
    from evaluations.sweep import Cell, run_cells

    monkeypatch.setattr(pfedpg.pretrain_loop, "ANNOUNCE_EVERY_S", 0.0)  # every epoch (no timed assertion)
    cfg = {"rounds": 1, "checkpoint_every": 0,
           "data": {"image_size": 8, "num_domains": 3, "max_train_per_client": 16, "max_test_per_client": 10},
           "model": {"weights": "pretrain", "kwargs": dict(TINY_MODEL), "num_prompts": 2},
           "pretrain": {"epochs": 2, "batch_size": 64, "cache_dir": str(tmp_path / "cache")}}
    logs = []
    (res,) = run_cells([Cell(name="c", config=cfg)], tmp_path / "grid", log=logs.append)
    assert res.error is None
    start = next(m for m in logs if m.startswith("pretraining vit"))
    assert "for 2 epochs" in start and str(tmp_path / "cache") in start
    epochs = [m for m in logs if m.startswith("pretraining epoch")]
    assert [m.split(":")[0] for m in epochs] == [f"pretraining epoch {e}/2" for e in (1, 2)]
    assert "left (estimate)" in epochs[0] and "left" not in epochs[-1] and "%" in epochs[0]
    assert logs.index(start) < logs.index(epochs[0]) < logs.index(next(m for m in logs if m.startswith("[1/1] c:")))
    assert any(m.startswith("pretraining done") and str(tmp_path / "cache") in m for m in logs)


# --- make report-check without a Chromium -------------------------------------------------------------
def test_the_browser_check_without_a_chromium_or_playwright_is_one_line(tmp_path, monkeypatch, capsys):
    import evaluations.browser_check as bc

    (tmp_path / "report.html").write_text("<p>x</p>")
    monkeypatch.setattr(bc, "find_chromium", lambda: None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())  # as if Playwright were installed
    assert bc.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no Chromium found") and "apt-get install chromium" in err
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert bc.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install -e '.[browser]'" in err
    assert bc.main([str(tmp_path / "empty")]) == 2 and capsys.readouterr().err.startswith("error: no report.html")


# --- plan: timed with the threads of a cell, the wall time of --jobs N ---------------------------------
def test_plan_times_with_the_threads_a_cell_gets_and_gives_the_wall_time_of_jobs(tmp_path, capsys):
    import os
    from types import SimpleNamespace

    from evaluations.cli import main
    from evaluations.plan_timing import cell_threads, wall_time

    assert cell_threads(SimpleNamespace(threads=None), 2) == max(1, (os.cpu_count() or 1) // 2)  # a worker's share
    assert cell_threads(SimpleNamespace(threads=3), 2) == 3  # the config's own
    assert wall_time([3.0, 1.0, 1.0, 1.0], 2) == 3.0 and wall_time([1.0] * 4, 2) == 2.0
    assert wall_time([1.0, 2.0], 1) == 3.0
    from evaluations import plan_timing

    cores = os.cpu_count() or 1
    assert plan_timing.machine_load(1.0, 1, 1)["slowdown"] == 1.0  # only the plan itself: idle
    # other work at load 3 (the plan's own 1 taken out) and 2 cells of 1 thread on these cores
    assert plan_timing.machine_load(3.0, 2, 1)["slowdown"] == pytest.approx(max(1.0, (2 + 2) / cores))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"rounds": 2, "model": {"weights": "random", "kwargs": TINY_MODEL},
                               "data": {"image_size": 8, "max_train_per_client": 20, "max_test_per_client": 10},
                               "client": {"batch_size": 16}}))
    grid = tmp_path / "sweep.yaml"
    grid.write_text(json.dumps({"base_config": str(cfg), "privacy": {
        "seeds": [0, 1], "mechanisms": {"dp_client": {"clip": 0.1}}, "target_epsilons": [8.0],
        "baselines": ["local"], "out_dir": str(tmp_path / "sweep")}}))
    assert main(["plan", "--config", str(grid), "--steps", "1", "--jobs", "2", "--json"]) == 0
    out, err = capsys.readouterr()
    p = json.loads(out)
    assert p["jobs"] == 2 and p["measured"]["threads"] == cell_threads(SimpleNamespace(threads=None), 2)
    assert p["wall_seconds"] == pytest.approx(wall_time([r["seconds"] for r in p["runs"]], 2))
    assert all(r["seconds"] > p["measured"]["build_s"] for r in p["runs"])  # set-up counted in every run
    # it says what it is doing while it measures
    assert "plan: loading the data and building the run" in err and \
        f"with {p['measured']['threads']} torch thread(s)" in err
    assert main(["plan", "--config", str(grid), "--steps", "1", "--jobs", "2", "--set", "threads=1"]) == 0
    text = capsys.readouterr().out
    assert "timed with 1 torch thread(s) per cell (--jobs 2" in text and "with --jobs 2" in text
