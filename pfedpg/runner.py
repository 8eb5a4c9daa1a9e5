"""The in-process runner's import face: :class:`Trainer` and its helpers live in ``pfedpg/run/``
(assembly, rounds, checkpoint, joins, summary, trainer); this module keeps ``from pfedpg.runner
import Trainer`` working."""
from pfedpg.run import (CHECKPOINT_VERSION, Trainer, accuracy_blocks, client_indices, environment,
                        latest_checkpoint, participation_schedule, partition_run, round_eval_stats,
                        round_train_stats, set_aside)

__all__ = ["CHECKPOINT_VERSION", "Trainer", "accuracy_blocks", "client_indices", "environment", "latest_checkpoint",
           "participation_schedule", "partition_run", "round_eval_stats", "round_train_stats", "set_aside"]
