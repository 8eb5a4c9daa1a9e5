"""Each hook point gets the view of its side (pfedpg/context.py): what a client-side point may read,
what a server-side point may read, and the whole run only at setup and the end of a round or run."""
import pytest
from conftest import tiny_config

from pfedpg.context import ClientSide, RunContext, ServerSide
from pfedpg.hooks import Hook, HookChain
from pfedpg.run import Trainer
from pfedpg.server import plain_aggregate

CLIENT_POINTS = ("client_data", "local_training", "outgoing_delta", "client_metrics")
SERVER_POINTS = ("incoming_deltas", "shared_gradients", "aggregate")
RUN_POINTS = ("setup", "end_of_round", "end_of_run")
#: what neither narrow view may reach: other clients' records, the shared model, the client states, the hooks
SIMULATION_ONLY = ("train_data", "model", "client_states", "client_info", "hooks", "joins", "eval_data", "evaluate")


class Seen(Hook):
    """Records the type of ``ctx`` at every point, and passes everything through."""

    name = "seen"

    def __init__(self):
        super().__init__()
        self.views: dict[str, set[type]] = {}

    def _see(self, point, ctx):
        self.views.setdefault(point, set()).add(type(ctx))

    def setup(self, ctx):
        self._see("setup", ctx)

    def client_data(self, ctx, *, client, round, data):
        self._see("client_data", ctx)
        return data

    def local_training(self, ctx, job, call_next):
        self._see("local_training", ctx)
        return call_next(job)

    def outgoing_delta(self, ctx, *, client, round, delta):
        self._see("outgoing_delta", ctx)
        return delta

    def client_metrics(self, ctx, *, client, evaluate):
        self._see("client_metrics", ctx)
        x, y = ctx.eval_data_of(client)
        assert x.shape[0] == y.shape[0]
        return None

    def incoming_deltas(self, ctx, *, round, deltas):
        self._see("incoming_deltas", ctx)
        assert ctx.server.sends_prompts
        return deltas

    def shared_gradients(self, ctx, *, round, grads):
        self._see("shared_gradients", ctx)
        return grads

    def aggregate(self, ctx, *, round, grads):
        self._see("aggregate", ctx)
        return plain_aggregate(grads)

    def end_of_round(self, ctx, *, round, record):
        self._see("end_of_round", ctx)

    def end_of_run(self, ctx, *, summary):
        self._see("end_of_run", ctx)


def test_every_point_gets_the_view_of_its_side(tmp_path):
    seen = Seen()
    Trainer(tiny_config(rounds=1), run_dir=tmp_path / "r", hooks=HookChain([seen])).run()
    assert set(seen.views) == set(CLIENT_POINTS + SERVER_POINTS + RUN_POINTS)
    for point in CLIENT_POINTS:
        assert seen.views[point] == {ClientSide}, point
    for point in SERVER_POINTS:
        assert seen.views[point] == {ServerSide}, point
    for point in RUN_POINTS:
        assert seen.views[point] == {RunContext}, point


def test_the_narrow_views_cannot_reach_the_simulation(tmp_path):
    t = Trainer(tiny_config(rounds=1), run_dir=tmp_path / "r")
    client, server = t.ctx.client_side, t.ctx.server_side
    for name in SIMULATION_ONLY:
        assert hasattr(t.ctx, name)
        with pytest.raises(AttributeError):
            getattr(client, name)
        with pytest.raises(AttributeError):
            getattr(server, name)
    with pytest.raises(AttributeError,
                       match="client-side hook point may not read ctx.server; read it at a server-side"):
        client.server  # noqa: B018 — a client-side point never sees the server
    with pytest.raises(AttributeError, match="server-side hook point may not read ctx.train_data"):
        server.train_data  # noqa: B018
    with pytest.raises(AttributeError):
        server.eval_data_of(0)
    with pytest.raises(AttributeError):
        client.num_clients = 99  # read-only
    # current, not a copy: what the run context holds now is what the views read
    assert server.server is t.server and client.schedule is t.ctx.schedule
    t.ctx.join_rounds = 7
    assert client.join_rounds == 7 and server.join_rounds == 7
