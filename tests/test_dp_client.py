"""Client-level DP on ΔP_n (DESIGN §5) and its empirical audit (DESIGN §6)."""
import math

import pytest
import torch
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from attacks.epsilon_bounds import audit_delta_mechanism, clopper_pearson, epsilon_lower_bound
from defenses.accounting import accountant_epsilon, make_accountant
from defenses.dp_client import ClientLevelDP, clip_by_norm
from pfedpg.errors import ConfigError
from pfedpg.gdp import gdp_epsilon
from pfedpg.hooks import RunContext
from pfedpg.run import Trainer
from pfedpg.seeding import Seeds

vectors = st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(vectors, st.floats(1e-3, 1e3))
def test_clip_bounds_the_norm_and_is_idempotent(values, clip):
    x = torch.tensor(values, dtype=torch.float64)
    y = clip_by_norm(x, clip)
    assert float(y.norm()) <= clip * (1 + 1e-9)
    torch.testing.assert_close(clip_by_norm(y, clip), y, rtol=1e-12, atol=0)
    if float(x.norm()) <= clip:
        assert torch.equal(y, x)


def test_zero_delta_passes():
    z = torch.zeros(4, 8)
    assert torch.equal(clip_by_norm(z, 1.0), z)
    hook = ClientLevelDP(clip=1.0, noise_multiplier=0.0)
    assert torch.equal(hook.privatize(z, torch.Generator().manual_seed(0)), z)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("z, rounds", [(1.0, 1), (2.0, 10), (8.0, 100)])
def test_accountant_matches_closed_form_gdp(accountant, z, rounds):
    """Full participation, replace: μ = 2C·√T / (zC); exact ε ≤ accountant ε ≤ 1.15 · exact."""
    hook = ClientLevelDP(clip=0.5, noise_multiplier=z, accountant=accountant)
    ctx = RunContext(config=None, seeds=Seeds(0), run_dir=None, num_clients=3, log=lambda m: None,
                     schedule=[[0, 1, 2]] * rounds)
    hook.setup(ctx)
    for r in range(1, rounds + 1):
        hook.outgoing_delta(ctx, client=0, round=r, delta=torch.ones(2, 3))
    exact = gdp_epsilon(2 * math.sqrt(rounds) / z, 1e-5)
    assert exact <= hook.epsilon(0) <= 1.15 * exact
    assert hook.epsilon(1) == 0.0  # never released anything


def test_target_epsilon_is_calibrated_for_the_planned_releases():
    hook = ClientLevelDP(clip=1.0, target_epsilon=3.0)
    ctx = RunContext(config=None, seeds=Seeds(0), run_dir=None, num_clients=4, log=lambda m: None,
                     schedule=[[0, 1], [1, 2], [0, 1], [3, 1]])  # client 1 joins 4 times
    hook.setup(ctx)
    for r in range(1, 5):
        hook.outgoing_delta(ctx, client=1, round=r, delta=torch.ones(3))
    assert 2.9 <= hook.epsilon(1) <= 3.0
    # Replace adjacency doubles the multiplier that add/remove needs for the same ε.
    add = ClientLevelDP(clip=1.0, target_epsilon=3.0, adjacency="add_remove")
    add.setup(ctx)
    assert hook.noise_multiplier == pytest.approx(2 * add.noise_multiplier)


@pytest.mark.parametrize("options, message", [
    ({"clip": 0, "noise_multiplier": 1.0}, "clip"),
    ({"clip": 1.0}, "exactly one of"),
    ({"clip": 1.0, "noise_multiplier": 1.0, "target_epsilon": 2.0}, "exactly one of"),
    ({"clip": 1.0, "noise_multiplier": -1.0}, "noise_multiplier"),
    ({"clip": 1.0, "noise_multiplier": 1.0, "adjacency": "swap"}, "adjacency"),
    ({"clip": 1.0, "noise_multiplier": 1.0, "accountant": "gdp"}, "accountant"),
])
def test_bad_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        ClientLevelDP(**options)


