"""The client seam (issue 30): the round loop sees its clients only through the ``Clients`` verbs and
the typed ``ClientUpdate`` — read as Prepare / Execute / Assert on scripted client replies, as
Flower's strategy tests are."""
import torch
from conftest import tiny_config

from pfedpg.run import ClientFacts, ClientUpdate, ClientViews, EvalRow, Roster, Trainer


class ScriptedClients:
    """Three clients that answer with fixed releases; client 1 fails every round."""

    def __init__(self, env):
        self.trained: list[tuple[int, list[int], set[int]]] = []

    def facts(self) -> Roster:
        return Roster(clients=[ClientFacts(client=n, train=10 + n, test=5, val=0, evaluated=5) for n in range(3)],
                      num_classes=10)

    def views(self) -> ClientViews:
        return ClientViews()

    def start(self, *, model, shape, server, ctx) -> None:
        self.shape = shape

    def release(self, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(n)
        return 1e-2 * torch.randn(self.shape.prompt_tokens, self.shape.dim, generator=g)

    def train(self, round, participants, sent):
        self.trained.append((round, list(participants), set(sent)))
        return {n: ClientUpdate(error="gone") if n == 1 else
                ClientUpdate({"train_loss": 1.0 + n, "local_steps": 3}, self.release(n)) for n in participants}

    def evaluate(self, round, generated):
        return [EvalRow(client=n, acc_adapted=0.5, loss_adapted=1.0, acc_generated=0.25) for n in range(3)]

    def state_dict(self):
        return None

    def load_state_dict(self, states):
        raise AssertionError("not resumed here")

    def communication(self):
        return {"scripted": True}


def _trainer(tmp_path, name):
    return Trainer(tiny_config(rounds=1), run_dir=tmp_path / name, clients=ScriptedClients)


def test_the_loop_steps_on_the_releases_and_records_the_failure(tmp_path):
    # Prepare
    scripted = _trainer(tmp_path, "scripted")
    reference = _trainer(tmp_path, "reference")
    releases = {n: scripted.clients.release(n) for n in (0, 2)}
    # Execute
    record = scripted.loop.run_round(1)
    reference.loop.server_step(1, releases)
    # Assert: every participant was sent its prompt; the failed client is recorded and left out of the step.
    assert scripted.clients.trained == [(1, [0, 1, 2], {0, 1, 2})]
    assert record["failed_clients"] == {"1": "gone"} and record["clients_aggregated"] == 2
    assert record["train_loss_mean"] == 2.0  # clients 0 and 2 (the failed one has no loss)
    rows = {r["client"]: r for r in record["clients"]}
    assert rows[1]["error"] == "gone" and "delta_norm" not in rows[1]
    for n in (0, 2):
        assert rows[n]["delta_norm"] == float(releases[n].norm()) and rows[n]["participated"]
    assert not any("_delta" in r or "delta" in r for r in rows.values())  # the release is a field, not a row key
    a, b = scripted.server.state_dict(), reference.server.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_run_writes_what_the_clients_add_and_no_client_state(tmp_path):
    t = _trainer(tmp_path, "run")
    summary = t.run()
    assert summary["communication"]["scripted"] is True
    assert summary["accuracy"]["per_client"] == [0.5, 0.5, 0.5]
    assert torch.load(tmp_path / "run" / "checkpoints" / "round_0001.pt", weights_only=True)["clients"] is None
    assert t.ctx.train_data == [] and t.ctx.client_states is None  # nothing in-process for the hooks to read


def test_in_process_clients_release_what_they_trained(tmp_path):
    t = Trainer(tiny_config(rounds=1), run_dir=tmp_path / "r")
    sent = t.server.prompts_for([0, 2])
    updates = t.clients.train(1, [0, 2], sent)
    for n, u in updates.items():
        assert u.error is None and u.metrics["local_steps"] > 0 and "train_loss" in u.metrics
        assert torch.equal(u.delta, t.clients.states[n].prompt - sent[n])  # ΔP_n = P̃_n − P_n (no hooks)
        assert u.row() == {**u.metrics, "delta_norm": float(u.delta.norm())}


def test_an_evaluation_row_keeps_its_metrics_jsonl_form():
    """EvalRow.to_record is the row metrics.jsonl has always held (keys, order, presence), and
    from_record (a Flower client's answer) gives the row back, hook metrics included."""
    from pfedpg.run import EvalRow

    row = EvalRow(client=2, acc_adapted=0.5, loss_adapted=1.0, hook_metrics={"backdoor/asr": 0.1})
    assert list(row.to_record()) == ["client", "acc_adapted", "loss_adapted", "acc_generated", "backdoor/asr"]
    row.acc_generated, row.loss_generated = 0.25, 2.0
    rec = row.to_record()
    assert list(rec) == ["client", "acc_adapted", "loss_adapted", "acc_generated", "backdoor/asr", "loss_generated"]
    assert EvalRow.from_record(rec) == row
    assert EvalRow(client=1, error="timeout").to_record() == {"client": 1, "acc_adapted": None, "acc_generated": None,
                                                               "error": "timeout"}
    assert EvalRow(client=1, withheld=True).to_record() == {"client": 1, "withheld": True}
    assert EvalRow.from_record({"client": 1, "withheld": True}).withheld
