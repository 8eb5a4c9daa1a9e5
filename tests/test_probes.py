"""Probe metrics and the descriptor attribute-inference probe (DESIGN §6)."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from attacks.attribute_inference import grouped_probe, out_of_fold_scores
from attacks.metrics import auc, balanced_accuracy_max, plot_roc, roc_curve, tpr_at_fpr


def test_auc_and_roc_agree_with_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = rng.normal(size=500) + 0.8 * y
    s[:50] = np.round(s[:50])  # ties
    assert auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, _ = roc_curve(s, y)
    sk_fpr, sk_tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_small_cases_by_hand_members_are_positive():
    # Members (label 1) score higher: perfect separation.
    assert auc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert auc([0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1]) == 0.0  # the positive class matters
    assert auc([0.5, 0.5], [1, 0]) == 0.5  # a tie counts one half
    assert balanced_accuracy_max([0.9, 0.8, 0.1, 0.2], [1, 0, 1, 0]) == 0.75


def test_tpr_at_fpr_resolution_and_interval():
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(2000), np.zeros(2000)].astype(int)
    s = np.r_[rng.normal(2, 1, 2000), rng.normal(0, 1, 2000)]
    r = tpr_at_fpr(s, y, 0.01)
    lo, hi = r["interval"]
    assert lo <= r["value"] <= hi and 0.2 < r["value"] < 0.55  # Φ(2 − 2.326) ≈ 0.37
    assert tpr_at_fpr(s, y, 0.001)["value"] == "unresolved"  # needs ≥ 10 / 0.001 = 10,000 non-members
    # Tied scores: a block of negatives straddles the target, so no threshold reaches it (RMIA's
    # discrete scores). Not 0.000.
    tied = np.r_[rng.normal(2, 1, 2000), np.where(rng.random(2000) < 0.05, 5.0, rng.normal(0, 1, 2000))]
    t = tpr_at_fpr(tied, y, 0.01)
    assert t["value"] == "unresolved" and t["reason"].startswith("tied scores")


def test_the_tpr_interval_covers_the_threshold_uncertainty():
    """Scores N(2, 1) vs N(0, 1), 1,000 negatives: TPR at 1 % FPR is Φ(2 − Φ⁻¹(0.99)) = 0.372. The
    threshold is set by the ~10 negatives above it, so a Clopper–Pearson interval on the TPR alone
    (given the threshold) covers the truth far less often than 95 % (measured: 19 of these 40 draws);
    the bootstrap that refits the threshold covers it (37 of 40). Over seeds (groups), the bootstrap
    resamples the seeds."""
    from scipy.stats import norm

    from attacks.epsilon_bounds import clopper_pearson

    truth = float(norm.cdf(2 - norm.ppf(0.99)))
    covered = {"bootstrap": 0, "clopper_pearson": 0}
    for seed in range(40):
        rng = np.random.default_rng(100 + seed)
        y = np.r_[np.ones(1000), np.zeros(1000)].astype(bool)
        s = np.r_[rng.normal(2, 1, 1000), rng.normal(0, 1, 1000)]
        r = tpr_at_fpr(s, y, 0.01, bootstrap=200)
        covered["bootstrap"] += r["interval"][0] <= truth <= r["interval"][1]
        lo, hi = clopper_pearson(round(r["value"] * 1000), 1000)
        covered["clopper_pearson"] += lo <= truth <= hi
    assert covered["bootstrap"] >= 34 and covered["clopper_pearson"] < covered["bootstrap"], covered
    seeds = np.tile(np.arange(4), 250)  # each seed a quarter of the positives and of the negatives
    grouped = tpr_at_fpr(np.r_[rng.normal(2, 1, 1000), rng.normal(0, 1, 1000)], y, 0.01, groups=np.r_[seeds, seeds])
    assert grouped["interval_method"].startswith("bootstrap over 4 groups")


def test_planted_property_is_found_and_shuffled_labels_are_not():
    rng = np.random.default_rng(0)
    n_clients, per = 40, 3  # each client contributes 3 feature vectors (e.g. rounds)
    groups = np.repeat(np.arange(n_clients), per)
    prop = np.repeat(rng.integers(0, 2, n_clients), per)
    x = rng.normal(size=(len(groups), 20))
    leak = x.copy()
    leak[:, 0] += 3.0 * prop  # the property written straight into the descriptor
    found = grouped_probe(leak, prop, groups, permutations=30, rng=np.random.default_rng(1))
    assert found["auc"] > 0.9 and found["permutation_p_value"] < 0.05
    none = grouped_probe(x, prop, groups, permutations=30, rng=np.random.default_rng(1))
    assert abs(none["auc"] - 0.5) < 0.2 and none["permutation_p_value"] > 0.05


def test_grouped_folds_never_split_a_client(monkeypatch):
    import attacks.attribute_inference as ai

    seen = []
    real = ai.GroupKFold

    class Spy(real):
        def split(self, x, y, groups):
            for train, test in super().split(x, y, groups):
                seen.append((set(groups[train]), set(groups[test])))
                yield train, test

    monkeypatch.setattr(ai, "GroupKFold", Spy)
    groups = np.repeat(np.arange(10), 4)
    y = np.repeat(np.arange(10) % 2, 4)
    out_of_fold_scores(np.random.default_rng(0).normal(size=(40, 5)), y, groups)
    assert seen and all(not (tr & te) for tr, te in seen)


def test_log_log_roc_plot(tmp_path):
    y = np.r_[np.ones(100), np.zeros(100)]
    s = np.r_[np.linspace(0.3, 1, 100), np.linspace(0, 0.7, 100)]
    assert plot_roc(tmp_path / "roc.png", {"loss": (s, y)}).is_file()


def test_membership_scores_find_memorised_canaries_and_not_shuffled_membership():
    import torch
    import torch.nn.functional as F
    from conftest import TINY_MODEL

    from attacks.membership import alignment_scores, confidence_scores, loss_scores
    from pfedpg.client import trainable_parameters
    from pfedpg.models import ModelConfig, PromptedViT, build_backbone

    with torch.random.fork_rng():
        torch.manual_seed(0)
        kw = dict(TINY_MODEL, embed_dim=32)
        model = PromptedViT(build_backbone(ModelConfig(weights="random", kwargs=kw)), num_prompts=3, num_classes=24)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, 8, 8, generator=g)
    y = torch.randperm(24, generator=g)  # a class of its own per record: only memorisation fits them
    members = torch.zeros(24, dtype=torch.bool)
    members[:6] = True
    labels = members.int().numpy()
    p0 = model.prompt.prompt.detach().clone()
    w0, b0 = model.head.weight.detach().clone(), model.head.bias.detach().clone()

    # Server side: after one local step on the members, −ΔP is their summed prompt gradient at the
    # prompt the server sent, so members' own gradients align with it (head known here: the planted case).
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    F.cross_entropy(model(x[members]), y[members], reduction="sum").backward()
    opt.step()
    delta = model.prompt.prompt.detach() - p0
    align = alignment_scores(model, prompt=p0, delta=delta, head_weight=w0, head_bias=b0, x=x, y=y)
    # Prompt gradients of a random one-block ViT share a low-rank subspace, so some non-members
    # align too: measured AUC ≈ 0.90 here, against 0.5 for no signal.
    assert auc(align.numpy(), labels) > 0.8

    # Observer with the final model: memorised members have low loss and high confidence.
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.5, momentum=0.9)
    for _ in range(150):
        loss = F.cross_entropy(model(x[members]), y[members])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert auc(loss_scores(model, x, y).numpy(), labels) > 0.9
    assert auc(confidence_scores(model, x, y).numpy(), labels) > 0.9
    # Shuffled membership: the same scores say nothing about a random split.
    shuffled = np.random.default_rng(0).permutation(labels)
    assert abs(auc(loss_scores(model, x, y).numpy(), shuffled) - 0.5) < 0.3
