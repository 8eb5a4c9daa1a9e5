"""The ``tracking`` config section: where a run's metrics, config and outputs are also logged (MLflow,
TensorBoard). The core only holds the setting and offers the seam — :class:`~pfedpg.run.Trainer`'s
``on_round`` observer, told every round record as it is written to ``metrics.jsonl``; the trackers
themselves live in ``evaluations/tracking.py`` (optional extra ``tracking``). Tracking never changes
a run's numbers: it is left out when a checkpoint or a grid's cell compares configs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pfedpg.errors import ConfigError

#: what :class:`~pfedpg.run.Trainer` tells its ``on_round`` observer: the round record as written
#: to metrics.jsonl (without the per-client rows); the observer must not change it
RoundObserver = Callable[[dict[str, Any]], None]


@dataclass
class TrackingConfig:
    """``tracking``: ``tensorboard: true`` writes TensorBoard event files into RUN_DIR/tensorboard/;
    ``mlflow``: a tracking URI (``sqlite:///PATH/mlflow.db``: a local SQLite store, no server; or
    ``http://HOST:PORT`` of an MLflow server) to log each run to, in the experiment ``experiment``.
    Needs ``pip install '.[tracking]'``."""

    tensorboard: bool = False  # true: TensorBoard event files in RUN_DIR/tensorboard/
    # a tracking URI: sqlite:///PATH/mlflow.db (a local store, no server) or http://HOST:PORT; null = none
    mlflow: str | None = None
    experiment: str = "pfedpg-eval"  # the MLflow experiment the runs go to

    def __post_init__(self):
        if not isinstance(self.tensorboard, bool):
            raise ConfigError(f"tracking.tensorboard={self.tensorboard!r} must be true or false")
        if self.mlflow is not None:
            uri = self.mlflow.strip()
            if not uri:
                raise ConfigError("tracking.mlflow is empty; give a tracking URI such as sqlite:///runs/mlflow.db, "
                                  "or null for none")
            if "://" not in uri and uri.endswith((".db", ".sqlite", ".sqlite3")):
                raise ConfigError(f"tracking.mlflow={self.mlflow!r} is a file name, not a tracking URI; "
                                  f"write sqlite:///{uri} for a SQLite store")
        if not self.experiment.strip():
            raise ConfigError("tracking.experiment is empty; name the MLflow experiment (default pfedpg-eval)")

    @property
    def enabled(self) -> bool:
        return self.tensorboard or self.mlflow is not None


def untracked(cfg: Any) -> Any:
    """A run config with the default ``tracking`` section: what decides the run's numbers (a
    checkpoint or a grid's finished cell is compared on this, so turning tracking on, off or
    elsewhere never invalidates it)."""
    import dataclasses

    return dataclasses.replace(cfg, tracking=TrackingConfig())
