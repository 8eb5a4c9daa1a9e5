"""Deprecated import face of the in-process runner: :class:`Trainer` and its helpers live in
``pfedpg.run`` (one module per part of a run: see its docstring). ``from pfedpg.runner import
Trainer`` works for this release, with a warning; the module goes in the next release."""
import warnings

from pfedpg.run import (
                        CHECKPOINT_VERSION,
                        Trainer,
                        accuracy_blocks,
                        client_indices,
                        environment,
                        latest_checkpoint,
                        participation_schedule,
                        partition_run,
                        round_eval_stats,
                        round_train_stats,
                        set_aside,
)

warnings.warn("pfedpg.runner is deprecated: import from pfedpg.run (the module goes in the next release)",
              FutureWarning, stacklevel=2)

__all__ = ["CHECKPOINT_VERSION", "Trainer", "accuracy_blocks", "client_indices", "environment", "latest_checkpoint",
           "participation_schedule", "partition_run", "round_eval_stats", "round_train_stats", "set_aside"]
