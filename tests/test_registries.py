"""Registries open at run time (issue 30): a plug-in registered after import is a valid choice from a
config at once, ``override`` restores what was there, and every registered entry is exercised (as
timm's tests are over its models)."""
import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_config

import attacks  # noqa: F401  (registers the probes and attack hooks)
import defenses  # noqa: F401  (registers the DP and robust hooks)
from attacks.metrics import probe_metrics
from attacks.probes import PROBE_TYPES, Probe
from defenses.accounting import ACCOUNTANT_TYPES, calibrate_noise
from defenses.robust import AGGREGATION_RULES, RobustAggregation, Rule
from pfedpg.errors import ConfigError
from pfedpg.gdp import gdp_epsilon
from pfedpg.hooks import HOOKS, Hook, build_hooks
from pfedpg.registry import Registry
from pfedpg.run import Trainer


def test_override_registers_for_the_block_and_restores():
    reg: Registry = Registry("thing")
    reg.register("a")(1)
    with reg.override("a", 2), reg.override("b", 3):
        assert reg.get("a") == 2 and reg.get("b") == 3 and "b" in reg
    assert reg.get("a") == 1 and "b" not in reg
    with pytest.raises(ConfigError, match="unknown thing 'b'; choose one of: a"):
        reg.get("b")
    assert [1] not in reg  # an unhashable config value is no name, not a crash


# --- three plug-ins a researcher registers in a notebook, after every import ----------------------
class ExactGDPAccountant:
    """Full-participation releases composed exactly: μ = √(Σ 1/z²) per client (Dong et al. 2022).
    Opacus' IAccountant face: ``step``, ``history``, ``get_epsilon``."""

    def __init__(self):
        self.history: list[tuple[float, float, int]] = []

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        assert sample_rate == 1.0, "this accountant covers full participation only"
        self.history.append((noise_multiplier, sample_rate, 1))

    def get_epsilon(self, delta: float) -> float:
        mu = math.sqrt(sum(steps / z ** 2 for z, _, steps in self.history))
        return gdp_epsilon(mu, delta)


class CoordinateClip(Rule):
    """Clip every coordinate of every g_n to ±bound, then the mean: an option of its own (``bound``)."""

    built: list["CoordinateClip"] = []

    def __init__(self, *, f: int, bound: float = 1.0):
        super().__init__(f=f)
        self.bound, self.calls, self.size = bound, 0, 0
        CoordinateClip.built.append(self)

    def combine(self, g):
        self.calls += 1
        self.size = g.shape[1]
        return g.clamp(-self.bound, self.bound).mean(0), list(range(g.shape[0]))


class DescriptorNormProbe(Probe):
    """Membership of nothing in particular: each target record scored by ``scale`` × the norm of its
    client's descriptor (a probe with an option and an underscore in its name)."""

    side, unit = "server", "client"

    def __init__(self, *, scale: float = 1.0):
        self.scale = scale

    def run(self, run) -> None:
        d = run.ctx.server.client_descriptors().detach()
        s = np.concatenate([np.full(len(run.mem[c][2]), self.scale * float(d[c].norm())) for c in run.audit.targets])
        lab = np.concatenate([run.mem[c][2] for c in run.audit.targets])
        run.record("descriptor_norm", {**probe_metrics(s, lab), "scale": self.scale})


def test_an_accountant_registered_at_run_time_calibrates_and_accounts_a_run(tmp_path):
    dp = {"name": "dp_client", "clip": 1.0, "target_epsilon": 4.0, "accountant": "exact_gdp"}
    with pytest.raises(ConfigError, match="dp_client.accountant='exact_gdp' is not one of prv, rdp"):
        build_hooks([dp])
    with ACCOUNTANT_TYPES.override("exact_gdp", ExactGDPAccountant):
        summary = Trainer(tiny_config(rounds=3, hooks=[dp]), run_dir=tmp_path / "r").run()
        res = summary["hook_results"]["dp_client"]
        z_rdp = calibrate_noise(target_epsilon=4.0, delta=1e-5, sample_rate=1.0, steps=3, accountant="rdp")
    # one registration served calibration and accounting: ε lands on the target, with less noise than
    # RDP needs (the exact GDP composition is tighter)
    assert res["epsilon_max"] == pytest.approx(4.0, abs=0.006) and res["epsilon_max"] <= 4.0
    unit = res["noise_multiplier"][0] / 2  # z per unit sensitivity (replace adjacency: sensitivity 2C)
    assert unit < z_rdp and gdp_epsilon(math.sqrt(3) / unit, 1e-5) == pytest.approx(res["epsilon_max"])
    assert "exact_gdp" not in ACCOUNTANT_TYPES


