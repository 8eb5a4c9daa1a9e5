"""``--executor ray``: a grid's cells as Ray tasks, on one machine or a cluster of them.

Each cell is one task that asks for ``num_cpus`` = its ``threads`` (1 where the config leaves them
null) and, when its device resolves to CUDA (``cuda``, or ``auto`` on a cluster with GPUs), for
``num_gpus: 1``: Ray then gives the task one GPU of its node alone (``CUDA_VISIBLE_DEVICES``), so no
two concurrent cells share a GPU and inside the task the device is its own ``cuda:0``. A task runs
the cell body every executor runs (``evaluations.executors.run_cell``) in a temporary folder of its
node and sends the run directory's files back through Ray: the driver writes each cell's
``OUT/runs/CELL`` exactly as a local run would (no shared filesystem), so resume, the merged tables,
the reports and ``plan`` work unchanged. A cell cut short earlier travels to its task with its
checkpoints and resumes there. Backbones the cells pretrain (``weights: pretrain``) are trained once,
as tasks, before the cells, and shipped to every cell that needs one. ``env.json`` of each run
records where it ran (``executor``: node, host, GPU ids, attempt, times).

A task whose node dies is run again elsewhere (``max_retries``) and the grid completes; a cell that
raises is a row, as with the local executor. Ctrl-C cancels the outstanding tasks. Every node needs
this toolkit installed (same version) and each cell's data at the same path (a relative path is read
from the driver's working directory where the node has that directory). A Flower cell is refused:
Flower's simulation starts a Ray runtime of its own, and a second runtime inside a task is not safe.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from evaluations.executors import CellJob, Finish, backbones_needed, outcome, pretrain, run_cell
from pfedpg import jsonio
from pfedpg.errors import ConfigError

if TYPE_CHECKING:
    from pfedpg.config import RunConfig

#: what an install without Ray is told (the flower extra pins the same Ray)
RAY_MISSING = ("--executor ray needs Ray: pip install -e '.[ray]' (the flower extra includes it); "
               "or use --executor local")


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    return ray


class RayExecutor:
    """Cells as Ray tasks on the cluster at ``address`` (``HOST:PORT`` of a ``ray start --head``), or on
    a local Ray instance started for the grid and stopped at its end (``address`` None). A driver
    already connected to Ray (``ray.init`` before) uses that connection and leaves it open.
    ``on_start(name, node, attempt)`` is told, on the driver, each time a cell's task starts."""

    name = "ray"

    def __init__(self, address: str | None = None, *, max_retries: int = 3,
                 on_start: Callable[[str, dict[str, Any], int], None] | None = None):
        self.address, self.max_retries, self.on_start = address, max_retries, on_start

    def check(self, configs: list[RunConfig]) -> None:
        import_ray()
        for cfg in configs:
            if cfg.engine == "flower":
                raise ConfigError("engine: flower cells cannot run under --executor ray (Flower's simulation starts "
                                  "a Ray runtime of its own inside the cell); use --executor local, or run one "
                                  "federation across machines with Flower's SuperLink (docs/how-to/flower.md)")
            if str(cfg.device).startswith("cuda:"):
                raise ConfigError(f"device: {cfg.device} names a GPU of one machine; under --executor ray use device: "
                                  "cuda or auto (each cell gets a GPU of its own)")

    def run(self, jobs: list[CellJob], *, log: Callable[[str], None], finish: Finish, progress: bool) -> None:
        if not jobs:
            return
        ray = import_ray()
        own = not ray.is_initialized()
        if own:
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.ERROR)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise ConfigError(f"cannot reach the Ray cluster at {self.address}: {' '.join(str(e).split())[:200]}; "
                                  "start it with `ray start --head` or fix --ray-address") from None
        pending: dict[Any, CellJob] = {}
        try:
            res = ray.cluster_resources()
            gpus = int(res.get("GPU", 0))
            log(f"Ray: {len(jobs)} cell(s) on {len(ray.nodes())} node(s) with {int(res.get('CPU', 0))} CPUs and "
                f"{gpus} GPU(s){f' at {self.address}' if self.address else ' (a local instance)'}")
            if any(job.config.device == "cuda" for job in jobs) and not gpus:
                raise ConfigError("device: cuda, but the Ray cluster has no GPU; use device: auto or cpu, "
                                  "or add GPU nodes")
            if any(job.config.threads is None for job in jobs):
                log("cells with threads: null ask Ray for 1 CPU and run 1 torch thread; set threads for more")
            backbones = self._pretrain(ray, jobs, log)
            board = _board(ray)
            cell = ray.remote(_cell_task)
            for job in jobs:
                threads = job.config.threads or 1
                want_gpu = job.config.device == "cuda" or (job.config.device == "auto" and gpus > 0)
                ref = cell.options(num_cpus=threads, num_gpus=1 if want_gpu else 0, max_retries=self.max_retries,
                                   scheduling_strategy="SPREAD",
                                   retry_exceptions=False).remote(
                    job.config, job.name, threads, _files(job.run_dir), backbones.get(job.name),
                    os.getcwd(), list(sys.argv), board)
                pending[ref] = job
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for name, node, attempt in ray.get(board.drain.remote()):
                    if attempt > 1:
                        log(f"{name}: started again on {_node_word(node)} (attempt {attempt}; its node was lost)")
                    if self.on_start is not None:
                        self.on_start(name, node, attempt)
                for ref in ready:
                    job = pending.pop(ref)
                    try:
                        got = ray.get(ref)
                    except ray.exceptions.RayError as e:  # its retries spent, or cancelled
                        finish(job, None, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}", str(e))
                        continue
                    _land(job.run_dir, got["files"])
                    finish(job, got["summary"], got["error"], got["trace"], _where(got["record"]))
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            log(f"cancelled {len(pending)} unfinished cell(s) on the Ray cluster")
            raise
        finally:
            if own:
                ray.shutdown()

    def _pretrain(self, ray, jobs: list[CellJob], log: Callable[[str], None]) -> dict[Any, Any]:
        """Each backbone the cells pretrain, trained once as a task (unless this machine's cache has it),
        cached here, and put in Ray's object store once: {cell name: object ref of its backbone}."""
        from pfedpg.pretrain import cached_path

        needed = backbones_needed([job.config for job in jobs])
        if needed:
            log(f"pretraining {len(needed)} backbone(s) first, as Ray tasks")
            task = ray.remote(_pretrain_task)
            refs = {path: task.options(num_cpus=cfg.threads or 1, max_retries=self.max_retries).remote(
                cfg, cfg.threads or 1, os.getcwd()) for path, cfg in needed.items()}
            for path, ref in refs.items():
                _write_atomic(path, ray.get(ref))
        out = {}
        for job in jobs:
            if job.config.model.weights == "pretrain":
                path = cached_path(job.config)
                if path not in out:
                    out[path] = ray.put(path.read_bytes())
        return {job.name: out[cached_path(job.config)] for job in jobs if job.config.model.weights == "pretrain"}


