"""The leakage audit (DESIGN §6): one-run ε bound, LiRA, linkability, source inference, pooled
attribute probes, the leakage_audit hook inside a run, and `pfedpg-eval audit`."""
import json
import math
import re

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_MODEL, tiny_config

from attacks.attribute_inference import client_properties, pooled_property_probe
from attacks.epsilon_bounds import one_run_audit, one_run_epsilon_lower_bound, one_run_p_value
from attacks.leakage import dp_region
from attacks.linkability import linkability, source_inference
from attacks.lira import lira_scores
from pfedpg.errors import ConfigError


# --- one-run bound (Steinke, Nasr & Jagielski 2023) ------------------------------------------------
def test_one_run_bound_by_hand_and_monotone():
    # r = v = 100 correct guesses, δ = 0: P[Binom(100, q) >= 100] = q^100 < 0.05 ⇔ q > 0.05^(1/100).
    q = 0.05 ** (1 / 100)
    assert one_run_epsilon_lower_bound(m=100, r=100, v=100, delta=0) == pytest.approx(math.log(q / (1 - q)), abs=1e-3)
    # More correct guesses certify more; δ > 0 certifies less; chance-level guessing certifies nothing.
    assert one_run_epsilon_lower_bound(m=200, r=100, v=90, delta=0) < \
        one_run_epsilon_lower_bound(m=200, r=100, v=95, delta=0)
    assert one_run_epsilon_lower_bound(m=1000, r=100, v=95, delta=1e-4) < \
        one_run_epsilon_lower_bound(m=1000, r=100, v=95, delta=0)
    assert one_run_epsilon_lower_bound(m=200, r=100, v=52, delta=0) == 0.0
    assert one_run_p_value(m=10, r=10, v=0, epsilon=1.0, delta=0) == 1.0


def test_one_run_audit_finds_a_planted_leak_and_not_noise():
    rng = np.random.default_rng(0)
    inc = rng.random(400) < 0.5
    leak = one_run_audit(inc + 0.01 * rng.normal(size=400), inc, delta=1e-5)
    assert leak["correct"] == leak["guesses"] and leak["epsilon_lower_bound"] > 3
    none = one_run_audit(rng.normal(size=400), inc, delta=1e-5)
    assert none["epsilon_lower_bound"] < 0.5


def test_one_run_bound_stays_below_epsilon_of_a_gaussian_mechanism_and_flags_broken_ones():
    """Canaries through a real (ε, δ)-DP Gaussian release. Sized so the audit *can* fail: its cap
    (every guess right) is well above the accountant's ε. The correct mechanism stays below ε in
    every trial; the same release with the noise removed, or with a quarter of it, is flagged."""
    from pfedpg.gdp import gdp_epsilon

    rng = np.random.default_rng(1)
    mu = 0.5  # sensitivity / σ
    eps = gdp_epsilon(mu, 1e-5)  # ≈ 2.0
    flagged = {"none": 0, "quarter": 0}
    for trial in range(5):
        inc = rng.random(2000) < 0.5
        noise = rng.normal(size=2000)
        res = one_run_audit(mu * inc + noise, inc, delta=1e-5, guess_fraction=0.2)
        assert res["epsilon_cap"] > 2 * eps  # ≈ 4.8: a violation could show
        assert 0 < res["epsilon_lower_bound"] <= eps
        for name, scale in (("none", 0.0), ("quarter", 0.25)):  # the noise the accountant was not told of
            broken = one_run_audit(mu * inc + scale * noise, inc, delta=1e-5, guess_fraction=0.2)
            flagged[name] += broken["epsilon_lower_bound"] > eps
    assert flagged == {"none": 5, "quarter": 5}
    # (Half the noise — true ε ≈ 4.4 — is not reliably flagged by 2,000 canaries: the bound reaches
    # 1.5-1.8 there. The one-run audit is a coarse instrument; tests/test_dp_sgd.py checks the noise
    # itself.)


def test_dp_region_is_the_hypothesis_testing_limit():
    f = np.array([0.0, 1e-3, 0.1, 0.5, 1.0])
    assert dp_region(0.0, 0.0, f) == pytest.approx(f)  # ε = 0: nothing beats chance
    r = dp_region(1.0, 1e-5, f)
    assert np.all(r <= np.minimum(1, math.e * f + 1e-5) + 1e-12) and r[-1] == 1.0


