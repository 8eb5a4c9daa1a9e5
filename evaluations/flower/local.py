"""Flower processes on 127.0.0.1, owned by whoever starts them:

* :class:`LocalSuperLink` — one ``flower-superlink`` on a free port, stopped (with its children)
  when the ``with`` block ends; the simulation engine runs on one (``simulation=True``).
* :class:`Federation` — a throw-away federation, a SuperLink and one SuperNode per client, each
  its own process — for the deployment tests and ``bench/flower_messages.py``, and for a user who
  wants to try a deployment on one machine before spreading it over several::

    fed = Federation(Path("fed"), clients=2, certs=Path("certs"))   # certs: flower-certs --nodes 2
    fed.train(cfg, Path("fed/run")); fed.shutdown()
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pfedpg.errors import ConfigError

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux /proc), whatever session or group it put itself in."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _stop(p: subprocess.Popen, timeout: float = 30) -> int | None:
    """Stops ``p`` and everything below it (its SuperExec, flwr-simulation, Ray — some start their
    own sessions): SIGTERM, then SIGKILL to whatever is left after ``timeout`` s."""
    tree = descendants(p.pid)
    for pid in [p.pid, *tree]:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        code = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    deadline = time.time() + timeout
    while any(_alive(pid) for pid in tree) and time.time() < deadline:
        time.sleep(0.1)
    for pid in [*tree, *descendants(p.pid)] + ([p.pid] if code is None else []):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if code is None:
        p.wait()
    return code


def wait_listening(proc: subprocess.Popen, port: int, log: Path, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited ({proc.returncode}): {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"flower-superlink did not listen on 127.0.0.1:{port} within {timeout:g} s (its log: {log})")


def write_connection(home: Path, address: str, *, insecure: bool, root_certificates: str | None = None) -> Path:
    """``home/config.toml``: the Flower CLI's SuperLink connection ``fed`` (``FLWR_HOME=home``);
    what a user writes to start ``RUN_DIR/flower_app`` by hand with ``flwr run RUN_DIR/flower_app fed``."""
    home.mkdir(parents=True, exist_ok=True)
    conn = [f"address = {json.dumps(address)}", f"insecure = {'true' if insecure else 'false'}"]
    if root_certificates:
        conn.append(f"root-certificates = {json.dumps(root_certificates)}")
    (home / "config.toml").write_text('[superlink]\ndefault = "fed"\n\n[superlink.fed]\n' + "\n".join(conn) + "\n")
    return home / "config.toml"


class LocalSuperLink:
    """``flower-superlink`` on a free port of 127.0.0.1 (plaintext: it listens on loopback only),
    with ``FLWR_HOME=home`` and its log in ``home/superlink.log``; ``simulation=True`` runs Flower's
    simulation runtime (what ``flwr run`` starts for a ``:local:`` connection). Leaving the ``with``
    block stops it and everything it started."""

    def __init__(self, home: Path, *, simulation: bool = False):
        self.home, self.simulation = Path(home), simulation

    def __enter__(self) -> "LocalSuperLink":
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = self.home / "superlink.log"
        env = {**os.environ, "FLWR_HOME": str(self.home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        cmd = [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd + (["--simulation"] if self.simulation else []), env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_listening(self.proc, self.port, self.log)
        except BaseException:
            _stop(self.proc)
            raise
        return self

    def connect(self) -> Path:
        """Writes the Flower CLI's connection ``fed`` to this SuperLink; returns FLWR_HOME."""
        write_connection(self.home, f"127.0.0.1:{self.port}", insecure=True)
        return self.home

    def __exit__(self, *exc) -> None:
        _stop(self.proc)