def executor_for(name: str = "local", ray_address: str | None = None) -> RayExecutor | None:
    """The executor ``--executor`` and ``--ray-address`` name; None for the local one (``--jobs`` builds it)."""
    if ray_address and name != "ray":
        raise ConfigError("--ray-address needs --executor ray")
    if name == "local":
        return None
    if name != "ray":
        raise ConfigError(f"--executor {name!r}: choose local or ray")
    return RayExecutor(ray_address)


def _board(ray):
    """A small actor on the driver's node that counts each cell's task starts (attempts)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    class Board:
        def __init__(self):
            self.attempts: dict[str, int] = {}
            self.lines: list[tuple[str, dict[str, Any], int]] = []

        def started(self, name: str, node: dict[str, Any]) -> int:
            n = self.attempts[name] = self.attempts.get(name, 0) + 1
            self.lines.append((name, node, n))
            return n

        def drain(self) -> list[tuple[str, dict[str, Any], int]]:
            out, self.lines = self.lines, []
            return out

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Board.options(scheduling_strategy=here).remote()


def _node_word(node: dict[str, Any]) -> str:
    return f"node {node['node_ip']} ({node['node_id'][:8]})"


def _where(record: dict[str, Any]) -> str:
    gpu = f", Ray GPU {','.join(record['gpu_ids'])}" if record.get("gpu_ids") else ""
    again = f", attempt {record['attempt']}" if record.get("attempt", 1) > 1 else ""
    return f"{_node_word(record)}{gpu}{again}"


def _files(run_dir: Path) -> dict[str, bytes]:
    """A run directory's files by relative path ({} where there is none)."""
    if not run_dir.is_dir():
        return {}
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _land(run_dir: Path, files: dict[str, bytes]) -> None:
    """A task's run directory, written here as the cell's (replacing what was shipped to it)."""
    import shutil

    if run_dir.exists():
        shutil.rmtree(run_dir)
    for rel, data in files.items():
        p = run_dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@contextmanager
def _in_dir(cwd: str):
    """In the driver's working directory where this node has it (relative paths read as there)."""
    old = os.getcwd()
    if os.path.isdir(cwd):
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(old)


def _node() -> dict[str, Any]:
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "host": socket.gethostname(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}


def _pretrain_task(cfg: RunConfig, threads: int, cwd: str) -> bytes:
    with _in_dir(cwd):
        return Path(pretrain(cfg, threads)).read_bytes()


def _cell_task(cfg: RunConfig, name: str, threads: int, files: dict[str, bytes], backbone: bytes | None,
               cwd: str, argv: list[str], board) -> dict[str, Any]:
    """One cell on a Ray worker: its run directory in a temporary folder, sent back as files."""
    import ray

    from pfedpg.pretrain import cached_path

    node = _node()
    attempt = ray.get(board.started.remote(name, node))
    started = time.time()
    with _in_dir(cwd), tempfile.TemporaryDirectory(prefix="pfedpg-cell-") as d:
        if backbone is not None and not cached_path(cfg).is_file():
            _write_atomic(cached_path(cfg), backbone)
        rd = Path(d) / name
        _land(rd, files)
        try:
            summary, error, trace = run_cell(cfg, str(rd), threads), None, None
        except Exception as e:  # a row, as with the local executor
            summary, error, trace = outcome(e)
        record = {"name": "ray", **node, "attempt": attempt, "started_at": started, "finished_at": time.time()}
        env = rd / "env.json"
        if env.is_file():  # where it ran, and the driver's command line rather than the worker's
            data = jsonio.read(env)
            env.write_text(jsonio.dumps({**data, "argv": argv, "executor": record}, indent=2))
        return {"summary": summary, "error": error, "trace": trace, "record": record, "files": _files(rd)}
