"""The client-level one-run audit (DESIGN §6): Andrew et al.'s estimate (two Gaussians and their ε, its
intervals on planted canaries), and canary clients through the hooks — noise off reads at the cap, the
correct client-level mechanism stays at or below its claim, broken mechanisms are violations."""
import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_config

from attacks.canary_estimate import epsilon_cap, estimate_epsilon
from pfedpg.errors import ConfigError
from pfedpg.gdp import gaussians_delta, gaussians_epsilon, gdp_epsilon


def test_two_gaussians_reduce_to_gdp_and_match_a_monte_carlo_privacy_loss():
    from scipy.stats import norm

    for mu in (0.5, 1.0, 3.0):  # equal spreads: μ-GDP
        assert gaussians_epsilon(mu, 1.0, 0.0, 1.0, 1e-5) == pytest.approx(gdp_epsilon(mu, 1e-5), rel=1e-5)
    rng = np.random.default_rng(0)
    for m1, s1, eps in ((1.0, 0.8, 1.5), (0.5, 1.6, 2.0)):  # unequal spreads: E_ε(P‖Q) by sampling
        y = rng.normal(m1, s1, 2_000_000)
        loss = norm.logpdf(y, m1, s1) - norm.logpdf(y, 0, 1)
        assert gaussians_delta(m1, s1, 0.0, 1.0, eps) == pytest.approx(np.mean(np.maximum(0, 1 - np.exp(eps - loss))),
                                                                       rel=0.02)
    # A canary spread off the null's raises ε either way (the reference implementation's behaviour).
    assert gaussians_epsilon(1.0, 0.9, 0, 1, 1e-5) > gdp_epsilon(1.0, 1e-5) < gaussians_epsilon(1.0, 1.1, 0, 1, 1e-5)


def test_estimator_recovers_a_planted_epsilon_with_intervals_that_cover_it():
    rng = np.random.default_rng(0)
    truth = gdp_epsilon(1.0, 1e-5)  # canaries N(1, 1) against a null N(0, 1), in null units
    covered = {"two_gaussians": 0, "equal_variance": 0}
    for _ in range(10):
        est = estimate_epsilon(1.0 + rng.normal(size=64), rng.normal(size=1000), delta=1e-5, bootstrap=300)
        covered["two_gaussians"] += est["epsilon_ci"][0] <= truth <= est["epsilon_ci"][1]
        ev = est["equal_variance"]
        covered["equal_variance"] += ev["epsilon_ci"][0] <= truth <= ev["epsilon_ci"][1]
        assert abs(ev["mu_hat"] - 1.0) < 0.5 and est["epsilon_cap"] == pytest.approx(epsilon_cap(64, 1000, 1e-5))
    assert covered["two_gaussians"] >= 9 and covered["equal_variance"] >= 9, covered
    # Never-inserted canaries read 0 at the interval's lower end; too few canaries give no estimate.
    assert estimate_epsilon(rng.normal(size=40), rng.normal(size=1000),
                            delta=1e-5)["equal_variance"]["epsilon_ci"][0] == 0.0
    few = estimate_epsilon([0.1, 0.2], rng.normal(size=100), delta=1e-5)
    assert few["epsilon_hat"] is None and "needs >= 3" in few["status"]
    # The cap: 8 canaries and 500 null directions, perfectly separated, certify at most ln(0.631 / 0.0074).
    assert epsilon_cap(8, 500, 1e-5) == pytest.approx(math.log((0.025 ** (1 / 8) - 1e-5) / (1 - 0.025 ** (1 / 500))),
                                                      rel=1e-6)


def run(tmp_path, name, hooks, **kw):
    from evaluations.plugins import load_plugins
    from pfedpg.run import Trainer

    load_plugins()
    cfg = tiny_config(**{"rounds": 4, "hooks": hooks, "server.lr": 0.1, **kw})
    summary = Trainer(cfg, run_dir=tmp_path / name).run()
    return summary["hook_results"]["client_canary_audit"]


