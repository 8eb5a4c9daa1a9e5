"""Honest statistics (DESIGN §8): paired differences, their intervals and the verdicts built on them."""
import math

import pytest

from evaluations.privacy import aggregate, table_rows
from evaluations.stats import fmt_paired, mean_spread, paired, t95, verdict


def test_paired_interval_by_hand():
    p = paired({0: 0.60, 1: 0.70, 2: 0.80}, {0: 0.50, 1: 0.65, 2: 0.70})
    d = [0.10, 0.05, 0.10]
    m = sum(d) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / 2)
    assert p["mean"] == pytest.approx(m) and p["std"] == pytest.approx(sd)
    assert p["ci"] == pytest.approx((m - t95(2) * sd / math.sqrt(3), m + t95(2) * sd / math.sqrt(3)))
    assert t95(2) == pytest.approx(4.303, abs=1e-3)
    assert paired({0: 1.0, 5: 2.0}, {5: 1.5, 7: 0.0})["seeds"] == [5]  # only seeds both have


def test_verdicts_need_three_seeds_and_an_interval_that_excludes_zero():
    # A mean 0.6 points below local, but noisy across seeds -> level, not dominated.
    level = paired({0: 0.915, 1: 0.93, 2: 0.92}, {0: 0.921, 1: 0.925, 2: 0.93})
    assert level["mean"] < 0 and verdict(level) == "level with local"
    assert verdict(paired({0: 0.50, 1: 0.51, 2: 0.49}, {0: 0.60, 1: 0.60, 2: 0.61})) == "dominated (below local)"
    assert verdict(paired({0: 0.70, 1: 0.71, 2: 0.69}, {0: 0.60, 1: 0.60, 2: 0.61})) == "above local"
    one = paired({0: 0.2}, {0: 0.9})
    assert one["ci"] is None and verdict(one) == "too few seeds (1; a verdict needs 3)" and \
        fmt_paired(one) == "-70.0 (1 seed)"
    # Two seeds (or three identical differences): an interval of zero width is no evidence.
    two = paired({0: 0.7, 1: 0.8}, {0: 0.6, 1: 0.7})
    assert two["ci"] is not None and verdict(two) == "too few seeds (2; a verdict needs 3)"
    same = paired({0: 0.7, 1: 0.8, 2: 0.9}, {0: 0.6, 1: 0.7, 2: 0.8})
    assert verdict(same) == "no spread over the 3 seeds: no interval"


def test_one_seed_has_no_spread_anywhere():
    assert mean_spread([0.5], scale=100) == "50.0" and mean_spread([0.5, 0.7], scale=100) == "60.0 ± 14.1"
    rows = [{"status": "ok", "mechanism": m, "target_epsilon": None, "noise_multiplier": None, "epsilon_max": e,
             "accuracy_mean": a, "accuracy_worst": a, "accuracy_generated_mean": None, "seed": 0}
            for m, e, a in (("local", None, 0.5), ("nonprivate", math.inf, 0.6))]
    header, body = table_rows(aggregate(rows))
    text = " ".join(" ".join(r) for r in body)
    assert "±" not in text and "too few seeds (1" in text
    rows += [{**r, "seed": 1, "accuracy_mean": r["accuracy_mean"] + 0.1, "accuracy_worst": r["accuracy_worst"]}
             for r in rows]
    header, body = table_rows(aggregate(rows))
    nonprivate = body[[r[0] for r in body].index("nonprivate")]
    assert nonprivate[header.index("accuracy % (mean)")] == "65.0 ± 7.1"
    assert nonprivate[header.index("vs local")] == "too few seeds (2; a verdict needs 3)"  # +10 on both: sd 0
