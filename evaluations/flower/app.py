"""``engine: flower``: runs through Flower's simulation engine or a SuperLink deployment (DESIGN §9).

``run_flower(cfg, run_dir)`` is what ``pfedpg-eval train`` and the sweeps call for a config with
``engine: flower``:

Both write the run's Flower App into ``RUN_DIR/flower_app`` and submit it with ``flwr run``
(Flower's current entry point; a user can start the same app by hand):

* ``flower.superlink: null`` — Flower's simulation engine (Ray): a simulation SuperLink this run
  starts on 127.0.0.1 and stops again, N virtual SuperNodes, one per client.
* ``flower.superlink: host:port`` — a deployment: a running SuperLink with one SuperNode per
  client (``--node-config partition-id=<client>``); the ServerApp then writes the run directory on
  the SuperLink's machine.

``server_app`` and ``client_app`` below are the app's components; they read the run from the
Flower run config (``config-yaml``, ``run-dir``, ``backbone-path``, ``client-shards``) that ``run_flower`` sets.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from evaluations.plugins import load_plugins
from pfedpg import jsonio
from pfedpg.errors import ClientFailure, ConfigError

if TYPE_CHECKING:
    from pfedpg.config import RunConfig

# (pfedpg.config, and with it torch, is imported where it is used: a ClientApp process that hands
# its message to the node's long-running worker never imports torch.)


def _require_flwr() -> None:
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise ConfigError("engine=flower needs Flower: pip install '.[flower]' "
                          "(or `make venv`, which installs it)") from None


def make_server_app():
    """A ServerApp running :func:`~evaluations.flower.trainer.flower_trainer` on the run settings in
    its Flower run config. Its log lines go to stderr, which ``flwr run --stream`` shows; an exception
    also leaves its one-line reason in ``RUN_DIR/flower_error.txt`` for the driver, which is another
    process."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from evaluations.flower.messages import settings_from
        from evaluations.flower.trainer import flower_trainer  # (torch: only where the server runs)

        load_plugins()
        cfg, run_dir, backbone = settings_from(dict(context.run_config))
        _check_run_dir_is_new(Path(run_dir))  # (the driver checked; an app started by hand may not be)
        try:
            trainer = flower_trainer(cfg, run_dir=run_dir, grid=grid, backbone_path=backbone,
                                     log=lambda m: print(m, file=sys.stderr, flush=True))
            trainer.run()
        except Exception as e:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            (Path(run_dir) / "flower_error.txt").write_text(f"{type(e).__name__}: {e}\n")
            raise

    return app


def _check_run_dir_is_new(run_dir: Path) -> None:
    if (run_dir / "summary.json").exists() or (run_dir / "metrics.jsonl").exists():
        what = "a finished run" if (run_dir / "summary.json").exists() else "an unfinished run"
        raise ConfigError(f"run directory {str(run_dir)!r} holds {what}; give this start another one: "
                          f"flwr run ... --run-config 'run-dir=\"NEW_DIR\"'")


