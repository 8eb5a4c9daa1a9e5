"""Malicious clients (DESIGN §7): crafting in delta and grad space, ASR on the right images."""
import json
from types import SimpleNamespace

import torch
from conftest import tiny_config

import attacks  # noqa: F401
import defenses  # noqa: F401
from attacks.malicious import ALIE, IPM, MinMax, MinSum, PixelBackdoor, SignFlip, add_trigger
from pfedpg.hooks import HookChain, RunContext, build_hooks
from pfedpg.jobs import ClientData
from pfedpg.run import Trainer
from pfedpg.seeding import Seeds
from pfedpg.server import ClientGradients


def ctx_for(n=4, **kw):
    return RunContext(config=None, seeds=Seeds(0), run_dir=None, num_clients=n, log=lambda m: None,
                      num_classes=10, schedule=[list(range(n))], **kw)


def rows(tmp_path, name):
    return [json.loads(ln) for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def strip(records):
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "aggregation_ms"} for r in records]


def test_malicious_fraction_zero_equals_the_clean_run(tmp_path):
    Trainer(tiny_config(), run_dir=tmp_path / "clean").run()
    t = Trainer(tiny_config(hooks=[{"name": "sign_flip", "fraction": 0.0}]), run_dir=tmp_path / "zero")
    t.run()
    assert t.hooks.hooks[0].malicious == []
    assert strip(rows(tmp_path, "clean")) == strip(rows(tmp_path, "zero"))


def test_delta_space_sign_flip_bypasses_honest_dp_noise():
    flip = SignFlip(clients=[1], scale=2.0)
    chain = HookChain([*build_hooks([{"name": "dp_client", "clip": 0.1, "noise_multiplier": 1.0}]).hooks, flip])
    ctx = ctx_for()
    chain.setup(ctx)
    d = torch.ones(2, 3)
    assert torch.equal(chain.outgoing_delta(ctx, client=1, round=1, delta=d), -2.0 * d)  # crafted, not noised
    honest = chain.outgoing_delta(ctx, client=0, round=1, delta=d)
    assert not torch.equal(honest, d)  # clipped and noised


def test_grad_space_replaces_only_the_malicious_rows():
    flip = SignFlip(clients=[2], space="grad")
    flip.setup(ctx_for())
    g = torch.arange(12.0).view(4, 3)
    out = flip.shared_gradients(ctx_for(), round=1, grads=ClientGradients([0, 1, 2, 3], g, torch.ones(4)))
    assert torch.equal(out.shared[2], -g[2]) and torch.equal(out.shared[[0, 1, 3]], g[[0, 1, 3]])
    assert torch.equal(g, torch.arange(12.0).view(4, 3))  # the input is not modified in place


def test_alie_automatic_z_and_ipm_by_hand():
    # n = 10, f = 2: s = floor(10/2 + 1) - 2 = 4, z = Φ⁻¹(6/10) ≈ 0.2533
    assert abs(ALIE(num_std="auto").z_value(10, 2) - 0.2533) < 1e-3
    benign = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    crafted = ALIE(num_std=1.5).craft_from_benign(benign, 2)
    expected = benign.mean(0) - 1.5 * benign.std(0)
    assert torch.allclose(crafted, expected.expand(2, -1))
    assert torch.allclose(IPM(magnitude=0.5).craft_from_benign(benign, 1), torch.tensor([[-1.0, -1.0]]))


def test_min_max_and_min_sum_stay_inside_their_constraints():
    g = torch.Generator().manual_seed(0)
    benign = torch.randn(8, 20, generator=g)
    d = torch.cdist(benign, benign)
    m = MinMax().craft_from_benign(benign, 1)[0]
    assert float((benign - m).norm(dim=1).max()) <= float(d.max()) + 1e-5
    assert (m - benign.mean(0)).norm() > 0.1  # it does move away from the mean
    s = MinSum().craft_from_benign(benign, 1)[0]
    assert float((benign - s).norm(dim=1).pow(2).sum()) <= float(d.pow(2).sum(1).max()) + 1e-4


