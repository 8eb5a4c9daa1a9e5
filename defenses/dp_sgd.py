"""``dp_sgd``: record-level DP-SGD inside each client (Abadi et al. 2016; Opacus) — DESIGN §5.

Per optimizer step: Poisson sampling of the client's records with rate q, per-sample gradients of
prompt and head (Opacus hooks; the prompt tokens are their own leaf module with a registered grad
sampler, so a DP step costs about a normal step), each clipped to L2 norm C jointly over prompt and
head, summed, plus N(0, (zC)² I), divided by the expected batch size q·|D_n|. One Opacus accountant
per client for the whole run, checkpointed, so ε never resets between rounds or on resume.

Privacy unit: one record of a client. Adjacency: add/remove (the subsampled-Gaussian accountants
assume it). Everything the server or an observer sees — ΔP_n, φ, P_base, d_n, and also the client's
adapted prompt and head — is post-processing of the DP-SGD output, so all of it is covered.
δ must be < 1/|D_n|. Seeded noise is for simulation only (see ``defenses.dp_client``).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from defenses.accounting import (
    PUBLIC,
    ClientAccountants,
    calibrate_noise,
    check_dp_options,
    check_noise_source,
    client_metrics_statement,
    load_record,
    merge_record,
    noise_generator,
    record_state,
    warn_seeded_deployment,
)
from pfedpg.client import make_optimizer, trainable_parameters, training_batch
from pfedpg.context import ClientSide, RunContext
from pfedpg.errors import ConfigError
from pfedpg.hooks import Hook, register_hook
from pfedpg.jobs import LocalResult
from pfedpg.models import PromptTokens
from pfedpg.privacy_result import PrivacyResult, Release
from pfedpg.seeding import normal_like

_REGISTERED = False


def _register_prompt_grad_sampler() -> None:
    """Per-sample gradient of the prompt = the gradient at the prompt module's output, which is
    each sample's own copy of the (shallow or deep) prompt."""
    global _REGISTERED
    if _REGISTERED:
        return
    from opacus.grad_sample import register_grad_sampler

    @register_grad_sampler(PromptTokens)
    def _prompt_grad_sample(layer: PromptTokens, activations, backprops):
        return {layer.prompt: backprops}

    _REGISTERED = True


class PerSampleGradients:
    """Opacus hooks on the model for one local-training call (wrapping once, not every step)."""

    def __init__(self, model):
        from opacus import GradSampleModule

        _register_prompt_grad_sampler()
        self.params = trainable_parameters(model)
        self.gsm = GradSampleModule(model, loss_reduction="sum", batch_first=True)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """([B × param shape] per-sample gradients of the summed cross-entropy, per-sample losses)."""
        for p in self.params:
            p.grad, p.grad_sample = None, None
        with warnings.catch_warnings():
            # The prompt module's input needs no gradient (frozen embedding), so its full backward
            # hook sees output gradients only; that is exactly what its grad sampler uses.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            losses = F.cross_entropy(self.gsm(x), y, reduction="none")
            losses.sum().backward()
        grads = [p.grad_sample for p in self.params]
        for p in self.params:
            p.grad, p.grad_sample = None, None
        return grads, losses.detach()

    def close(self) -> None:
        self.gsm._close()


