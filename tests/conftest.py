import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs 2 workers on 2 cores: one thread each
    torch.set_num_threads(1)

from pfedpg.models import ModelConfig, PromptedViT, build_backbone  # noqa: E402

TINY_MODEL = {"img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2, "mlp_ratio": 1.0}


def tiny_config(**overrides):
    """The smallest preset the tests train with: embedded digits at 8x8, a one-block ViT."""
    from pfedpg.config import config_from_dict

    base = {
        "seed": 0,
        "rounds": 2,
        "checkpoint_every": 1,
        "data": {"image_size": 8, "num_domains": 3, "public_fraction": 0.3, "max_train_per_client": 48,
                 "max_test_per_client": 40},
        "model": {"weights": "random", "kwargs": dict(TINY_MODEL), "num_prompts": 4},
        "client": {"batch_size": 16, "local_epochs": 1, "lr": 0.1},
    }
    for key, value in overrides.items():
        node = base
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return config_from_dict(base)


@pytest.fixture
def tiny_vit():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        backbone = build_backbone(ModelConfig(weights="random", kwargs=dict(TINY_MODEL), num_prompts=3))
        return PromptedViT(backbone, num_prompts=3, num_classes=5)



def pytest_configure(config):
    """`make test` runs ``-n 2 --dist loadgroup``: the tests marked ``xdist_group`` (Flower's ports,
    one Ray cluster per module) must share a worker. pytest 9.2 ignores the group pytest-xdist 3.8
    writes into a test's id, and the groups silently split (measured: the Ray cluster built twice,
    Flower tests overlapping): refuse to run that way, naming the fix."""
    if config.getoption("dist", None) != "loadgroup" or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    import xdist

    def version(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split(".")[:2] if x.isdigit())

    if version(pytest.__version__) >= (9, 2) and version(xdist.__version__) <= (3, 8):
        raise pytest.UsageError(f"--dist loadgroup does not group tests under pytest {pytest.__version__} with "
                                f"pytest-xdist {xdist.__version__}; install the pinned pair: "
                                "pip install -c constraints.txt -e '.[test]'")