def test_a_robust_rule_registered_at_run_time_runs_from_a_config_with_its_own_option(tmp_path):
    hook = {"name": "robust_aggregation", "rule": "coordinate_clip", "f": 0, "bound": 1e-4}
    with AGGREGATION_RULES.override("coordinate_clip", CoordinateClip):
        with pytest.raises(ConfigError, match="rule coordinate_clip: unknown option 'radius'; its options are bound"):
            build_hooks([{**hook, "radius": 1.0}])
        build_hooks([hook])
        CoordinateClip.built.clear()
        summary = Trainer(tiny_config(rounds=2, hooks=[hook]), run_dir=tmp_path / "r").run()
    (rule,) = CoordinateClip.built
    assert rule.bound == 1e-4 and rule.calls == 2
    assert summary["hook_results"]["robust_aggregation"]["rule"] == "coordinate_clip"
    # each coordinate of the aggregate within ±1e-4, scaled by the m clients' weights: a tiny step
    rounds = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    norms = [r["server_update_norm"] for r in rounds if r["type"] == "round"]
    assert len(norms) == 2 and all(0 < n < 3 * 1e-4 * math.sqrt(rule.size) for n in norms)


def test_a_probe_registered_at_run_time_runs_from_a_config_with_its_option(tmp_path):
    from attacks.leakage import probe_specs

    audit = {"name": "leakage_audit", "shadow_clients": 2, "targets_per_client": 10, "permutations": 3,
             "probes": [{"name": "descriptor_norm", "scale": 2.5}, "loss"]}
    with pytest.raises(ConfigError, match="unknown probe 'descriptor_norm'"):
        probe_specs(audit["probes"])
    with PROBE_TYPES.override("descriptor_norm", DescriptorNormProbe):
        with pytest.raises(ConfigError, match=r"probes\[0\] \(descriptor_norm\): unknown option 'scal'"):
            probe_specs([{"name": "descriptor_norm", "scal": 2.5}])
        cfg = tiny_config(rounds=2, hooks=[audit], **{"data.clients_per_domain": 2})
        summary = Trainer(cfg, run_dir=tmp_path / "r").run()
    probes = json.loads((tmp_path / "r" / "audit" / "audit.json").read_text())["probes"]
    res = probes["descriptor_norm"]
    assert res["scale"] == 2.5 and 0 <= res["auc"] <= 1
    assert summary["hook_results"]["leakage_audit"]["probes"]["descriptor_norm"]["auc"] == res["auc"]
    # its side and unit came from the class, not from parsing its name
    assert res["privacy_unit_of_question"] == "client" and res["threat_model"].startswith("honest-but-curious")
    assert "loss" in probes


# --- every registered entry, by registry ----------------------------------------------------------
@pytest.mark.parametrize("name", ACCOUNTANT_TYPES.names())
def test_every_accountant_calibrates_as_opacus_does(name):
    """Calibration over our registry takes Opacus' search step for step (so z, and every golden run,
    is unchanged), and the calibrated z reaches the target from below."""
    from opacus.accountants.utils import get_noise_multiplier

    for target, q, steps in ((8.0, 1.0, 10), (2.0, 0.05, 200)):
        ours = calibrate_noise(target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps, accountant=name)
        theirs = get_noise_multiplier(target_epsilon=target, target_delta=1e-5, sample_rate=q, steps=steps,
                                      accountant=name, epsilon_tolerance=0.005)
        assert ours == theirs
        acc = ACCOUNTANT_TYPES.get(name)()
        acc.history = [(ours, q, steps)]
        assert target - 0.005 <= acc.get_epsilon(delta=1e-5) <= target