def make_client_app(settings: dict[str, Any] | None = None):
    """A ClientApp answering query / train / evaluate messages with ``ClientRuntime`` — in this
    process, or, when the SuperNode's --node-config names a ``worker`` socket, in the node's
    long-running worker (``evaluations.flower.worker``), which keeps the built client (backbone,
    data, state) across messages."""
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def handle(kind: str, msg: Message, context: Context) -> Message:
        values = settings if settings is not None else dict(context.run_config)
        node_config = dict(context.node_config)
        if node_config.get("worker"):
            from evaluations.flower.worker import forward

            content, state = forward(str(node_config["worker"]), kind, values, node_config, msg.content, context.state)
            for key in list(context.state.keys()):
                del context.state[key]
            for key, record in state.items():
                context.state[key] = record
            return Message(content, reply_to=msg)
        from evaluations.flower.node import ClientRuntime

        load_plugins()
        return Message(getattr(ClientRuntime.get(values, node_config), kind)(msg, context), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle("query", msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle("train", msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle("evaluate", msg, context)

    return app


try:  # the components ``flwr run`` loads (RUN_DIR/flower_app/pyproject.toml points here)
    server_app = make_server_app()
    client_app = make_client_app()
except ImportError:  # Flower not installed: run_flower says how to install it
    server_app = client_app = None


# ------------------------------------------------------------------------------------------------
# The driver


def _settings(cfg: RunConfig, run_dir: Path, backbone_path: str | None) -> dict[str, str]:
    from pfedpg.config import dump_config

    # client-shards: the simulation's per-client record files, set by _simulate for its own start
    # ("" = each node partitions the data file itself, e.g. when the app is started by hand).
    # client-metrics-dir: where the clients keep the rows they do not send under a DP mechanism (the
    # simulation's RUN_DIR/client_metrics, set by _simulate; "" = each node's metrics-dir or its default).
    return {"config-yaml": dump_config(cfg), "run-dir": str(run_dir.resolve()), "backbone-path": backbone_path or "",
            "client-shards": "", "client-metrics-dir": ""}


CLIENT_METRICS = "client_metrics"


def merge_client_metrics(run_dir: Path) -> None:
    """The study's side of a simulation: the rows the clients kept under a DP mechanism
    (RUN_DIR/client_metrics/client_<n>.jsonl) folded back into metrics.jsonl — each client row gets
    its training and evaluation figures, each round record the aggregates the server could not
    compute — and summary.json's accuracies rederived, exactly as the in-process runner writes them.
    The server never received any of it."""
    from pfedpg.run import accuracy_blocks, round_eval_stats, round_train_stats

    kept: dict[tuple[str, int, int], dict[str, Any]] = {}
    for f in sorted((run_dir / CLIENT_METRICS).glob("client_*.jsonl")):
        for line in f.read_text().splitlines():
            row = jsonio.loads(line)
            kept[(row.pop("kind"), row["round"], row["client"])] = row
    metrics = run_dir / "metrics.jsonl"
    rows = jsonio.read_lines(metrics)
    by_round: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        if row["type"] != "client":
            continue
        train = kept.get(("train", row["round"], row["client"]))
        if train is not None and row.get("participated", True):
            row.update(train)
        evaluated = kept.get(("eval", row["round"], row["client"]))
        if evaluated is not None:
            row.pop("withheld", None)
            row.update(evaluated)
        by_round.setdefault(row["round"], []).append(row)
    for row in rows:
        if row["type"] == "round":
            clients = by_round.get(row["round"], [])
            row.update(round_train_stats(c for c in clients if c.get("participated", True)))
            if row.pop("client_metrics", None) == "withheld":
                row.update(round_eval_stats(sorted(clients, key=lambda c: c["client"])))
    metrics.write_text("".join(jsonio.dumps(r) + "\n" for r in rows))
    summary = jsonio.read(run_dir / "summary.json")
    last = max(r["round"] for r in rows if r["type"] == "round")
    final = sorted((r for r in by_round.get(last, []) if "acc_adapted" in r), key=lambda r: r["client"])
    summary.update(accuracy_blocks(final))
    summary["client_metrics"] = (f"kept by the clients ({CLIENT_METRICS}/) and merged by the driver after the run; the "
                                 "server never received them")
    (run_dir / "summary.json").write_text(jsonio.dumps(summary, indent=2))


def run_flower(cfg: RunConfig, run_dir: str | Path, *, log: Callable[[str], None] = print,
               resume: bool = False) -> dict[str, Any]:
    """Run ``cfg`` on Flower into ``run_dir``; returns summary.json's contents."""
    _require_flwr()
    load_plugins()
    from evaluations.flower.trainer import check_supported
    from pfedpg.hooks import build_hooks

    check_supported(cfg, build_hooks(cfg.hooks), resume=resume)  # before Ray or a SuperLink is touched
    if cfg.flower.superlink is not None:
        _check_connection(cfg, log)
    # absolute: the ServerApp writes it from another process (Flower's), whose working directory is not ours
    run_dir = Path(run_dir).resolve()
    if (run_dir / "summary.json").exists():
        raise ConfigError(f"run directory {str(run_dir)!r} holds a finished run; choose another --run-dir or run_name")
    if (run_dir / "metrics.jsonl").exists():  # Flower runs do not resume: start it again, keep its files
        from pfedpg.run import set_aside

        log(f"run directory {run_dir} held an unfinished Flower run; starting it again "
            f"(its files are in {set_aside(run_dir)})")
    backbone = None
    if cfg.model.weights == "pretrain":  # pretrain (or find) it once here, not in every ClientApp
        from pfedpg.pretrain import pretrain_backbone

        backbone = str(pretrain_backbone(cfg, log=log))
    settings = _settings(cfg, run_dir, backbone)
    run_dir.mkdir(parents=True, exist_ok=True)
    failed = run_dir / "flower_error.txt"
    failed.unlink(missing_ok=True)  # from an attempt that stopped before its first round
    if cfg.flower.superlink is None:
        status = _simulate(cfg, run_dir, settings, log)
    else:
        status = _deploy(cfg, run_dir, settings, log)
    summary = run_dir / "summary.json"
    if summary.is_file() and (run_dir / CLIENT_METRICS).is_dir():
        merge_client_metrics(run_dir)
        log(f"flower: merged the rows the clients kept ({run_dir / CLIENT_METRICS}) "
            "into metrics.jsonl and summary.json")
    if not summary.is_file() and failed.is_file():
        kind, _, reason = failed.read_text().strip().partition(": ")
        error = {"ConfigError": ConfigError, "ClientFailure": ClientFailure}.get(kind, RuntimeError)
        raise error(f"the ServerApp stopped: {reason}")
    if not summary.is_file() and status != 0:
        where = "a local simulation SuperLink" if cfg.flower.superlink is None else f"SuperLink {cfg.flower.superlink}"
        raise RuntimeError(f"`flwr run` exited with status {status} ({where}); see its output above")
    if not summary.is_file():
        where = "" if cfg.flower.superlink is None else (
            "; the ServerApp writes the run directory on the SuperLink's machine, so look there if it is another one")
        seen = f"its log: {run_dir / 'log.txt'}" if (run_dir / "log.txt").is_file() else "see Flower's output above"
        raise RuntimeError(f"the Flower run ended without {summary} ({seen}){where}")
    return jsonio.read(summary)


def _simulate(cfg: RunConfig, run_dir: Path, settings: dict[str, str], log: Callable[[str], None]) -> int:
    """Flower's simulation engine through its current entry point: ``flwr run`` of the run's Flower
    App on a simulation SuperLink (``flower-superlink --simulation``) that this run starts on a free
    port of 127.0.0.1 and stops when it ends (what ``flwr run`` does with a ``:local:`` connection,
    but owned by this run: no SuperLink left behind, and parallel runs never share one). Flower's
    Ray backend runs one virtual SuperNode per client, ``flower.client_cpus`` CPUs each."""
    from evaluations.flower.local import LocalSuperLink
    from evaluations.flower.node import write_client_shards

    cpus = os.cpu_count() or 1
    if cfg.flower.client_cpus > cpus:
        raise ConfigError(f"flower.client_cpus={cfg.flower.client_cpus} is more than this machine's {cpus} CPUs: no "
                          f"ClientApp actor could start; set flower.client_cpus to at most {cpus}")
    import torch

    if cfg.device.startswith("cuda") and cfg.flower.client_gpus == 0:
        raise ConfigError(f"device={cfg.device} but flower.client_gpus is 0: the simulation gives ClientApp actors no "
                          "GPU; set flower.client_gpus (e.g. 0.25 = four actors per GPU) or device: cpu")
    if cfg.flower.client_gpus > 0 and not torch.cuda.is_available():
        raise ConfigError(f"flower.client_gpus={cfg.flower.client_gpus:g} but torch sees no CUDA device here; set "
                          "flower.client_gpus: 0")
    if cfg.device == "auto" and torch.cuda.is_available() and cfg.flower.client_gpus == 0:
        log("flower: the ClientApps run on the CPU (flower.client_gpus: 0 gives them no GPU; the server uses "
            "the GPU)")
    app = write_flower_app(run_dir, settings)
    shards = run_dir / "flower_shards"  # each actor reads the client it serves from here, and only that
    try:
        num_clients = write_client_shards(cfg, shards)
        with _terminate_as_interrupt(), LocalSuperLink(run_dir / "flower_home", simulation=True) as link:
            sim = {"num_supernodes": num_clients, "backend": "'ray'",
                   "client_resources_num_cpus": cfg.flower.client_cpus,
                   "client_resources_num_gpus": float(cfg.flower.client_gpus), "init_args_num_cpus": cpus,
                   "init_args_logging_level": "'ERROR'", "init_args_log_to_driver": "false"}
            kept = (run_dir / CLIENT_METRICS).resolve()
            return _flwr_run(app, link.connect(), log,
                             "--federation-config", " ".join(f"{k}={v}" for k, v in sim.items()),
                             "--run-config", f"client-shards={json.dumps(str(shards.resolve()))} "
                                             f"client-metrics-dir={json.dumps(str(kept))}")
    finally:
        shutil.rmtree(shards, ignore_errors=True)


@contextlib.contextmanager
def _terminate_as_interrupt():
    """While the block runs, SIGTERM (``timeout``, a scheduler) ends the run as Ctrl-C does — the
    ``with`` and ``finally`` blocks stop the SuperLink this run started — instead of leaving it and
    its simulation running."""
    import signal
    import threading

    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _flwr_run(app: Path, home: Path, log: Callable[[str], None], *args: str) -> int:
    """``flwr run APP fed --stream`` with the SuperLink connection in ``home/config.toml``; its
    output (Flower's and the ServerApp's log) goes line by line to ``log``."""
    import re

    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    flwr = shutil.which("flwr", path=path)
    if flwr is None:
        raise ConfigError("the `flwr` command is missing; pip install '.[flower]' in this environment")
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": path}
    ansi = re.compile(r"\x1b\[[0-9;]*m")
    blank = re.compile(r"^\s*(INFO|DEBUG|WARNING|ERROR)\s*:\s*$")  # Flower's empty log lines
    # Flower's hints about the simulated federation's size: the run sets num_supernodes itself.
    noise = ("default simulated SuperNodes changed", "To change federation size", "flwr federation simulation-config")
    with subprocess.Popen([flwr, "run", str(app), "fed", "--stream", *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace") as p:
        try:
            for line in p.stdout:
                line = ansi.sub("", line.rstrip())
                if line.strip() and not blank.match(line) and not any(n in line for n in noise):
                    log(line)
        except BaseException:  # Ctrl-C or SIGTERM: do not wait for the CLI to notice
            p.terminate()
            raise
    return p.returncode


APP_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "pfedpg-run"
version = "1.0.0"
description = "One pfedpg-eval run on Flower (written by pfedpg-eval; needs pfedpg-eval installed on every node)"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "pfedpg-eval"

[tool.flwr.app.components]
serverapp = "pfedpg_run:server_app"
clientapp = "pfedpg_run:client_app"

[tool.flwr.app.config]
{config}
"""


def write_flower_app(run_dir: Path, settings: dict[str, str]) -> Path:
    """The Flower App ``flwr run`` submits: the run's settings as its run config, the components
    imported from the installed pfedpg-eval."""
    app = run_dir / "flower_app"
    app.mkdir(parents=True, exist_ok=True)
    lines = "\n".join(f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in settings.items())
    (app / "pyproject.toml").write_text(APP_PYPROJECT.format(config=lines))
    (app / "pfedpg_run.py").write_text('"""Components of one pfedpg-eval run (see RUN_DIR/config.yaml)."""\n'
                                       "from evaluations.flower import app as _app\n\n"
                                       "server_app = _app.server_app\nclient_app = _app.client_app\n")
    return app


def _check_connection(cfg: RunConfig, log: Callable[[str], None]) -> None:
    """TLS by default; plaintext only when asked for, with a warning. Checked before anything is written."""
    if cfg.flower.insecure:
        log(f"warning: flower.insecure: true — the connection to the SuperLink {cfg.flower.superlink} is plaintext "
            "(updates and prompts readable on the network); use TLS (flower.root_certificates) "
            "outside a trusted network")
    elif not Path(cfg.flower.root_certificates).expanduser().is_file():
        raise ConfigError(f"flower.root_certificates={cfg.flower.root_certificates!r} not found; "
                          "point it at the SuperLink's CA certificate (PEM), "
                          "e.g. one made with `pfedpg-eval flower-certs DIR` (DIR/ca.crt)")


def _deploy(cfg: RunConfig, run_dir: Path, settings: dict[str, str], log: Callable[[str], None]) -> int:
    app = write_flower_app(run_dir, settings)
    home = run_dir / "flower_home"  # the CLI's SuperLink connection, kept apart from ~/.flwr
    root = str(Path(cfg.flower.root_certificates).resolve()) if cfg.flower.root_certificates else None
    from evaluations.flower.local import write_connection

    write_connection(home, cfg.flower.superlink, insecure=cfg.flower.insecure, root_certificates=root)
    return _flwr_run(app, home, log)
