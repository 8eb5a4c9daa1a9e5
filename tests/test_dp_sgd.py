"""Record-level DP-SGD inside each client (DESIGN §5)."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from defenses.dp_sgd import RecordLevelDPSGD, per_sample_gradients
from pfedpg.client import trainable_parameters
from pfedpg.errors import ConfigError
from pfedpg.runner import Trainer


def test_per_sample_gradients_equal_a_loop_of_single_examples(tiny_vit):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        tiny_vit.prompt.prompt.normal_(generator=g)
    x, y = torch.randn(5, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 3, 4])
    batched = per_sample_gradients(tiny_vit, x, y)
    params = trainable_parameters(tiny_vit)
    for i in range(5):
        single = torch.autograd.grad(F.cross_entropy(tiny_vit(x[i:i + 1]), y[i:i + 1], reduction="sum"), params)
        for b, s in zip(batched, single):
            torch.testing.assert_close(b[i], s, rtol=1e-4, atol=1e-6)
    # The hooks are gone afterwards: a plain backward leaves no grad_sample behind.
    F.cross_entropy(tiny_vit(x), y).backward()
    assert all(getattr(p, "grad_sample", None) is None for p in params)


def test_dp_sgd_run_accounts_once_per_client_for_the_whole_run(tmp_path):
    import defenses  # noqa: F401

    hooks = [{"name": "dp_sgd", "clip": 1.0, "noise_multiplier": 1.0}]
    cfg = tiny_config(rounds=4, checkpoint_every=2, hooks=hooks)
    full = Trainer(cfg, run_dir=tmp_path / "full").run()
    rounds = [json.loads(ln) for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    eps = [r["dp_sgd/epsilon_max"] for r in rounds if r["type"] == "round"]
    assert all(a < b for a, b in zip(eps, eps[1:])), eps  # never resets between rounds
    Trainer(cfg, run_dir=tmp_path / "cut").run(stop_after=2)
    resumed = Trainer(cfg, run_dir=tmp_path / "cut").run(resume=True)
    assert resumed["hook_results"]["dp_sgd"]["epsilon_per_client"] == full["hook_results"]["dp_sgd"]["epsilon_per_client"]
    assert resumed["accuracy"] == full["accuracy"]


def test_target_epsilon_is_reached_per_client(tmp_path):
    import defenses  # noqa: F401

    cfg = tiny_config(rounds=2, hooks=[{"name": "dp_sgd", "clip": 1.0, "target_epsilon": 4.0}])
    summary = Trainer(cfg, run_dir=tmp_path / "r").run()
    eps = summary["hook_results"]["dp_sgd"]["epsilon_per_client"]
    assert all(3.8 <= e <= 4.0 for e in eps), eps


def test_delta_must_be_below_one_over_the_client_size(tmp_path):
    import defenses  # noqa: F401

    cfg = tiny_config(hooks=[{"name": "dp_sgd", "clip": 1.0, "noise_multiplier": 1.0, "delta": 0.05}])
    with pytest.raises(ConfigError, match="1/\\|D_n\\|"):
        Trainer(cfg, run_dir=tmp_path / "r").run()
    with pytest.raises(ConfigError, match="exactly one of"):
        RecordLevelDPSGD(clip=1.0)