@pytest.mark.parametrize("name", AGGREGATION_RULES.names())
def test_every_rule_agrees_with_the_mean_when_clients_agree(name):
    """A stack of identical rows: every rule returns that row (its defaults built from the registry)."""
    f = 1
    m = AGGREGATION_RULES.get(name).min_clients(f)
    g = torch.arange(1.0, 7.0).repeat(max(m, 5), 1)
    agg, kept = RobustAggregation(rule=name, f=f).combine(g)
    if name == "norm_clip":  # clipped to the median norm: equal rows are left alone
        assert torch.allclose(agg, g[0])
    elif name == "centered_clip":  # starts at 0 and moves by at most τ per iteration
        assert 0 < float(agg.norm()) <= float(g[0].norm()) + 1e-6
    else:
        assert torch.allclose(agg, g[0]) and kept and set(kept) <= set(range(g.shape[0]))


@pytest.mark.parametrize("name", PROBE_TYPES.in_order())
def test_every_probe_states_its_question(name):
    cls = PROBE_TYPES.get(name)
    assert issubclass(cls, Probe) and cls.side in ("server", "observer", "server+observer")
    assert cls.unit in ("client", "record", "placement") and isinstance(cls.needs_aux, bool)
    cls()  # every shipped probe builds with its defaults


#: the options a hook cannot go without
REQUIRED = {"robust_aggregation": {"rule": "median"}}


@pytest.mark.parametrize("name", HOOKS.names())
def test_every_hook_rejects_an_unknown_option_naming_its_own(name):
    with pytest.raises(ConfigError, match="unknown option 'surely_not_an_option'|takes no options"):
        build_hooks([{"name": name, "surely_not_an_option": 1, **REQUIRED.get(name, {})}])
    assert issubclass(HOOKS.get(name), Hook)


# --- one typed Spec at every {name: ..., **options} seam -----------------------------------------
def test_specs_are_typed_at_each_seam():
    from pfedpg.registry import Spec
    from pfedpg.server import ServerConfig

    cfg = tiny_config(hooks=[{"name": "dp_client", "clip": 1.0, "noise_multiplier": 1.0}])
    assert cfg.hook_specs == [Spec("dp_client", {"clip": 1.0, "noise_multiplier": 1.0})]
    assert cfg.hook_specs[0].to_config() == cfg.hooks[0]  # config.yaml keeps the YAML form
    with pytest.raises(ConfigError, match=r"hooks\[0\]='dp_client' must be a mapping"):
        tiny_config(hooks=["dp_client"])
    with pytest.raises(ConfigError, match=r"hooks\[0\] must be a mapping with a `name` key, got \{'clip': 1.0\}"):
        tiny_config(hooks=[{"clip": 1.0}])
    # the generator: a name, a mapping, or the server keys that are its options; misplaced ones fail early
    assert ServerConfig(generator={"name": "mlp", "hidden": 7}).generator_spec == Spec("mlp", {"hidden": 7})
    assert ServerConfig(generator="mlp", mlp_hidden=7).generator_spec == Spec("mlp", {"hidden": 7})
    assert ServerConfig(residual=True).generator_spec == Spec("cross_attention", {"residual": True})
    with pytest.raises(ConfigError, match="server.residual is an option of the cross_attention generator, not of mlp"):
        ServerConfig(generator="mlp", residual=True)
    with pytest.raises(ConfigError, match="server.generator mlp: unknown option 'hiden'; its options are hidden"):
        ServerConfig(generator={"name": "mlp", "hiden": 7})
    with pytest.raises(ConfigError, match="keep one"):
        ServerConfig(generator={"name": "mlp", "hidden": 7}, mlp_hidden=8)
    with pytest.raises(ConfigError, match="unknown generator 'mpl'"):
        ServerConfig(generator="mpl")


def test_a_generator_with_its_options_runs_from_a_config(tmp_path):
    cfg = tiny_config(rounds=1, **{"server.generator": {"name": "mlp", "hidden": 5}})
    trainer = Trainer(cfg, run_dir=tmp_path / "r")
    summary = trainer.run()
    assert trainer.server.generator.fc1.out_features == 5 and summary["generator"] == {"name": "mlp", "hidden": 5}
