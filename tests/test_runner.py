"""The in-process runner: determinism, resume, hooks, participation, errors (DESIGN §4, §8)."""
import json

import pytest
import torch
from conftest import tiny_config

from pfedpg.errors import ConfigError, NonFiniteDeltaError
from pfedpg.hooks import Hook, HookChain, RunContext, build_hooks
from pfedpg.run import Trainer, participation_schedule
from pfedpg.seeding import Seeds


def metrics(run_dir):
    """metrics.jsonl without wall-clock fields."""
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "aggregation_ms"} for r in rows]


def server_state(trainer):
    return {k: v.clone() for k, v in trainer.server.state_dict().items()}


def test_same_seed_same_numbers(tmp_path):
    a = Trainer(tiny_config(), run_dir=tmp_path / "a")
    a.run()
    b = Trainer(tiny_config(), run_dir=tmp_path / "b")
    b.run()
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    for k, v in server_state(a).items():
        assert torch.equal(v, server_state(b)[k]), k
    c = Trainer(tiny_config(seed=1), run_dir=tmp_path / "c")
    c.run()
    assert metrics(tmp_path / "a") != metrics(tmp_path / "c")


@pytest.mark.parametrize("method", ["pfedpg", "fedvpt", "local"])
def test_resume_equals_uninterrupted(tmp_path, method):
    cfg = tiny_config(method=method, rounds=4, checkpoint_every=2)
    full = Trainer(cfg, run_dir=tmp_path / "full").run()
    Trainer(cfg, run_dir=tmp_path / "cut").run(stop_after=2)
    assert not (tmp_path / "cut" / "summary.json").exists()
    resumed = Trainer(cfg, run_dir=tmp_path / "cut").run(resume=True)
    assert resumed["accuracy"] == full["accuracy"]
    assert resumed["accuracy_generated"] == full["accuracy_generated"]
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")


def test_resume_refuses_a_changed_config_and_a_missing_checkpoint(tmp_path):
    Trainer(tiny_config(rounds=3), run_dir=tmp_path / "r").run(stop_after=1)
    with pytest.raises(ConfigError, match="config differs"):
        Trainer(tiny_config(rounds=3, **{"client.lr": 0.05}), run_dir=tmp_path / "r").run(resume=True)
    with pytest.raises(ConfigError, match="no checkpoint"):
        Trainer(tiny_config(), run_dir=tmp_path / "empty").run(resume=True)
    with pytest.raises(ConfigError,
                       match=r"holds an unfinished run \(checkpoint round_0001.pt\); continue it with --resume"):
        Trainer(tiny_config(rounds=3), run_dir=tmp_path / "r").run()
    # --restart starts it again; the first attempt's files are kept.
    Trainer(tiny_config(rounds=3), run_dir=tmp_path / "r").run(restart=True)
    assert (tmp_path / "r" / "summary.json").is_file() and (tmp_path / "r" / "attempt-1" / "checkpoints").is_dir()
    with pytest.raises(ConfigError, match="holds a finished run"):
        Trainer(tiny_config(rounds=3), run_dir=tmp_path / "r").run()


def test_a_run_that_failed_after_it_started_reruns_after_the_fix(tmp_path):
    """A late check (Krum's m >= 2f + 3, found when the hooks are set up) fails after the run
    directory was written; the same command with the config fixed starts it again, nothing deleted."""
    from evaluations.plugins import load_plugins

    load_plugins()
    bad = tiny_config(rounds=2, hooks=[{"name": "robust_aggregation", "rule": "krum", "f": 5}])
    with pytest.raises(ConfigError, match="krum"):
        Trainer(bad, run_dir=tmp_path / "r").run()
    assert (tmp_path / "r" / "metrics.jsonl").exists() and not (tmp_path / "r" / "checkpoints").exists()
    summary = Trainer(tiny_config(rounds=2), run_dir=tmp_path / "r").run()
    assert summary is not None and (tmp_path / "r" / "summary.json").is_file()
    assert "krum" in (tmp_path / "r" / "attempt-1" / "config.yaml").read_text()


