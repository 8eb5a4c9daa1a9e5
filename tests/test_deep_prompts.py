"""Deep prompts (VPT-deep, FedVPT-D, pFedPG-deep; DESIGN §1 "Prompt depth")."""
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL, tiny_config

from pfedpg.client import trainable_parameters
from pfedpg.models import ModelConfig, PromptedViT, build_backbone

K, DEPTH = 3, 3


def make_vit(deep: bool, depth: int = DEPTH) -> PromptedViT:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        backbone = build_backbone(ModelConfig(weights="random", kwargs={**TINY_MODEL, "depth": depth}))
        model = PromptedViT(backbone, num_prompts=K, num_classes=5, deep=deep)
    with torch.no_grad():
        model.prompt.prompt.normal_(generator=torch.Generator().manual_seed(1))
    return model


def reference_features(model: PromptedViT, images: torch.Tensor, deep: bool) -> torch.Tensor:
    """A loop over the blocks written from VPT's description, not from the model's code."""
    b = model.backbone
    x = b.patch_embed(images) + b.pos_embed[:, 1:]
    cls = (b.cls_token + b.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    prompts = model.prompt.prompt.view(-1, K, model.embed_dim)
    for i, block in enumerate(b.blocks):
        if i == 0:
            x = torch.cat([cls, prompts[0].expand(x.shape[0], -1, -1), x], dim=1)
        elif deep:
            x = torch.cat([x[:, :1], prompts[i].expand(x.shape[0], -1, -1), x[:, 1 + K:]], dim=1)
        x = block(x)
    return b.norm(x)[:, 0]


@pytest.mark.parametrize("deep", [False, True])
def test_insertion_equals_a_reference_loop_over_the_blocks(deep):
    model = make_vit(deep)
    assert model.prompt.prompt.shape == ((DEPTH if deep else 1) * K, 16)
    images = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    seen = []
    handles = [block.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
               for block in model.backbone.blocks]
    with torch.no_grad():
        out = model.features(images)
        for h in handles:
            h.remove()
        ref = reference_features(model, images, deep)
    assert len(seen) == DEPTH
    # Shallow is the same arithmetic as before deep prompts existed: bit for bit.
    if deep:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(out, ref)
    # Every block's input holds that layer's prompt at positions 1..K (deep), or whatever the
    # previous block made of the first prompt (shallow).
    layers = model.prompt.prompt.detach().view(-1, K, 16)
    for i, x in enumerate(seen):
        assert x.shape == (4, 1 + K + 4, 16)
        at_prompts = x[:, 1:1 + K]
        if i == 0 or deep:
            torch.testing.assert_close(at_prompts, layers[i].expand(4, -1, -1), rtol=0, atol=0)
        else:
            assert not torch.allclose(at_prompts, layers[0].expand(4, -1, -1))


def test_every_layer_prompt_moves_the_output():
    model = make_vit(True)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(x)
        for i in range(DEPTH):
            saved = model.prompt.prompt.clone()
            # (a random change: a constant shift of a token would vanish in the blocks' LayerNorm)
            model.prompt.prompt[i * K:(i + 1) * K] += torch.randn(K, 16, generator=torch.Generator().manual_seed(i))
            assert not torch.allclose(model(x), before), f"layer {i}'s prompt has no effect"
            model.prompt.prompt.copy_(saved)


def test_per_sample_gradients_of_deep_prompts_are_exact():
    from attacks.membership import prompt_gradients
    from defenses.dp_sgd import per_sample_gradients

    model = make_vit(True)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(5, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 3, 4])
    batched = per_sample_gradients(model, x, y)
    probe = prompt_gradients(model, x, y)
    params = trainable_parameters(model)
    for i in range(5):
        single = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum"), params)
        assert single[0].shape == (DEPTH * K, 16) and single[0][-K:].abs().sum() > 0  # the last layer's prompt learns
        for b, s in zip(batched, single):
            torch.testing.assert_close(b[i], s, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(probe[i], single[0], rtol=1e-4, atol=1e-6)


def deep_config(**kw):
    return tiny_config(**{"model.prompt_depth": "deep", "model.kwargs.depth": 2, "checkpoint_every": 0, **kw})


@pytest.mark.parametrize("method", ["pfedpg", "fedvpt", "local"])
def test_deep_runs_for_every_method_and_counts_every_layer(tmp_path, method):
    from pfedpg.run import Trainer

    t = Trainer(deep_config(method=method), run_dir=tmp_path / method)
    summary = t.run()
    k, depth, dim = 4, 2, TINY_MODEL["embed_dim"]
    assert all(s.prompt.shape == (depth * k, dim) for s in t.clients.states)
    comm = summary["communication"]
    assert comm["up_numbers_per_client_round"] == (0 if method == "local" else depth * k * dim)
    if method == "pfedpg":  # one generator, one descriptor per client, over all L·K tokens
        assert t.server.p_base.shape == (depth * k, dim) and t.server.descriptors.shape == (3, depth * k, dim)
    assert 0 <= summary["accuracy"]["mean"] <= 1


def test_deep_prompts_with_dp_sgd_dp_client_an_attack_and_a_robust_rule(tmp_path):
    from evaluations.plugins import load_plugins
    from pfedpg.run import Trainer

    load_plugins()
    hooks = [{"name": "dp_client", "clip": 1.0, "noise_multiplier": 1.0},
             {"name": "sign_flip", "clients": [0]},
             {"name": "robust_aggregation", "rule": "median", "f": 1}]
    s = Trainer(deep_config(hooks=hooks), run_dir=tmp_path / "a").run()
    assert s["hook_results"]["dp_client"]["epsilon_per_client"][1] > 0
    s = Trainer(deep_config(hooks=[{"name": "dp_sgd", "clip": 1.0, "noise_multiplier": 1.0}]),
                run_dir=tmp_path / "b").run()
    assert s["hook_results"]["dp_sgd"]["epsilon_max"] > 0


def test_prompt_depth_is_validated():
    from pfedpg.errors import ConfigError

    with pytest.raises(ConfigError, match="model.prompt_depth='deeper' is not one of shallow, deep"):
        tiny_config(**{"model.prompt_depth": "deeper"})