CANARY = {"name": "client_canary_audit", "clients": 150, "null_directions": 300}
# z = 2 under replace (the canary pair ±C·u): the claim for a canary's 4 releases is μ = 2·√4 / 2 = 2 (ε 10.0)
DP = {"name": "dp_client", "clip": 0.05, "noise_multiplier": 2.0, "delta": 1e-5}


@pytest.mark.parametrize("method", ["pfedpg", "fedvpt"])
def test_noise_off_reads_at_the_cap_and_the_correct_mechanism_stays_at_its_claim(tmp_path, method):
    off = run(tmp_path, "off", [CANARY, {**DP, "noise_multiplier": 0.0}], method=method)
    on = run(tmp_path, "on", [CANARY, DP], method=method)
    # noise off (clip only): every release guess right — the bound is its cap; ε = ∞ is claimed, so no violation
    assert off["releases"]["correct"] == 150 and off["releases"]["epsilon_lb"] == off["releases"]["epsilon_cap"]
    assert off["claimed_epsilon"] == math.inf and off["violation"] is False and off["can_fail"] is False
    assert on["claimed_epsilon"] == pytest.approx(gdp_epsilon(2.0, 1e-5))
    assert on["claimed_epsilon"] < on["accountant_epsilon"]  # RDP is looser than the exact μ-GDP claim
    assert on["can_fail"] and not on["violation"] and on["headline"] == "releases"
    for view in ("releases", "final_state"):
        assert all(not b["violation"] for b in on[view]["bounds"].values()), on[view]["bounds"]
    written = json.loads((tmp_path / "on" / "audit" / "client_canary.json").read_text())
    assert written["epsilon_lb"] == on["epsilon_lb"] and written["canary_clients"] == 150
    releases = written["views"]["releases"]
    assert len(releases["cos_null"]) == 300 and sum(releases["inserted"]) == on["inserted"]


class _Broken:
    """dp_client variants told z that release something else."""

    @staticmethod
    def make(mode):
        from defenses.dp_client import ClientLevelDP, clip_by_norm

        class Broken(ClientLevelDP):
            def privatize(self, delta, generator):
                z, c = self.noise_multiplier, self.clip
                noise = torch.randn(delta.shape, generator=generator, dtype=delta.dtype) * (z * c)
                if mode == "half_noise":
                    return clip_by_norm(delta, c) + noise / 2
                return clip_by_norm(delta + noise, c)  # clipping after the noise

        return Broken


@pytest.mark.parametrize("mode", ["half_noise", "clip_after_noise"])
def test_broken_mechanisms_are_violations(tmp_path, monkeypatch, mode):
    """The releases view reaches above the claim (10.0) for both: half the noise doubles μ; clipping
    after the noise lets the 100 C canary through nearly noise-free."""
    from pfedpg.hooks import HOOKS

    with HOOKS.override("dp_client", _Broken.make(mode)):
        res = run(tmp_path, mode, [CANARY, DP], method="fedvpt")
    assert res["violation"] and res["releases"]["epsilon_lb"] > res["claimed_epsilon"], res["releases"]


def test_hook_order_and_bad_options(tmp_path):
    with pytest.raises(ConfigError, match="before dp_client"):
        run(tmp_path, "order", [{"name": "dp_client", "clip": 0.05, "noise_multiplier": 1.0},
                                {"name": "client_canary_audit"}])
    with pytest.raises(ConfigError, match="send nothing|sends nothing"):
        run(tmp_path, "local", [{"name": "client_canary_audit"}], method="local")
    with pytest.raises(ConfigError, match="null_directions"):
        run(tmp_path, "bad", [{"name": "client_canary_audit", "null_directions": 3}])
    with pytest.raises(ConfigError, match="is a count"):
        run(tmp_path, "ids", [{"name": "client_canary_audit", "clients": [0, 1]}])