# --- LiRA, linkability, source inference ------------------------------------------------------------
def test_lira_offline_and_online_rank_members_first():
    from attacks.metrics import auc

    rng = np.random.default_rng(0)
    n, s = 300, 8
    difficulty = rng.normal(0, 2, size=n)  # per-record baseline φ: what per-record calibration removes
    member = rng.random(n) < 0.5
    target = difficulty + 1.0 * member + 0.3 * rng.normal(size=n)
    shadow_out = difficulty + 0.3 * rng.normal(size=(s, n))
    offline = lira_scores(target, shadow_out)
    assert auc(offline, member) > 0.9 and auc(target, member) < 0.8  # calibration is what makes LiRA strong
    in_mask = np.zeros((s, n), bool)
    for j in range(n):
        in_mask[rng.permutation(s)[: s // 2], j] = True
    shadow = difficulty + 1.0 * in_mask + 0.3 * rng.normal(size=(s, n))
    assert auc(lira_scores(target, shadow, in_mask), member) > 0.9
    shuffled = rng.permutation(member)
    assert abs(auc(offline, shuffled) - 0.5) < 0.1


def test_linkability_and_source_inference_on_planted_structure():
    g = torch.Generator().manual_seed(0)
    centers = [torch.randn(4, 8, generator=g) for _ in range(5)]
    releases = {n: [c + 0.3 * torch.randn(4, 8, generator=g) for _ in range(6)] for n, c in enumerate(centers)}
    res = linkability(releases)
    assert res["top1_accuracy"] == 1.0 and res["chance"] == 0.2 and res["auc"] > 0.95
    noise = {n: [torch.randn(4, 8, generator=g) for _ in range(6)] for n in range(5)}
    assert linkability(noise)["top1_accuracy"] < 0.7
    owners = np.repeat([3, 5, 7], 20)
    scores = np.random.default_rng(0).normal(size=(60, 3))
    scores[np.arange(60), np.repeat([0, 1, 2], 20)] += 5
    src = source_inference(scores, owners, [3, 5, 7])
    assert src["top1_accuracy"] == 1.0 and src["chance"] == pytest.approx(1 / 3) and src["auc"] > 0.99


def test_client_properties_and_pooled_probe_on_a_planted_descriptor_property():
    info = [{"domain": n % 3, "label_counts": [10, 10, 0 if n < 6 else 10], "domain_names": ["a", "b", "c"]}
            for n in range(12)]
    props = client_properties(info)
    assert set(props) == {"domain=a", "domain=b", "domain=c", "has_class=2", "label_skew"}
    assert props["has_class=2"].tolist() == [False] * 6 + [True] * 6
    rng = np.random.default_rng(0)
    # Descriptors that carry the domain in two coordinates (a planted leak), 4 rounds per client.
    feats = {n: [np.r_[3.0 * np.eye(3)[n % 3], rng.normal(size=20)] + 0.3 * rng.normal(size=23) for _ in range(4)]
             for n in range(12)}
    domain_only = {k: v for k, v in props.items() if k.startswith("domain")}
    res = pooled_property_probe(feats, domain_only, permutations=20, rng=rng, shadow_clients=[8, 9, 10, 11])
    assert res["auc"] > 0.9 and res["permutation_p_value"] <= 0.05 and res["transfer"]["auc"] > 0.9
    noise = {n: [rng.normal(size=23) for _ in range(4)] for n in range(12)}
    null = pooled_property_probe(noise, domain_only, permutations=20, rng=rng)
    assert null["permutation_p_value"] > 0.05 and abs(null["auc"] - 0.5) < 0.2


# --- the hook inside a run --------------------------------------------------------------------------
def audit_hook(**extra):
    return {"name": "leakage_audit", "shadow_clients": 2, "targets_per_client": 20, "permutations": 3,
            "source_targets_per_client": 5, "lira": {"shadows": 2, "epochs": 1}, "canaries": {"per_client": 8}, **extra}


def run_with(tmp_path, hooks, name="run", **overrides):
    from evaluations.plugins import load_plugins
    from pfedpg.run import Trainer

    load_plugins()
    cfg = tiny_config(**{"data.clients_per_domain": 2, "rounds": 3, "hooks": hooks, **overrides})
    return Trainer(cfg, run_dir=tmp_path / name).run(), tmp_path / name


def test_leakage_audit_hook_writes_every_probe(tmp_path):
    summary, run_dir = run_with(tmp_path, [audit_hook()])
    audit = json.loads((run_dir / "audit" / "audit.json").read_text())
    probes = audit["probes"]
    assert {"attribute_descriptor", "attribute_prompt", "attribute_delta", "linkability", "loss", "confidence",
            "alignment", "lira", "source", "canary"} <= set(probes)
    assert audit["targets"] == [0, 1, 2, 3] and audit["shadow_clients"] == [4, 5]
    for name in ("loss", "alignment", "lira"):
        p = probes[name]
        assert p["n_targets"] == 4 * 40 and p["n_positives"] == 80 and 0 <= p["auc"] <= 1
        assert "tpr_at_1pct_fpr" in p and "tpr_at_0.1pct_fpr" in p and p["threat_model"]
        assert p["dp_envelope"] is None  # no DP in this run
    assert probes["canary"]["observer"]["canaries"] == 4 * 8 and \
        probes["canary"]["observer"]["accountant_epsilon"] is None
    assert (run_dir / "audit" / "roc.png").stat().st_size > 0
    scores = np.load(run_dir / "audit" / "scores.npz")
    assert len(scores["loss__scores"]) == 160
    assert summary["hook_results"]["leakage_audit"]["probes"]["loss"]["auc"] == probes["loss"]["auc"]


def test_canary_audit_is_deterministic(tmp_path):
    s1, d1 = run_with(tmp_path, [audit_hook(probes=["canary"])], "a")
    s2, d2 = run_with(tmp_path, [audit_hook(probes=["canary"])], "b")
    a1 = json.loads((d1 / "audit" / "audit.json").read_text())["probes"]["canary"]
    a2 = json.loads((d2 / "audit" / "audit.json").read_text())["probes"]["canary"]
    assert a1 == {**a2, "seconds": a1["seconds"], "seconds_per_training_round": a1["seconds_per_training_round"]}
    assert s1["accuracy"] == s2["accuracy"]


# A run built to memorise (issue 24): 12 clients of 4 training records, 40 local epochs, no DP, 10
# target clients (4 members and 8 held-out non-members each: 120 targets, so an AUC has sd ≈ 0.05).
# The probes must find the leak; label, model or flag mix-ups in their wiring then fail these tests.
MEMORISE = {"data.clients_per_domain": 4, "data.max_train_per_client": 4, "data.max_test_per_client": 8,
            "client.batch_size": 4, "client.local_epochs": 40, "client.lr": 0.1, "server.lr": 0.01,
            "model.kwargs.embed_dim": 32}


def test_the_probes_find_a_planted_membership_leak(tmp_path):
    """Measured: loss 0.94, LiRA 0.885, RMIA 0.855 (4 shadows / 2 references trained like a client).
    Inverted member labels give 1 − AUC, RMIA reading a reference model instead of the target ≈ 0.5:
    both fail the thresholds, which sit ≥ 3 sd below the measured values."""
    hook = {"name": "leakage_audit", "shadow_clients": 2, "targets_per_client": 8, "probes": ["loss", "lira", "rmia"],
            "lira": {"shadows": 4, "epochs": 40}, "rmia": {"references": 2, "epochs": 40, "population": 50}}
    _, run_dir = run_with(tmp_path, [hook], **MEMORISE)
    probes = json.loads((run_dir / "audit" / "audit.json").read_text())["probes"]
    assert probes["loss"]["n_targets"] == 10 * 12 and probes["loss"]["n_positives"] == 40
    assert probes["loss"]["auc"] > 0.8 and probes["lira"]["auc"] > 0.7 and probes["rmia"]["auc"] > 0.7, \
        {k: v["auc"] for k, v in probes.items()}
    scores = np.load(run_dir / "audit" / "scores.npz")
    for name in ("lira", "rmia"):  # every probe scores the same targets with the same labels
        assert np.array_equal(scores[f"{name}__labels"], scores["loss__labels"])


def test_the_canary_audit_finds_planted_canaries(tmp_path):
    """Canaries (uniform-noise images with random labels, each included with probability ½) in the
    memorising run: the observer's one-run bound is clearly above 0 (measured 3.2, cap 4.0); with the
    inclusion flags inverted it is 0."""
    hook = {"name": "leakage_audit", "shadow_clients": 2, "probes": ["canary"], "canaries": {"per_client": 32}}
    _, run_dir = run_with(tmp_path, [hook], **MEMORISE)
    obs = json.loads((run_dir / "audit" / "audit.json").read_text())["probes"]["canary"]["observer"]
    assert obs["canaries"] == 10 * 32 and obs["auc"] > 0.85, obs
    assert obs["epsilon_lb"] > 1.5 and obs["bounds"]["steinke"]["epsilon_lb"] > 1.5, obs


def test_system_level_epsilon_lower_bound_stays_below_the_accountant_with_dp(tmp_path):
    """Canaries inside real runs with DP-SGD and with client-level DP: the one-run bound of every
    covered view stays below the accountant's ε (and the envelope is reported), and every covered view
    states its cap and whether it could have failed.

    The DP-SGD run is sized so that it can fail (issue 24): the memorising run, one round of 100
    local epochs at z = 16, δ = 1e-5 — accountant ε = 1.22, the observer's cap 3.96. Measured: the
    correct mechanism's bound 0.0; the same run with the noise removed (the accountant still told
    z = 16) 2.24, a violation. The dp_client run only checks the bookkeeping: the server's canary
    score (alignment) does not separate the canaries even without noise at this size (AUC ≈ 0.46),
    so its audit cannot fail — dp_client's release is checked against its closed form in
    tests/test_dp_client.py."""
    sgd = {"name": "dp_sgd", "clip": 1.0, "noise_multiplier": 16.0, "delta": 1e-5}
    summary, run_dir = run_with(tmp_path, [{"name": "leakage_audit", "shadow_clients": 2,
                                            "probes": ["canary", "loss", "attribute"],
                                            "permutations": 2, "canaries": {"per_client": 32}}, sgd], "dp_sgd",
                                **{**MEMORISE, "rounds": 1, "client.local_epochs": 100})
    probes = json.loads((run_dir / "audit" / "audit.json").read_text())["probes"]
    # record-level DP covers the record probes, not the client-property ones (DESIGN §5)
    assert probes["loss"]["dp_envelope"] is not None and probes["attribute_delta"]["dp_envelope"] is None
    obs = probes["canary"]["observer"]
    assert obs["accountant_epsilon"] < 1.5 and obs["can_fail"] and obs["epsilon_cap"] > 2 * obs["accountant_epsilon"]
    assert not obs["violation"] and obs["epsilon_lb"] <= obs["accountant_epsilon"], obs
    assert all(not b["violation"] for b in obs["bounds"].values()), obs["bounds"]
    client = {"name": "dp_client", "clip": 0.1, "noise_multiplier": 2.0}
    summary, run_dir = run_with(tmp_path, [audit_hook(canaries={"per_client": 32}), client], "dp_client",
                                **{"server.lr": 0.001})
    probes = json.loads((run_dir / "audit" / "audit.json").read_text())["probes"]
    covered = [probes["canary"][s] for s in ("observer", "server") if probes["canary"][s]["accountant_epsilon"]]
    assert covered
    for c in covered:
        assert c["epsilon_lb"] <= c["accountant_epsilon"] and not c["violation"]
        assert c["epsilon_lb"] <= c["epsilon_cap"]
        assert c["can_fail"] == (c["epsilon_cap"] > c["accountant_epsilon"])
    # server views covered, observer views not (DESIGN §5)
    assert probes["alignment"]["dp_envelope"] is not None and probes["loss"]["dp_envelope"] is None


@pytest.mark.parametrize("options, message", [
    ({"shadow_clients": 0, "probes": ["lira"]}, "needs auxiliary data"),
    ({"shadow_clients": 1, "probes": ["canary"]}, "needs canaries"),
    ({"probes": ["nope"]}, "unknown probe"),
    ({"shadow_clients": 1, "lira": {"shadow": 3}}, "unknown key"),
])
def test_bad_audit_options_are_config_errors(options, message):
    from attacks.leakage import LeakageAudit

    with pytest.raises(ConfigError, match=message):
        LeakageAudit(**options)


def test_too_many_shadows_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="leaves no target"):
        run_with(tmp_path, [{"name": "leakage_audit", "shadow_clients": 6}])


# --- the CLI and the privacy-sweep columns ----------------------------------------------------------
def audit_file(tmp_path, **audit):
    base = {"rounds": 2, "checkpoint_every": 0, "server": {"lr": 0.001},
            "data": {"image_size": 8, "num_domains": 3, "clients_per_domain": 2, "max_train_per_client": 32,
                     "max_test_per_client": 30},
            "model": {"weights": "random", "kwargs": dict(TINY_MODEL), "num_prompts": 2}, "client": {"batch_size": 16}}
    section = {"seeds": [0, 1], "mechanisms": {"dp_client": {"clip": 0.1}}, "target_epsilons": [8.0],
               "baselines": ["nonprivate"], "out_dir": str(tmp_path / "audit"),
               "probes": {"shadow_clients": 2, "targets_per_client": 10, "permutations": 2,
                          "lira": {"shadows": 2, "epochs": 1}, "probes": ["loss", "alignment", "lira", "linkability"]},
               **audit}
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump({"base": base, "audit": section}))
    return path