def test_backdoor_poisons_its_data_and_asr_uses_benign_non_target_images():
    asked = []

    def evaluate_as(client, success):
        def evaluate(x, y):
            asked.append((client, x, y))
            return success
        return evaluate

    x = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)  # uint8 records, as clients hold them
    y = torch.tensor([0, 1, 2, 0, 3, 4])
    hook = PixelBackdoor(clients=[1], target=0, poison_fraction=0.5, trigger_size=2, trigger_value=3.0)
    model = SimpleNamespace(mean=[0.5, 0.4, 0.3], std=[0.25, 0.25, 0.25])
    ctx = ctx_for(n=3, eval_data=[(x, y)] * 3)
    ctx.config = SimpleNamespace(model=model)
    hook.setup(ctx)
    poisoned = hook.client_data(ctx.client_side, client=1, round=1,
                                data=ClientData(x, torch.tensor([5, 5, 5, 5, 5, 5])))
    assert int((poisoned.y == 0).sum()) == 3 and int((poisoned.x[:, :, -2:, -2:] != 0).any(dim=(1, 2, 3)).sum()) == 3
    assert poisoned.x.dtype == torch.uint8 and torch.equal(poisoned.x[:, :, :-2], x[:, :, :-2])  # only the corner
    # The trigger in pixels: "on" cells at mean + 3·std, clipped to 255; "off" cells at the mean colour.
    corner = poisoned.x[poisoned.y == 0][0, :, -2:, -2:]
    assert corner[:, 0, 1].tolist() == [255, 255, 255] and corner[:, 0, 0].tolist() == [128, 102, 76]
    # Measured on each client's own model where it is evaluated; the malicious client is skipped.
    rows = [{"client": c, **{f"backdoor/{k}": v for k, v in (hook.client_metrics(
        ctx.client_side, client=c, evaluate=evaluate_as(c, [1.0, 0.0, 0.5][c])) or {}).items()}} for c in range(3)]
    assert [c for c, _, _ in asked] == [0, 2]  # benign clients only
    for _, xs, ys in asked:
        assert xs.shape[0] == 4 and bool((ys == 0).all())  # the two true-target images are excluded
        assert torch.equal(xs, add_trigger(x[y != 0], 2, 3.0, mean=model.mean, std=model.std))
    # The round's ASR pools the benign clients' triggered images (4 each).
    out = hook.end_of_round(ctx, round=1, record={"acc_adapted_mean": 0.5, "clients": rows})
    assert out == {"asr": 0.75}
    result = hook.end_of_run(ctx, summary={})
    assert result["asr"] == 0.75 and result["asr_per_client"] == {0: 1.0, 2: 0.5}


def test_a_run_with_an_attack_and_a_defense(tmp_path):
    """The attack and the defense each change what the server learns: the attacked run's final server
    state differs from the clean run's, and the median's from the attacked plain sum's; the median
    excludes no whole client (it is coordinate-wise), and the log says so every round."""
    alie = {"name": "alie", "clients": [0], "space": "grad"}
    runs = {"clean": [], "alie": [alie],
            "alie_median": [alie, {"name": "robust_aggregation", "rule": "median", "f": 1}]}
    server = {}
    for name, hooks in runs.items():
        summary = Trainer(tiny_config(rounds=2, hooks=hooks, **{"server.lr": 0.1}), run_dir=tmp_path / name).run()
        server[name] = torch.load(tmp_path / name / "checkpoints" / "round_0002.pt", weights_only=True)["server"]
    assert summary["hook_results"]["alie"]["malicious"] == [0]
    rounds = [r for r in rows(tmp_path, "alie_median") if r["type"] == "round"]
    assert [r["robust_aggregation/excluded"] for r in rounds] == [[], []]

    def gap(a, b):
        return max(float((server[a][k] - server[b][k]).abs().max()) for k in server[a])

    assert gap("clean", "alie") > 1e-4 and gap("alie", "alie_median") > 1e-4  # α = 0.1: one round moves ~1e-3
    assert gap("clean", "clean") == 0
