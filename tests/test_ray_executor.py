"""--executor ray: a grid's cells as Ray tasks on a two-node cluster on this machine (logical GPUs).

The cluster: a head that runs no cells (the driver's node) and three worker nodes: A with 2 CPUs and
1 logical GPU (its GPU, not its CPUs, limits it to one cell at a time), B with 1 CPU and 1 GPU (lost
while its first cell runs), C with 2 CPUs and 2 GPUs. Every cell has ``device: auto`` and
``threads: 1``, so on a cluster with GPUs each asks for one CPU and one GPU (torch sees no CUDA here:
the cells run on the CPU, and Ray's ``CUDA_VISIBLE_DEVICES`` records the GPU it was given).
"""
import csv
import json
import sys

import pytest
import yaml
from conftest import TINY_MODEL

from evaluations.cli import main
from evaluations.privacy import load_sweep, run_sweep
from pfedpg.errors import ConfigError

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.xdist_group("ray")


def sweep_file(tmp_path, **base):
    tree = {"base": {"rounds": 2, "checkpoint_every": 1, "threads": 1, "device": "auto",
                     "data": {"image_size": 8, "num_domains": 3, "max_train_per_client": 32,
                              "max_test_per_client": 30},
                     "model": {"weights": "random", "kwargs": dict(TINY_MODEL), "num_prompts": 2},
                     "client": {"batch_size": 16}, **base},
            "privacy": {"seeds": [0, 1], "mechanisms": {"dp_client": {"clip": 0.5}}, "target_epsilons": None,
                        "noise_multipliers": [1.0], "baselines": ["nonprivate", "local"]}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def table(out):
    with open(out / "tradeoff.csv") as f:
        return [{k: v for k, v in r.items() if k != "run_dir"} for r in csv.DictReader(f)]


def records(out):
    return {d.name: json.loads((d / "env.json").read_text())["executor"] for d in (out / "runs").iterdir()}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    a = c.add_node(num_cpus=2, num_gpus=1)
    b = c.add_node(num_cpus=1, num_gpus=1)
    n3 = c.add_node(num_cpus=2, num_gpus=2)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c, a, b, n3
    ray.shutdown()
    c.shutdown()


def test_a_grid_on_two_nodes_equals_the_local_table_survives_a_lost_node_and_resumes(tmp_path, cluster):
    from evaluations.ray_executor import RayExecutor

    c, a, b, n3 = cluster
    sweep, base = load_sweep(sweep_file(tmp_path))
    local = run_sweep(sweep, base, out_dir=tmp_path / "local", log=lambda m: None)
    starts_on_b, lost = [], []

    def on_start(name, node, attempt):
        if node["node_id"] == b.node_id:
            starts_on_b.append(name)
            if len(starts_on_b) == 1:  # B runs its first cell: the node goes away under it
                lost.append(name)
                c.remove_node(b)

    logs = []
    out = run_sweep(sweep, base, out_dir=tmp_path / "ray", log=logs.append, executor=RayExecutor(on_start=on_start))
    assert lost, "no cell started on node B; the test proved nothing"
    rows = table(out)
    assert [r["status"] for r in rows] == ["ok"] * 6
    assert rows == table(local)  # same numbers as one after another in this process
    rec = records(out)
    assert {r["node_id"] for r in rec.values()} == {a.node_id, n3.node_id}  # cells on both nodes left
    assert rec[lost[0]]["attempt"] == 2 and rec[lost[0]]["node_id"] != b.node_id  # run again, elsewhere
    assert any(f"{lost[0]}: started again on node" in m for m in logs)
    assert all(len(r["gpu_ids"]) == 1 for r in rec.values())
    assert len({r["gpu_ids"][0] for r in rec.values() if r["node_id"] == n3.node_id}) == 2  # both of C's GPUs
    for x in rec.values():  # no two cells at the same time on one GPU
        for y in rec.values():
            if x is not y and x["node_id"] == y["node_id"] and x["gpu_ids"] == y["gpu_ids"]:
                assert x["finished_at"] <= y["started_at"] or y["finished_at"] <= x["started_at"]
    for name, r in rec.items():
        env = json.loads((out / "runs" / name / "env.json").read_text())
        assert env["cuda_visible_devices"] == r["gpu_ids"][0] and env["device"] == "cpu"
        assert (out / "runs" / name / "report.md").is_file() and (out / "runs" / name / "checkpoints").is_dir()
    finished = sum("accuracy" in m and "(on cpu, node " in m for m in logs)
    assert finished == 6
    # A rerun reuses every finished cell; a cell deleted since runs again (on the node left).
    logs.clear()
    (out / "tradeoff.csv").unlink()
    import shutil

    shutil.rmtree(out / "runs" / "local-s1")
    run_sweep(sweep, base, out_dir=out, log=logs.append, executor=RayExecutor())
    assert sum("done before, reused" in m for m in logs) == 5
    assert records(out)["local-s1"]["node_id"] in (a.node_id, n3.node_id) and table(out) == table(local)


def test_ctrl_c_cancels_the_cells_on_the_cluster_and_the_rerun_finishes_them(tmp_path, cluster):
    from evaluations.ray_executor import RayExecutor

    sweep, base = load_sweep(sweep_file(tmp_path))

    def interrupt(name, node, attempt):
        raise KeyboardInterrupt

    logs = []
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, base, out_dir=tmp_path / "cut", log=logs.append, executor=RayExecutor(on_start=interrupt))
    assert any("cancelled" in m and "unfinished cell(s) on the Ray cluster" in m for m in logs)
    assert not (tmp_path / "cut" / "tradeoff.csv").exists()
    logs.clear()
    out = run_sweep(sweep, base, out_dir=tmp_path / "cut", log=logs.append, executor=RayExecutor())
    assert [r["status"] for r in table(out)] == ["ok"] * 6