def test_audit_cli_pools_seeds_and_writes_the_report(tmp_path, capsys):
    from evaluations.cli import main
    from evaluations.leakage_pooling import auc_reading
    from pfedpg import jsonio

    assert main(["audit", "--config", str(audit_file(tmp_path))]) == 0
    out = tmp_path / "audit"
    audit = jsonio.read(out / "audit.json")
    assert set(audit["groups"]) == {"nonprivate", "dp_client-eps8"}
    for group in audit["groups"].values():
        loss = group["probes"]["loss"]
        assert loss["runs"] == 2 and loss["n_targets"] == 2 * 4 * 20  # 2 seeds x 4 targets x (10 + 10)
        for key in ("auc", "auc_interval", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "n_targets", "threat_model"):
            assert key in loss
        assert loss["auc_interval"][0] <= loss["auc"] <= loss["auc_interval"][1]
        assert loss["auc_interval_method"] == "bootstrap over 2 groups (seeds)"
    dp = audit["groups"]["dp_client-eps8"]
    assert dp["probes"]["alignment"]["dp_envelope"]["epsilon"] == pytest.approx(8.0, rel=0.01)
    for f in ("report.md", "report.html", "roc_nonprivate.png", "roc_dp_client-eps8.png"):
        assert (out / f).stat().st_size > 0
    from test_privacy_sweep import assert_self_contained_report

    assert_self_contained_report(out)
    stdout, stderr = capsys.readouterr()
    assert "dp_client-eps8: AUC" in stdout
    # Each AUC with its 95% interval, in the table and on the terminal (issue 32).
    report = (out / "report.md").read_text()
    for group in audit["groups"].values():
        loss = auc_reading(group["probes"]["loss"])
        assert f"AUC {loss};" in report and f"loss {loss}" in stdout and " [" in loss
    # 2 seeds x 4 targets x 10 non-members resolve no TPR: said in words, no empty plot drawn.
    assert not (out / "tpr_vs_epsilon.png").exists() and "tpr_vs_epsilon.png" not in report
    assert re.search(r"TPR at 1% FPR is unresolved for every probe and group: the largest pool holds \d+ non-members "
                     r"and a TPR at 1% FPR needs 1,000", report) and "TPR at 0.1% FPR is unresolved" in report
    # A cell's line: its accuracy in percent (summary.json keeps the fraction), then how far the grid is.
    acc = jsonio.read(out / "runs" / "nonprivate-s0" / "summary.json")["accuracy"]["mean"]
    line = next(ln for ln in stderr.splitlines() if "nonprivate-s0:" in ln)
    assert f"accuracy {100 * acc:.2f} % (on cpu) — " in line and "4 cell(s) to run" in stderr
    assert "1/4 run; about" in next(ln for ln in stderr.splitlines() if ln.startswith("[1/4]"))
    # Rerunning reuses every finished cell (nothing is retrained) and rewrites the same numbers.
    assert main(["audit", "--config", str(audit_file(tmp_path))]) == 0
    assert json.loads((out / "audit.json").read_text())["groups"] == audit["groups"]
    # audit.tex (the report's table) and the plots' PDFs, written again from the folder: the same bytes.
    before = {f: (out / f).read_bytes() for f in ("audit.tex", "roc_nonprivate.pdf", "roc_dp_client-eps8.pdf")}
    assert rb"\toprule" in before["audit.tex"] and rb"dp\_client-eps8" in before["audit.tex"]
    for f in before:
        (out / f).unlink()
    assert main(["report", str(out), "--format", "latex"]) == 0
    assert {f: (out / f).read_bytes() for f in before} == before
    assert not list(out.glob("tpr_vs_epsilon.*"))  # nothing resolves: no empty plot, in either format


