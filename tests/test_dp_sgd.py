"""Record-level DP-SGD inside each client (DESIGN §5)."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from defenses.dp_sgd import RecordLevelDPSGD, per_sample_gradients
from pfedpg.client import trainable_parameters
from pfedpg.errors import ConfigError
from pfedpg.runner import Trainer


def test_per_sample_gradients_equal_a_loop_of_single_examples(tiny_vit):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        tiny_vit.prompt.prompt.normal_(generator=g)
    x, y = torch.randn(5, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 3, 4])
    batched = per_sample_gradients(tiny_vit, x, y)
    params = trainable_parameters(tiny_vit)
    for i in range(5):
        single = torch.autograd.grad(F.cross_entropy(tiny_vit(x[i:i + 1]), y[i:i + 1], reduction="sum"), params)
        for b, s in zip(batched, single):
            torch.testing.assert_close(b[i], s, rtol=1e-4, atol=1e-6)
    # The hooks are gone afterwards: a plain backward leaves no grad_sample behind.
    F.cross_entropy(tiny_vit(x), y).backward()
    assert all(getattr(p, "grad_sample", None) is None for p in params)


def test_dp_sgd_run_accounts_once_per_client_for_the_whole_run(tmp_path):
    import defenses  # noqa: F401

    hooks = [{"name": "dp_sgd", "clip": 1.0, "noise_multiplier": 1.0}]
    cfg = tiny_config(rounds=4, checkpoint_every=2, hooks=hooks)
    full = Trainer(cfg, run_dir=tmp_path / "full").run()
    rounds = [json.loads(ln) for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    eps = [r["dp_sgd/epsilon_max"] for r in rounds if r["type"] == "round"]
    assert all(a < b for a, b in zip(eps, eps[1:])), eps  # never resets between rounds
    Trainer(cfg, run_dir=tmp_path / "cut").run(stop_after=2)
    resumed = Trainer(cfg, run_dir=tmp_path / "cut").run(resume=True)
    assert resumed["hook_results"]["dp_sgd"]["epsilon_per_client"] == full["hook_results"]["dp_sgd"]["epsilon_per_client"]
    assert resumed["accuracy"] == full["accuracy"]


def test_target_epsilon_is_reached_per_client(tmp_path):
    import defenses  # noqa: F401

    cfg = tiny_config(rounds=2, hooks=[{"name": "dp_sgd", "clip": 1.0, "target_epsilon": 4.0}])
    summary = Trainer(cfg, run_dir=tmp_path / "r").run()
    eps = summary["hook_results"]["dp_sgd"]["epsilon_per_client"]
    assert all(3.8 <= e <= 4.0 for e in eps), eps


def test_delta_must_be_below_one_over_the_client_size(tmp_path):
    import defenses  # noqa: F401

    cfg = tiny_config(hooks=[{"name": "dp_sgd", "clip": 1.0, "noise_multiplier": 1.0, "delta": 0.05}])
    with pytest.raises(ConfigError, match="1/\\|D_n\\|"):
        Trainer(cfg, run_dir=tmp_path / "r").run()
    with pytest.raises(ConfigError, match="exactly one of"):
        RecordLevelDPSGD(clip=1.0)


# ------------------------------------------------------------------------------------------------
# The mechanism itself, checked from the outside (issue 13): a recorder sits where the hook hands its
# private gradient to the optimiser and where it asks for per-sample gradients; from those alone the
# checks below re-derive what DP-SGD must have done. Each broken variant must be flagged.

Z, CLIP, BATCH = 1.0, 0.01, 8   # C far below the per-sample gradient norms: clipping always binds


class _Recorder:
    def __init__(self):
        self.steps = []      # per optimiser step: the gradient handed over (flattened), the batch
        self.batches = []    # per-sample gradients the hook received, per non-empty step

    def install(self, monkeypatch):
        import defenses.dp_sgd as mod

        rec = self
        real_psg = mod.PerSampleGradients

        class SpyPSG(real_psg):
            def __call__(self, x, y):
                grads, losses = super().__call__(x, y)
                rec.batches.append([g.detach().clone() for g in grads])
                rec.pending = True
                return grads, losses

        class Frozen:  # the optimiser: records the gradient, never moves the model
            def __init__(self, params):
                self.params = params

            def step(self):
                empty = not getattr(rec, "pending", False)
                rec.steps.append((torch.cat([p.grad.reshape(-1) for p in self.params]).clone(),
                                  None if empty else rec.batches[-1]))
                rec.pending = False

            def zero_grad(self, set_to_none=True):
                for p in self.params:
                    p.grad = None

        monkeypatch.setattr(mod, "PerSampleGradients", SpyPSG)
        monkeypatch.setattr(mod, "make_optimizer", lambda model, cfg: Frozen(trainable_parameters(model)))
        return self


def _run_mechanism(tmp_path, monkeypatch, cls):
    import defenses  # noqa: F401
    from pfedpg.hooks import HOOKS

    monkeypatch.setitem(HOOKS._items, "dp_sgd", cls)
    rec = _Recorder().install(monkeypatch)
    cfg = tiny_config(rounds=1, checkpoint_every=0, **{"client.batch_size": BATCH, "client.local_epochs": 6},
                      hooks=[{"name": "dp_sgd", "clip": CLIP, "noise_multiplier": Z}])
    trainer = Trainer(cfg, run_dir=tmp_path / cls.__name__)
    trainer.run()
    return rec, trainer.ctx.train_sizes


def _check(rec, sizes):
    """What the mechanism must satisfy; returns the list of violated properties."""
    problems = []
    # 1. Sampling: records drawn per step ~ Binomial(n, q) with q n = BATCH, over every step.
    hook = RecordLevelDPSGD(clip=CLIP, noise_multiplier=Z)
    hook.batch_size, hook.local_epochs = BATCH, 6
    expected = sum(hook.steps(n) * BATCH for n in sizes)
    var = sum(hook.steps(n) * BATCH * (1 - BATCH / n) for n in sizes)
    drawn = sum(b[0].shape[0] for g, b in rec.steps if b is not None)
    assert len(rec.steps) == sum(hook.steps(n) for n in sizes)
    if abs(drawn - expected) > 4.5 * var ** 0.5:
        problems.append(f"sampling: {drawn} records drawn, expected {expected} ± {var ** 0.5:.1f}")
    # 2./3. The residual after removing the correctly clipped sum must be pure N(0, (zC)^2) noise:
    # its std within a tight interval of zC, and uncorrelated with the clipped sum's direction.
    resid, proj = [], []
    for g, batch in rec.steps:
        total = g * BATCH  # the hook hands over (sum + noise) / (q n), q n = BATCH
        if batch is not None:
            flat = torch.cat([b.reshape(b.shape[0], -1) for b in batch], dim=1)
            factor = (CLIP / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)
            s = (factor[:, None] * flat).sum(0)
            r = total - s
            proj.append(float(r @ (s / s.norm())))
        else:
            r = total
        resid.append(r)
    r = torch.cat(resid)
    std = float(r.std())
    # n coordinates: the sample std's relative sd is ~1/sqrt(2n); 6 sd is far from a flaky bound.
    tol = 6 / (2 * r.numel()) ** 0.5
    if not (1 - tol) * Z * CLIP <= std <= (1 + tol) * Z * CLIP:
        problems.append(f"noise: residual std {std:.5f}, expected {Z * CLIP:.5f} ± {tol * Z * CLIP:.5f}")
    zscore = sum(proj) / (Z * CLIP * len(proj) ** 0.5)
    if abs(zscore) > 5:
        problems.append(f"clipping: residual along the clipped sum has z = {zscore:.1f}")
    return problems, r.numel()


class _NoClip(RecordLevelDPSGD):
    def clip_and_sum(self, grads):
        norms = torch.stack([g.reshape(g.shape[0], -1).norm(dim=1) for g in grads]).norm(dim=0)
        return [g.sum(0) for g in grads], norms


class _DoubleClip(RecordLevelDPSGD):  # the wrong sensitivity: clipped at 2C, noised for C
    def clip_and_sum(self, grads):
        self.clip *= 2
        try:
            return super().clip_and_sum(grads)
        finally:
            self.clip /= 2


class _NoNoise(RecordLevelDPSGD):
    def add_noise(self, summed, z, g):
        return [s.clone() for s in summed]


class _HalfNoise(RecordLevelDPSGD):
    def add_noise(self, summed, z, g):
        return super().add_noise(summed, z / 2, g)


class _DoubleRate(RecordLevelDPSGD):
    @staticmethod
    def poisson_sample(n, q, g):
        return RecordLevelDPSGD.poisson_sample(n, min(1.0, 2 * q), g)


def test_dp_sgd_mechanism_passes_its_black_box_checks(tmp_path, monkeypatch):
    rec, sizes = _run_mechanism(tmp_path, monkeypatch, RecordLevelDPSGD)
    problems, n = _check(rec, sizes)
    assert n > 5000 and problems == []


@pytest.mark.parametrize("broken, flagged", [
    (_NoClip, "clipping"), (_DoubleClip, "clipping"), (_NoNoise, "noise"), (_HalfNoise, "noise"),
    (_DoubleRate, "sampling"),
])
def test_broken_dp_sgd_mechanisms_are_flagged(tmp_path, monkeypatch, broken, flagged):
    rec, sizes = _run_mechanism(tmp_path, monkeypatch, broken)
    problems, _ = _check(rec, sizes)
    assert any(p.startswith(flagged) for p in problems), problems
