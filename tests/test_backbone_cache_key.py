"""The pretrained-backbone cache is keyed on the data's content, not the text of ``data.path``
(issue 32): another npz at the same path pretrains again, the same file by another path is found."""
import json
import shutil

import numpy as np
import pytest
from conftest import TINY_MODEL, tiny_config

from pfedpg.config import config_from_dict
from pfedpg.errors import DataError
from pfedpg.pretrain import cached_path, pretrain_key


def write_npz(path, seed):
    rng = np.random.default_rng(seed)
    n = 120
    labels = np.arange(n) % 3
    np.savez(path, images=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), labels=labels.astype(np.int64),
             domains=(np.arange(n) // 40).astype(np.int64), class_names=np.array(["a", "b", "c"]),
             domain_names=np.array(["d0", "d1", "d2"]))


def npz_config(path, tmp_path, **extra):
    return config_from_dict({
        "rounds": 1, "checkpoint_every": 1,
        "data": {"source": "npz", "path": str(path), "image_size": 8, "public_fraction": 0.3},
        "model": {"weights": "pretrain", "kwargs": dict(TINY_MODEL), "num_prompts": 2},
        "pretrain": {"epochs": 1, "cache_dir": str(tmp_path / "cache")},
        "client": {"batch_size": 16}, **extra})


def test_the_key_follows_the_files_content_not_its_path(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    write_npz(tmp_path / "data" / "a.npz", seed=0)
    absolute = npz_config(tmp_path / "data" / "a.npz", tmp_path)
    monkeypatch.chdir(tmp_path)
    relative = npz_config("data/a.npz", tmp_path)
    assert cached_path(relative) == cached_path(absolute)  # the same file, written two ways
    shutil.copy(tmp_path / "data" / "a.npz", tmp_path / "copy.npz")
    assert cached_path(npz_config("copy.npz", tmp_path)) == cached_path(absolute)
    before = cached_path(absolute)
    write_npz(tmp_path / "data" / "a.npz", seed=1)  # another data set at the same path
    assert cached_path(relative) != before and cached_path(absolute) == cached_path(relative)
    # What decides the public split still counts (the same file, another split).
    assert cached_path(npz_config("data/a.npz", tmp_path, seed=1)) != cached_path(relative)


def test_embedded_keys_are_unchanged():
    """Backbones cached for the embedded source (no data.path) before the change stay valid."""
    assert pretrain_key(tiny_config(**{"model.weights": "pretrain"})) == "ae5496eb168b9d27"


def test_a_missing_data_file_says_where_a_relative_path_is_read_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"gone.npz not found \(a relative data.path is read from the current "
                                        rf"directory, {tmp_path}\)"):
        cached_path(npz_config("gone.npz", tmp_path))


def test_a_replaced_data_file_pretrains_again_and_the_run_records_the_key(tmp_path):
    from pfedpg.run import Trainer

    path = tmp_path / "d.npz"
    write_npz(path, seed=0)
    cfg = npz_config(path, tmp_path)
    first = Trainer(cfg, run_dir=tmp_path / "r1", log=lambda m: None).run()
    assert first["backbone"]["pretrain_key"] == pretrain_key(cfg)
    assert first["backbone"]["file"] == str(cached_path(cfg)) and pretrain_key(cfg) in first["backbone"]["file"]
    write_npz(path, seed=1)
    logs = []
    second = Trainer(npz_config(path, tmp_path), run_dir=tmp_path / "r2", log=logs.append).run()
    assert any(m.startswith("pretraining ") for m in logs)  # not the old file's backbone
    assert second["backbone"]["pretrain_key"] != first["backbone"]["pretrain_key"]
    assert json.loads((tmp_path / "r2" / "summary.json").read_text())["backbone"] == second["backbone"]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