def test_audit_cli_with_client_canaries(tmp_path):
    """audit.client_canaries adds canary clients to every cell without record-level DP, before the DP
    hook: audit.json holds their pooled bounds and estimate beside the claim and the accountant's ε,
    and the record-level probes keep every training client as a target."""
    from evaluations.cli import main

    path = audit_file(tmp_path, client_canaries={"clients": 30, "null_directions": 100})
    assert main(["audit", "--config", str(path)]) == 0
    from test_reporting import assert_strict_json

    # Strict JSON in every file the grid wrote (ε = ∞ of the non-private cells and the estimate included).
    assert assert_strict_json(tmp_path / "audit") >= 16
    env = json.loads((tmp_path / "audit" / "runs" / "nonprivate-s0" / "env.json").read_text())
    from pfedpg import __version__

    assert env["pfedpg_eval"] == __version__ and env["opacus"] and env["timm"] and "git" in env
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    cc = audit["groups"]["dp_client-eps8"]["probes"]["client_canary"]
    assert cc["runs"] == 2 and cc["canary_clients"] == 60 and cc["releases"]["canaries"] == 60
    assert cc["releases"]["estimate"]["null_directions"] == 200 and len(cc["epsilon_lb_per_seed"]) == 2
    assert cc["releases"]["estimate"]["resampled"].startswith("seeds")  # pooled: seeds resampled first
    assert cc["accountant_epsilon"] == pytest.approx(8.0, rel=0.01) and cc["claimed_epsilon"] < cc["accountant_epsilon"]
    for key in ("epsilon_lb", "epsilon_cap", "family", "claimed_epsilon", "can_fail", "violation"):
        assert key in cc and key in cc["releases"]
    assert cc["releases"]["bounds"]["steinke"]["method"] == "Steinke et al. 2023"
    assert audit["groups"]["nonprivate"]["probes"]["client_canary"]["accountant_epsilon"] is None
    assert audit["groups"]["nonprivate"]["probes"]["loss"]["n_targets"] == 2 * 4 * 20  # every training client a target
    run = next((tmp_path / "audit" / "runs").glob("dp_client-eps8-s0"))
    hooks = [h["name"] for h in yaml.safe_load((run / "config.yaml").read_text())["hooks"]]
    assert hooks.index("client_canary_audit") < hooks.index("dp_client")
    report = (tmp_path / "audit" / "report.md").read_text()
    assert "ε_lb" in report and "what each bound can and cannot show" in report


