"""A throw-away Flower federation on 127.0.0.1 — a SuperLink and one SuperNode per client, each its
own process — for the deployment tests and ``bench/flower_messages.py``, and for a user who wants
to try a deployment on one machine before spreading it over several:

    fed = Federation(Path("fed"), clients=2, certs=Path("certs"), auth=True)   # certs: flower-certs
    fed.train(cfg, Path("fed/run")); fed.shutdown()
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Federation:
    """``flower-superlink`` and one ``flower-supernode`` per client, each its own process.

    ``certs``: a directory from ``make_certificates`` — the SuperLink serves TLS with its server
    certificate and (``auth``) admits only SuperNodes whose public keys were registered; each node
    dials with the CA as root certificate and signs with its own key. ``node_configs``: each
    node's --node-config (default ``partition-id=n``)."""

    def __init__(self, tmp_path: Path, clients: int, *, certs: Path | None = None, auth: bool = False,
                 node_configs: list[dict] | None = None):
        self.home = tmp_path / "flwr_home"
        self.home.mkdir()
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        self.port = free_port()
        self.logs, self.certs = tmp_path, certs
        if certs is None:
            link_tls, node_tls = ["--insecure"], ["--insecure"]
        else:
            link_tls = ["--ssl-ca-certfile", certs / "ca.crt", "--ssl-certfile", certs / "server.pem",
                        "--ssl-keyfile", certs / "server.key"] + (["--enable-supernode-auth"] if auth else [])
            node_tls = ["--root-certificates", certs / "ca.crt"]
        self.link = self._start("superlink", [BIN / "flower-superlink", *link_tls, "--port", str(self.port)])
        self._wait_listening()
        if auth:
            for n in range(clients):
                self.register(certs / f"node{n}.pub")
        node_configs = node_configs or [{"partition-id": n} for n in range(clients)]
        self.nodes = []
        for n, nc in enumerate(node_configs):
            key = ["--auth-supernode-private-key", certs / f"node{n}.key"] if auth else []
            self.nodes.append(self._start(f"supernode{n}", [
                BIN / "flower-supernode", *node_tls, *key, "--superlink", f"127.0.0.1:{self.port}",
                "--port", str(free_port()), "--node-config", " ".join(f"{k}={v}" if isinstance(v, int) else f'{k}="{v}"' for k, v in nc.items())]))

    def _connection(self) -> None:
        conn = [f'address = "127.0.0.1:{self.port}"']
        conn += [f'root-certificates = "{self.certs / "ca.crt"}"'] if self.certs else ["insecure = true"]
        (self.home / "config.toml").write_text('[superlink]\ndefault = "fed"\n\n[superlink.fed]\n' + "\n".join(conn) + "\n")

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
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.link.poll() is not None:
                raise RuntimeError(f"flower-superlink exited: {(self.logs / 'superlink.log').read_text()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError("flower-superlink did not listen within 60 s")

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