def per_sample_gradients(model, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """[B × param shape] per-sample gradients for prompt and head (prompt, head.weight, head.bias)."""
    psg = PerSampleGradients(model)
    try:
        return psg(x, y)[0]
    finally:
        psg.close()


@register_hook("dp_sgd")
class RecordLevelDPSGD(Hook):
    """Options: ``clip`` C (per-sample L2 bound); exactly one of ``noise_multiplier`` z or
    ``target_epsilon`` (z calibrated per client for all its planned steps); ``delta`` (default
    1/(10·|D_n|) of the smallest client; must be < 1/|D_n| for every client); ``accountant``;
    ``noise`` (seeded | local, see ``defenses.accounting.NOISE_SOURCES``): with ``local`` both the
    Gaussian noise and the Poisson sampling come from secret seeds — amplification by sampling
    assumes the adversary does not know which records each step drew."""

    privacy_mechanism = True  # what a client sends under it: the release and what the statement names public
    unit, adjacency = "record", "add_remove"

    def __init__(self, *, clip: float, noise_multiplier: float | None = None, target_epsilon: float | None = None,
                 delta: float | None = None, accountant: str = "rdp", noise: str = "seeded"):
        super().__init__()
        check_noise_source("dp_sgd", noise)
        self.noise_source = noise
        check_dp_options("dp_sgd", clip=clip, noise_multiplier=noise_multiplier, target_epsilon=target_epsilon,
                         accountant=accountant, allow_zero_noise=False)
        if delta is not None and not delta > 0:  # NaN too; check() bounds it above by 1/|D_n|
            raise ConfigError(f"dp_sgd.delta={delta!r} must be > 0 (and < 1/|D_n| for every client)")
        self.clip, self.delta, self.accountant_name = float(clip), delta, accountant
        self.target_epsilon, self.fixed_noise = target_epsilon, noise_multiplier
        self.noise: dict[int, float] = {}
        self.accountants = ClientAccountants(accountant, delta)
        #: What the mechanism did, per client, one Release per local training: the rate handed to
        #: poisson_sample, the z handed to add_noise (its noise std / C) and the loop iterations run,
        #: taken where they are used. The accountant composes these records and nothing else, so a
        #: wrong q or step count can enter only through calibration (z then misses the target, which
        #: tests/test_accounting_history.py checks against its own arithmetic).
        self.mechanism_record: dict[int, list[Release]] = {}

    @staticmethod
    def _sizes(facts) -> dict[int, int]:
        """Training-set size per client: 0..N-1, then the new clients (data.new_clients), which train
        in join rounds 0..R (round 0 the head alone), R + 1 local trainings in all."""
        sizes = dict(enumerate(facts.train_sizes))
        sizes.update(zip(facts.new_clients, facts.new_train_sizes))
        return sizes

    def fixes_rounds(self) -> bool:
        return self.target_epsilon is not None  # z is calibrated to the rounds each client joins

    def check(self, facts) -> None:
        sizes = self._sizes(facts)
        delta = self.delta if self.delta is not None else 1.0 / (10 * min(sizes.values()))
        bad = [n for n, s in sizes.items() if delta >= 1.0 / s]
        if bad:
            raise ConfigError(f"dp_sgd.delta={delta} must be < 1/|D_n| for every client "
                              f"(client {bad[0]} has {sizes[bad[0]]} records); lower delta")

    def setup(self, ctx: RunContext) -> None:
        self.check(ctx.facts)
        warn_seeded_deployment("dp_sgd", ctx, self.noise_source)
        self.metrics_statement = client_metrics_statement(ctx)
        sizes = self._sizes(ctx)
        if self.delta is None:
            self.delta = 1.0 / (10 * min(sizes.values()))
        self.accountants.delta = self.delta
        cfg = ctx.config.client
        self.batch_size, self.local_epochs = cfg.batch_size, cfg.local_epochs
        for n, size in sizes.items():
            if self.fixed_noise is not None:
                self.noise[n] = float(self.fixed_noise)
            else:
                joins = ctx.join_rounds + 1 if n in ctx.new_clients else sum(n in r for r in ctx.schedule)
                self.noise[n] = calibrate_noise(target_epsilon=self.target_epsilon, delta=self.delta,
                                                sample_rate=self.sample_rate(size), steps=joins * self.steps(size),
                                                accountant=self.accountant_name)

    def sample_rate(self, size: int) -> float:
        return min(1.0, self.batch_size / size)

    def steps(self, size: int) -> int:
        return self.local_epochs * math.ceil(1.0 / self.sample_rate(size))

    def local_training(self, ctx: ClientSide, job, call_next):
        cfg = ctx.config.client
        model = job.model
        n = job.data.y.shape[0]
        q, z = self.sample_rate(n), self.noise[job.client]
        params = trainable_parameters(model)
        opt = make_optimizer(model, cfg)
        noise_g = noise_generator(ctx, self.noise_source, "dp_sgd.noise", client=job.client, round=job.round)
        sample_g = job.generator if self.noise_source == "seeded" else \
            noise_generator(ctx, self.noise_source, "dp_sgd.sampling", client=job.client, round=job.round)
        canaries = job.gradient_canaries  # an audit's records with fixed gradients (pfedpg.jobs.GradientCanaries)
        canary_g = None if canaries is None else \
            noise_generator(ctx, self.noise_source, "dp_sgd.canary_sampling", client=job.client, round=job.round)
        model.train()
        total, seen, clipped = 0.0, 0, 0
        steps, ran = self.steps(n), 0
        psg = PerSampleGradients(model)
        for _ in range(steps):
            idx = self.poisson_sample(n, q, sample_g)
            per_sample = None
            if idx.numel():
                per_sample, losses = psg(*training_batch(model, job.data, idx, job.augment))
                total += float(losses.sum())
                seen += idx.numel()
            if canaries is not None:  # sampled like any record, at the same q
                dirs = canaries.directions()
                extra = self.canary_gradients(dirs, canaries.scale, self.poisson_sample(len(dirs), q, canary_g), params)
                per_sample = extra if per_sample is None else [torch.cat([g, e]) for g, e in zip(per_sample, extra)]
            summed = [torch.zeros_like(p) for p in params]
            if per_sample is not None:
                summed, norms = self.clip_and_sum(per_sample)
                clipped += int((norms[:idx.numel()] > self.clip).sum())
            noisy = self.add_noise(summed, z, noise_g)
            if canaries is not None:
                canaries.observe(torch.cat([g.reshape(-1) for g in noisy]))
            for p, s in zip(params, noisy):
                p.grad = s / (q * n)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ran += 1
        psg.close()
        # The record of what ran (the q handed to the sampler, the z to the noise, the iterations), and
        # the accountant composes exactly that (sensitivity C: one record, add/remove).
        release = Release(round=job.round, noise_multiplier=z, clip=self.clip, sensitivity=1.0,
                          adjacency=self.adjacency, accounting_multiplier=z, sample_rate=q, steps=ran).check()
        self.mechanism_record.setdefault(job.client, []).append(release)
        self.accountants.account(job.client, release)
        model.eval()
        return LocalResult(loss=total / max(1, seen), steps=steps, samples=seen,
                           extra={"dp_sgd_clipped_fraction": clipped / max(1, seen)})

    # The three parts of the mechanism, each replaceable by a broken variant in tests/test_dp_sgd.py,
    # whose black-box checks must flag it.
    @staticmethod
    def poisson_sample(n: int, q: float, g: torch.Generator) -> torch.Tensor:
        """Poisson sampling: each of the n records joins this step independently with probability q."""
        return (torch.rand(n, generator=g) < q).nonzero().squeeze(1)

    def canary_gradients(self, directions: torch.Tensor, scale: float | None, drawn: torch.Tensor,
                         params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The drawn canaries' per-sample gradients, per parameter ([k × param shape]): scale · C (or C)
        times each one's direction, split over the parameters in ``trainable_parameters`` order."""
        flat = directions[drawn] * (self.clip if scale is None else scale * self.clip)
        sizes = [p.numel() for p in params]
        return [piece.reshape(len(drawn), *p.shape).to(p) for piece, p in zip(flat.split(sizes, dim=1), params)]

    def clip_and_sum(self, grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Scale each sample's whole gradient (all parameters together) to L2 norm ≤ C, then sum over
        the samples; returns (sums, the samples' norms before clipping)."""
        norms = torch.stack([g.reshape(g.shape[0], -1).norm(dim=1) for g in grads]).norm(dim=0)
        factor = (self.clip / (norms + 1e-6)).clamp(max=1.0)
        return [torch.einsum("b,b...->...", factor, g) for g in grads], norms

    def add_noise(self, summed: list[torch.Tensor], z: float, g: torch.Generator) -> list[torch.Tensor]:
        """Gaussian noise of std z·C on every coordinate of the clipped sum."""
        return [s + normal_like(s, g) * (z * self.clip) for s in summed]

    def releases(self, client: int) -> list[Release]:
        return list(self.mechanism_record.get(client, []))

    def epsilon(self, client: int) -> float:
        return self.accountants.epsilon(client)

    def end_of_round(self, ctx: RunContext, *, round, record):
        return self.accountants.summary(ctx.num_clients)

    def statement(self) -> dict:
        zs = sorted(set(self.noise.values()))
        return {
            "privacy_unit": "record (one training example of a client)",
            "adjacency": self.adjacency,
            "threat_model": "honest-but-curious server and any observer of the client's final model "
                            "(all of it is post-processing of DP-SGD)",
            "mechanism": f"DP-SGD on prompt and head: per-sample clip C={self.clip}, Gaussian noise z={zs[0]:.4g}"
                         + (f"..{zs[-1]:.4g}" if len(zs) > 1 else ""),
            "sampling": f"Poisson, rate q = batch_size/|D_n| (batch_size {self.batch_size})",
            "delta": self.delta,
            "accountant": f"opacus {self.accountant_name}, one per client for the whole run",
            "noise_source": self.noise_source,
            "public": PUBLIC,
            "client_metrics": getattr(self, "metrics_statement", client_metrics_statement(None)),
        }

    def end_of_run(self, ctx: RunContext, *, summary):
        return self.privacy_result(ctx).to_dict()

    def privacy_result(self, ctx) -> PrivacyResult:
        new = None
        if ctx.new_clients:
            new = {"clients": list(ctx.new_clients), "noise_multiplier": [self.noise[c] for c in ctx.new_clients],
                   "local_trainings": ctx.join_rounds + 1, "epsilon": [self.epsilon(c) for c in ctx.new_clients]}
        return PrivacyResult(unit="record", delta=self.delta, epsilon=[self.epsilon(c) for c in range(ctx.num_clients)],
                             noise_multiplier=[self.noise[c] for c in range(ctx.num_clients)],
                             statement=self.statement(), new_clients=new)

    # Checkpoints from before the mechanism record load with an empty one.
    def state_dict(self):
        return {"accountants": self.accountants.state_dict(), "mechanism_record": record_state(self.mechanism_record)}

    def client_state(self, client):
        return {"accountant": self.accountants.client_state(client),
                "mechanism_record": [e.to_dict() for e in self.mechanism_record.get(client, [])]}

    def merge_client_state(self, client, state):
        self.accountants.merge_client_state(client, state["accountant"])
        merge_record(self.mechanism_record, client, state.get("mechanism_record", []), **self.record_defaults())

    def load_state_dict(self, state):
        self.accountants.load_state_dict(state["accountants"])
        self.mechanism_record = load_record(state.get("mechanism_record", {}), **self.record_defaults())

    def record_defaults(self) -> dict:
        return {"clip": self.clip, "sensitivity": 1.0, "adjacency": self.adjacency}