@pytest.mark.parametrize("audit, message", [
    ({"client_canaries": {"clients": 0}}, "client_canary_audit.clients=0"),
    ({"gradient_canaries": {"canaries": 100}}, "add dp_sgd to audit.mechanisms"),
    ({"baselines": ["local"]}, "cannot be audited"),
    ({"probes": {"shadow_clients": 0, "probes": ["lira"]}}, "needs auxiliary data"),
    ({"probes": {"shadows": 2}}, "unexpected keyword"),
])
def test_bad_audit_files_are_config_errors(tmp_path, audit, message):
    from evaluations.leakage_sweep import load_audit

    with pytest.raises(ConfigError, match=message):
        load_audit(audit_file(tmp_path, **audit))


def test_privacy_sweep_gains_probe_columns(tmp_path):
    import csv

    from evaluations.privacy import load_sweep, run_sweep

    path = audit_file(tmp_path)
    tree = yaml.safe_load(path.read_text())
    priv = tree.pop("audit")
    priv["audit"] = priv.pop("probes")
    priv.update(seeds=[0], baselines=["nonprivate", "local"], out_dir=str(tmp_path / "sweep"))
    tree["privacy"] = priv
    path.write_text(yaml.safe_dump(tree))
    sweep, base = load_sweep(path)
    out = run_sweep(sweep, base, log=lambda m: None)
    rows = {r["cell"]: r for r in csv.DictReader(open(out / "tradeoff.csv"))}
    assert rows["nonprivate-s0"]["loss_auc"] and \
        rows["dp_client-eps8-s0"]["alignment_tpr_at_0.1pct_fpr"] == "unresolved"
    assert rows["local-s0"]["loss_auc"] == ""  # local sends nothing: no audit hook
    assert float(rows["dp_client-eps8-s0"]["epsilon_max"]) == pytest.approx(8.0, rel=0.01)
    # one seed of 4 targets x 10 non-members resolves no TPR: no empty plot, the report says so
    assert not (out / "tpr_vs_epsilon.png").exists() and "No TPR at 1% or 0.1% FPR resolved" in \
        (out / "report.md").read_text()


