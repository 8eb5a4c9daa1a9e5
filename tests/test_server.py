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
        attn = server.generator.attention(server.p_base, server.descriptors[0]) @ (server.p_base @ server.generator.w_v) @ server.generator.w_o
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
