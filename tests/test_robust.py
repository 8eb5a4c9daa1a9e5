"""Robust aggregation rules on hand-built vectors (Prepare / Execute / Assert), DESIGN §4, §7."""
import pytest
import torch
from conftest import tiny_config

from defenses.robust import (
    AGGREGATION_RULES,
    RobustAggregation,
    coordinate_median,
    geometric_median,
    multi_krum_select,
    trimmed_mean,
)
from pfedpg.errors import ConfigError
from pfedpg.hooks import RunContext
from pfedpg.run import Trainer
from pfedpg.seeding import Seeds
from pfedpg.server import ClientGradients, plain_aggregate


def benign_and_outliers(m=11, f=2, p=5, scale=100.0):
    g = torch.Generator().manual_seed(0)
    benign = 1.0 + 0.1 * torch.randn(m - f, p, generator=g, dtype=torch.float64)
    outliers = scale * torch.ones(f, p, dtype=torch.float64)
    return benign, torch.cat([benign, outliers])


def test_median_by_hand():
    g = torch.tensor([[1.0, 5.0], [2.0, 6.0], [10.0, -4.0], [3.0, 0.0]])
    assert torch.equal(coordinate_median(g), torch.tensor([2.5, 2.5]))  # [1,2,3,10] and [-4,0,5,6]


def test_trimmed_mean_by_hand():
    g = torch.tensor([[1.0], [2.0], [3.0], [100.0], [-50.0]])
    assert torch.equal(trimmed_mean(g, 1), torch.tensor([2.0]))


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "geometric_median", "bulyan", "multi_krum", "krum"])
def test_with_f_outliers_the_result_stays_in_the_benign_range(rule):
    benign, stack = benign_and_outliers()
    agg, _ = RobustAggregation(rule=rule, f=2).combine(stack)
    lo, hi = benign.min(0).values, benign.max(0).values
    assert bool(((agg >= lo - 1e-9) & (agg <= hi + 1e-9)).all()), (rule, agg)


def test_krum_picks_a_benign_vector_and_multi_krum_excludes_the_outliers():
    _, stack = benign_and_outliers()
    (i,) = multi_krum_select(stack, 2, 1)
    assert i < 9
    assert multi_krum_select(stack, 2, 9) == list(range(9))


def test_geometric_median_ignores_outliers():
    benign, stack = benign_and_outliers(m=11, f=2)
    assert (geometric_median(stack) - benign.mean(0)).norm() < 0.2


def test_norm_clip_and_centered_clip_bound_an_outlier():
    benign, stack = benign_and_outliers()
    for rule in ("norm_clip", "centered_clip"):
        agg, _ = RobustAggregation(rule=rule, f=2).combine(stack)
        assert (agg - benign.mean(0)).norm() < 0.5 * benign.mean(0).norm(), rule


def test_mean_rule_reproduces_the_plain_update():
    g = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = ClientGradients([0, 1, 2, 3], g, torch.ones(4, dtype=torch.float64))
    out = RobustAggregation(rule="mean").aggregate(None, round=1, grads=grads)
    torch.testing.assert_close(out, plain_aggregate(grads), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rule, f, m", [("krum", 1, 4), ("bulyan", 1, 6), ("trimmed_mean", 2, 4)])
def test_preconditions_are_config_errors(rule, f, m):
    hook = RobustAggregation(rule=rule, f=f)
    ctx = RunContext(config=None, seeds=Seeds(0), run_dir=None, num_clients=m, log=print, schedule=[list(range(m))])
    with pytest.raises(ConfigError, match="needs at least"):
        hook.setup(ctx)


def test_bad_options():
    with pytest.raises(ConfigError, match="rule"):
        RobustAggregation(rule="average")
    with pytest.raises(ConfigError, match="f="):
        RobustAggregation(rule="median", f=-1)
    assert len(AGGREGATION_RULES.names()) == 9
    # each rule owns its options: radius belongs to the clipping rules, iters to centered_clip
    with pytest.raises(ConfigError, match="rule median: unknown option 'radius'; its options are"):
        RobustAggregation(rule="median", radius=0.5)
    with pytest.raises(ConfigError, match="rule norm_clip: unknown option 'iters'; its options are radius"):
        RobustAggregation(rule="norm_clip", iters=2)
    with pytest.raises(ConfigError, match="iters=0 must be an integer >= 1"):
        RobustAggregation(rule="centered_clip", iters=0)
    assert RobustAggregation(rule="centered_clip", radius=2.0, iters=5).rule.iters == 5


def test_a_robust_run_and_its_exclusions(tmp_path):
    import defenses  # noqa: F401

    cfg = tiny_config(rounds=2, hooks=[{"name": "robust_aggregation", "rule": "multi_krum", "f": 0}],
                      **{"data.num_domains": 3})
    summary = Trainer(cfg, run_dir=tmp_path / "r").run()
    # f = 0: multi-Krum selects all n - f = 3 clients, so none is ever excluded.
    assert summary["hook_results"]["robust_aggregation"]["excluded_per_round"] == {"1": [], "2": []}
    plain = Trainer(tiny_config(rounds=2), run_dir=tmp_path / "p").run()
    # f = 0 multi-Krum keeps every client: the same run as the plain sum, up to summation order.
    assert summary["accuracy"]["mean"] == pytest.approx(plain["accuracy"]["mean"], abs=0.05)


def test_each_rule_is_a_registered_class_with_its_precondition():
    from defenses.robust import Rule, min_clients

    assert all(issubclass(AGGREGATION_RULES.get(r), Rule) for r in AGGREGATION_RULES.names())
    assert {r: min_clients(r, 2) for r in ("krum", "multi_krum", "bulyan", "trimmed_mean", "mean", "norm_clip")} == \
        {"krum": 7, "multi_krum": 7, "bulyan": 11, "trimmed_mean": 5, "mean": 1, "norm_clip": 1}


def test_the_old_option_name_clip_still_works_with_a_warning():
    from pfedpg.deprecation import RenamedKeyWarning
    from pfedpg.hooks import build_hooks

    _, stack = benign_and_outliers()
    with pytest.warns(RenamedKeyWarning, match="robust_aggregation.clip is renamed robust_aggregation.radius"):
        (old,) = build_hooks([{"name": "robust_aggregation", "rule": "norm_clip", "clip": 0.5}]).hooks
    new = RobustAggregation(rule="norm_clip", radius=0.5)
    assert old.rule.radius == 0.5
    assert torch.equal(old.combine(stack)[0], new.combine(stack)[0])
    with pytest.raises(ConfigError, match="keep only robust_aggregation.radius"):
        build_hooks([{"name": "robust_aggregation", "rule": "norm_clip", "clip": 0.5, "radius": "auto"}])
    with pytest.raises(ConfigError, match="radius"):
        RobustAggregation(rule="norm_clip", radius=-1.0)
