"""The pFedPG server: generator variants and the update's sign (DESIGN §1)."""
import pytest
import torch

from pfedpg.generators import GENERATORS
from pfedpg.seeding import Seeds
from pfedpg.server import SERVERS, ClientGradients, ServerConfig, plain_aggregate

K, D, N = 4, 8, 3


def make_server(generator="cross_attention", method="pfedpg", lr=1e-3, **kw):
    cfg = ServerConfig(generator=generator, lr=lr, **kw)
    server = SERVERS.get(method)(cfg, num_clients=N, num_prompts=K, dim=D, init_bound=0.3,
                                 seeds=Seeds(0), train_sizes=[10, 20, 30])
    return server.double()


def step(server, deltas, sign=1.0):
    grads = server.client_gradients(deltas)
    flipped = ClientGradients(grads.clients, sign * grads.shared, grads.weights,
                              {n: [sign * g for g in gs] for n, gs in grads.private.items()})
    server.apply(plain_aggregate(flipped), flipped)


def distance(server, targets):
    with torch.no_grad():
        return sum(float((server.generate(n) - t).pow(2).sum()) for n, t in targets.items())


@pytest.mark.parametrize("generator", GENERATORS.names())
@pytest.mark.parametrize("clients", [[1], [0, 1, 2]])
def test_sign(generator, clients):
    """After one server step G(P_base, d_n) moves towards P̃_n; with the sign flipped it moves away."""
    g = torch.Generator().manual_seed(1)
    results = {}
    for sign in (1.0, -1.0):
        server = make_server(generator)
        sent = server.prompts_for(clients)
        targets = {n: sent[n] + 0.1 * torch.randn(K, D, generator=g, dtype=torch.float64) for n in clients}
        g.manual_seed(1)
        before = distance(server, targets)
        step(server, {n: targets[n] - sent[n] for n in clients}, sign)
        results[sign] = distance(server, targets) - before
    assert results[1.0] < 0 < results[-1.0], results


@pytest.mark.parametrize("generator", GENERATORS.names())
def test_sign_of_the_descriptor_step_alone(generator):
    """The descriptor update on its own (shared parameters held still) moves G(P_base, d_n) towards
    P̃_n, and away with its sign flipped: a sign error in the descriptor step alone is caught for
    every generator, the default one included (the whole-step test above is dominated by the shared
    update, so it misses it)."""
    g = torch.Generator().manual_seed(2)
    results = {}
    for sign in (1.0, -1.0):
        server = make_server(generator, lr=1e-2)
        shared_before = [p.detach().clone() for p in server.shared_parameters()]
        sent = server.prompts_for([1])
        targets = {1: sent[1] + 0.1 * torch.randn(K, D, generator=g, dtype=torch.float64)}
        g.manual_seed(2)
        before = distance(server, targets)
        grads = server.client_gradients({1: targets[1] - sent[1]})
        only = ClientGradients(grads.clients, 0 * grads.shared, grads.weights,
                               {n: [sign * x for x in gs] for n, gs in grads.private.items()})
        server.apply(plain_aggregate(only), only)
        assert all(torch.equal(a, b) for a, b in zip(shared_before, server.shared_parameters()))
        results[sign] = distance(server, targets) - before
    if generator == "basis":  # Table 4's "basis only" ignores the descriptor: the step is inert
        assert results == {1.0: 0.0, -1.0: 0.0}
    else:
        assert results[1.0] < 0 < results[-1.0], results


@pytest.mark.parametrize("generator", GENERATORS.names())
def test_generator_shapes_and_independence(generator):
    server = make_server(generator)
    p0 = server.prompts_for([0])[0]
    assert p0.shape == (K, D) and torch.isfinite(p0).all()
    # P_0 depends on d_0 and the shared parameters only: changing d_1, d_2 leaves it unchanged ...
    with torch.no_grad():
        server.descriptors[1:] += 5.0
    torch.testing.assert_close(server.prompts_for([0])[0], p0, rtol=0, atol=0)
    # ... and its gradient w.r.t. the other descriptors is exactly zero.
    grad = torch.autograd.grad(server.generate(0).sum(), server.descriptors, allow_unused=True)[0]
    if grad is not None:
        assert grad[1:].abs().max() == 0


def test_cross_attention_clients_start_with_different_prompts():
    server = make_server("cross_attention")
    p = torch.stack([server.prompts_for([n])[n] for n in range(N)])
    spread = (p[0] - p[1]).norm() / p[0].norm()
    assert spread > 0.05, f"initial prompts nearly identical (relative distance {spread:.4f})"
    # The default: single head, no residual -> the output is not P_base plus something.
    assert server.generator.residual is False


def test_residual_variant_adds_the_basis():
    server = make_server("cross_attention", residual=True)
    with torch.no_grad():
        attn = (server.generator.attention(server.p_base, server.descriptors[0])
                @ (server.p_base @ server.generator.w_v) @ server.generator.w_o)
    torch.testing.assert_close(server.prompts_for([0])[0], server.p_base.detach() + attn)


