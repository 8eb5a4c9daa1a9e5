"""The in-process runner, one module per part of a run (DESIGN §1, §8):

* ``env`` — what every part is built with (config, run folder, device, seeds, hooks, log);
* ``clients`` — the client seam: the :class:`Clients` protocol the round loop holds, and the typed
  :class:`ClientUpdate` that crosses it; ``inprocess`` — :class:`InProcessClients`, every client in
  this process (records from ``data``); the Flower engine brings its own implementation;
* ``assembly`` — model, server, schedule and the hooks' context around the clients;
* ``rounds`` — :class:`RoundLoop`: train, step, evaluate; ``stats`` — a round's figures;
* ``checkpoint`` (save, resume, set aside), ``joins`` (new clients), ``summary`` (summary.json),
  ``rundir`` (the run directory's files) — functions and small objects of the loop;
* ``trainer`` — :class:`Trainer`, the façade that assembles a run and drives it.

Import from here (``pfedpg.runner``, the old face, is deprecated)."""
from pfedpg.run.assembly import participation_schedule
from pfedpg.run.checkpoint import CHECKPOINT_VERSION, latest_checkpoint, set_aside
from pfedpg.run.clients import ClientFacts, Clients, ClientUpdate, ClientViews, EvalRow, ModelShape, Roster
from pfedpg.run.data import ClientRecords, client_indices, partition_run
from pfedpg.run.env import RunEnv, RunLog, run_env
from pfedpg.run.inprocess import InProcessClients
from pfedpg.run.rounds import RoundLoop
from pfedpg.run.stats import accuracy_blocks, round_eval_stats, round_train_stats
from pfedpg.run.summary import environment
from pfedpg.run.trainer import Trainer

__all__ = ["CHECKPOINT_VERSION", "ClientFacts", "ClientRecords", "ClientUpdate", "ClientViews", "Clients", "EvalRow",
           "InProcessClients", "ModelShape", "Roster", "RoundLoop", "RunEnv", "RunLog", "Trainer", "accuracy_blocks",
           "client_indices", "environment", "latest_checkpoint", "participation_schedule", "partition_run",
           "round_eval_stats", "round_train_stats", "run_env", "set_aside"]