def test_what_the_ray_executor_refuses_before_any_cell_runs(tmp_path, capsys, monkeypatch):
    from evaluations.ray_executor import RayExecutor

    for base, match in [({"engine": "flower"}, "Flower's simulation starts a Ray runtime of its own"),
                        ({"device": "cuda:1"}, "names a GPU of one machine")]:
        sweep, b = load_sweep(sweep_file(tmp_path, **base))
        with pytest.raises(ConfigError, match=match):
            run_sweep(sweep, b, out_dir=tmp_path / "x", log=lambda m: None, executor=RayExecutor())
        assert not (tmp_path / "x").exists()  # refused before any cell ran (and before anything was written)
    path = str(sweep_file(tmp_path))
    for argv, said in [(["--executor", "ray", "--jobs", "2"], "--jobs is for --executor local"),
                       (["--ray-address", "127.0.0.1:6379"], "--ray-address needs --executor ray")]:
        assert main(["privacy", "--config", path, "--out", str(tmp_path / "y"), *argv]) == 2
        assert said in capsys.readouterr().err
    # The core install (no Ray): one line naming the extra.
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["privacy", "--config", path, "--out", str(tmp_path / "z"), "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --executor ray needs Ray: pip install -e '.[ray]' (the flower extra includes it); " \
                  "or use --executor local"


def test_a_backbone_the_cells_share_is_pretrained_once_as_a_task(tmp_path, cluster):
    from evaluations.ray_executor import RayExecutor

    path = sweep_file(tmp_path, model={"weights": "pretrain", "kwargs": dict(TINY_MODEL), "num_prompts": 2},
                      pretrain={"epochs": 1, "cache_dir": str(tmp_path / "cache")},
                      data={"image_size": 8, "num_domains": 3, "max_train_per_client": 32, "max_test_per_client": 30,
                            "public_fraction": 0.3})
    tree = yaml.safe_load(path.read_text())
    tree["privacy"].update(seeds=[0], baselines=["nonprivate"])
    path.write_text(yaml.safe_dump(tree))
    sweep, base = load_sweep(path)
    logs = []
    out = run_sweep(sweep, base, out_dir=tmp_path / "pre", log=logs.append, executor=RayExecutor())
    assert sum("pretraining 1 backbone(s) first, as Ray tasks" in m for m in logs) == 1
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    assert [r["status"] for r in table(out)] == ["ok"] * 2
