"""New clients (DESIGN §1, "New clients"; data.new_clients): held out of training, they join after the
last round; the server's shared state stays frozen and pFedPG updates the newcomer's descriptor only."""
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from test_server import D, K, make_server

import defenses  # noqa: F401  (registers the DP hooks)
from pfedpg.client import ClientConfig, frozen_prompt, sgd_local_training
from pfedpg.errors import ConfigError
from pfedpg.generators import GENERATORS
from pfedpg.jobs import ClientData, LocalJob
from pfedpg.run import Trainer


def _rows(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


@pytest.mark.parametrize("generator", GENERATORS.names())
def test_join_step_moves_the_new_descriptor_towards_the_adapted_prompt(generator):
    """One join step with the released ΔP_new brings G(P_base, d_new) closer to P̃_new, and the same step
    with the sign flipped moves it away; P_base, G and the trained descriptors stay bit-identical."""
    g = torch.Generator().manual_seed(3)
    moved = {}
    for sign in (1.0, -1.0):
        server = make_server(generator, lr=1e-2)
        before = {k: v.clone() for k, v in server.state_dict().items()}
        state = server.join_state()
        assert torch.equal(state["descriptor"], server.descriptors.detach().mean(0))  # the fresh descriptor
        sent = server.join_prompt(state)
        target = sent + 0.1 * torch.randn(K, D, generator=g, dtype=torch.float64)
        g.manual_seed(3)
        d0 = float((server.join_prompt(state) - target).pow(2).sum())
        server.join_step(state, sign * (target - sent))
        moved[sign] = float((server.join_prompt(state) - target).pow(2).sum()) - d0
        assert all(torch.equal(v, before[k]) for k, v in server.state_dict().items())
    if generator == "basis":  # "basis only" ignores the descriptor: nothing to move
        assert moved == {1.0: 0.0, -1.0: 0.0}
    else:
        assert moved[1.0] < 0 < moved[-1.0], moved


def test_join_step_is_bounded_like_a_training_step():
    server = make_server(lr=1.0, update_bound=1e-3)
    state = server.join_state()
    d0 = state["descriptor"].clone()
    info = server.join_step(state, torch.randn(K, D, dtype=torch.float64) * 100)
    assert info["descriptor_grad_norm"] > 1e-3
    assert float((state["descriptor"] - d0).norm()) == pytest.approx(1e-3, rel=1e-6)  # lr 1 × clipped norm


def test_frozen_prompt_trains_the_head_alone(tiny_vit):
    """Round 0 of a new client: E epochs on the head only; the prompt stays bit-identical."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, 8, 8, generator=g), torch.randint(0, 5, (40,), generator=g)
    with torch.no_grad():
        tiny_vit.prompt.prompt.normal_(generator=g)
    p0, w0 = tiny_vit.prompt.prompt.detach().clone(), tiny_vit.head.weight.detach().clone()
    job = LocalJob(client=0, round=0, model=tiny_vit, data=ClientData(x, y), generator=torch.Generator().manual_seed(1),
                   run_default=None)
    with frozen_prompt(tiny_vit):
        sgd_local_training(job, ClientConfig(batch_size=16, lr=0.1))
    assert torch.equal(tiny_vit.prompt.prompt, p0)
    assert not torch.equal(tiny_vit.head.weight, w0)
    assert tiny_vit.prompt.prompt.requires_grad  # restored afterwards


@pytest.mark.parametrize("method", ["pfedpg", "fedvpt", "local"])
def test_new_clients_join_after_training_and_never_train_before(tmp_path, method):
    cfg = tiny_config(method=method, rounds=3, **{"data.new_clients": [1], "data.new_client_rounds": 2,
                                                  "data.num_domains": 4})
    tr = Trainer(cfg, run_dir=tmp_path / "r")
    assert tr.num_clients == 3 and [f.partition_id for f in tr.loop.roster.clients] == [0, 2, 3]
    assert [f.partition_id for f in tr.loop.roster.new] == [1] and tr.ctx.new_clients == [3]
    summary = tr.run()
    # Never in a training round: not scheduled, no client row, no server-side record.
    assert all(3 not in p for p in tr.schedule)
    assert {r["client"] for r in _rows(tmp_path / "r", "client")} == {0, 1, 2}
    assert all(3 not in r["participants"] for r in _rows(tmp_path / "r", "round"))
    # The newcomer's own records are its own (no trained client holds one of them).
    records = tr.clients.records
    new_x = records.new_train_data[0][0].reshape(len(records.new_train_data[0][0]), -1).float()
    for x, _ in records.train_data:
        assert not (torch.cdist(new_x, x.reshape(len(x), -1).float()) == 0).any()
    joins = _rows(tmp_path / "r", "join")
    assert [(r["client"], r["join_round"], r["round"]) for r in joins] == [(3, 0, 3), (3, 1, 4), (3, 2, 5)]
    new = summary["new_clients"]
    assert new["clients"] == [3] and new["partition_ids"] == [1] and new["join_rounds"] == 2
    assert new["accuracy"]["per_client"] == [[r["acc_adapted"] for r in joins]]
    assert len(new["accuracy"]["mean"]) == 3 and new["final"]["mean"] == joins[-1]["acc_adapted"]
    assert new["budget_epochs"] == 3
    if method == "pfedpg":  # round 0 sends nothing; each join round sends ΔP_new and moves d_new only
        assert "delta_norm" not in joins[0] and all(r["delta_norm"] > 0 for r in joins[1:])
        assert len(tr.ctx.joins[3]) == 2
        assert new["accuracy_generated"]["per_client"][0][0] == joins[0]["acc_adapted"]  # round 0: the prompt it got
    else:
        assert new["accuracy_generated"] is None and all("delta_norm" not in r for r in joins)
    comm = new["communication"]  # what one newcomer exchanges over its join rounds
    k_d = tr.loop.shape.prompt_tokens * tr.loop.shape.dim
    assert (comm["down_numbers_per_client"], comm["up_numbers_per_client"]) == \
        {"pfedpg": (3 * k_d, 2 * k_d), "fedvpt": (k_d, 0), "local": (0, 0)}[method]
    from evaluations.report import write_report

    report = write_report(tmp_path / "r").read_text()
    assert "## New clients" in report and "| client | partition id |" in report and \
        summary["data"]["partition_ids"] == [0, 2, 3]


def test_join_rounds_leave_the_shared_state_bit_identical(tmp_path):
    """G, P_base (and every trained descriptor) after the join rounds equal the final checkpoint, which
    is written before they start."""
    cfg = tiny_config(rounds=2, **{"data.new_clients": 1, "data.new_client_rounds": 3})
    tr = Trainer(cfg, run_dir=tmp_path / "r")
    tr.run()
    saved = torch.load(tmp_path / "r" / "checkpoints" / "round_0002.pt", weights_only=True)["server"]
    now = tr.server.state_dict()
    assert set(saved) == set(now) and {"p_base", "descriptors"} <= set(now)
    assert all(torch.equal(saved[k], now[k]) for k in now)
    assert len(tr.ctx.joins[tr.ctx.new_clients[0]]) == 3
    d = [e["descriptor"] for e in tr.ctx.joins[tr.ctx.new_clients[0]]]
    assert not torch.equal(d[0], d[-1])  # while the newcomer's own descriptor moved


def test_new_clients_are_deterministic_and_resume_to_the_same_numbers(tmp_path):
    cfg = tiny_config(rounds=3, **{"data.new_clients": 1, "data.new_client_rounds": 2})
    a = Trainer(cfg, run_dir=tmp_path / "a").run()["new_clients"]
    Trainer(cfg, run_dir=tmp_path / "b").run(stop_after=2)
    b = Trainer(cfg, run_dir=tmp_path / "b").run(resume=True)["new_clients"]
    for key in ("accuracy", "accuracy_generated", "clients", "partition_ids"):
        assert a[key] == b[key]
    assert len(_rows(tmp_path / "b", "join")) == 3  # re-run once, not appended twice
    # --resume of the finished run rewrites its summary without duplicating the join rows.
    lines = []
    c = Trainer(cfg, run_dir=tmp_path / "b", log=lines.append).run(resume=True)["new_clients"]
    assert c["accuracy"] == a["accuracy"] and len(_rows(tmp_path / "b", "join")) == 3
    assert any("finished run: rewriting its summary" in ln and "join rounds run again" in ln for ln in lines)


def test_a_count_of_new_clients_is_drawn_with_the_seed():
    ids = {s: [f.partition_id
               for f in Trainer(tiny_config(seed=s, **{"data.new_clients": 1}), run_dir="/nonexistent").loop.roster.new]
           for s in range(6)}
    assert all(len(v) == 1 for v in ids.values()) and len({v[0] for v in ids.values()}) > 1
    again = Trainer(tiny_config(seed=0, **{"data.new_clients": 1}), run_dir="/nonexistent").loop.roster.new
    assert [f.partition_id for f in again] == ids[0]


@pytest.mark.parametrize("overrides, message", [
    ({"data.new_clients": 3}, "asks for 3 of the partition's 3 clients.*data.clients_per_domain"),
    ({"data.new_clients": 5}, "asks for 5 of the partition's 3 clients"),
    ({"data.new_clients": [0, 1, 2]}, "asks for 3 of the partition's 3 clients"),
    ({"data.new_clients": [5]}, "partition id 5"),
])
def test_impossible_new_clients_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(tiny_config(**overrides), run_dir="/nonexistent")


@pytest.mark.parametrize("overrides, message", [
    ({"data.new_clients": 0}, "data.new_clients"),
    ({"data.new_clients": [1, 1]}, "distinct"),
    ({"data.new_clients": [-1]}, "distinct partition ids"),
    ({"data.new_clients": True}, "a count >= 1, a list of distinct partition ids"),
    ({"data.new_clients": "two"}, "a count >= 1, a list of distinct partition ids"),
    ({"data.new_client_rounds": -1}, "new_client_rounds"),
    ({"data.new_clients": 1, "engine": "flower"}, "engine: inprocess only"),
])
def test_bad_new_client_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**overrides)


def test_join_rounds_are_releases_for_dp_client(tmp_path):
    """A pFedPG newcomer's join rounds are releases: with target_epsilon, z is calibrated for the most
    releases of any client (here the newcomer's 3 > 2 training rounds), so the newcomer reaches the
    target and the trained clients stay below it; what the server records is the noised delta."""
    hook = {"name": "dp_client", "clip": 0.05, "target_epsilon": 4.0, "delta": 1e-3}
    cfg = tiny_config(rounds=2, hooks=[hook], **{"data.new_clients": 1, "data.new_client_rounds": 3})
    tr = Trainer(cfg, run_dir=tmp_path / "r")
    res = tr.run()["hook_results"]["dp_client"]
    new = res["new_clients"]
    assert new["clients"] == tr.ctx.new_clients and new["releases"] == 3
    assert new["epsilon_max"] == pytest.approx(4.0, rel=0.01)
    assert res["epsilon_max_training_clients"] < 3.9  # 2 releases at the same z
    assert res["epsilon_max"] == new["epsilon_max"]  # the run's headline ε is over every client
    (z,) = set(res["noise_multiplier"])  # one z per client, the same for every client under dp_client
    for e in tr.ctx.joins[tr.ctx.new_clients[0]]:  # clip 0.05, noise std z·C per coordinate
        assert float(e["delta"].norm()) == pytest.approx(z * 0.05 * e["delta"].numel() ** 0.5, rel=0.2)


def test_fedvpt_and_local_newcomers_release_nothing(tmp_path):
    hook = {"name": "dp_client", "clip": 0.05, "noise_multiplier": 1.0}
    res = Trainer(tiny_config(method="fedvpt", hooks=[hook], **{"data.new_clients": 1, "data.new_client_rounds": 2}),
                  run_dir=tmp_path / "r").run()["hook_results"]["dp_client"]
    assert res["new_clients"]["releases"] == 0 and res["new_clients"]["epsilon_max"] == 0.0


def test_dp_sgd_accounts_every_local_training_of_a_newcomer(tmp_path):
    """Record-level DP-SGD covers round 0 (the head alone) and the join rounds: R + 1 trainings, each
    with the same steps as a training round; the newcomer's z is calibrated for them."""
    hook = {"name": "dp_sgd", "clip": 1.0, "target_epsilon": 6.0}
    cfg = tiny_config(rounds=2, hooks=[hook], **{"data.new_clients": 1, "data.new_client_rounds": 2})
    tr = Trainer(cfg, run_dir=tmp_path / "r")
    summary = tr.run()
    res = summary["hook_results"]["dp_sgd"]["new_clients"]
    n = tr.ctx.new_clients[0]
    dp = tr.hooks.hooks[0]
    assert res["local_trainings"] == 3
    assert len(dp.accountants._acc[n].history) == 1 and \
        dp.accountants._acc[n].history[0][2] == 3 * dp.steps(tr.loop.roster.new[0].train)
    assert res["epsilon_max"] == pytest.approx(6.0, rel=0.01)
    assert summary["hook_results"]["dp_sgd"]["epsilon_max"] >= res["epsilon_max"]
    rows = _rows(tmp_path / "r", "join")
    assert rows[0]["local_steps"] == dp.steps(tr.loop.roster.new[0].train)  # round 0 runs DP-SGD too


def _with_a_new_client(path, *, join_rounds: int):
    """A grid file whose base has 4 domain clients, one of them held out as a new client."""
    import yaml

    spec = yaml.safe_load(path.read_text())
    spec["base"]["data"].update(num_domains=4, new_clients=1)
    spec["base"]["data"]["new_client_rounds"] = join_rounds
    path.write_text(yaml.safe_dump(spec))
    return path


def test_privacy_sweep_gains_a_new_clients_column(tmp_path):
    import csv

    from test_privacy_sweep import sweep_file

    from evaluations.privacy import load_sweep, run_sweep

    path = _with_a_new_client(sweep_file(tmp_path, baselines=["nonprivate", "local"]), join_rounds=2)
    out = run_sweep(*load_sweep(path), log=lambda m: None)
    with open(out / "tradeoff.csv") as f:
        rows = {r["mechanism"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"nonprivate", "local", "dp_client"}
    for r in rows.values():
        assert 0 <= float(r["new_clients_accuracy_worst"]) <= float(r["new_clients_accuracy_mean"]) <= 1
    dp = rows["dp_client"]  # z = 1 for 2 training and 2 join releases: ε over every client, newcomers included
    assert float(dp["new_clients_epsilon_max"]) > 0 and float(dp["epsilon_max"]) >= float(dp["new_clients_epsilon_max"])
    table = (out / "tradeoff.md").read_text()
    assert "new clients %" in table and "new clients − local (paired)" in table


def test_robustness_matrix_gains_a_new_clients_column_and_newcomers_are_never_malicious(tmp_path):
    import csv

    from test_robustness_matrix import matrix_file

    from evaluations.robustness import load_matrix, run_matrix

    path = _with_a_new_client(matrix_file(tmp_path, attacks={"sign_flip": {"space": "grad"}}, defenses={"sum": {}},
                                          malicious_fractions=[0.0, 0.34]), join_rounds=1)
    out = run_matrix(*load_matrix(path), log=lambda m: None)
    with open(out / "robustness.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert all(0 <= float(r["new_clients_accuracy_mean"]) <= 1 for r in rows)
    attacked = next(r for r in rows if r["attack"] == "sign_flip")
    summary = json.loads((Path(attacked["run_dir"]) / "summary.json").read_text())
    assert summary["num_clients"] == 3 and attacked["num_malicious"] == "1"  # 0.34 of the 3 that train
    assert summary["hook_results"]["sign_flip"]["malicious"][0] < 3 <= summary["new_clients"]["clients"][0]
    assert "new clients %" in (out / "robustness.md").read_text()


def test_transfer_property_probe_reads_a_planted_property_and_not_noise():
    import numpy as np

    from attacks.attribute_inference import transfer_property_probe

    rng = np.random.default_rng(0)
    prop = np.array([0, 1] * 10, dtype=bool)  # clients 0..15 known, 16..19 probed
    feats = {n: [rng.normal(size=8) + 3.0 * prop[n] for _ in range(3)] for n in range(20)}
    known, probed = {n: feats[n] for n in range(16)}, {n: feats[n] for n in range(16, 20)}
    planted = transfer_property_probe(known, probed, {"p": prop}, permutations=20, rng=np.random.default_rng(1))
    assert planted["auc"] > 0.95 and planted["clients_probed"] == 4 and planted["rows_probed"] == 12
    # The null is there (with 16 known clients a strong feature can still rank 4 probed clients
    # perfectly under a partly shuffled labelling, so the test has little power at this n).
    assert 1 / 21 <= planted["permutation_p_value"] <= 1 and planted["null_auc_mean"] is not None
    noise = {n: [rng.normal(size=8) for _ in range(3)] for n in range(20)}
    blank = transfer_property_probe({n: noise[n] for n in range(16)}, {n: noise[n] for n in range(16, 20)}, {"p": prop},
                                    permutations=20, rng=np.random.default_rng(1))
    assert blank["auc"] < 0.9
    assert "not applicable" in transfer_property_probe(known, probed, {"p": np.ones(20, bool)})["status"]


def test_linkability_can_query_new_clients_only():
    from attacks.linkability import linkability

    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(32, generator=g) for n in range(4)}
    releases = {n: [base[n] + 0.1 * torch.randn(32, generator=g) for _ in range(4)] for n in range(4)}
    res = linkability(releases, query_clients=[3])
    assert res["queries"] == 2 and res["top1_accuracy"] == 1.0 and res["clients"] == 4
    assert "not applicable" in linkability(releases, query_clients=[9])["status"]


def test_the_audit_probes_new_clients_descriptors_and_deltas(tmp_path):
    import attacks  # noqa: F401  (registers leakage_audit)

    hook = {"name": "leakage_audit", "probes": ["attribute", "linkability"], "permutations": 2}
    cfg = tiny_config(rounds=3, hooks=[hook], **{"data.num_domains": 4, "data.clients_per_domain": 2,
                                                   "data.new_clients": 2, "data.new_client_rounds": 4})
    summary = Trainer(cfg, run_dir=tmp_path / "r").run()
    audit = json.loads((tmp_path / "r" / "audit" / "audit.json").read_text())["probes"]
    for view in ("descriptor", "prompt", "delta"):
        res = audit[f"attribute_new_clients_{view}"]
        assert res["clients_probed"] == 2 and res["rows_probed"] == 8 and 0 <= res["auc"] <= 1, res
        assert res["known_clients"].startswith("every trained client")
    link = audit["linkability_new_clients"]
    assert link["queries"] == 4 and link["clients"] == 8  # 2 later join releases each, against all 8 references
    assert "linkability_new_clients" in summary["hook_results"]["leakage_audit"]["probes"]