def test_delta_must_be_below_one_over_n():
    hook = ClientLevelDP(clip=1.0, noise_multiplier=1.0, delta=0.5)
    ctx = RunContext(config=None, seeds=Seeds(0), run_dir=None, num_clients=3, log=print, schedule=[[0]])
    with pytest.raises(ConfigError, match="1/N"):
        hook.setup(ctx)


def test_epsilon_accumulates_over_rounds_and_survives_resume(tmp_path):
    import defenses  # noqa: F401

    cfg = tiny_config(rounds=4, checkpoint_every=2, hooks=[{"name": "dp_client", "clip": 0.1, "noise_multiplier": 2.0}],
                      **{"data.num_domains": 3})
    # With 3 clients, δ must be < 1/3: the default 1e-5 is.
    full = Trainer(cfg, run_dir=tmp_path / "full").run()
    import json
    rounds = [json.loads(ln) for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    eps = [r["dp_client/epsilon_max"] for r in rounds if r["type"] == "round"]
    assert all(a < b for a, b in zip(eps, eps[1:])), eps
    Trainer(cfg, run_dir=tmp_path / "cut").run(stop_after=2)
    resumed = Trainer(cfg, run_dir=tmp_path / "cut").run(resume=True)
    assert resumed["hook_results"]["dp_client"]["epsilon_per_client"] == \
        full["hook_results"]["dp_client"]["epsilon_per_client"]
    assert resumed["accuracy"] == full["accuracy"]
    expected = gdp_epsilon(2 * math.sqrt(4) / 2.0, 1e-5)
    assert expected <= full["hook_results"]["dp_client"]["epsilon_max"] <= 1.15 * expected


def test_dp_noise_changes_what_the_server_sees_but_not_the_adapted_prompt(tmp_path):
    import defenses  # noqa: F401

    plain = Trainer(tiny_config(rounds=1), run_dir=tmp_path / "a")
    plain.run()
    noisy = Trainer(tiny_config(rounds=1, hooks=[{"name": "dp_client", "clip": 0.1, "noise_multiplier": 1.0}]),
                    run_dir=tmp_path / "b")
    noisy.run()
    # Round 1: same start, same local training, so the adapted prompts are identical ...
    for a, b in zip(plain.clients.states, noisy.clients.states):
        assert torch.equal(a.prompt, b.prompt)
    # ... while the server state, built from the noisy deltas, differs.
    assert not torch.equal(plain.server.p_base, noisy.server.p_base)


@pytest.mark.parametrize("hook", [{"name": "dp_client", "clip": 0.1, "noise_multiplier": 1.0},
                                  {"name": "dp_sgd", "clip": 1.0, "noise_multiplier": 1.0}])
def test_local_noise_is_secret_and_seeded_noise_reproducible(tmp_path, hook):
    import defenses  # noqa: F401

    def server_after(name, noise):
        t = Trainer(tiny_config(rounds=1, hooks=[{**hook, "noise": noise}]), run_dir=tmp_path / name)
        summary = t.run()
        assert summary["hook_results"][hook["name"]]["noise_source"] == noise
        return t.server.p_base.detach().clone()

    # Seeded: the same run twice is the same run. Local: a secret seed per release, so two runs of
    # one config differ — the server, which knows the run seed, cannot reproduce the noise.
    assert torch.equal(server_after("s1", "seeded"), server_after("s2", "seeded"))
    assert not torch.equal(server_after("l1", "local"), server_after("l2", "local"))
    with pytest.raises(ConfigError, match="noise='os' is not one of seeded, local"):
        Trainer(tiny_config(rounds=1, hooks=[{**hook, "noise": "os"}]), run_dir=tmp_path / "bad")


def test_seeded_noise_in_a_flower_deployment_is_flagged():
    from pfedpg.config import config_from_dict

    lines = []
    for superlink, noise, warned in [("10.0.0.1:9093", "seeded", True), ("10.0.0.1:9093", "local", False),
                                     (None, "seeded", False)]:
        cfg = config_from_dict({"engine": "flower",
                                "flower": {"superlink": superlink, "insecure": superlink is not None}})
        ctx = RunContext(config=cfg, seeds=Seeds(0), run_dir=None, num_clients=4, log=lines.append,
                         schedule=[[0, 1, 2, 3]])
        lines.clear()
        ClientLevelDP(clip=1.0, noise_multiplier=1.0, noise=noise).setup(ctx)
        assert any("WARNING dp_client" in ln and "noise: local" in ln for ln in lines) == warned


# ------------------------------------------------------------------------------------------------
# Mechanism-level audit on the exact client-side code path (DESIGN §6)


def test_clopper_pearson_and_epsilon_bound_by_hand():
    lo, hi = clopper_pearson(0, 10, 0.05)
    assert lo == 0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))
    lo, hi = clopper_pearson(10, 10, 0.05)
    assert hi == 1 and lo == pytest.approx(0.025 ** (1 / 10))
    # With no errors in 2000 trials per side the bound is ln((1 - δ - p_hi) / p_hi), p_hi = 1 - 0.025^(1/2000).
    eps, fpr_hi, _ = epsilon_lower_bound(fp=0, fn=0, n=2000, delta=0.0)
    assert eps == pytest.approx(math.log((1 - fpr_hi) / fpr_hi)) and 5.5 < eps < 6.5


