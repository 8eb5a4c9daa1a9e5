"""The two trackers a run can log to (``tracking`` config section, ``evaluations/tracking.py`` drives
them): :class:`MlflowTracker` (one MLflow run through ``MlflowClient``: no global active run, so
nothing leaks into a notebook's own MLflow use) and :class:`TensorBoardTracker` (event files by
``torch.utils.tensorboard.SummaryWriter``). Both are optional (``pip install '.[tracking]'``):
imported only when a config turns them on, with a one-line error naming the extra when missing.

Each tracker logs numbers at a step (the round), a config as parameters, files as artifacts, and
keeps what it needs to be reopened — the MLflow run id, the last round logged — in a small state
dict that ``RUN_DIR/tracking.json`` holds between processes (``--resume``, a grid rerun)."""
from __future__ import annotations

import json
import logging
import math
import re
import sqlite3
from pathlib import Path
from typing import Any

from pfedpg.errors import ConfigError

EXTRA = "pip install '.[tracking]' (or `make venv`, which installs it)"
#: record keys that are not metrics (an index, ids, the config's own numbers in summary.json)
NOT_METRICS = {"type", "round", "participants", "audit_clients", "seed", "rounds",
               "num_clients", "clients_per_round"}
#: a run's outcome as an MLflow status (the tag pfedpg.outcome keeps the outcome itself)
MLFLOW_STATUS = {"ok": "FINISHED", "diverged": "FAILED", "failed": "FAILED", "interrupted": "KILLED"}


def final(state: dict[str, Any]) -> str | None:
    """The outcome a tracked run ended with, if no later attempt can change it (finished or
    diverged: a resume logs nothing more); a failed or interrupted run is reopened by its resume."""
    return state.get("ended") if state.get("ended") in ("ok", "diverged") else None


def require(what: str) -> None:
    """Import the package ``what`` ("mlflow" or "tensorboard") needs, or a one-line ConfigError."""
    try:
        if what == "mlflow":
            import mlflow  # noqa: F401
            import sqlalchemy  # noqa: F401  (MLflow's SQL stores: sqlite:///...)
        else:
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"tracking.{what} needs the tracking extra ({e.name} is missing): {EXTRA}") from None