class Federation:
    """``flower-superlink`` and one ``flower-supernode`` per client, each its own process.

    ``certs``: a directory from ``make_certificates`` with a key pair per node — the SuperLink serves
    TLS with its server certificate and, always with certificates, admits only SuperNodes whose
    public keys were registered (``--enable-supernode-auth``: :func:`~evaluations.flower.certs.superlink_args`);
    each node dials with the CA as root certificate and signs with its own key. Without ``certs``
    all is plaintext (``--insecure``). ``node_configs``: each node's --node-config (default
    ``partition-id=n``). ``env``: extra environment for every process (e.g.
    ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``)."""

    def __init__(self, tmp_path: Path, clients: int, *, certs: Path | None = None,
                 node_configs: list[dict] | None = None, env: dict[str, str] | None = None):
        from evaluations.flower.certs import superlink_args, supernode_args

        certs = None if certs is None else Path(certs)
        node_configs = node_configs or [{"partition-id": n} for n in range(clients)]
        missing = [certs / f"node{n}.{x}" for n in range(len(node_configs)) for x in ("key", "pub")
                   if certs is not None and not (certs / f"node{n}.{x}").is_file()]
        if missing:
            raise ConfigError(f"Federation: {missing[0]} not found; every SuperNode needs its key pair: make them "
                              f"with `pfedpg-eval flower-certs NEW_DIR --nodes {len(node_configs)}`")
        self.home = tmp_path / "flwr_home"
        self.home.mkdir()
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    **(env or {})}
        self.port = free_port()
        self.logs, self.certs = tmp_path, certs
        self.link = self._start("superlink", [BIN / "flower-superlink", *superlink_args(certs),
                                              "--port", str(self.port)])
        self.nodes = []
        try:
            self._wait_listening()
            for n in range(len(node_configs) if certs is not None else 0):
                self.register(certs / f"node{n}.pub")
        except BaseException:
            self.shutdown()
            raise
        for n, nc in enumerate(node_configs):
            self.nodes.append(self._start(f"supernode{n}", [
                BIN / "flower-supernode", *supernode_args(certs, n), "--superlink", f"127.0.0.1:{self.port}",
                "--port", str(free_port()),
                "--node-config", " ".join(f"{k}={v}" if isinstance(v, int) else f'{k}="{v}"' for k, v in nc.items())]))

    def _connection(self) -> None:
        write_connection(self.home, f"127.0.0.1:{self.port}", insecure=self.certs is None,
                         root_certificates=str(self.certs / "ca.crt") if self.certs else None)

    def register(self, public_key: Path) -> None:
        """``flwr supernode register`` through the SuperLink's control API (CLI-managed node auth)."""
        self._connection()
        out = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(public_key), "fed"], env=self.env,
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0 or "registered successfully" not in out.stdout:
            raise RuntimeError(f"flwr supernode register failed: {(out.stdout + out.stderr)[-2000:]}")

    def flower_settings(self) -> list[str]:
        tls = [f"flower.root_certificates={self.certs / 'ca.crt'}"] if self.certs else ["flower.insecure=true"]
        return [f"flower.superlink=127.0.0.1:{self.port}", *tls]

    def _start(self, name, cmd):
        log = open(self.logs / f"{name}.log", "w")
        return subprocess.Popen([str(c) for c in cmd], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def _wait_listening(self, timeout: float = 60.0) -> None:
        wait_listening(self.link, self.port, self.logs / "superlink.log", timeout)

    def train(self, cfg, run_dir: Path, timeout: float = 400) -> subprocess.CompletedProcess:
        from pfedpg.config import dump_config

        cfg_file = run_dir.parent / f"{run_dir.name}.yaml"
        cfg_file.write_text(dump_config(cfg))
        sets = [a for kv in self.flower_settings() for a in ("--set", kv)]
        return subprocess.run([str(BIN / "pfedpg-eval"), "train", "--config", str(cfg_file), "--engine", "flower",
                               *sets, "--run-dir", str(run_dir), "--no-progress"], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def shutdown(self, timeout: float = 30) -> dict[str, int | None]:
        codes = {}
        for name, p in [(f"supernode{i}", p) for i, p in enumerate(self.nodes)] + [("superlink", self.link)]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                codes[name] = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                codes[name] = None
        return codes

    def leftovers(self) -> list[str]:
        """Processes still running that belong to this federation (e.g. a SuperExec child)."""
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                if f":{self.port}" in cmd and "pytest" not in cmd:
                    out.append(cmd)
        return out