class Broken(ClientLevelDP):
    """Deliberately broken variants that the audit must flag."""

    def __init__(self, mode, **kw):
        super().__init__(**kw)
        self.mode = mode

    @property
    def accounting_multiplier(self):
        if self.mode == "sensitivity_c":  # accounts as if replace had sensitivity C
            return self.noise_multiplier
        return super().accounting_multiplier

    def privatize(self, delta, generator):
        if self.mode == "half_noise":
            noise = torch.randn(delta.shape, generator=generator, dtype=delta.dtype)
            return clip_by_norm(delta, self.clip) + noise * (self.noise_multiplier * self.clip / 2)
        if self.mode == "noise_before_clip":
            noise = torch.randn(delta.shape, generator=generator, dtype=delta.dtype)
            return clip_by_norm(delta + noise * (self.noise_multiplier * self.clip), self.clip)
        return super().privatize(delta, generator)


def run_audit(hook, *, trials=2000, canary_norm=100.0):
    """Canaries +c / −c (replace), one release each (T = 1), through hook.outgoing_delta."""
    ctx = RunContext(config=None, seeds=Seeds(7), run_dir=None, num_clients=2, log=lambda m: None, schedule=[[0]])
    hook.setup(ctx)
    c = torch.randn(4, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = c / c.norm() * canary_norm * hook.clip  # large canaries: a correct mechanism clips them first

    def release(x, trial):
        return hook.outgoing_delta(ctx, client=0, round=trial + 1, delta=x)

    claim = make_accountant("rdp")
    claim.step(noise_multiplier=hook.accounting_multiplier, sample_rate=1.0)
    return audit_delta_mechanism(release, canary=c, other=-c, trials=trials, delta=hook.delta,
                                 claimed_epsilon=accountant_epsilon(claim, hook.delta),
                                 claimed_mu=1.0 / hook.accounting_multiplier)


@pytest.mark.parametrize("z", [1.0, 4.0])
def test_audit_lower_bound_stays_below_the_accountant(z):
    result = run_audit(ClientLevelDP(clip=1.0, noise_multiplier=z))
    assert not result.violated, result.to_dict()
    assert result.epsilon_lb < result.claimed_epsilon and result.mu_lb < result.claimed_mu
    # ... and the audit is not vacuous: it detects a real leak at this noise (μ = 2/z).
    assert result.mu_lb > 0.5 * (2 / z)


@pytest.mark.parametrize("mode", ["half_noise", "noise_before_clip"])
def test_audit_flags_broken_mechanisms(mode):
    result = run_audit(Broken(mode, clip=1.0, noise_multiplier=4.0))
    assert result.violated, result.to_dict()


def test_accounting_with_the_wrong_sensitivity_is_refused_at_the_first_release():
    """Accounting replace as if its sensitivity were C (z instead of z/2): the release record's
    accounting multiplier is not z / sensitivity, so the mechanism stops before any ε is reported
    (the audit above flagged it empirically before the record existed)."""
    with pytest.raises(ValueError, match="converts its noise to the accountant's unit wrongly"):
        run_audit(Broken("sensitivity_c", clip=1.0, noise_multiplier=4.0), trials=1)


# ------------------------------------------------------------------------------------------------
# The release itself against its closed form (issue 24): T releases through the hook's own client-side
# path (outgoing_delta), each from its own (client, round) stream, of deltas with norms on both sides
# of C. What was released minus the correctly clipped delta must be N(0, (zC)² I), independent from
# release to release, and the released deltas must be the clipped ones at scale 1.

RELEASE_Z, RELEASE_C, RELEASE_D, CLIENTS, ROUNDS = 0.5, 1.0, 64, 40, 100   # T = 4,000 releases


def _releases(hook):
    ctx = RunContext(config=None, seeds=Seeds(3), run_dir=None, num_clients=CLIENTS, log=lambda m: None,
                     schedule=[list(range(CLIENTS))] * ROUNDS)
    hook.setup(ctx)
    g = torch.Generator().manual_seed(11)
    deltas, released = [], []
    for r in range(1, ROUNDS + 1):
        for c in range(CLIENTS):
            d = torch.randn(4, RELEASE_D // 4, generator=g, dtype=torch.float64)
            d = d / d.norm() * RELEASE_C * float(torch.empty(1).uniform_(0.2, 5.0, generator=g))
            deltas.append(d)
            released.append(hook.outgoing_delta(ctx, client=c, round=r, delta=d.clone()))
    return torch.stack(deltas).reshape(len(deltas), -1), torch.stack(released).reshape(len(released), -1)


def _release_check(hook) -> tuple[list[str], dict]:
    """Checks and their power at this size (T = 4,000 releases of d = 64 numbers, z = 0.5, C = 1):

    - clipping: the released deltas regressed on the correctly clipped ones give the scale a with
      standard error zC/√(Σ|s|²) ≈ 0.008; |a − 1| > 5 SE flags. Clipping at 1.1C: a = 1.09 here
      (the clip binds on ~80 % of the deltas), 11 SE (power > 0.999); no clipping: a = 2.9;
      clipping after the noise: a = 0.55.
    - noise scale: the residual's std within 6/√(2·T·d) (0.84 % relative) of zC. Noise × 0.95 is
      6 tolerances off (30 sd; power 1); clipping after the noise shrinks the residual to 0.12.
    - noise independence: pairwise cosines of the residuals ~N(0, 1/d); |cos| > 7/√d (0.875) flags
      (the largest of 8 million pairs reads 0.62 here; a false alarm: below 1e-4). Reused noise
      gives cos = 1.
    """
    deltas, released = _releases(hook)
    norms = deltas.norm(dim=1, keepdim=True)
    clipped = deltas * (RELEASE_C / norms).clamp(max=1.0)
    resid = released - clipped
    facts, problems = {}, []
    facts["scale"] = float((released * clipped).sum() / (clipped * clipped).sum())
    facts["scale_se"] = RELEASE_Z * RELEASE_C / float((clipped * clipped).sum().sqrt())
    if abs(facts["scale"] - 1) > 5 * facts["scale_se"]:
        problems.append(f"clipping: released = {facts['scale']:.3f} × the clipped delta (± {facts['scale_se']:.3f})")
    facts["noise_std"] = float(resid.std())
    tol = 6 / (2 * resid.numel()) ** 0.5
    if abs(facts["noise_std"] / (RELEASE_Z * RELEASE_C) - 1) > tol:
        problems.append(f"noise: residual std {facts['noise_std']:.4f}, expected {RELEASE_Z * RELEASE_C} (± {tol:.2%})")
    unit = resid / resid.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    cos.fill_diagonal_(0)
    facts["max_cos"] = float(cos.abs().max())
    if facts["max_cos"] > 7 / RELEASE_D ** 0.5:
        problems.append(f"noise: two releases' noise has cosine {facts['max_cos']:.2f}")
    return problems, facts


class BrokenRelease(ClientLevelDP):
    """Broken releases the closed-form checks must flag (privatize is the whole client-side step)."""

    def __init__(self, mode, **kw):
        super().__init__(**kw)
        self.mode = mode

    def privatize(self, delta, generator):
        z, c = self.noise_multiplier, self.clip
        if self.mode == "noise_95":
            return (clip_by_norm(delta, c)
                    + torch.randn(delta.shape, generator=generator, dtype=delta.dtype) * (0.95 * z * c))
        if self.mode == "clip_110":
            return (clip_by_norm(delta, 1.1 * c)
                    + torch.randn(delta.shape, generator=generator, dtype=delta.dtype) * (z * c))
        if self.mode == "no_clip":
            return delta + torch.randn(delta.shape, generator=generator, dtype=delta.dtype) * (z * c)
        if self.mode == "clip_after_noise":
            return clip_by_norm(delta + torch.randn(delta.shape, generator=generator, dtype=delta.dtype) * (z * c), c)
        if self.mode == "reused_noise":
            return super().privatize(delta, torch.Generator().manual_seed(0))
        raise ValueError(self.mode)


def test_the_release_matches_its_closed_form():
    problems, facts = _release_check(ClientLevelDP(clip=RELEASE_C, noise_multiplier=RELEASE_Z))
    assert problems == [], facts
    assert facts["scale_se"] < 0.015  # the clipping check has the power its docstring states


@pytest.mark.parametrize("mode, flagged", [("noise_95", "noise"), ("clip_110", "clipping"), ("no_clip", "clipping"),
                                           ("clip_after_noise", "noise"), ("reused_noise", "noise")])
def test_broken_releases_are_flagged(mode, flagged):
    problems, facts = _release_check(BrokenRelease(mode, clip=RELEASE_C, noise_multiplier=RELEASE_Z))
    assert any(p.startswith(flagged) for p in problems), (problems, facts)


def test_both_dp_hooks_report_one_typed_result(tmp_path):
    """dp_client and dp_sgd end a run with the same shape (pfedpg.hooks.PrivacyResult): the unit, δ,
    and ε and z per client — no scalar-or-list for the sweep to tell apart."""
    from conftest import tiny_config

    import defenses  # noqa: F401  (registers the hooks)
    from pfedpg.privacy_result import PrivacyResult
    from pfedpg.run import Trainer

    for hook, unit in (({"name": "dp_client", "clip": 0.1, "noise_multiplier": 1.0}, "client"),
                       ({"name": "dp_sgd", "clip": 1.0, "noise_multiplier": 1.0}, "record")):
        t = Trainer(tiny_config(rounds=1, hooks=[hook]), run_dir=tmp_path / hook["name"])
        res = t.run()["hook_results"][hook["name"]]
        n = t.ctx.num_clients
        assert res["unit"] == unit and res["noise_multiplier"] == [1.0] * n and len(res["epsilon_per_client"]) == n
        assert res["epsilon_max"] == max(res["epsilon_per_client"]) > 0
        typed = next(h for h in t.hooks.hooks if h.name == hook["name"]).privacy_result(t.ctx)
        assert isinstance(typed, PrivacyResult) and typed.to_dict() == res
    with pytest.raises(ValueError, match="one ε and one z per client"):
        PrivacyResult(unit="client", delta=1e-5, epsilon=[1.0], noise_multiplier=[1.0, 1.0], statement={})
