"""The Flower engine (DESIGN §9): same numbers as in-process, a real SuperLink deployment, and
clients that die. Skipped when the ``flower`` extra is not installed (``make test`` installs it)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

flwr = pytest.importorskip("flwr")

from conftest import tiny_config  # noqa: E402
from flwr.app import MessageType  # noqa: E402

from evaluations.plugins import load_plugins  # noqa: E402
from pfedpg.config import config_from_dict, dump_config  # noqa: E402
from pfedpg.errors import ConfigError, DataError  # noqa: E402
from pfedpg.run import Trainer  # noqa: E402

# Under `pytest -n 2 --dist loadgroup` (make test) the Flower tests run in two groups, each on one
# worker: the deployments (SuperLinks and SuperNodes as processes) one after another in one, Ray's
# simulation and the in-memory grid tests in the other — never two deployments at once.
pytestmark = pytest.mark.xdist_group("flower")
DEPLOY = pytest.mark.xdist_group("flower-deploy")

load_plugins()

BIN = Path(sys.executable).parent


def _flower(cfg, **flower):
    d = cfg.to_dict()
    d["engine"] = "flower"
    d["flower"].update(flower)
    return config_from_dict(d)


def _rows(run_dir: Path) -> list[dict]:
    keep = ("type", "round", "client", "participants", "train_loss", "train_loss_mean", "delta_norm",
            "acc_adapted", "acc_generated", "loss_adapted", "local_steps", "backdoor/asr")
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.append({k: row[k] for k in keep if k in row} | {k: v for k, v in row.items() if k.startswith("dp_client/")})
    return out


def _simulation_processes() -> list[str]:
    out = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode() if d.name.isdigit() else ""
        except OSError:
            continue
        if "flwr-simulation" in cmd or ("flower-superlink" in cmd and "--simulation" in cmd):
            out.append(cmd)
    return out


def _server_state(run_dir: Path, r: int) -> dict:
    return torch.load(run_dir / "checkpoints" / f"round_{r:04d}.pt", weights_only=True)["server"]


# ------------------------------------------------------------------------------------------------
# Simulation engine: same config and seed, same numbers


SIMULATED_HOOKS = [
    # client-side DP (noise and accountant in the ClientApp)
    {"name": "dp_client", "clip": 0.5, "noise_multiplier": 0.8},
    # a backdoor: poisoning in the ClientApp, success measured on each benign client's own model
    {"name": "backdoor", "clients": [0], "trigger_size": 2},
    # a malicious client crafting its delta in its ClientApp, a robust rule in the ServerApp
    {"name": "sign_flip", "clients": [1]}, {"name": "robust_aggregation", "rule": "median"},
]


# One simulation covers every side of the hook corridor (each simulation costs a SuperLink, a
# flwr-simulation process and a Ray cluster): 6 clients, 3 per round, deep prompts (L·K tokens in
# every message).
@pytest.mark.parametrize("hooks,extra", [
    (SIMULATED_HOOKS, {"clients_per_round": 3, "data.clients_per_domain": 2, "model.prompt_depth": "deep",
                       "model.kwargs.depth": 2}),
])
def test_simulation_matches_inprocess(tmp_path, hooks, extra, monkeypatch):
    from evaluations.flower.app import run_flower

    # privacy.release_metrics: the clients send their rows too (the default keeps them on the clients
    # under dp_client; test_the_server_receives_only_the_release_under_dp checks that path), so the
    # server's own summary can be compared whole, backdoor success included.
    cfg = tiny_config(threads=1, hooks=hooks, **extra, **{"privacy.release_metrics": True})
    Trainer(cfg, run_dir=tmp_path / "inprocess").run()
    ref = json.loads((tmp_path / "inprocess" / "summary.json").read_text())  # as written, like Flower's
    monkeypatch.chdir(tmp_path)  # a relative run directory: Flower's processes work elsewhere, the run lands here
    got = run_flower(_flower(cfg), "flower")
    # Through Flower's current entry point (`flwr run` of the run's app on a simulation SuperLink),
    # which the run stopped again with everything it started.
    assert "[tool.flwr.app.components]" in (tmp_path / "flower" / "flower_app" / "pyproject.toml").read_text()
    assert _simulation_processes() == []
    assert got["accuracy"]["per_client"] == ref["accuracy"]["per_client"]
    assert got["accuracy_generated"]["per_client"] == ref["accuracy_generated"]["per_client"]
    # Every round's losses, delta norms and accuracies, and the final server state, bit for bit.
    assert _rows(tmp_path / "flower") == _rows(tmp_path / "inprocess")
    a, b = _server_state(tmp_path / "flower", cfg.rounds), _server_state(tmp_path / "inprocess", cfg.rounds)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Client-side accounting reaches the server's summary through the replies.
    if "backdoor" in ref["hook_results"]:
        assert ref["hook_results"]["backdoor"]["asr"] is not None
        assert got["hook_results"]["backdoor"]["asr"] == ref["hook_results"]["backdoor"]["asr"]
        assert got["hook_results"]["backdoor"]["asr_per_client"] == ref["hook_results"]["backdoor"]["asr_per_client"]
    if "dp_client" in ref["hook_results"]:
        assert got["hook_results"]["dp_client"]["epsilon_per_client"] == \
            ref["hook_results"]["dp_client"]["epsilon_per_client"]
        # Every benign client that trained has spent privacy (the malicious clients 0 and 1 run no DP).
        benign = {c for row in _rows(tmp_path / "flower") for c in row.get("participants") or []} - {0, 1}
        eps = got["hook_results"]["dp_client"]["epsilon_per_client"]
        assert benign and all(eps[c] > 0 for c in benign)


def test_flower_refuses_what_it_cannot_run(tmp_path):
    from evaluations.flower.app import run_flower

    with pytest.raises(ConfigError, match="leakage_audit.*engine: inprocess"):
        run_flower(_flower(tiny_config(hooks=[{"name": "leakage_audit", "probes": ["loss"]}])), tmp_path / "a")
    with pytest.raises(ConfigError, match="batched_clients"):
        run_flower(_flower(tiny_config(batched_clients=True)), tmp_path / "b")
    with pytest.raises(ConfigError, match="--resume"):
        run_flower(_flower(tiny_config()), tmp_path / "c", resume=True)
    with pytest.raises(ConfigError, match="flower.superlink"):
        _flower(tiny_config(), superlink="localhost")
    with pytest.raises(ConfigError, match="on_client_failure"):
        _flower(tiny_config(), on_client_failure="retry")
    with pytest.raises(ConfigError, match="client_cpus=0.5 must be an integer"):
        _flower(tiny_config(), client_cpus=0.5)
    with pytest.raises(ConfigError, match="client_cpus=0 must be a whole number of CPUs"):
        _flower(tiny_config(), client_cpus=0)
    with pytest.raises(ConfigError, match="more than this machine's .* CPUs"):
        run_flower(_flower(tiny_config(), client_cpus=(os.cpu_count() or 1) + 1), tmp_path / "d")


def test_a_simulation_started_with_the_wrong_number_of_supernodes_names_the_fix(tmp_path):
    from flwr.app import Context, RecordDict

    from evaluations.flower.node import ClientRuntime
    from pfedpg.run.summary import _redacted

    values = {"config-yaml": dump_config(_flower(tiny_config(rounds=1, threads=1))), "run-dir": str(tmp_path),
              "backbone-path": ""}
    rt = ClientRuntime.get(values, {})
    assert rt.client_id(Context(1, 1, {"partition-id": 2, "num-partitions": 3}, RecordDict(), {})) == 2
    with pytest.raises(ConfigError, match='has 5 SuperNodes but the run has 3 clients; .*"num_supernodes=3"'):
        rt.client_id(Context(1, 1, {"partition-id": 0, "num-partitions": 5}, RecordDict(), {}))
    # env.json records a Flower process's argv without its one-use token.
    assert _redacted(["flwr-serverapp", "--token", "abc", "--insecure"]) == ["flwr-serverapp", "--token", "<redacted>",
                                                                            "--insecure"]


# ------------------------------------------------------------------------------------------------
# Failure policies, with an in-memory stand-in for Flower's Grid (real ClientApp and messages)


class FakeGrid:
    """Delivers messages to a real ClientApp in this process; ``die`` = {node: round} makes that
    node vanish (no reply, gone from get_node_ids) when its message of that round arrives."""

    def __init__(self, client_app, num_clients: int, die: dict[int, int], node_configs: list[dict] | None = None):
        from flwr.app import Context, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        # What a ServerApp process gets from its runtime before it builds messages.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
        self.app, self.die = client_app, die
        node_configs = node_configs or [{"partition-id": n} for n in range(num_clients)]
        self.contexts = {100 + i: Context(1, 100 + i, nc, RecordDict(), {}) for i, nc in enumerate(node_configs)}
        self.dead: set[int] = set()
        self.replies = {}

    def get_node_ids(self):
        return [i for i in self.contexts if i not in self.dead]

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            node = m.metadata.dst_node_id
            task = m.content.config_records.get("task")
            if task is not None and self.die.get(node) == int(task["round"]):
                self.dead.add(node)
            if node not in self.dead:
                self.replies[m.metadata.message_id] = self.app(message=m, context=self.contexts[node])
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def _fake_run(tmp_path, policy):
    from evaluations.flower.app import make_client_app
    from evaluations.flower.trainer import flower_trainer

    cfg = _flower(tiny_config(rounds=3, threads=1), on_client_failure=policy, round_timeout_s=0.5)
    settings = {"config-yaml": dump_config(cfg), "run-dir": str(tmp_path), "backbone-path": ""}
    grid = FakeGrid(make_client_app(settings), 3, die={101: 2})  # client 1 dies in round 2
    return flower_trainer(cfg, run_dir=tmp_path / policy, grid=grid), cfg


class RecordingGrid(FakeGrid):
    """FakeGrid that keeps every reply the server receives (its type and content)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.received = []

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        for m, i in zip(messages, ids):
            if i in self.replies:
                self.received.append((m.metadata.message_type, self.replies[i].content))
        return ids


