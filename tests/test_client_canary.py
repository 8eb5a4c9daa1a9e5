"""The client-level one-run audit (Andrew et al. 2024; DESIGN §6): noise off reads a large ε̂, the
correct client-level mechanism reads below its accountant's ε, and the estimator recovers a planted μ."""
import json
import math

import numpy as np
import pytest

from attacks.client_canary import _gdp_epsilon, estimate_epsilon
from conftest import tiny_config
from pfedpg.errors import ConfigError


def test_estimator_recovers_a_planted_mu_and_gdp_epsilon_matches_the_accountants():
    from defenses.accounting import gdp_epsilon

    for mu in (0.5, 1.0, 3.0):
        assert _gdp_epsilon(mu, 1e-5) == pytest.approx(gdp_epsilon(mu, 1e-5), rel=1e-4)
    rng = np.random.default_rng(0)
    null = 0.01 * rng.normal(size=5000)
    inserted = 0.01 * (2.0 + rng.normal(size=40))
    est = estimate_epsilon(inserted, null, delta=1e-5)
    assert est["mu_ci"][0] < 2.0 < est["mu_ci"][1] and abs(est["mu_hat"] - 2.0) < 0.5
    assert est["epsilon_ci"][0] <= est["epsilon_hat"] <= est["epsilon_ci"][1]
    assert estimate_epsilon(0.01 * rng.normal(size=40), null, delta=1e-5)["epsilon_ci"][0] == 0.0


def run(tmp_path, name, hooks, **kw):
    from evaluations.plugins import load_plugins
    from pfedpg.runner import Trainer

    load_plugins()
    cfg = tiny_config(**{"data.clients_per_domain": 6, "rounds": 4, "hooks": hooks, "server.lr": 0.1,
                         "model.num_prompts": 16, **kw})
    summary = Trainer(cfg, run_dir=tmp_path / name).run()
    return summary["hook_results"]["client_canary_audit"]


@pytest.mark.parametrize("method", ["pfedpg", "fedvpt"])
def test_noise_off_reads_large_and_the_correct_mechanism_reads_below_its_accountant(tmp_path, method):
    canary = {"name": "client_canary_audit", "clients": 8, "null_directions": 500}   # 8 of 18 clients
    clip = {"name": "dp_client", "clip": 0.05, "noise_multiplier": 0.0}            # clip only: ε = ∞
    noisy = {"name": "dp_client", "clip": 0.05, "noise_multiplier": 3.0, "delta": 1e-5}
    off = run(tmp_path, "off", [canary, clip], method=method)
    on = run(tmp_path, "on", [canary, noisy], method=method)
    # measured: pfedpg 12.5 [8.7, 16.7], fedvpt 40 [33, 48]: the canaries stand out from the null
    assert off["epsilon_ci"][0] > 8, off
    # measured: pfedpg 0.0 [0, 2.0], fedvpt 1.7 [0, 5.2], against the accountant's 6.6
    assert math.isfinite(on["accountant_epsilon"]) and on["epsilon_ci"][1] < on["accountant_epsilon"], on
    assert not on["estimate_above_accountant"] and not on["interval_above_accountant"]
    written = json.loads((tmp_path / "on" / "audit" / "client_canary.json").read_text())
    assert written["epsilon_hat"] == on["epsilon_hat"] and written["canary_clients"] == list(range(8))


def test_broken_mechanism_is_flagged(tmp_path, monkeypatch):
    """dp_client told z = 3 that adds a tenth of that noise: with FedVPT the estimate lies above the
    accountant's ε (measured 9.5 [5.1, 14.5] against 6.6). Under pFedPG the same broken mechanism
    reads 2.5 [0, 7.2] — the generator's Jacobian dilutes the canaries at this size: not flagged."""
    from defenses.dp_client import ClientLevelDP
    from pfedpg.hooks import HOOKS

    class TenthNoise(ClientLevelDP):
        def privatize(self, delta, generator):
            z = self.noise_multiplier
            self.noise_multiplier = z / 10
            try:
                return super().privatize(delta, generator)
            finally:
                self.noise_multiplier = z

    monkeypatch.setitem(HOOKS._items, "dp_client", TenthNoise)
    res = run(tmp_path, "broken", [{"name": "client_canary_audit", "clients": 8, "null_directions": 500},
                                   {"name": "dp_client", "clip": 0.05, "noise_multiplier": 3.0, "delta": 1e-5}],
              method="fedvpt")
    assert res["estimate_above_accountant"], res


def test_hook_order_and_bad_options(tmp_path):
    with pytest.raises(ConfigError, match="before dp_client"):
        run(tmp_path, "order", [{"name": "dp_client", "clip": 0.05, "noise_multiplier": 1.0},
                                {"name": "client_canary_audit"}])
    with pytest.raises(ConfigError, match="not local"):
        run(tmp_path, "local", [{"name": "client_canary_audit"}], method="local")
    with pytest.raises(ConfigError, match="null_directions"):
        run(tmp_path, "bad", [{"name": "client_canary_audit", "null_directions": 3}])