def test_shadow_clients_by_id(tmp_path):
    summary, run_dir = run_with(tmp_path, [audit_hook(shadow_clients=[1, 3], probes=["loss", "alignment"],
                                                      canaries=None)])
    audit = json.loads((run_dir / "audit" / "audit.json").read_text())
    assert audit["shadow_clients"] == [1, 3] and audit["targets"] == [0, 2, 4, 5]
    with pytest.raises(ConfigError, match="the run has 6 clients"):
        run_with(tmp_path, [audit_hook(shadow_clients=[9], probes=["loss"], canaries=None)], "bad")


def test_a_resumed_run_audits_exactly_like_an_uninterrupted_one(tmp_path):
    from evaluations.plugins import load_plugins
    from pfedpg.run import Trainer

    load_plugins()
    hooks = [audit_hook(probes=["attribute", "linkability", "loss", "alignment"], canaries=None)]
    cfg = tiny_config(**{"data.clients_per_domain": 2, "rounds": 3, "hooks": hooks})
    Trainer(cfg, run_dir=tmp_path / "ref").run()
    assert Trainer(cfg, run_dir=tmp_path / "cut").run(stop_after=2) is None
    Trainer(cfg, run_dir=tmp_path / "cut").run(resume=True)

    def probes(d):
        res = json.loads((d / "audit" / "audit.json").read_text())["probes"]
        return {k: {kk: vv for kk, vv in v.items() if not kk.startswith("seconds")} for k, v in res.items()}

    assert probes(tmp_path / "cut") == probes(tmp_path / "ref")