def flatten(tree: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested mappings as one level of ``a.b.c`` keys; lists and scalars are leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        out.update(flatten(v, key, sep) if isinstance(v, dict) and v else {key: v})
    return out


def numbers(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a record (``a/b`` keys): booleans, strings, lists and ids left out."""
    return {_name(k): float(v) for k, v in flatten(tree, prefix, "/").items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k.rsplit("/", 1)[-1] not in NOT_METRICS}


def round_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A round record's metrics under the record's own keys (``acc_adapted_mean``,
    ``dp_client/epsilon_max``, ``time_round_s``, ...)."""
    return numbers(record)


def _name(key: str) -> str:
    """A metric or parameter name both trackers accept (letters, digits, ``_ - . / :`` and spaces)."""
    return re.sub(r"[^\w\-./: ]", "_", key)[:250]


def param_values(params: dict[str, Any], limit: int) -> dict[str, str]:
    """Parameter values as text: lists as JSON, None as ``null``, anything longer than ``limit`` cut
    with a note (the run's config.yaml artifact holds it whole)."""
    out = {}
    for k, v in params.items():
        text = "null" if v is None else json.dumps(v, default=str) if isinstance(v, (list, tuple)) else str(v)
        out[_name(k)] = text if len(text) <= limit else text[: limit - 40] + " ... (cut: see config.yaml)"
    return out


def resolve_uri(uri: str) -> str:
    """``uri`` with a relative SQLite path made absolute (read from this working directory), its
    folder created: the same store whichever directory a resume or a rerun starts from. A SQLite
    file that cannot be one is refused in one line here (MLflow would retry it for minutes)."""
    uri = uri.strip()
    if not uri.startswith("sqlite:///") or uri[len("sqlite:///"):] in ("", ":memory:"):
        return uri
    p = Path(uri[len("sqlite:///"):]).expanduser().resolve()
    fix = "; give a SQLite file in a folder you can write, e.g. sqlite:///runs/mlflow.db"
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"tracking.mlflow={uri!r}: cannot make the folder {str(p.parent)!r} "
                          f"({e.strerror}){fix}") from None
    if p.is_dir():
        raise ConfigError(f"tracking.mlflow={uri!r}: {str(p)!r} is a folder{fix}")
    if p.exists() and p.stat().st_size and p.read_bytes()[:16] != b"SQLite format 3\x00":
        raise ConfigError(f"tracking.mlflow={uri!r}: {str(p)!r} is not a SQLite database{fix}")
    try:  # a write lock taken and given back: the file can be made and written
        con = sqlite3.connect(f"{p.as_uri()}?mode=rwc", uri=True, timeout=30)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.rollback()
        finally:
            con.close()
    except sqlite3.Error as e:
        raise ConfigError(f"tracking.mlflow={uri!r}: SQLite cannot write {str(p)!r} ({e}){fix}") from None
    return f"sqlite:///{p}"


def reachable(uri: str, timeout: float = 10.0) -> None:
    """A server answers at ``uri`` (any HTTP answer), or one line now: MLflow's client would retry a
    refused connection for about four minutes before it says so."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered
    except (urllib.error.URLError, OSError) as e:
        why = getattr(e, "reason", e)
        raise ConfigError(f"tracking.mlflow={uri!r}: no MLflow server answers there ({why}); start one "
                          "(mlflow server) or log to a local store such as sqlite:///runs/mlflow.db") from None


class MlflowTracker:
    """One MLflow run in ``experiment`` of the store at ``uri`` (made absolute). ``state`` (from
    tracking.json) reopens the run it names, when the same store still holds it."""

    name = "mlflow"

    def __init__(self, uri: str, experiment: str):
        require("mlflow")
        for lib in ("mlflow", "alembic"):  # their INFO lines (creating tables, migrations) are not ours
            logging.getLogger(lib).setLevel(logging.WARNING)
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        from sqlalchemy.exc import SQLAlchemyError

        self.uri, self.experiment = resolve_uri(uri), experiment
        if self.uri.startswith(("http://", "https://")):
            reachable(self.uri)
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = self._experiment(experiment)
        except (MlflowException, SQLAlchemyError) as e:
            first = str(e).split(". ")[0].split("\n")[0].strip().rstrip(".")
            raise ConfigError(f"tracking.mlflow={uri!r}: MLflow cannot use it ({first}); use a SQLite store such as "
                              "sqlite:///runs/mlflow.db or an MLflow server's http://HOST:PORT") from None
        self.run_id: str | None = None
        self.logged_round = 0
        self.ended: str | None = None  # the outcome the run ended with, once it has

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        where = None
        if self.uri.startswith("sqlite:///"):  # artifacts beside the database, not in the working directory
            where = (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=where)
        except MlflowException:  # made meanwhile by another process
            return self.client.get_experiment_by_name(name).experiment_id

    def where(self) -> str:
        return f"MLflow run {self.run_id} in {self.uri} (experiment {self.experiment})"

    def open(self, state: dict[str, Any] | None, *, name: str, params: dict[str, Any], tags: dict[str, str],
             parent: str | None = None, reopen_ended: bool = False) -> str | None:
        """Reopen the run ``state`` names (same store; one that has ended stays ended unless
        ``reopen_ended``), else start one; returns a line to log when the recorded run could not be
        reopened."""
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        note = None
        if state and state.get("run_id"):
            if state.get("uri") != self.uri:
                note = f"tracking: this run was logged to {state.get('uri')}; now to {self.uri}, as a new MLflow run"
            else:
                try:
                    self.client.get_run(state["run_id"])
                    self.run_id, self.logged_round = state["run_id"], int(state.get("logged_round", 0))
                    self.ended = None if reopen_ended else final(state)
                    if not self.ended:
                        self.client.update_run(self.run_id, status="RUNNING")
                    return None
                except MlflowException:
                    note = f"tracking: MLflow run {state['run_id']} is gone from {self.uri}; logging a new one"
        all_tags = {**tags, **({"mlflow.parentRunId": parent} if parent else {})}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        self.run_id, self.logged_round, self.ended = run.info.run_id, 0, None
        values = param_values(params, MAX_PARAM_VAL_LENGTH)
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in values.items()])
        return note

    def state(self) -> dict[str, Any]:
        return {"uri": self.uri, "run_id": self.run_id, "logged_round": self.logged_round,
                **({"ended": self.ended} if self.ended else {})}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_round(self, r: int, metrics: dict[str, float]) -> None:
        self.log(r, metrics)
        self.logged_round = r

    def tag(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def artifacts(self, files: list[Path]) -> None:
        for f in files:
            self.client.log_artifact(self.run_id, str(f))

    def end(self, outcome: str) -> None:
        self.client.set_terminated(self.run_id, MLFLOW_STATUS[outcome])
        self.ended = outcome


class TensorBoardTracker:
    """Event files in ``log_dir`` (a run's RUN_DIR/tensorboard/): scalars per round, the config as
    text and as TensorBoard hparams (with the run's final numbers), so ``tensorboard --logdir`` on a
    grid's folder compares its cells. No artifacts: the run's files sit beside its event files."""

    name = "tensorboard"

    def __init__(self, log_dir: Path):
        require("tensorboard")
        self.log_dir = Path(log_dir)
        self.writer: Any = None
        self.logged_round = 0
        self.ended: str | None = None
        self.params: dict[str, Any] = {}

    def where(self) -> str:
        return f"TensorBoard event files in {self.log_dir}"

    def open(self, state: dict[str, Any] | None, *, name: str, params: dict[str, Any], tags: dict[str, str],
             parent: str | None = None) -> str | None:
        """Continue the event files ``state`` describes (the rounds they hold are not written twice),
        or start them with the config as text."""
        from torch.utils.tensorboard import SummaryWriter

        self.params = params
        if state and any(self.log_dir.glob("events.out.tfevents.*")):
            self.logged_round, self.ended = int(state.get("logged_round", 0)), final(state)
            if not self.ended:
                self.writer = SummaryWriter(log_dir=str(self.log_dir))  # a new event file beside the old ones
            return None
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        text = "\n".join(f"    {k}: {v}" for k, v in param_values(params, 10_000).items())  # Markdown code
        self.writer.add_text("config", text, 0)
        return None

    def state(self) -> dict[str, Any]:
        return {"dir": self.log_dir.name, "logged_round": self.logged_round,
                **({"ended": self.ended} if self.ended else {})}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def log_round(self, r: int, metrics: dict[str, float]) -> None:
        self.log(r, metrics)
        self.logged_round = r

    def tag(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.writer.add_text(k, str(v), 0)

    def hparams(self, final: dict[str, float]) -> None:
        """The config's values with the run's final numbers, for TensorBoard's HParams view."""
        from torch.utils.tensorboard.summary import hparams

        values = {k: v if isinstance(v, (int, float, bool, str)) and not (isinstance(v, float) and math.isnan(v))
                  else json.dumps(v, default=str) for k, v in self.params.items()}
        for summary in hparams(values, {k: v for k, v in final.items() if math.isfinite(v)}):
            self.writer.file_writer.add_summary(summary)

    def artifacts(self, files: list[Path]) -> None:
        return None

    def end(self, outcome: str) -> None:
        self.writer.close()
        self.ended = outcome