def test_noop_hooks_equal_no_hooks(tmp_path):
    plain = Trainer(tiny_config(), run_dir=tmp_path / "plain")
    plain.run()
    hooked = Trainer(tiny_config(hooks=[{"name": "noop"}]), run_dir=tmp_path / "hooked")
    assert len(hooked.hooks) == 1
    hooked.run()
    assert metrics(tmp_path / "plain") == metrics(tmp_path / "hooked")
    for k, v in server_state(plain).items():
        assert torch.equal(v, server_state(hooked)[k]), k


def test_every_hook_point_is_called_in_order(tmp_path):
    calls = []

    class Recorder(Hook):
        def __init__(self, tag):
            super().__init__()
            self.name = tag

        def client_data(self, ctx, *, client, round, data):
            calls.append((self.name, "client_data", round, client))
            return data

        def local_training(self, ctx, job, call_next):
            calls.append((self.name, "local_training", job.round, job.client))
            return call_next(job)

        def outgoing_delta(self, ctx, *, client, round, delta):
            calls.append((self.name, "outgoing_delta", round, client))
            return delta

        def incoming_deltas(self, ctx, *, round, deltas):
            calls.append((self.name, "incoming_deltas", round, sorted(deltas)))
            return deltas

        def end_of_round(self, ctx, *, round, record):
            calls.append((self.name, "end_of_round", round, None))
            return {"seen": 1}

    t = Trainer(tiny_config(rounds=1), run_dir=tmp_path / "r", hooks=HookChain([Recorder("a"), Recorder("b")]))
    t.run()
    points = [(c[0], c[1]) for c in calls if c[3] in (0, None, [0, 1, 2])]
    assert points[:6] == [("a", "client_data"), ("b", "client_data"), ("a", "local_training"),
                          ("b", "local_training"), ("a", "outgoing_delta"), ("b", "outgoing_delta")]
    assert ("a", "incoming_deltas") in points and ("b", "end_of_round") in points
    last_round = [r for r in metrics(tmp_path / "r") if r["type"] == "round"][-1]
    assert last_round["a/seen"] == 1 and last_round["b/seen"] == 1


def test_a_controlling_hook_replaces_the_honest_client_hooks():
    class Honest(Hook):
        name = "honest"

        def outgoing_delta(self, ctx, *, client, round, delta):
            return delta + 1

    class Attacker(Hook):
        name = "attacker"

        def controls_client(self, client):
            return client == 0

        def outgoing_delta(self, ctx, *, client, round, delta):
            return -delta

    chain = HookChain([Honest(), Attacker()])
    ctx = RunContext(config=None, seeds=Seeds(0), run_dir=None, num_clients=2, log=print)
    d = torch.ones(2, 2)
    assert torch.equal(chain.outgoing_delta(ctx, client=0, round=1, delta=d), -d)
    assert torch.equal(chain.outgoing_delta(ctx, client=1, round=1, delta=d), d + 1)


def test_two_aggregators_and_unknown_hooks_are_config_errors():
    class Agg(Hook):
        def aggregate(self, ctx, *, round, grads):
            return grads.shared.sum(0)

    class Agg2(Agg):
        name = "agg2"

    with pytest.raises(ConfigError, match="aggregation"):
        HookChain([Agg(), Agg2()])
    with pytest.raises(ConfigError, match="unknown hook 'nope'; choose one of"):
        build_hooks([{"name": "nope"}])
    with pytest.raises(ConfigError, match="takes no options"):
        build_hooks([{"name": "noop", "strength": 3}])


