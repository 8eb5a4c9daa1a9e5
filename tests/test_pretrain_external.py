"""Pretraining on an external public data set (``pretrain.data``, issue 12): validation per epoch,
bit-for-bit resume, the recipe knobs and their errors, continuing from a checkpoint."""
import json

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config
from safetensors.torch import load_file

from pfedpg.errors import ConfigError
from pfedpg.pretrain import cached_path, log_path, partial_path, pretrain_backbone


def _npz(path, *, n=90, classes=3, split=False, seed=0):
    """A learnable tiny data set: class c is bright in colour channel c, plus noise (shift-invariant,
    as the pretraining's random crops need)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 60, size=(n, 8, 8, 3)).astype(np.uint8)
    images[np.arange(n), :, :, labels % 3] += 150
    extra = {"split": (np.arange(n) % 5 == 0).astype(np.int64)} if split else {}
    np.savez(path, images=images, labels=labels, domains=np.zeros(n, dtype=np.int64),
             class_names=np.array([f"c{i}" for i in range(classes)]), domain_names=np.array(["pub"]), **extra)
    return path


def _cfg(tmp_path, **kw):
    base = {"model.weights": "pretrain", "pretrain.cache_dir": str(tmp_path / "cache"), "pretrain.epochs": 4,
            "pretrain.batch_size": 16, "pretrain.lr": 5e-3, "data.public_fraction": 0.0}
    return tiny_config(**{**base, **kw})


def test_external_npz_pretraining_logs_validation_every_epoch_and_keys_on_content(tmp_path):
    f = _npz(tmp_path / "pub.npz", split=True)
    cfg = _cfg(tmp_path, **{"pretrain.data.path": str(f), "pretrain.epochs": 12})
    path = pretrain_backbone(cfg, log=lambda m: None)
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["public_records"] == 72 and info["val_records"] == 18  # split == 1 is the validation set
    lines = [json.loads(x) for x in log_path(cfg).read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 13)) and all(0 <= r["val_accuracy"] <= 1 for r in lines)
    assert lines[-1]["val_accuracy"] > 0.6  # three separable classes: it learned (chance is 1/3)
    assert info["history"] == lines
    assert not partial_path(cfg).exists()  # a finished pretraining leaves no partial state
    # The key follows the file's bytes, not its name; the run's own public split is not needed.
    before = cached_path(cfg)
    _npz(f, split=True, seed=1)
    assert cached_path(cfg) != before
    # The cached file keeps the pretraining head (3 classes here); runs drop it when loading
    # (the CLI test below trains on the embedded digits with this backbone).
    assert load_file(str(path))["head.weight"].shape[0] == 3


def test_val_fraction_and_val_path_and_max_records(tmp_path):
    f = _npz(tmp_path / "pub.npz")
    cfg = _cfg(tmp_path, **{"pretrain.data.path": str(f), "pretrain.data.val_fraction": 0.2,
                            "pretrain.data.max_records": 30, "pretrain.epochs": 1})
    info = json.loads(pretrain_backbone(cfg, log=lambda m: None).with_suffix(".json").read_text())
    assert info["val_records"] == 18 and info["public_records"] == 30
    v = _npz(tmp_path / "val.npz", n=21, seed=3)
    cfg = _cfg(tmp_path, **{"pretrain.data.path": str(f), "pretrain.data.val_path": str(v), "pretrain.epochs": 1})
    info = json.loads(pretrain_backbone(cfg, log=lambda m: None).with_suffix(".json").read_text())
    assert info["val_records"] == 21 and info["public_records"] == 90
    bad = _npz(tmp_path / "bad.npz", n=20, classes=2)
    with pytest.raises(ConfigError, match="other classes"):
        pretrain_backbone(_cfg(tmp_path, **{"pretrain.data.path": str(f), "pretrain.data.val_path": str(bad)}))
    # Settings that would be silently ignored are refused, before any pretraining.
    with pytest.raises(ConfigError, match="val_fraction is set but val_path"):
        _cfg(tmp_path, **{"pretrain.data.path": str(f), "pretrain.data.val_path": str(v),
                          "pretrain.data.val_fraction": 0.1})
    split = _npz(tmp_path / "split.npz", split=True)
    with pytest.raises(ConfigError, match="has a split key.*drop val_fraction"):
        pretrain_backbone(_cfg(tmp_path, **{"pretrain.data.path": str(split), "pretrain.data.val_fraction": 0.1}))
    with pytest.raises(ConfigError, match="max_records=500 is not below the 90"):
        pretrain_backbone(_cfg(tmp_path, **{"pretrain.data.path": str(f), "pretrain.data.max_records": 500}))


def test_interrupted_pretraining_resumes_bit_for_bit(tmp_path):
    f = _npz(tmp_path / "pub.npz", split=True)
    kw = {"pretrain.data.path": str(f), "pretrain.augment": "crop_flip"}
    whole = pretrain_backbone(_cfg(tmp_path / "a", **kw), log=lambda m: None)
    cfg = _cfg(tmp_path / "b", **kw)
    out = pretrain_backbone(cfg, log=lambda m: None, stop_after=1)
    assert out == partial_path(cfg) and out.is_file() and not cached_path(cfg).exists()
    out = pretrain_backbone(cfg, log=lambda m: None, stop_after=2)  # epochs 2-3, then stopped again
    msgs = []
    resumed = pretrain_backbone(cfg, log=msgs.append)
    assert any("resuming pretraining at epoch 4/4" in m for m in msgs)
    a, b = load_file(str(whole)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads(whole.with_suffix(".json").read_text())["history"]
    hb = json.loads(resumed.with_suffix(".json").read_text())["history"]
    assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]
    assert [h["val_accuracy"] for h in ha] == [h["val_accuracy"] for h in hb]


def test_corrupt_partial_state_is_a_one_line_error(tmp_path):
    f = _npz(tmp_path / "pub.npz")
    cfg = _cfg(tmp_path, **{"pretrain.data.path": str(f)})
    partial_path(cfg).parent.mkdir(parents=True)
    partial_path(cfg).write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot resume pretraining.*delete it to start over"):
        pretrain_backbone(cfg, log=lambda m: None)


def test_recipe_knobs_change_the_weights_and_the_key(tmp_path):
    f = _npz(tmp_path / "pub.npz")
    plain = _cfg(tmp_path, **{"pretrain.data.path": str(f), "pretrain.epochs": 1})
    flip = _cfg(tmp_path, **{"pretrain.data.path": str(f), "pretrain.epochs": 1, "pretrain.augment": "crop_flip"})
    warm = _cfg(tmp_path, **{"pretrain.data.path": str(f), "pretrain.epochs": 1, "pretrain.warmup_epochs": 0})
    assert len({cached_path(plain), cached_path(flip), cached_path(warm)}) == 3
    assert cached_path(_cfg(tmp_path, **{"pretrain.data.path": str(f), "pretrain.epochs": 1,
                                         "pretrain.checkpoint_every": 0})) == cached_path(plain)
    a = load_file(str(pretrain_backbone(plain, log=lambda m: None)))
    b = load_file(str(pretrain_backbone(flip, log=lambda m: None)))
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_continue_from_a_checkpoint(tmp_path):
    f = _npz(tmp_path / "pub.npz")
    first = pretrain_backbone(_cfg(tmp_path, **{"pretrain.data.path": str(f), "pretrain.epochs": 1}),
                              log=lambda m: None)
    cont = _cfg(tmp_path, **{"pretrain.data.path": str(f), "pretrain.epochs": 1, "pretrain.init": str(first),
                             "seed": 1})
    scratch = _cfg(tmp_path, **{"pretrain.data.path": str(f), "pretrain.epochs": 1, "seed": 1})
    msgs = []
    c = json.loads(pretrain_backbone(cont, log=msgs.append).with_suffix(".json").read_text())
    s = json.loads(pretrain_backbone(scratch, log=lambda m: None).with_suffix(".json").read_text())
    assert c["final_train_loss"] < s["final_train_loss"]  # it starts from trained weights
    wrong = _cfg(tmp_path, **{"pretrain.data.path": str(f), "pretrain.init": str(first), "model.kwargs.embed_dim": 32})
    with pytest.raises(ConfigError, match="pretrain.init .* does not match"):
        pretrain_backbone(wrong, log=lambda m: None)


@pytest.mark.parametrize("kw, match", [
    ({"pretrain.amp": True, "pretrain.device": "cpu"}, "amp .*needs a CUDA device"),
    ({"pretrain.augment": "randaug"}, "pretrain.augment='randaug' is not one of shift, crop_flip"),
    ({"pretrain.data.val_fraction": 0.2}, "need pretrain.data.path"),
    ({"pretrain.data.val_fraction": 1.5, "pretrain.data.path": "x.npz"}, "val_fraction=1.5 must be in"),
    ({"pretrain.device": "tpu"}, "pretrain.device='tpu' is not one of auto, cpu, cuda, cuda:N"),
    ({"pretrain.warmup_epochs": -1}, "warmup_epochs=-1 must be an integer >= 0"),
])
def test_bad_recipe_settings_are_one_line_errors(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(tmp_path, **kw)


def test_missing_external_file_and_no_public_split_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="pretrain.data: .*nope.npz not found"):
        pretrain_backbone(_cfg(tmp_path, **{"pretrain.data.path": str(tmp_path / "nope.npz")}), log=lambda m: None)
    with pytest.raises(ConfigError, match="pretrain.data.path"):
        pretrain_backbone(_cfg(tmp_path), log=lambda m: None)  # public_fraction 0 and no external data
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA device"):
            pretrain_backbone(_cfg(tmp_path, **{"pretrain.device": "cuda",
                                                "pretrain.data.path": str(_npz(tmp_path / "p.npz"))}))


def test_cli_pretrain_on_external_data_then_a_run_uses_it(tmp_path, capsys):
    from evaluations.cli import main
    from pfedpg.run import Trainer

    f = _npz(tmp_path / "pub.npz", split=True)
    cfg = tiny_config(**{"model.weights": "pretrain", "pretrain.cache_dir": str(tmp_path / "cache"),
                         "pretrain.epochs": 2, "pretrain.data.path": str(f), "rounds": 1})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    sets = ["--config", str(tmp_path / "c.yaml")]
    assert main(["pretrain", *sets]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == str(cached_path(cfg))
    summary = Trainer(cfg, run_dir=tmp_path / "run").run()  # the embedded digits on the external backbone
    assert 0 <= summary["accuracy"]["mean"] <= 1
