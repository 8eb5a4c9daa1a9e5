"""Audits that can fail (DESIGN §6), end to end through the hooks: the shipped
configs/audit_falsifiable.yaml — its mechanisms, ε, rounds and canaries — on the test preset's tiny
model. Each audit can fail, the correct mechanisms show no violation, and broken ones do: dp_client's
noise × 0.57 (ε 8 → about 16), dp_client clipping after its noise, DP-SGD's noise × 0.5."""
from pathlib import Path

import pytest
from conftest import TINY_MODEL

SHIPPED = Path(__file__).resolve().parent.parent / "configs" / "audit_falsifiable.yaml"
# The test preset's one-block ViT, with 64 prompt tokens so that prompt and head hold ~1,200 numbers like
# the shipped model's 1,290: 1,000 gradient canaries need that room not to drown in each other.
TINY = ["model.weights=random", "data.image_size=8", f"model.kwargs={TINY_MODEL}", "model.num_prompts=64",
        "data.max_test_per_client=20", "threads=1"]


def falsifiable_cell(tmp_path, mechanism: str) -> dict:
    """Run the shipped file's cell for ``mechanism`` (seed 0) and return its one-run audit's result."""
    from evaluations.leakage_sweep import AuditGrid, load_audit
    from evaluations.plugins import load_plugins
    from pfedpg.config import config_from_dict
    from pfedpg.run import Trainer

    load_plugins()
    grid, probes, base = load_audit(SHIPPED, TINY)
    cell = next(c for c in AuditGrid(grid, base, probes).cells() if c.mechanism == mechanism)
    summary = Trainer(config_from_dict(cell.config), run_dir=tmp_path / mechanism).run()
    return summary["hook_results"]["client_canary_audit" if mechanism == "dp_client" else "gradient_canary_audit"]


def _scaled_noise(factor: float):
    from defenses.dp_client import ClientLevelDP, clip_by_norm
    from pfedpg.seeding import normal_like

    class Scaled(ClientLevelDP):
        def privatize(self, delta, generator):
            clipped = clip_by_norm(delta, self.clip)
            return clipped + normal_like(clipped, generator) * (factor * self.noise_multiplier * self.clip)

    return Scaled


def _clip_after_noise():
    from defenses.dp_client import ClientLevelDP, clip_by_norm
    from pfedpg.seeding import normal_like

    class ClipAfter(ClientLevelDP):
        def privatize(self, delta, generator):
            return clip_by_norm(delta + normal_like(delta, generator) * (self.noise_multiplier * self.clip), self.clip)

    return ClipAfter


@pytest.mark.parametrize("broken", [None, "noise_x0.57", "clip_after_noise"])
def test_client_canaries_catch_a_broken_dp_client(tmp_path, monkeypatch, broken):
    from pfedpg.hooks import HOOKS

    mechanism = HOOKS.get("dp_client") if broken is None else \
        _scaled_noise(0.57) if broken == "noise_x0.57" else _clip_after_noise()
    with HOOKS.override("dp_client", mechanism):
        res = falsifiable_cell(tmp_path, "dp_client")
    assert res["can_fail"] and res["headline"] == "releases" and res["canary_clients"] == 500
    assert res["violation"] is (broken is not None), res["releases"]
    if broken is None:  # every bound of the releases view at or below the claim, the estimate too
        assert not any(b["violation"] for b in res["releases"]["bounds"].values())


@pytest.mark.parametrize("broken", [None, "noise_x0.5"])
def test_gradient_canaries_catch_a_broken_dp_sgd(tmp_path, monkeypatch, broken):
    from defenses.dp_sgd import RecordLevelDPSGD

    if broken is not None:
        half = RecordLevelDPSGD.add_noise
        monkeypatch.setattr(RecordLevelDPSGD, "add_noise", lambda self, summed, z, g: half(self, summed, z * 0.5, g))
    res = falsifiable_cell(tmp_path, "dp_sgd")
    assert res["can_fail"] and res["canaries"] == 1000 and res["family"].startswith("Poisson-subsampled Gaussian")
    assert res["violation"] is (broken is not None), {k: res[k] for k in ("epsilon_lb", "claimed_epsilon", "correct")}