def test_non_finite_delta_is_an_error_unless_rejected(tmp_path):
    import defenses  # noqa: F401  (registers reject_nonfinite)

    class NaNClient(Hook):
        name = "nan_client"

        def outgoing_delta(self, ctx, *, client, round, delta):
            return delta * float("nan") if client == 1 else delta

    with pytest.raises(NonFiniteDeltaError, match="client 1 .* reject_nonfinite"):
        Trainer(tiny_config(), run_dir=tmp_path / "a", hooks=HookChain([NaNClient()])).run()
    chain = HookChain([NaNClient(), *build_hooks([{"name": "reject_nonfinite"}]).hooks])
    t = Trainer(tiny_config(), run_dir=tmp_path / "b", hooks=chain)
    summary = t.run()
    assert summary["hook_results"]["reject_nonfinite"]["rejected"] == [[1, 1], [2, 1]]
    assert all(torch.isfinite(v).all() for v in t.server.state_dict().values())


def test_participation_schedule_is_seeded_m_of_n():
    s = participation_schedule(num_clients=10, per_round=3, rounds=50, seeds=Seeds(0))
    assert all(len(r) == 3 == len(set(r)) and all(0 <= c < 10 for c in r) for r in s)
    assert s == participation_schedule(num_clients=10, per_round=3, rounds=50, seeds=Seeds(0))
    assert s[:20] == participation_schedule(num_clients=10, per_round=3, rounds=20, seeds=Seeds(0))
    assert len({c for r in s for c in r}) == 10
    with pytest.raises(ConfigError, match="exceeds"):
        participation_schedule(num_clients=3, per_round=4, rounds=1, seeds=Seeds(0))


def test_partial_participation_run(tmp_path):
    t = Trainer(tiny_config(clients_per_round=2, rounds=3), run_dir=tmp_path / "r")
    summary = t.run()
    rounds = [r for r in metrics(tmp_path / "r") if r["type"] == "round"]
    assert [r["participants"] for r in rounds] == t.schedule and all(len(p) == 2 for p in t.schedule)
    assert summary["clients_per_round"] == 2 and len(summary["accuracy"]["per_client"]) == 3


def test_summary_and_communication(tmp_path):
    summary = Trainer(tiny_config(), run_dir=tmp_path / "r").run()
    assert {"method", "seed", "rounds", "accuracy", "accuracy_generated", "communication"} <= set(summary)
    acc = summary["accuracy"]
    assert acc["worst"] == min(acc["per_client"]) and abs(acc["mean"] - sum(acc["per_client"]) / 3) < 1e-12
    comm = summary["communication"]
    assert comm["up_numbers_per_client_round"] == comm["down_numbers_per_client_round"] == 4 * 16
    assert comm["ratio_vs_backbone"] == pytest.approx(64 / comm["backbone_numbers"])
    local = Trainer(tiny_config(method="local"), run_dir=tmp_path / "l").run()
    assert local["communication"]["up_numbers_per_client_round"] == 0 and local["accuracy_generated"] is None


def test_training_on_the_embedded_default_beats_chance(tmp_path):
    # A random frozen backbone learns little (DESIGN §3), so use a quick toolkit-pretrained one.
    cfg = tiny_config(rounds=6, **{"model.weights": "pretrain", "pretrain.epochs": 40,
                                   "pretrain.cache_dir": str(tmp_path / "cache"),
                                   "data.max_train_per_client": None, "client.local_epochs": 2,
                                   "server.lr": 0.1})
    summary = Trainer(cfg, run_dir=tmp_path / "r").run()
    # 10 classes: chance is 0.1.
    assert summary["accuracy"]["mean"] > 0.3, summary["accuracy"]
    assert summary["accuracy"]["worst"] > 0.15, summary["accuracy"]


