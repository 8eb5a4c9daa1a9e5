"""The in-process runner, one module per part of a run (DESIGN §1, §8): ``assembly`` (data, model,
server, hooks' context), ``rounds`` (train, step, evaluate), ``checkpoint`` (save, resume, set
aside), ``joins`` (new clients), ``summary`` (what the run reports) and ``trainer`` (the loop that
ties them: :class:`Trainer`). Import from here (``pfedpg.runner``, the old face, is deprecated)."""
from pfedpg.run.assembly import client_indices, participation_schedule, partition_run
from pfedpg.run.checkpoint import CHECKPOINT_VERSION, latest_checkpoint, set_aside
from pfedpg.run.summary import accuracy_blocks, environment, round_eval_stats, round_train_stats
from pfedpg.run.trainer import Trainer

__all__ = ["CHECKPOINT_VERSION", "Trainer", "accuracy_blocks", "client_indices", "environment", "latest_checkpoint",
           "participation_schedule", "partition_run", "round_eval_stats", "round_train_stats", "set_aside"]
