"""Shallow VPT on a frozen timm ViT (DESIGN §1)."""
import pytest
import torch

from pfedpg.errors import ConfigError
from pfedpg.models import ModelConfig, build_backbone
from pfedpg.models.backbone import load_state_file


def test_prompts_sit_after_cls_without_positional_embedding(tiny_vit):
    # Prepare: known prompt values and a probe on the first block's input.
    with torch.no_grad():
        tiny_vit.prompt.prompt.copy_(torch.arange(3 * 16, dtype=torch.float32).view(3, 16))
    seen = {}
    tiny_vit.backbone.blocks[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    images = torch.randn(2, 3, 8, 8)
    # Execute
    tiny_vit(images)
    # Assert: [CLS + pos_0, P (raw, no position), patches + pos_1..]
    b = tiny_vit.backbone
    x = seen["x"]
    assert x.shape == (2, 1 + 3 + 4, 16)
    torch.testing.assert_close(x[:, 0], (b.cls_token + b.pos_embed[:, :1]).expand(2, 1, 16)[:, 0])
    torch.testing.assert_close(x[:, 1:4], tiny_vit.prompt.prompt.expand(2, 3, 16))
    patches = b.patch_embed(images) + b.pos_embed[:, 1:]
    torch.testing.assert_close(x[:, 4:], patches)


def test_no_gradient_reaches_the_frozen_backbone(tiny_vit):
    tiny_vit.train()
    assert not tiny_vit.backbone.training, "the backbone must stay in eval mode"
    loss = tiny_vit(torch.randn(4, 3, 8, 8)).sum()
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in tiny_vit.backbone.parameters())
    assert tiny_vit.prompt.prompt.grad is not None and tiny_vit.prompt.prompt.grad.abs().sum() > 0
    assert tiny_vit.head.weight.grad is not None


def test_prompt_changes_the_output(tiny_vit):
    x = torch.randn(2, 3, 8, 8)
    before = tiny_vit(x)
    with torch.no_grad():
        tiny_vit.prompt.prompt.add_(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)))
    assert not torch.allclose(before, tiny_vit(x))


def test_checkpoint_round_trip_and_errors(tmp_path):
    from safetensors.torch import save_file

    kw = {"img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2}
    src = build_backbone(ModelConfig(weights="random", kwargs=kw))
    path = tmp_path / "b.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    loaded = build_backbone(ModelConfig(weights="checkpoint", checkpoint=str(path), kwargs=kw))
    for (k, a), (_, b) in zip(src.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    pth = tmp_path / "b.pth"
    torch.save(src.state_dict(), pth)
    assert set(load_state_file(pth)) == set(src.state_dict())
    # A missing file, a corrupt file and a mismatched architecture each give a one-line ConfigError.
    with pytest.raises(ConfigError, match="not found"):
        build_backbone(ModelConfig(weights="checkpoint", checkpoint=str(tmp_path / "nope.safetensors"), kwargs=kw))
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cannot read"):
        build_backbone(ModelConfig(weights="checkpoint", checkpoint=str(tmp_path / "bad.safetensors"), kwargs=kw))
    with pytest.raises(ConfigError, match="does not match"):
        build_backbone(ModelConfig(weights="checkpoint", checkpoint=str(path), kwargs={**kw, "depth": 2}))


def test_model_config_errors():
    with pytest.raises(ConfigError, match="model.weights"):
        ModelConfig(weights="imagenet")
    with pytest.raises(ConfigError, match="model.checkpoint"):
        ModelConfig(weights="checkpoint")
    with pytest.raises(ConfigError, match="not a timm model"):
        build_backbone(ModelConfig(name="vit_does_not_exist", weights="random"))
