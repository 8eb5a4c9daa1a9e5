"""A SuperNode's long-running client worker (DESIGN §9: a node keeps its built client alive).

Flower 1.42 starts a fresh ClientApp process for every message. Building a pfedpg-eval client in it
— importing torch, loading the node's data, building the backbone, replaying the run's set-up —
costs seconds per message. With ``--node-config "... worker=<socket path>"`` the ClientApp process
only forwards the message (its content and the node's ``context.state``) over a Unix socket to this
worker, which builds the client once and answers every later message from memory; the ClientApp
side imports neither torch nor the model.

The first message starts the worker if none listens at the path (a lock file keeps two from
starting). The worker exits when the process that started it is gone (its SuperNode's SuperExec),
after ``--idle-s`` seconds without a message, or on SIGTERM. The socket is created owner-only
(0600): only the user running the SuperNode can talk to it. Requests are pickled, which is why
the socket must stay private to that user.

Run it by hand (e.g. under a service manager) with ``python -m evaluations.flower.worker --socket
PATH``; the ClientApp then uses the running one.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

IDLE_S = 1800.0


def _send(sock: socket.socket, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(struct.pack("!Q", len(data)) + data)


def _recv(sock: socket.socket) -> Any:
    def exact(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = sock.recv(min(1 << 20, n - len(buf)))
            if not chunk:
                raise ConnectionError("the worker closed the connection")
            buf += chunk
        return bytes(buf)

    (n,) = struct.unpack("!Q", exact(8))
    return pickle.loads(exact(n))


def _connect(path: str) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return s
    except (FileNotFoundError, ConnectionRefusedError):
        s.close()
        return None


def _start(path: str, timeout: float) -> socket.socket:
    """Connect to the worker at ``path``, starting it first if none listens (under a lock)."""
    if len(os.fsencode(path)) > 100:
        raise ValueError(f"node-config worker={path!r} is {len(os.fsencode(path))} bytes; a Unix socket path must be "
                         "under ~100: choose a shorter one, e.g. /tmp/pfedpg-node0.sock")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = _connect(path)
        if sock is not None:
            return sock
        Path(path).unlink(missing_ok=True)  # a stale socket of a worker that died
        log = open(path + ".log", "a")
        subprocess.Popen([sys.executable, "-m", "evaluations.flower.worker", "--socket", path,
                          "--watch-pid", str(os.getppid())], stdout=log, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            sock = _connect(path)
            if sock is not None:
                return sock
            time.sleep(0.05)
    raise RuntimeError(f"the client worker at {path} did not start within {timeout:g} s; see {path}.log")


def forward(path: str, kind: str, values: dict, node_config: dict, content, state, *, timeout: float = 120.0):
    """Have the node's worker answer one message: returns (reply content, new context.state)."""
    sock = _start(path, timeout)
    try:
        _send(sock, (kind, dict(values), dict(node_config), content, state))
        status, *rest = _recv(sock)
    finally:
        sock.close()
    if status != "ok":
        raise RuntimeError(rest[0])  # the ClientApp fails with the worker's one-line reason
    return rest[0], rest[1]


def serve(path: str, *, watch_pid: int | None = None, idle_s: float = IDLE_S) -> None:
    """Answer messages until the watched process is gone, ``idle_s`` pass without one, or SIGTERM."""
    from evaluations.flower.node import ClientRuntime
    from evaluations.plugins import load_plugins

    load_plugins()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    Path(path).unlink(missing_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)  # the socket file is owner-only from the start
    try:
        srv.bind(path)
    finally:
        os.umask(old)
    srv.listen(8)
    srv.settimeout(0.5)
    last = time.time()
    print(f"flower worker: listening on {path} (pid {os.getpid()})", flush=True)
    try:
        while not stop:
            if watch_pid is not None and not _alive(watch_pid):
                print(f"flower worker: process {watch_pid} is gone; exiting", flush=True)
                break
            if time.time() - last > idle_s:
                print(f"flower worker: idle for {idle_s:g} s; exiting", flush=True)
                break
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            last = time.time()
            with conn:
                conn.settimeout(None)
                try:
                    kind, values, node_config, content, state = _recv(conn)
                    ctx = SimpleNamespace(node_config=node_config, state=state)
                    runtime = ClientRuntime.get(values, node_config)
                    reply = getattr(runtime, kind)(SimpleNamespace(content=content), ctx)
                    _send(conn, ("ok", reply, ctx.state))
                except Exception as e:  # noqa: BLE001 — every failure goes back as the message's error
                    try:
                        _send(conn, ("error", f"{type(e).__name__}: {e}"))
                    except OSError:
                        pass
    finally:
        srv.close()
        Path(path).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluations.flower.worker",
                                description="A SuperNode's long-running pfedpg-eval client worker "
                                            "(see the module docs).")
    p.add_argument("--socket", required=True, metavar="PATH",
                   help="Unix socket to listen on (the node-config's worker=)")
    p.add_argument("--watch-pid", type=int, metavar="PID", help="exit when this process is gone")
    p.add_argument("--idle-s", type=float, default=IDLE_S, metavar="S",
                   help=f"exit after S idle seconds (default {IDLE_S:g})")
    a = p.parse_args(argv)
    serve(a.socket, watch_pid=a.watch_pid, idle_s=a.idle_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