def test_pretrained_backbone_is_cached_by_config_hash(tmp_path):
    from pfedpg.pretrain import cached_path, pretrain_backbone

    cfg = tiny_config(**{"model.weights": "pretrain", "pretrain.epochs": 1, "pretrain.cache_dir": str(tmp_path)})
    path = pretrain_backbone(cfg)
    assert path == cached_path(cfg) and path.is_file()
    mtime = path.stat().st_mtime_ns
    assert pretrain_backbone(cfg) == path and path.stat().st_mtime_ns == mtime  # cache hit, no retraining
    other = tiny_config(**{"model.weights": "pretrain", "pretrain.epochs": 2, "pretrain.cache_dir": str(tmp_path)})
    assert cached_path(other) != path
    no_public = tiny_config(**{"model.weights": "pretrain", "data.public_fraction": 0.0,
                               "pretrain.cache_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="public split"):
        pretrain_backbone(no_public)


def test_evaluate_on_validation_split(tmp_path):
    with pytest.raises(ConfigError, match="val_fraction"):
        tiny_config(evaluate_on="val")
    cfg = tiny_config(evaluate_on="val", **{"data.val_fraction": 0.2})
    t = Trainer(cfg, run_dir=tmp_path / "r")
    summary = t.run()
    assert summary["evaluated_on"] == "val"
    from pfedpg.run import partition_run

    _, splits, _ = partition_run(cfg)  # the run's own partition (seeded)
    assert [f.val for f in t.loop.roster.clients] == [len(s.val) for s in splits]
    assert summary["data"]["test_per_client"] == [len(s.val) for s in splits]
    assert all(not set(s.val) & set(s.test) for s in splits)


def test_head_lr_is_its_own_parameter_group(tiny_vit):
    from pfedpg.client import ClientConfig, make_optimizer

    opt = make_optimizer(tiny_vit, ClientConfig(lr=0.5, head_lr=0.01))
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.01]
    assert opt.param_groups[0]["params"][0] is tiny_vit.prompt.prompt
    assert [g["lr"] for g in make_optimizer(tiny_vit, ClientConfig(lr=0.5)).param_groups] == [0.5, 0.5]


def test_partition_settings_share_one_pretrained_backbone():
    from pfedpg.pretrain import cached_path

    a = tiny_config(**{"model.weights": "pretrain"})
    b = tiny_config(**{"model.weights": "pretrain", "data.clients_per_domain": 2, "data.max_train_per_client": 10})
    c = tiny_config(**{"model.weights": "pretrain", "data.public_fraction": 0.2})
    assert cached_path(a) == cached_path(b) != cached_path(c)


def test_domain_prompted_pretraining_trains_a_backbone_clients_can_load(tmp_path):
    """pretrain.domain_prompts: the backbone is trained through the clients' own prompt insertion
    with one prompt per domain; what is cached is a plain backbone (no head, no prompts)."""
    from safetensors.torch import load_file

    from pfedpg.pretrain import cached_path, pretrain_backbone

    kw = {"model.weights": "pretrain", "pretrain.epochs": 2, "pretrain.cache_dir": str(tmp_path),
          "data.composite": "overlay", "model.prompt_depth": "deep", "model.kwargs.depth": 2}
    cfg = tiny_config(**kw, **{"pretrain.domain_prompts": True})
    path = pretrain_backbone(cfg)
    keys = set(load_file(str(path)))
    assert not any(k.startswith("head.") for k in keys) and "blocks.1.attn.qkv.weight" in keys
    again = pretrain_backbone(tiny_config(**{**kw, "pretrain.domain_prompts": True,
                                             "pretrain.cache_dir": str(tmp_path / "again")}))
    a, b = load_file(str(path)), load_file(str(again))
    assert all(torch.equal(a[k], b[k]) for k in a)  # same config and seed, same weights
    summary = Trainer(cfg, run_dir=tmp_path / "r").run()  # loads strictly: every backbone key matches
    assert 0 <= summary["accuracy"]["mean"] <= 1
    # The prompt shape it trained with is part of the cache key; without domain prompts it is not.
    plain = tiny_config(**kw)
    assert cached_path(plain) != path
    assert cached_path(tiny_config(**{**kw, "pretrain.domain_prompts": True, "model.prompt_depth": "shallow"})) != path
    assert cached_path(tiny_config(**{**kw, "model.prompt_depth": "shallow"})) == cached_path(plain)
    # pretrain.remix trains on re-drawn distractors: other weights, and a backbone runs load.
    remixed = pretrain_backbone(tiny_config(**{**kw, "pretrain.domain_prompts": True, "pretrain.remix": True}))
    r = load_file(str(remixed))
    assert remixed != path and r.keys() == a.keys() and not all(torch.equal(a[k], r[k]) for k in a)
    # pretrain.mixed_default adds the unprompted-mixture loss: other weights again.
    mixed = pretrain_backbone(tiny_config(**{**kw, "pretrain.domain_prompts": True, "pretrain.remix": True,
                                             "pretrain.mixed_default": True}))
    mx = load_file(str(mixed))
    assert mixed not in (path, remixed) and not all(torch.equal(r[k], mx[k]) for k in r)


def test_remix_redraws_overlay_distractors_from_public_label_channels_only():
    """pretrain.remix: each record keeps its label channel; every other digit channel holds the label
    channel of another public record (never its own), re-drawn on each call; channels past the
    overlay's stay black."""
    import numpy as np

    from pfedpg.pretrain_loop import _remixer

    rng = np.random.default_rng(0)
    n, s = 12, 4
    images = np.zeros((n, s, s, 3), dtype=np.uint8)
    domains = np.arange(n) % 2
    own = rng.integers(1, 256, size=(n, s, s)).astype(np.uint8)  # each record's digit, distinct
    images[np.arange(n), :, :, domains] = own
    images[np.arange(n), :, :, 1 - domains] = 7  # the fixed distractor remix replaces
    batch = _remixer(images, domains, channels=2, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    g = torch.Generator().manual_seed(0)
    idx = torch.arange(n)
    (first, src1), (second, src2) = batch(idx, g), batch(idx, g)
    label = torch.from_numpy(own).float() / 255
    pool = {tuple(label[j].flatten().tolist()): j for j in range(n)}
    for out, src in ((first, src1), (second, src2)):
        assert torch.equal(out[idx, torch.from_numpy(domains)], label)   # the label channel is kept
        assert torch.all(out[:, 2] == 0)                                   # blue stays black
        for i in range(n):
            j = pool.get(tuple(out[i, 1 - domains[i]].flatten().tolist()))
            assert j is not None and j != i   # another record's label channel, never the fixed 7s
            assert src[domains[i], i] == i and src[1 - domains[i], i] == j  # sources name them
    assert not torch.equal(first, second)  # drawn afresh each time


def test_remix_needs_overlay_and_is_in_the_cache_key(tmp_path):
    from pfedpg.pretrain import cached_path

    with pytest.raises(ConfigError, match="pretrain.remix.*composite: overlay"):
        tiny_config(**{"pretrain.remix": True})
    with pytest.raises(ConfigError, match="mixed_default needs pretrain.remix and pretrain.domain_prompts"):
        tiny_config(**{"pretrain.mixed_default": True, "pretrain.remix": True, "data.composite": "overlay"})
    kw = {"model.weights": "pretrain", "pretrain.cache_dir": str(tmp_path), "data.composite": "overlay"}
    assert cached_path(tiny_config(**kw, **{"pretrain.remix": True})) != cached_path(tiny_config(**kw))
    assert cached_path(tiny_config(**kw, **{"pretrain.remix": False})) == cached_path(tiny_config(**kw))


def test_a_server_step_that_blows_up_in_the_last_round_is_a_divergence_of_that_round(tmp_path):
    """The check after the server step: no client has to send a non-finite delta afterwards for the
    run to be recorded as diverged, and the round is the one whose step blew up."""
    import json

    from pfedpg.hooks import HOOKS
    from pfedpg.server import ClientGradients

    class Blowup(Hook):  # finite gradients whose sum overflows in round 2's step
        def shared_gradients(self, ctx, *, round, grads):
            if round != 2:
                return grads
            return ClientGradients(grads.clients, torch.full_like(grads.shared, 3e38), grads.weights, grads.private)

    with HOOKS.override("_blowup_test", Blowup):
        cfg = tiny_config(rounds=2, hooks=[{"name": "_blowup_test"}])
        with pytest.raises(NonFiniteDeltaError, match="server state became non-finite in round 2"):
            Trainer(cfg, run_dir=tmp_path / "r").run()
    div = json.loads((tmp_path / "r" / "diverged.json").read_text())
    assert div["round"] == 2 and len(div["accuracy_per_client"]) == 3


def test_evaluation_batch_follows_the_training_batch_and_does_not_change_the_numbers(tmp_path):
    """client.eval_batch_size null (the default) evaluates in batches of client.batch_size, so a
    smaller training batch lowers the evaluation's peak too; any batch size gives the same accuracy
    and (per-record losses summed exactly) the same loss."""
    from pfedpg.client import ClientConfig, evaluate

    assert ClientConfig(batch_size=4).eval_batch == 4
    assert ClientConfig(batch_size=4, eval_batch_size=256).eval_batch == 256
    with pytest.raises(ConfigError, match=r"client.eval_batch_size=0 must be a positive integer \(or null"):
        ClientConfig(eval_batch_size=0)
    runs = {}
    for name, ebs in (("follows", None), ("one_batch", 4096), ("sevens", 7)):
        cfg = tiny_config(**{"client.eval_batch_size": ebs, "checkpoint_every": 0})
        t = Trainer(cfg, run_dir=tmp_path / name)
        if name == "follows":
            seen = []
            original = type(t.clients).evaluate_one

            def spy(self, n, generated, _orig=original):
                seen.append(self.cfg.client.eval_batch)
                return _orig(self, n, generated)

            type(t.clients).evaluate_one = spy
            try:
                t.run()
            finally:
                type(t.clients).evaluate_one = original
            assert seen and set(seen) == {cfg.client.batch_size}
        else:
            t.run()
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [r for r in rows if r["type"] == "client" and "acc_adapted" in r]
    assert runs["follows"]
    for name in ("one_batch", "sevens"):
        for a, b in zip(runs["follows"], runs[name], strict=True):
            assert (a["acc_adapted"], a.get("acc_generated")) == (b["acc_adapted"], b.get("acc_generated"))
            for key in ("loss_adapted", "loss_generated"):
                assert a.get(key) == pytest.approx(b.get(key), rel=1e-6)
    x = torch.randint(0, 256, (37, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 10, (37,))
    model = t.clients.model
    results = {bs: evaluate(model, x, y, batch_size=bs) for bs in (1, 5, 16, 37, 256)}
    assert len({acc for acc, _ in results.values()}) == 1
    losses = [loss for _, loss in results.values()]
    assert max(losses) - min(losses) <= 1e-6 * abs(losses[0])


def test_progress_is_lines_where_no_bar_can_be_drawn(tmp_path, capsys):
    """A run whose output is a file or a pipe (a batch job's log) gets lines, not a bar's carriage
    returns: the first round, a round at least every 30 s, and the last, with the accuracy and the
    time left; on a fake clock, rounds of 10 s are said at 1, 4 and 7 and at the last."""
    from pfedpg.run.trainer import RoundLines

    logs = []
    Trainer(tiny_config(rounds=2, eval_every=1), run_dir=tmp_path / "r", log=logs.append, progress=True).run()
    assert "\r" not in capsys.readouterr().err  # pytest's captured stderr is no terminal: no bar drawn
    said = [m for m in logs if m.startswith("round ")]
    assert said[0].startswith("round 1/2: accuracy ") and said[0].endswith(" left (estimate)"), said
    assert said[1].startswith("round 2/2: accuracy ") and "left" not in said[1], said
    now = [0.0]
    lines = RoundLines(0, 8, clock=lambda: now[0])
    out = {}
    for r in range(1, 9):
        now[0] += 10.0
        out[r] = lines.after(r, 0.5 if r % 3 == 0 else None)
    assert [r for r, line in out.items() if line] == [1, 4, 7, 8]
    assert out[1] == "round 1/8; about 70 s left (estimate)"
    assert out[4] == "round 4/8: accuracy 50.00 % (measured after round 3); about 40 s left (estimate)"
    assert out[8] == "round 8/8: accuracy 50.00 % (measured after round 6)"