@pytest.mark.parametrize("mechanism", [{"name": "dp_client", "clip": 0.5, "noise_multiplier": 0.8},
                                       {"name": "dp_sgd", "clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-4}])
def test_the_server_receives_only_the_release_under_dp(tmp_path, mechanism):
    """Every message the Flower server receives under each mechanism: the set-up query's split sizes,
    the DP release ΔP_n, the public step count and the accountant's state — no loss, accuracy, records
    drawn, clipped fraction or compute time. The clients keep those rows; merged after the run they
    are the in-process run's rows. With privacy.release_metrics they are sent, and the statement says
    they are released outside the guarantee."""
    from evaluations.flower.app import make_client_app, merge_client_metrics
    from evaluations.flower.messages import unpack
    from evaluations.flower.trainer import flower_trainer

    cfg = tiny_config(rounds=2, threads=1, hooks=[mechanism])
    fcfg = _flower(cfg)
    run_dir = tmp_path / "flower"
    settings = {"config-yaml": dump_config(fcfg), "run-dir": str(run_dir), "backbone-path": "",
                "client-metrics-dir": str(run_dir / "client_metrics")}
    grid = RecordingGrid(make_client_app(settings), 3, die={})
    summary = flower_trainer(fcfg, run_dir=run_dir, grid=grid).run()
    kinds = {}
    for kind, content in grid.received:
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind == MessageType.TRAIN:
            assert set(content.array_records) == {"delta"}
            result = content.config_records["result"]
            assert set(result.keys()) == {"row", "hooks"}
            assert set(json.loads(result["row"])) == {"local_steps"}
            state = unpack(result["hooks"])
            assert set(state) == {mechanism["name"]} and \
                set(state[mechanism["name"]]) == {"accountant", "mechanism_record"}
        elif kind == MessageType.EVALUATE:
            assert not content.array_records and \
                set(json.loads(content.config_records["result"]["row"])) == {"client", "withheld"}
        else:
            facts = json.loads(content.config_records["info"]["json"])["facts"]
            assert facts["domain"] is None and facts["label_counts"] is None
    assert kinds == {MessageType.QUERY: 3, MessageType.TRAIN: 6, MessageType.EVALUATE: 6}
    assert summary["accuracy"] is None and summary["client_metrics"].startswith("withheld")
    statement = summary["hook_results"][mechanism["name"]]
    assert statement["client_metrics"].startswith("kept by each client") and "split sizes" in statement["public"]
    # The study's side: the rows the clients kept, merged, are the in-process run's.
    ref = Trainer(cfg, run_dir=tmp_path / "ref").run()
    merge_client_metrics(run_dir)
    merged = json.loads((run_dir / "summary.json").read_text())
    assert merged["accuracy"] == ref["accuracy"] and merged["accuracy_generated"] == ref["accuracy_generated"]
    assert _rows(run_dir) == _rows(tmp_path / "ref")
    # privacy.release_metrics: the rows travel, and the statement names them outside the guarantee.
    released = _flower(tiny_config(rounds=1, threads=1, hooks=[mechanism], **{"privacy.release_metrics": True}))
    settings = {**settings, "config-yaml": dump_config(released), "run-dir": str(tmp_path / "released")}
    grid = RecordingGrid(make_client_app(settings), 3, die={})
    out = flower_trainer(released, run_dir=tmp_path / "released", grid=grid).run()
    rows = [json.loads(c.config_records["result"]["row"]) for k, c in grid.received if k == MessageType.TRAIN]
    assert all("train_loss" in r for r in rows) and out["accuracy"] is not None
    assert out["hook_results"][mechanism["name"]]["client_metrics"].startswith("RELEASED to the server outside")


def test_the_app_started_by_hand_refuses_a_used_run_dir(tmp_path):
    """`flwr run RUN_DIR/flower_app` by hand: a run directory that holds a run is never written over."""
    from flwr.app import Context, RecordDict

    from evaluations.flower.app import make_server_app

    cfg = _flower(tiny_config(rounds=1, threads=1))
    Trainer(cfg, run_dir=tmp_path / "done").run()
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "metrics.jsonl").write_text("{}\n")
    for name, what in (("done", "a finished run"), ("half", "an unfinished run")):
        before = sorted(p.name for p in (tmp_path / name).iterdir())
        settings = {"config-yaml": dump_config(cfg), "run-dir": str(tmp_path / name), "backbone-path": ""}
        with pytest.raises(ConfigError, match=f"holds {what}; .*--run-config 'run-dir="):
            make_server_app()(grid=None, context=Context(1, 0, {}, RecordDict(), settings))
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == before


def test_dead_client_continue_keeps_every_round(tmp_path):
    trainer, cfg = _fake_run(tmp_path, "continue")
    # The server holds no client data: N and the split sizes come from the clients' query replies,
    # their domains and label counts do not.
    ref = Trainer(tiny_config(rounds=3, threads=1), run_dir=tmp_path / "ref")
    assert trainer.ctx.train_data == [] and trainer.ctx.eval_data == [] and trainer.ctx.client_states is None
    assert [f.train for f in trainer.loop.roster.clients] == [f.train for f in ref.loop.roster.clients]
    assert all(f.label_counts is None and f.domain is None for f in trainer.loop.roster.clients)
    summary = trainer.run()
    rounds = [json.loads(ln) for ln in (tmp_path / "continue" / "metrics.jsonl").read_text().splitlines()]
    rounds = {r["round"]: r for r in rounds if r["type"] == "round"}
    assert sorted(rounds) == [1, 2, 3]
    assert "failed_clients" not in rounds[1] and rounds[1]["clients_aggregated"] == 3
    assert rounds[2]["failed_clients"] == {"1": "its SuperNode went offline"}
    assert rounds[2]["clients_aggregated"] == 2 and rounds[2]["clients_missing"] == [1]
    assert rounds[3]["failed_clients"] == {"1": "its SuperNode is offline"}
    assert summary["clients_missing"] == [1]
    assert summary["accuracy"]["per_client"][1] is None
    assert summary["accuracy"]["mean"] == pytest.approx(sum(summary["accuracy"]["per_client"][i] for i in (0, 2)) / 2)
    assert "client 1 failed" in (tmp_path / "continue" / "log.txt").read_text()


def test_dead_client_fail_stops_with_finished_rounds_kept(tmp_path):
    from pfedpg.errors import ClientFailure

    trainer, cfg = _fake_run(tmp_path, "fail")
    with pytest.raises(ClientFailure, match="round 2, training: client 1 failed.*on_client_failure"):
        trainer.run()
    lines = [json.loads(ln) for ln in (tmp_path / "fail" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines if r["type"] == "round"] == [1]
    assert (tmp_path / "fail" / "checkpoints" / "round_0001.pt").is_file()
    assert not (tmp_path / "fail" / "summary.json").exists()


# ------------------------------------------------------------------------------------------------
# Deployment: a SuperLink and two SuperNodes as separate processes on 127.0.0.1


from evaluations.flower.local import Federation  # noqa: E402
from evaluations.flower.local import free_port as _free_port  # noqa: E402


@DEPLOY
@pytest.mark.skipif(not (BIN / "flower-superlink").exists(), reason="flower-superlink is not installed in this venv")
def test_deployment_client_dies_mid_run(tmp_path):
    # Flower marks a killed node offline after ~60 s (heartbeats); a 50 s timeout leaves a healthy
    # client margin on a loaded machine and costs no extra time here.
    cfg = _flower(tiny_config(threads=1, eval_every=2, **{"data.num_domains": 2}), round_timeout_s=50.0)
    # The healthy node 0 answers from a long-running worker (seconds per message, not ~15 s).
    sock = Path(f"/tmp/pfedpg-test-{os.getpid()}-{_free_port()}.sock")
    fed = Federation(tmp_path, clients=2, node_configs=[{"partition-id": 0, "worker": str(sock)}, {"partition-id": 1}])
    run_dir = tmp_path / "run"
    try:
        cfg_file = tmp_path / "run.yaml"
        cfg_file.write_text(dump_config(cfg))
        sets = [a for kv in fed.flower_settings() for a in ("--set", kv)]
        proc = subprocess.Popen([str(BIN / "pfedpg-eval"), "train", "--config", str(cfg_file), *sets,
                                 "--run-dir", str(run_dir), "--no-progress"],
                                env=fed.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        metrics = run_dir / "metrics.jsonl"
        while time.time() < deadline and not (metrics.exists() and '"type": "round"' in metrics.read_text()):
            time.sleep(0.2)
        os.killpg(fed.nodes[1].pid, signal.SIGKILL)  # client 1's machine goes away after round 1
        out, _ = proc.communicate(timeout=300)
    finally:
        fed.shutdown()
        for f in (sock, Path(str(sock) + ".log"), Path(str(sock) + ".lock")):
            f.unlink(missing_ok=True)
    assert proc.returncode == 0, out[-3000:]
    assert "plaintext" in out  # insecure: true is explicit and warned about
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    rounds = {r["round"]: r for r in rows if r["type"] == "round"}
    assert sorted(rounds) == [1, 2]
    assert "failed_clients" not in rounds[1]
    assert list(rounds[2]["failed_clients"]) == ["1"] and rounds[2]["clients_aggregated"] == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["clients_missing"] == [1] and summary["accuracy"]["per_client"][0] is not None
    assert "client 1 failed" in out


# ------------------------------------------------------------------------------------------------
# Node-local data: each SuperNode brings its own records; the server holds none


def write_node_files(cfg, out: Path) -> list[dict]:
    """What a hospital would hold: client n's own train and test records of the partition, as npz
    files of its own. Returns each node's --node-config."""
    import numpy as np

    from pfedpg.data import load_dataset, partition_clients

    ds = load_dataset(cfg.data, seed=cfg.seed)
    nodes = []
    for s in partition_clients(ds, cfg.data, seed=cfg.seed):
        paths = {}
        for part, idx in (("train", s.train), ("test", s.test)):
            paths[part] = out / f"client{s.client}_{part}.npz"
            np.savez(paths[part], images=ds.images[idx], labels=ds.labels[idx], domains=np.zeros(len(idx), np.int64),
                     class_names=np.array(ds.class_names), domain_names=np.array([f"site{s.client}"]))
        nodes.append({"partition-id": s.client, "data-path": str(paths["train"]), "test-path": str(paths["test"])})
    return nodes


def _node_local_run(tmp_path, cfg, nodes, name="local"):
    from evaluations.flower.app import make_client_app
    from evaluations.flower.trainer import flower_trainer

    fcfg = _flower(cfg, superlink="127.0.0.1:1", insecure=True, num_clients=len(nodes), round_timeout_s=30.0,
                   node_wait_s=5.0)
    settings = {"config-yaml": dump_config(fcfg), "run-dir": str(tmp_path), "backbone-path": ""}
    grid = FakeGrid(make_client_app(settings), len(nodes), die={}, node_configs=nodes)
    return flower_trainer(fcfg, run_dir=tmp_path / name, grid=grid)


def test_node_local_data_matches_the_partitioned_run(tmp_path):
    from evaluations.flower.app import merge_client_metrics
    from evaluations.flower.node import ClientRuntime

    cfg = tiny_config(rounds=2, threads=1, hooks=[{"name": "dp_client", "clip": 0.5, "noise_multiplier": 0.8}])
    # Under dp_client each node keeps its rows in its own metrics-dir (here all beside the run, to merge).
    nodes = [{**n, "metrics-dir": str(tmp_path / "local" / "client_metrics")} for n in write_node_files(cfg, tmp_path)]
    trainer = _node_local_run(tmp_path, cfg, nodes)
    summary = trainer.run()
    assert summary["accuracy"] is None  # the server never saw them
    merge_client_metrics(tmp_path / "local")
    summary = json.loads((tmp_path / "local" / "summary.json").read_text())
    ref = Trainer(cfg, run_dir=tmp_path / "ref").run()
    # The nodes trained on their own files only: the numbers are the partitioned run's, bit for bit.
    assert summary["accuracy"]["per_client"] == ref["accuracy"]["per_client"]
    assert _rows(tmp_path / "local") == _rows(tmp_path / "ref")
    assert trainer.ctx.train_data == [] and trainer.ctx.eval_data == []  # the server holds no records
    # A node's runtime holds its own client's records and nobody else's.
    rt = ClientRuntime.get({"config-yaml": dump_config(_flower(cfg, superlink="127.0.0.1:1", insecure=True,
                                                               num_clients=3)),
                            "run-dir": str(tmp_path), "backbone-path": ""}, nodes[1])
    sizes = [int(x.shape[0]) for x, _ in rt.clients.records.train_data]
    assert sizes[1] == ref["data"]["train_per_client"][1] and sizes[0] == sizes[2] == 0


@pytest.mark.parametrize("shards", [True, False])
def test_a_process_serving_every_client_holds_one_clients_records(tmp_path, shards):
    """Partition mode (simulation): one ClientApp process serves all clients in turn, like a Ray
    actor, with the partitioned run's numbers, and holds only the current client's records — read
    from its shard (what the simulation driver writes), or re-partitioned from the data file."""
    from evaluations.flower.app import make_client_app
    from evaluations.flower.node import ClientRuntime, write_client_shards
    from evaluations.flower.trainer import flower_trainer

    cfg = tiny_config(rounds=2, threads=1, clients_per_round=2)
    ref = Trainer(cfg, run_dir=tmp_path / "ref").run()
    fcfg = _flower(cfg)
    if shards:
        assert write_client_shards(fcfg, tmp_path / "shards") == 3
    settings = {"config-yaml": dump_config(fcfg), "run-dir": str(tmp_path), "backbone-path": "",
                "client-shards": str(tmp_path / "shards") if shards else ""}
    ClientRuntime._cache.clear()
    summary = flower_trainer(fcfg, run_dir=tmp_path / "one", grid=FakeGrid(make_client_app(settings), 3, die={})).run()
    assert summary["accuracy"]["per_client"] == ref["accuracy"]["per_client"]
    assert _rows(tmp_path / "one") == _rows(tmp_path / "ref")
    (rt,) = ClientRuntime._cache.values()  # the one runtime that served every client
    records = rt.clients.records
    sizes = [int(x.shape[0]) for x, _ in records.train_data]
    tests = [int(x.shape[0]) for x, _ in records.test_data]
    last = records.held
    assert sizes[last] == ref["data"]["train_per_client"][last] and tests[last] > 0
    assert sum(sizes) == sizes[last] and sum(tests) == tests[last] and not hasattr(records, "dataset")
    # Every client's split sizes are known (the config fixes the partition); the records are not.
    assert [f.train for f in records.roster.clients] == ref["data"]["train_per_client"]
    if shards:  # a shard that is not there is a one-line error, not a silent re-partition
        (tmp_path / "shards" / f"client_{(last + 1) % 3}.npz").unlink()
        with pytest.raises(DataError, match=f"client {(last + 1) % 3}'s simulation shard .* is missing"):
            rt.clients.hold((last + 1) % 3)


def test_node_local_split_by_fraction_and_bad_node_configs(tmp_path):
    from evaluations.flower.node import ClientRuntime

    cfg = tiny_config(rounds=1, threads=1)
    nodes = write_node_files(cfg, tmp_path)
    values = {"config-yaml": dump_config(_flower(cfg, superlink="127.0.0.1:1", insecure=True, num_clients=3)),
              "run-dir": str(tmp_path), "backbone-path": ""}
    rt = ClientRuntime.get(values, {"partition-id": 0, "data-path": nodes[0]["data-path"], "test-fraction": 0.25})
    x_tr, x_te = rt.clients.records.train_data[0][0], rt.clients.records.test_data[0][0]
    assert x_te.shape[0] == round(0.25 * (x_tr.shape[0] + x_te.shape[0]))

    def refused(node, match, values=values):
        ClientRuntime._cache.clear()
        with pytest.raises((ConfigError, DataError), match=match):
            ClientRuntime.get(values, node)

    refused({"partition-id": 0, "data-path": str(tmp_path / "nope.npz")},
            r"data-path=.*nope.npz' not found on this node")
    refused({"partition-id": 0}, r"expects node-local data.*data-path=")
    refused({"partition-id": 5, "data-path": nodes[0]["data-path"]},
            r"partition-id=5, but the run has flower.num_clients=3")
    refused({"partition-id": 0, "data-path": nodes[0]["data-path"], "data_path": "x"}, r"unknown key 'data_path'")
    # A node's own device: a spec it cannot read is one line naming the node config key.
    refused({"partition-id": 0, "data-path": nodes[0]["data-path"], "device": "tpu"},
            r"--node-config device='tpu' is not one of auto, cpu, cuda, cuda:N")
    ClientRuntime._cache.clear()
    rt = ClientRuntime.get(values, {"partition-id": 0, "data-path": nodes[0]["data-path"], "device": "cpu"})
    assert rt.run.device == torch.device("cpu") and rt.run.cfg.device == "cpu"
    partitioned = {**values, "config-yaml": dump_config(_flower(cfg))}
    refused({"partition-id": 0, "data-path": nodes[0]["data-path"]}, r"flower.num_clients is null", partitioned)
    with pytest.raises(ConfigError, match="flower.num_clients .*needs a deployment"):
        _flower(cfg, num_clients=3)


def test_node_local_class_lists_must_agree(tmp_path):
    import numpy as np

    cfg = tiny_config(rounds=1, threads=1)
    nodes = write_node_files(cfg, tmp_path)
    # Client 2's file names its classes in another order: its labels would mean other digits.
    for part in ("train", "test"):
        f = tmp_path / f"client2_{part}.npz"
        d = dict(np.load(f))
        d["class_names"] = d["class_names"][::-1].copy()
        np.savez(f, **d)
    with pytest.raises(ConfigError, match=r"client 2\) has classes .* same class list in the same order"):
        _node_local_run(tmp_path, cfg, nodes)
    # Two nodes that claim one id.
    with pytest.raises(ConfigError, match="two SuperNodes claim partition-id=0"):
        _node_local_run(tmp_path, cfg, [nodes[0], {**nodes[1], "partition-id": 0}, nodes[2]], "dup")


@DEPLOY
@pytest.mark.skipif(not (BIN / "flower-superlink").exists(), reason="flower-superlink is not installed in this venv")
def test_deployment_with_node_local_data_tls_and_node_authentication(tmp_path):
    """A deployment as a federation of hospitals runs it: each SuperNode reads only its own files,
    the SuperLink serves TLS and admits only registered SuperNodes. Same numbers as the in-process
    run on the same records; node 0 serves its messages from a long-running worker (``worker=``)."""
    from evaluations.flower.certs import make_certificates

    # 2 clients, 2 rounds, evaluated after the last
    cfg = tiny_config(threads=1, eval_every=2, **{"data.num_domains": 2})
    certs = tmp_path / "certs"
    make_certificates(certs, nodes=2)
    nodes = write_node_files(cfg, tmp_path)
    # Node 0 keeps its client alive in a long-running worker; node 1 builds it in every ClientApp.
    sock = Path(f"/tmp/pfedpg-test-{os.getpid()}-{_free_port()}.sock")
    nodes[0]["worker"] = str(sock)
    fed = Federation(tmp_path, clients=2, certs=certs, node_configs=nodes)
    try:
        assert "--enable-supernode-auth" in fed.link.args  # certificates given: node authentication on
        # A SuperNode that dials with the CA but no registered key (one that would register itself)
        # is turned away by node authentication, and only by it (shown by
        # test_supernode_auth_is_what_turns_an_unregistered_node_away).
        # (Its output goes to a file: a SuperExec child may hold a pipe open after the node exits.)
        rogue = fed._start("rogue", [BIN / "flower-supernode", "--root-certificates", certs / "ca.crt",
                                     "--superlink", f"127.0.0.1:{fed.port}", "--port", str(_free_port()),
                                     "--node-config", "partition-id=0"])
        # (It is turned away while the run goes on: the run does not wait for it.)
        try:
            proc = fed.train(_flower(cfg, num_clients=2, superlink=f"127.0.0.1:{fed.port}",
                                     root_certificates=str(certs / "ca.crt")), tmp_path / "run")
            assert sock.exists()  # the worker listens while its SuperNode runs
            worker_pid = int((Path(str(sock) + ".log").read_text().split("(pid ")[1]).split(")")[0])
            rogue_code = rogue.wait(timeout=120)
        finally:
            if rogue.poll() is None:
                os.killpg(rogue.pid, signal.SIGKILL)
    finally:
        codes = fed.shutdown()
    assert rogue_code != 0 and AUTH_REFUSAL in (tmp_path / "rogue.log").read_text()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "plaintext" not in proc.stderr  # TLS: no insecure warning
    # The worker ends with its SuperNode.
    deadline = time.time() + 30
    while time.time() < deadline and Path(f"/proc/{worker_pid}").exists():
        time.sleep(0.2)
    assert not Path(f"/proc/{worker_pid}").exists() and not sock.exists()
    for f in (Path(str(sock) + ".log"), Path(str(sock) + ".lock")):
        f.unlink(missing_ok=True)
    ref = Trainer(cfg, run_dir=tmp_path / "ref").run()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["accuracy"]["per_client"] == ref["accuracy"]["per_client"]
    assert _rows(tmp_path / "run") == _rows(tmp_path / "ref")
    # Clean shutdown: every process ends on SIGTERM (uvicorn re-raises it after a graceful stop),
    # the SuperLink completes its shutdown, and no child process is left behind.
    assert all(c in (0, -signal.SIGTERM) for c in codes.values()), codes
    assert "Application shutdown complete" in (tmp_path / "superlink.log").read_text()
    time.sleep(1)
    assert fed.leftovers() == []


#: What a SuperNode logs when a SuperLink with --enable-supernode-auth refuses to let it register
#: itself (Flower 1.42, ApiErrorCode 2001), and when it activates a key the SuperLink does not know (2004).
AUTH_REFUSAL = "[code: 2001] SuperNode authentication is enabled. All SuperNodes must be registered via the CLI."
UNKNOWN_KEY = "[code: 2004] Failed to activate SuperNode."


def _process(log: Path, cmd, env) -> subprocess.Popen:
    with open(log, "w") as out:  # a file, not a pipe: a SuperExec child may outlive its SuperNode
        return subprocess.Popen([str(c) for c in cmd], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _admitted_or_refused(proc: subprocess.Popen, log: Path, timeout: float = 120) -> str:
    """Waits until the SuperNode is in (it logs the id the SuperLink gave it) or has exited; its log."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and "SuperNode ID:" not in log.read_text():
        time.sleep(0.2)
    return log.read_text()


def _node_id(log: str) -> str | None:
    m = re.search(r"SuperNode ID: (\d+)", log)
    return m and m.group(1)


def _end(*procs: subprocess.Popen) -> None:
    from evaluations.flower.local import _stop

    for p in procs:
        _stop(p)
        try:  # what is left of its process group (its SuperExec)
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@DEPLOY
@pytest.mark.skipif(not (BIN / "flower-superlink").exists(), reason="flower-superlink is not installed in this venv")
def test_supernode_auth_is_what_turns_an_unregistered_node_away(tmp_path):
    """The SuperLink the toolkit starts with certificates, and the same command without
    --enable-supernode-auth: the same keyless SuperNode command (TLS, the right CA) is refused by
    the first with the auth refusal and admitted by the second. A node with a key that was never
    registered is refused by both (a keyed node never registers itself in Flower 1.42): its refusal
    proves nothing about auth — the observable the deployment test had before."""
    from evaluations.flower.certs import make_certificates
    from evaluations.flower.local import wait_listening

    certs = tmp_path / "certs"
    make_certificates(certs, nodes=2)  # node 0 registered by the Federation; node 1 never
    (tmp_path / "on").mkdir()
    fed = Federation(tmp_path / "on", clients=1, certs=certs)
    procs = []
    try:
        on_cmd = list(fed.link.args)
        off_cmd = [a for a in on_cmd if a != "--enable-supernode-auth"]
        assert len(off_cmd) == len(on_cmd) - 1
        off_port = _free_port()
        off_cmd[off_cmd.index("--port") + 1] = str(off_port)
        off = tmp_path / "off"
        off.mkdir()
        procs.append(_process(off / "superlink.log", off_cmd, {**fed.env, "FLWR_HOME": str(off)}))
        wait_listening(procs[0], off_port, off / "superlink.log")
        logs = {}
        for where, port in (("on", fed.port), ("off", off_port)):
            node = [BIN / "flower-supernode", "--root-certificates", certs / "ca.crt",
                    "--superlink", f"127.0.0.1:{port}"]
            for who, key in (("keyless", []), ("unregistered", ["--auth-supernode-private-key", certs / "node1.key"])):
                log = tmp_path / where / f"{who}.log"
                procs.append(_process(log, [*node, *key, "--port", str(_free_port())], fed.env))
                logs[where, who] = (procs[-1], log)
        seen = {k: _admitted_or_refused(p, log) for k, (p, log) in logs.items()}
        alive = {k: p.poll() is None for k, (p, _) in logs.items()}
        node0 = _admitted_or_refused(fed.nodes[0], tmp_path / "on" / "supernode0.log")
    finally:
        _end(*procs)
        fed.shutdown()
    on_log = (tmp_path / "on" / "superlink.log").read_text()
    off_log = (tmp_path / "off" / "superlink.log").read_text()
    # Auth on: the registered node is in; the keyless node is refused by node authentication.
    assert _node_id(node0) and f"Activated node_id={_node_id(node0)}" in on_log
    assert AUTH_REFUSAL in seen["on", "keyless"] and not alive["on", "keyless"]
    assert _node_id(seen["on", "keyless"]) is None
    # Auth off (the only difference): the same command registers itself and the SuperLink activates it.
    assert "SuperNode authentication is disabled" in off_log and "authentication is disabled" not in on_log
    nid = _node_id(seen["off", "keyless"])
    assert nid and f"Activated node_id={nid}" in off_log and alive["off", "keyless"], seen["off", "keyless"][-2000:]
    # An unregistered key is refused either way, with the same message: no proof of auth.
    for where in ("on", "off"):
        assert UNKNOWN_KEY in seen[where, "unregistered"] and not alive[where, "unregistered"]


@DEPLOY
@pytest.mark.skipif(not (BIN / "flower-superlink").exists(), reason="flower-superlink is not installed in this venv")
def test_a_tls_superlink_refuses_a_plaintext_supernode(tmp_path):
    """The toolkit's SuperLink (TLS, node auth): node 0 dials with TLS and its registered key and is
    in. One keyless node command, dialled with TLS (the CA), reaches the SuperLink and is answered
    (the auth refusal); dialled plaintext (--insecure) it is dropped at the transport: it reads no
    answer and the SuperLink logs no request from it. A plaintext node cannot bring a key either:
    flower-supernode itself refuses --insecure with --auth-supernode-private-key."""
    from evaluations.flower.certs import make_certificates

    certs = tmp_path / "certs"
    make_certificates(certs, nodes=1)
    fed = Federation(tmp_path, clients=1, certs=certs)
    procs = {}
    try:
        # --max-retries 0: a plaintext node otherwise retries a dropped connection forever
        for name, transport in (("plain", ["--insecure"]), ("tls", ["--root-certificates", certs / "ca.crt"]),
                                ("plain_key", ["--insecure", "--auth-supernode-private-key", certs / "node0.key"])):
            procs[name] = _process(tmp_path / f"{name}.log", [
                BIN / "flower-supernode", *transport, "--superlink", f"127.0.0.1:{fed.port}",
                "--port", str(_free_port()), "--max-retries", "0"], fed.env)
        node0 = _admitted_or_refused(fed.nodes[0], tmp_path / "supernode0.log")
        seen = {name: _admitted_or_refused(p, tmp_path / f"{name}.log") for name, p in procs.items()}
        codes = {name: p.poll() for name, p in procs.items()}
    finally:
        _end(*procs.values())
        fed.shutdown()
    link_log = (tmp_path / "superlink.log").read_text()
    assert _node_id(node0) and f"Activated node_id={_node_id(node0)}" in link_log
    assert "Starting insecure channel" in seen["plain"] and codes["plain"] not in (None, 0)
    assert "Failed to initialize the connection to the SuperLink.\nServer disconnected without sending a response." \
        in seen["plain"] and _node_id(seen["plain"]) is None
    assert AUTH_REFUSAL in seen["tls"] and codes["tls"] not in (None, 0)
    assert "Node authentication can only be used when TLS is enabled" in seen["plain_key"] and codes["plain_key"]
    # What reached the SuperLink's HTTP layer: the TLS node's registration (refused) and node 0's
    # activation — nothing from the plaintext node, which would have asked to register too.
    calls = re.findall(r'"POST /v1/fleet/(register-node|activate-node) HTTP/1.1" (\d+)', link_log)
    assert sorted(calls) == [("activate-node", "200"), ("register-node", "412")], calls


def test_the_toolkit_runs_supernode_auth_whenever_it_has_certificates(tmp_path, capsys):
    """Every SuperLink command the toolkit starts (Federation), prints (flower-certs) or documents
    (docs/how-to/flower.md) with certificates carries --enable-supernode-auth; without certificates, --insecure."""
    import shlex

    from evaluations.cli import main
    from evaluations.flower.certs import superlink_args, supernode_args

    assert superlink_args(None) == supernode_args(None, 0) == ["--insecure"]
    assert "--enable-supernode-auth" in superlink_args("certs") and "--ssl-certfile" in superlink_args("certs")
    assert supernode_args("certs", 1) == ["--root-certificates", "certs/ca.crt",
                                          "--auth-supernode-private-key", "certs/node1.key"]
    out_dir = tmp_path / "c"
    assert main(["flower-certs", str(out_dir), "--nodes", "2", "--host", "link.example"]) == 0
    lines = capsys.readouterr().out.splitlines()

    def printed(label):
        return [shlex.split(ln.split(":", 1)[1]) for ln in lines if ln.startswith(f"  {label}:")]

    assert printed("server") == [["flower-superlink", *superlink_args(out_dir)]]
    registers = [shlex.split(ln) for ln in lines if ln.lstrip().startswith("flwr supernode register")]
    assert registers == [["flwr", "supernode", "register", str(out_dir / f"node{n}.pub"), "fed"] for n in range(2)]
    for n in range(2):
        (node,) = printed(f"node {n}")
        assert node[:7] == ["flower-supernode", *supernode_args(out_dir, n), "--superlink", "link.example:8000"]
    # The documented deployment's steps 2 and 4: the same flags.
    readme = (Path(__file__).parents[1] / "docs" / "how-to" / "flower.md").read_text().replace("\\\n", " ")
    link = next(ln for ln in readme.splitlines() if ln.startswith("flower-superlink --ssl"))
    assert shlex.split(link) == ["flower-superlink", *superlink_args("certs")]
    node = next(ln for ln in readme.splitlines() if ln.startswith("flower-supernode --root"))
    assert shlex.split(node)[:5] == ["flower-supernode", *supernode_args("certs", 0)]
    # A federation with certificates but no key pair for a node is refused before anything starts.
    with pytest.raises(ConfigError, match=r"node2\.key not found.*flower-certs NEW_DIR --nodes 3"):
        Federation(tmp_path, clients=3, certs=out_dir)
    assert not (tmp_path / "flwr_home").exists()


def test_deployment_connection_settings_are_checked_first(tmp_path, capsys):
    from evaluations.cli import main

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(dump_config(_flower(tiny_config(), insecure=True)))
    with pytest.raises(ConfigError, match="TLS by default.*pfedpg-eval flower-certs"):
        _flower(tiny_config(), superlink="127.0.0.1:9093")
    code = main(["train", "--config", str(cfg_file), "--set", "flower.insecure=false", "--set",
                 "flower.superlink=127.0.0.1:9", "--set", f"flower.root_certificates={tmp_path / 'ca.crt'}",
                 "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "flower.root_certificates=" in err and "not found" in err and "flower-certs" in err
    assert not (tmp_path / "run").exists()  # nothing written


def test_flower_certs_command(tmp_path):
    from evaluations.cli import main

    assert main(["flower-certs", str(tmp_path / "c"), "--nodes", "1", "--host", "10.0.0.5",
                 "--host", "link.example"]) == 0
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    cert = x509.load_pem_x509_certificate((tmp_path / "c" / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert san.get_values_for_type(x509.DNSName) == ["link.example"]
    key = load_ssh_private_key((tmp_path / "c" / "node0.key").read_bytes(), None)
    assert load_ssh_public_key((tmp_path / "c" / "node0.pub").read_bytes()).public_numbers() == \
        key.public_key().public_numbers()
    assert (tmp_path / "c" / "ca.key").stat().st_mode & 0o077 == 0  # private keys are owner-only
    assert main(["flower-certs", str(tmp_path / "c")]) == 2  # keys are never overwritten