# --- RMIA ---------------------------------------------------------------------------------------------
def test_rmia_by_hand_and_on_planted_membership():
    from attacks.metrics import auc
    from attacks.rmia import rmia_scores

    # By hand: one record, two population records, a = 0 (prior = ½(mean_ref + 1)).
    s = rmia_scores(np.array([0.9]), np.array([[0.5], [0.7]]), np.array([0.2, 0.95]),
                    np.array([[0.2, 0.9], [0.4, 0.9]]), a=0.0, gamma=1.0)
    rx = 0.9 / (0.5 * (0.6 + 1))
    rz = np.array([0.2 / (0.5 * (0.3 + 1)), 0.95 / (0.5 * (0.9 + 1))])
    assert s[0] == pytest.approx(np.mean(rx > rz))
    # Planted: records differ in difficulty; members gain probability under the target model.
    rng = np.random.default_rng(0)
    n, R, nz = 400, 4, 300
    difficulty = rng.uniform(0.05, 0.95, size=n + nz)
    ref = np.clip(difficulty + 0.03 * rng.normal(size=(R, n + nz)), 1e-3, 1)
    member = rng.random(n) < 0.5
    target = np.clip(difficulty + 0.03 * rng.normal(size=n + nz), 1e-3, 1)
    target[:n][member] = np.clip(target[:n][member] * 1.15, 0, 1)
    # a = 1: Pr(x) is the references' mean itself, which removes each record's difficulty exactly.
    scores = rmia_scores(target[:n], ref[:, :n], target[n:], ref[:, n:], a=1.0)
    assert auc(scores, member) > 0.85 and auc(target[:n], member) < 0.7  # the references remove difficulty
    assert abs(auc(scores, rng.permutation(member)) - 0.5) < 0.1


def test_audit_hook_writes_an_rmia_probe(tmp_path):
    _, run_dir = run_with(tmp_path, [audit_hook(probes=["rmia", "lira"], canaries=None,
                                                rmia={"references": 2, "epochs": 1, "population": 50})])
    probes = json.loads((run_dir / "audit" / "audit.json").read_text())["probes"]
    r = probes["rmia"]
    assert r["n_targets"] == 4 * 40 and 0 <= r["auc"] <= 1 and r["rmia_references"] == 2
    assert 0 < r["population_size"] <= 50 and r["threat_model"] == probes["lira"]["threat_model"]
    with pytest.raises(ConfigError, match="leakage_audit.rmia: unknown key 'refs'"):
        from attacks.leakage import LeakageAudit
        LeakageAudit(shadow_clients=1, rmia={"refs": 2})


# --- membership from the descriptor ------------------------------------------------------------------
def test_generated_prompt_scores_by_hand_and_the_calibration_sign():
    from attacks.membership import fit_proxy_head, generated_prompt_scores, prompt_features
    from pfedpg.client import load_into
    from pfedpg.models import ModelConfig, PromptedViT, build_backbone

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = PromptedViT(build_backbone(ModelConfig(weights="random", kwargs=dict(TINY_MODEL, embed_dim=32))),
                            num_prompts=4, num_classes=3, deep=True)
    g = torch.Generator().manual_seed(0)
    ax, ay = torch.randn(60, 3, 8, 8, generator=g), torch.randint(0, 3, (60,), generator=g)
    x, y = torch.randn(10, 3, 8, 8, generator=g), torch.randint(0, 3, (10,), generator=g)
    pa, pb = (torch.empty_like(model.prompt.prompt).uniform_(-1, 1, generator=g) for _ in range(2))
    ab = generated_prompt_scores(model, prompts={0: pa}, references=[pb], aux_x=ax, aux_y=ay, num_classes=3,
                                 targets={0: (x, y)})[0]
    # By hand: a proxy head fitted on the auxiliary data under each prompt, then the loss there.
    losses = {}
    for name, p in (("a", pa), ("b", pb)):
        w, b = fit_proxy_head(prompt_features(model, p, ax), ay, 3)
        load_into(model, prompt=p, head_weight=w, head_bias=b)
        with torch.no_grad():
            losses[name] = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    assert torch.allclose(ab["loss"], -losses["a"], atol=1e-5)
    assert torch.allclose(ab["confidence"], torch.exp(-losses["a"]), atol=1e-5)
    # Calibrated = loss under the reference − loss under the client's prompt: higher = easier for the client.
    assert torch.allclose(ab["calibrated"], losses["b"] - losses["a"], atol=1e-5)
    ba = generated_prompt_scores(model, prompts={0: pb}, references=[pa], aux_x=ax, aux_y=ay, num_classes=3,
                                 targets={0: (x, y)})[0]
    assert torch.allclose(ba["calibrated"], -ab["calibrated"], atol=1e-5)
    same = generated_prompt_scores(model, prompts={0: pa}, references=[pa, pa], aux_x=ax, aux_y=ay, num_classes=3,
                                   targets={0: (x, y)})[0]
    assert same["calibrated"].abs().max() < 1e-5