def test_plain_update_is_the_sum_of_per_client_vjps():
    server = make_server()
    deltas = {n: torch.randn(K, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n)) for n in range(N)}
    grads = server.client_gradients(deltas)
    # One batched backward through all clients at once agrees to rounding.
    shared = server.shared_parameters()
    total = sum((server.generate(n) * -deltas[n]).sum() for n in range(N))
    batched = torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, shared)])
    torch.testing.assert_close(plain_aggregate(grads), batched, rtol=1e-10, atol=1e-12)
    # And the summed rows are exactly the per-client VJPs added one by one.
    assert torch.equal(plain_aggregate(grads), grads.shared[0] + grads.shared[1] + grads.shared[2])


def test_fedvpt_is_fedavg_of_the_deltas():
    server = make_server(method="fedvpt")
    p = server.prompts_for([0])[0]
    deltas = {n: torch.full((K, D), float(n + 1), dtype=torch.float64) for n in range(N)}
    step(server, deltas)
    expected = p + (10 * 1 + 20 * 2 + 30 * 3) / 60
    torch.testing.assert_close(server.prompts_for([0])[0], expected)


@pytest.mark.parametrize("method", ["pfedpg", "fedvpt"])
def test_bounded_step_clips_the_shared_update_and_each_descriptor_gradient(method):
    c, lr = 0.5, 0.1
    server = make_server(method=method, lr=lr, update_bound=c)
    before = {k: v.detach().clone() for k, v in server.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    deltas = {n: 100.0 * torch.randn(K, D, generator=g, dtype=torch.float64) for n in range(N)}
    grads = server.client_gradients(deltas)
    plain = plain_aggregate(grads)
    info = server.apply(plain, grads)
    assert info["server_update_norm"] == pytest.approx(float(plain.norm())) and info["server_update_norm"] > c
    shared_names = [k for k in before if k != "descriptors" and k != "train_sizes"]
    moved = torch.cat([(server.state_dict()[k] - before[k]).reshape(-1) for k in shared_names])
    step_lr = lr if method == "pfedpg" else 1.0  # FedAvg's step has lr 1
    assert float(moved.norm()) == pytest.approx(step_lr * c, rel=1e-9)
    # ... in the direction of the plain update
    torch.testing.assert_close(moved / moved.norm(), -plain / plain.norm())
    if method == "pfedpg":
        assert info["descriptor_grad_norm_max"] > c
        for n in range(N):
            step = server.descriptors[n].detach() - before["descriptors"][n]
            assert float(step.norm()) == pytest.approx(lr * c, rel=1e-9)
    # Below the bound the step is the plain one.
    loose = make_server(method=method, lr=lr, update_bound=1e9)
    plain_server = make_server(method=method, lr=lr)
    for s in (loose, plain_server):
        gr = s.client_gradients(deltas)
        s.apply(plain_aggregate(gr), gr)
    for a, b in zip(loose.state_dict().values(), plain_server.state_dict().values()):
        assert torch.equal(a, b)


def test_bounded_step_keeps_the_sign():
    server = make_server(lr=1e-2, update_bound=1e-3)
    sent = server.prompts_for([0, 1])
    targets = {n: sent[n] + torch.randn(K, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
               for n in sent}
    before = distance(server, targets)
    step(server, {n: targets[n] - sent[n] for n in sent})
    assert distance(server, targets) < before


def test_update_bound_is_validated():
    from pfedpg.errors import ConfigError

    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ConfigError, match="server.update_bound"):
            ServerConfig(update_bound=bad)


def test_a_large_server_lr_under_dp_noise_diverges_without_the_bound_and_stays_finite_with_it(tmp_path):
    """α = 1 with client-level DP noise (z = 1): the plain step blows the generator up within five
    rounds; the bounded step keeps every generated prompt finite."""
    from conftest import tiny_config

    from evaluations.plugins import load_plugins
    from pfedpg.errors import NonFiniteDeltaError
    from pfedpg.run import Trainer

    load_plugins()
    hooks = [{"name": "dp_client", "clip": 1.0, "noise_multiplier": 1.0}]
    kw = {"rounds": 5, "checkpoint_every": 0, "hooks": hooks, "server.lr": 1.0}
    with pytest.raises(NonFiniteDeltaError):
        Trainer(tiny_config(**kw), run_dir=tmp_path / "plain").run()
    t = Trainer(tiny_config(**kw, **{"server.update_bound": 1.0}), run_dir=tmp_path / "bounded")
    summary = t.run()
    assert all(torch.isfinite(p).all() for p in t.server.prompts_for(list(range(t.num_clients))).values())
    assert summary["accuracy"]["mean"] > 0
    import json

    rounds = [json.loads(ln) for ln in (tmp_path / "bounded" / "metrics.jsonl").read_text().splitlines()]
    norms = [r["server_update_norm"] for r in rounds if r["type"] == "round"]
    assert max(norms) > 1.0, norms  # the bound was active, so it is what kept the run finite
