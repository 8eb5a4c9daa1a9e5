"""Clients trained in one batch equal clients trained one after another (DESIGN §9)."""
import pytest
import torch
from conftest import tiny_config

from pfedpg.errors import ConfigError


def run(tmp_path, name, **overrides):
    from evaluations.plugins import load_plugins
    from pfedpg.run import Trainer

    load_plugins()
    cfg = tiny_config(**{"checkpoint_every": 0, **overrides})
    t = Trainer(cfg, run_dir=tmp_path / name)
    summary = t.run()
    return t, summary


@pytest.mark.parametrize("extra", [
    {},                                                            # pfedpg, momentum, wd, 1 epoch
    {"client.local_epochs": 2, "client.head_lr": 0.03, "data.max_train_per_client": 41},  # ragged batches
    {"method": "fedvpt"},
    {"model.prompt_depth": "deep", "model.kwargs.depth": 2},      # deep prompts: L·K tokens per sample
    {"method": "local", "client.momentum": 0.0, "client.weight_decay": 0.0},
])
def test_batched_round_equals_sequential_clients(tmp_path, extra):
    seq, s1 = run(tmp_path, "seq", **extra)
    bat, s2 = run(tmp_path, "bat", batched_clients=True, **extra)
    for a, b in zip(seq.clients.states, bat.clients.states):
        for key in ("prompt", "head_weight", "head_bias"):
            torch.testing.assert_close(getattr(b, key), getattr(a, key), rtol=1e-4, atol=1e-5)
    for p, q in zip(seq.server.parameters(), bat.server.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
    assert s2["accuracy"]["per_client"] == pytest.approx(s1["accuracy"]["per_client"], abs=1 / 40 + 1e-9)


def test_one_batched_step_matches_torch_sgd_to_float_precision(tiny_vit):
    """Two clients, one step each: the batched update equals torch.optim.SGD on each client alone."""
    from pfedpg.batched import batched_sgd_local_training
    from pfedpg.client import ClientConfig, load_into, sgd_local_training
    from pfedpg.jobs import ClientData, LocalJob

    cfg = ClientConfig(lr=0.25, head_lr=0.05, batch_size=8, local_epochs=1)
    g = torch.Generator().manual_seed(0)
    data = [ClientData(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(2)]
    starts = [{"prompt": torch.randn(3, 16, generator=g), "head_weight": 0.1 * torch.randn(5, 16, generator=g),
               "head_bias": torch.zeros(5)} for _ in range(2)]
    expected = []
    for d, st in zip(data, starts):
        load_into(tiny_vit, **st)
        sgd_local_training(LocalJob(0, 1, tiny_vit, d, torch.Generator().manual_seed(1), None), cfg)
        expected.append(tiny_vit.prompt.prompt.detach().clone())
    jobs = [LocalJob(i, 1, tiny_vit, d, torch.Generator().manual_seed(1), None) for i, d in enumerate(data)]
    _, finals = batched_sgd_local_training(tiny_vit, jobs, starts, cfg)
    for f, e in zip(finals, expected):
        torch.testing.assert_close(f["prompt"], e, rtol=1e-5, atol=1e-6)


def test_local_training_hooks_keep_their_clients_sequential(tmp_path):
    hooks = [{"name": "dp_sgd", "clip": 1.0, "noise_multiplier": 1.0}]
    seq, _ = run(tmp_path, "seq", hooks=hooks)
    bat, _ = run(tmp_path, "bat", hooks=hooks, batched_clients=True)
    for a, b in zip(seq.clients.states, bat.clients.states):
        assert torch.equal(a.prompt, b.prompt)  # DP-SGD clients never join the batch: bit-identical
    assert "train one after another" in (tmp_path / "bat" / "log.txt").read_text()


def test_batched_clients_must_be_a_boolean():
    with pytest.raises(ConfigError, match="batched_clients"):
        tiny_config(batched_clients="yes")