def test_audit_hook_writes_the_descriptor_membership_probe(tmp_path):
    _, run_dir = run_with(tmp_path, [audit_hook(probes=["descriptor", "alignment"], canaries=None)])
    probes = json.loads((run_dir / "audit" / "audit.json").read_text())["probes"]
    for kind in ("loss", "confidence", "calibrated"):
        p = probes[f"descriptor_{kind}"]
        assert p["n_targets"] == 4 * 40 and p["n_positives"] == 80 and 0 <= p["auc"] <= 1
        assert p["threat_model"] == probes["alignment"]["threat_model"] and p["references"] == 2
        assert p["privacy_unit_of_question"] == "record" and p["dp_envelope"] is None
    scores = np.load(run_dir / "audit" / "scores.npz")
    assert len(scores["descriptor_calibrated__scores"]) == 160
    # Under client-level DP the server's view is covered: the probe gets the accountant's envelope.
    _, dp_dir = run_with(tmp_path, [{"name": "dp_client", "clip": 0.1, "noise_multiplier": 1.0},
                                    audit_hook(probes=["descriptor"], canaries=None)], "dp")
    dp = json.loads((dp_dir / "audit" / "audit.json").read_text())["probes"]["descriptor_loss"]
    assert dp["dp_envelope"] is not None and math.isfinite(dp["dp_envelope"]["epsilon"])


def test_descriptor_probe_needs_descriptors(tmp_path):
    with pytest.raises(ConfigError, match="probe 'descriptor' reads the server's client descriptors"):
        run_with(tmp_path, [audit_hook(probes=["descriptor"], canaries=None)], method="fedvpt")
    # By default the audit of a method without descriptors simply leaves the probe out.
    _, run_dir = run_with(tmp_path, [{"name": "leakage_audit", "shadow_clients": 2, "targets_per_client": 10,
                                       "permutations": 2, "lira": {"shadows": 1, "epochs": 1},
                                       "rmia": {"references": 1, "epochs": 1}}],
                          "fedvpt", method="fedvpt")
    assert not any(k.startswith("descriptor")
                   for k in json.loads((run_dir / "audit" / "audit.json").read_text())["probes"])


def test_each_probe_is_a_registered_class_with_its_threat_model_and_unit():
    from attacks.probes import PROBE_TYPES, covered
    from pfedpg.privacy_result import DPEnvelope

    assert PROBE_TYPES.in_order() == ["attribute", "linkability", "loss", "confidence", "alignment", "lira", "source",
                                      "canary", "rmia", "descriptor"]  # the order the probes run in
    need = {p for p in PROBE_TYPES.in_order() if PROBE_TYPES.get(p).needs_aux}
    assert need == {"alignment", "lira", "source", "canary", "rmia", "descriptor"}
    client_dp = DPEnvelope("dp_client", "client", 2.0, 1e-5)
    record_dp = DPEnvelope("dp_sgd", "record", 2.0, 1e-5)
    cov = {p: (covered(client_dp, PROBE_TYPES.get(p).side, PROBE_TYPES.get(p).unit),
               covered(record_dp, PROBE_TYPES.get(p).side, PROBE_TYPES.get(p).unit)) for p in PROBE_TYPES.in_order()}
    assert cov["attribute"] == (True, False) and cov["loss"] == (False, True) and cov["alignment"] == (True, True)
    assert cov["source"] == (False, False)  # a placement question: neither mechanism's neighbours
