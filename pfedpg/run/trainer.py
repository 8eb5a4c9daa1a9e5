"""The in-process runner: one pFedPG (or baseline) run into one run directory (DESIGN §1, §8).

Run directory::

    config.yaml        resolved config (every default filled in)
    seeds.json         master seed, participation schedule, data split sizes
    env.json           versions, platform, threads
    metrics.jsonl      one ``round`` record per round and one ``client`` record per client/eval round
    summary.json       final accuracies (adapted and generated prompts), communication, timings
    checkpoints/       round_XXXX.pt every ``checkpoint_every`` rounds and after the last; ``--resume``
                       continues exactly
    log.txt

Evaluation uses the final round only (no best-round selection on test data)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pfedpg.config import dump_config
from pfedpg.errors import ConfigError, NonFiniteDeltaError
from pfedpg.models.device import out_of_memory_as_error
from pfedpg.run.assembly import Assembly
from pfedpg.run.checkpoint import Checkpoints, set_aside
from pfedpg.run.joins import Joins
from pfedpg.run.rounds import Rounds
from pfedpg.run.summary import Summary, environment


class Trainer(Assembly, Rounds, Checkpoints, Joins, Summary):
    """Builds everything a run needs from a ``RunConfig`` and runs the rounds.

    ``hooks`` overrides ``cfg.hooks`` (tests pass instances); ``backbone_path`` skips the
    pretraining lookup for ``weights: pretrain``."""

    def run(self, *, resume: bool = False, stop_after: int | None = None,
            restart: bool = False) -> dict[str, Any] | None:
        """Run to ``cfg.rounds`` (or stop after round ``stop_after``, leaving a checkpoint).

        A run directory holding an unfinished run (no summary.json): without a checkpoint there is
        nothing to resume, so the run starts again (its files moved to RUN_DIR/attempt-<k>/); with a
        checkpoint, ``resume`` continues it and ``restart`` starts it again the same way."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.run_dir / "metrics.jsonl"
        start = self._open_run_dir(metrics_path, resume=resume, restart=restart)
        self._log_file = open(self.run_dir / "log.txt", "a")
        self.hooks.setup(self.ctx)
        self._log_start(start)
        try:
            # Out of memory: one line naming the knobs, and nothing left behind that blocks the re-run
            # with a smaller setting (the unfinished run's files move to RUN_DIR/attempt-<k>/).
            with out_of_memory_as_error(str(self.device), on_error=self._set_aside_unfinished):
                if not self._train_rounds(start, metrics_path, stop_after):
                    return None
                self.run_new_clients(metrics_path)
                summary = self.summarize(metrics_path)
                (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
                acc = summary["accuracy"]
                self.log(f"done: adapted mean {acc['mean']:.4f}, worst {acc['worst']:.4f}" if acc else
                         f"done: the clients kept their accuracies ({summary.get('client_metrics')})")
                return summary
        finally:
            self._close_log()

    def _open_run_dir(self, metrics_path: Path, *, resume: bool, restart: bool) -> int:
        """Prepare the run directory: continue from its latest checkpoint (``resume``; returns the
        round it holds), or start afresh — an unfinished run without a checkpoint (or with
        ``restart``) set aside first, a finished or resumable one refused. Returns the last round done."""
        unfinished = metrics_path.exists() and not (self.run_dir / "summary.json").exists()
        if unfinished and not resume and (restart or self.latest_checkpoint() is None):
            kept = set_aside(self.run_dir)
            self.log(f"run directory {self.run_dir} held an unfinished run"
                     f"{'' if restart else ' without a checkpoint'}; starting it again (its files are in {kept})")
        if resume:
            return self._resume(metrics_path)
        if (self.run_dir / "summary.json").exists():
            raise ConfigError(f"run directory {str(self.run_dir)!r} holds a finished run; choose another --run-dir or "
                              "run_name (or --resume to rewrite its summary)")
        if metrics_path.exists():
            ckpt = self.latest_checkpoint()
            raise ConfigError(f"run directory {str(self.run_dir)!r} holds an unfinished run (checkpoint {ckpt.name}); "
                              f"continue it with --resume --run-dir {self.run_dir}, or pass --restart to start it "
                              "again (its files are kept under RUN_DIR/attempt-<k>/)")
        self._write_run_files()
        metrics_path.write_text("")
        return 0

    def _resume(self, metrics_path: Path) -> int:
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            raise ConfigError(f"--resume: no checkpoint in {str(self.run_dir / 'checkpoints')!r}; run the same command "
                              "without --resume to start it again (the old files are kept under RUN_DIR/attempt-<k>/)")
        start = self.load_checkpoint(ckpt)
        if (self.run_dir / "summary.json").exists():
            self.log(f"--resume of a finished run: rewriting its summary from {ckpt.name}"
                     + (f" (the {len(self.new_facts)} new clients' join rounds run again, to the same numbers)"
                        if self.new_facts else ""))
        # Keep the records up to the checkpoint: the rounds after it are re-run identically.
        # (Join rounds run after the last round from the final state: they are re-run as well.)
        kept = [ln for ln in metrics_path.read_text().splitlines()
                if ln and json.loads(ln)["round"] <= start and json.loads(ln)["type"] != "join"] \
            if metrics_path.exists() else []
        metrics_path.write_text("".join(ln + "\n" for ln in kept))
        return start

    def _write_run_files(self) -> None:
        """config.yaml, env.json and seeds.json of a new run."""
        cfg = self.cfg
        (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        (self.run_dir / "env.json").write_text(json.dumps(environment(self.device), indent=2))
        (self.run_dir / "seeds.json").write_text(json.dumps({
            "master_seed": cfg.seed,
            "streams": "numpy.random.SeedSequence(master, spawn_key=(crc32(component), client, round))",
            "participation": self.schedule,
            "clients": [{k: f.get(k) for k in ("client", "train", "test", "val", "domain")} for f in self.client_facts],
            # data.new_clients: their ids here, and every client's id in the partition
            **({"new_clients": [{k: f[k] for k in ("client", "train", "test", "val", "domain")}
                                for f in self.new_facts],
                "partition_ids": {"clients": [f["partition_id"] for f in self.client_facts],
                                  "new_clients": [f["partition_id"] for f in self.new_facts]}}
               if self.new_facts else {}),
        }, indent=1))

    def _log_start(self, start: int) -> None:
        cfg = self.cfg
        if cfg.batched_clients:
            alone = [n for n in range(self.num_clients) if self.hooks.has_local_training(n)]
            self.log("batched_clients: clients train in one batch" + (
                f"; clients {alone} run a local_training hook (e.g. dp_sgd) and train one after another"
                if alone else ""))
        self.log(f"{cfg.method}: {self.num_clients} clients, {cfg.rounds} rounds, "
                 f"backbone {self.backbone_numbers:,} numbers, on {self.device}{' (bf16 autocast)' if cfg.amp else ''}"
                 + (f" (resuming after round {start})" if start else ""))

    def _train_rounds(self, start: int, metrics_path: Path, stop_after: int | None) -> bool:
        """Rounds ``start + 1 ..`` with their records and checkpoints; False when stopped after
        ``stop_after`` (a checkpoint left there), True when every round ran."""
        cfg = self.cfg
        rounds = range(start + 1, cfg.rounds + 1)
        if self.progress:
            from tqdm import tqdm

            rounds = tqdm(rounds, desc=cfg.method, unit="round", initial=start, total=cfg.rounds, file=sys.stderr)
        for r in rounds:
            try:
                record = self.run_round(r)
            except NonFiniteDeltaError as e:
                self._record_divergence(r, e)
                raise
            with open(metrics_path, "a") as f:
                for row in record.pop("clients"):
                    f.write(json.dumps(row) + "\n")
                f.write(json.dumps(record) + "\n")
            if self.progress and "acc_adapted_mean" in record:
                rounds.set_postfix(acc=f"{record['acc_adapted_mean']:.3f}")
            self.round = r
            if (cfg.checkpoint_every and r % cfg.checkpoint_every == 0) or r == cfg.rounds:
                self.save_checkpoint(r)
            if stop_after is not None and r >= stop_after and r < cfg.rounds:
                if not (cfg.checkpoint_every and r % cfg.checkpoint_every == 0):
                    self.save_checkpoint(r)
                return False
        return True

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _set_aside_unfinished(self) -> str:
        self._close_log()
        return f"this run's files were moved to {set_aside(self.run_dir)}"
