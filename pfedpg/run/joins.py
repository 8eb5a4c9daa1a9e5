"""New clients (DESIGN §1, "New clients"): after the last round each held-out client joins for
``data.new_client_rounds`` join rounds with the same budget in every method — :class:`JoinRounds`,
which the run holds next to its round loop — and summary.json's ``new_clients`` block."""
from __future__ import annotations

import contextlib
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pfedpg import jsonio
from pfedpg.client import evaluate, frozen_prompt, load_into, sgd_local_training
from pfedpg.jobs import ClientData, LocalJob
from pfedpg.run.inprocess import InProcessClients, fresh_head, vpt_prompt
from pfedpg.run.rounds import RoundLoop


class JoinRounds:
    """The join rounds of the loop's new clients (``loop.roster.new``), whose records and the shared
    model ``clients`` hold (the in-process engine: the Flower engine has no new clients)."""

    def __init__(self, loop: RoundLoop, clients: InProcessClients):
        self.loop, self.clients = loop, clients

    def run(self, metrics_path: Path) -> float:
        """Round 0: a new client's head alone trains E epochs on the prompt it received; join rounds
        1..R: prompt and head train E epochs (pfedpg: from G(P_base, d_new), returning ΔP_new; the
        server updates d_new only; G and P_base stay frozen). Every method spends the same (R + 1)·E
        epochs; rows go to metrics.jsonl as ``type: join``. Returns the seconds it took."""
        loop = self.loop
        t0 = time.perf_counter()
        before = {k: v.detach().clone() for k, v in loop.server.state_dict().items()}
        loop.ctx.joins = {}
        rows = []
        for j in range(len(loop.roster.new)):
            rows += self.join_client(j)
        changed = [k for k, v in loop.server.state_dict().items() if not torch.equal(v, before[k])]
        if changed:  # an invariant of the protocol, checked on every run (not a user error)
            raise RuntimeError(f"join rounds changed the shared server state {changed}; this is a bug")
        with open(metrics_path, "a") as fh:
            for row in rows:
                fh.write(jsonio.dumps(row) + "\n")
        return time.perf_counter() - t0

    def join_client(self, j: int) -> list[dict[str, Any]]:
        """New client ``j``'s rounds 0..R (rows for metrics.jsonl). Its streams (head init, VPT init,
        shuffling) are keyed by its id and the join round, the same for every method (paired)."""
        loop, clients = self.loop, self.clients
        cfg, server, hooks, model, seeds = loop.cfg, loop.server, loop.hooks, clients.model, loop.seeds
        fact = loop.roster.new[j]
        n, last, R = fact.client, cfg.rounds, cfg.data.new_client_rounds
        (x, y), (xt, yt) = clients.records.new_train_data[j], clients.records.new_test_data[j]
        w, b = fresh_head(loop.shape, seeds.torch("join.head", client=n), loop.device)
        state = server.join_state()
        prompt = vpt_prompt(loop.shape, seeds.torch("join.prompt", client=n), loop.device) if state is None \
            else server.join_prompt(state)
        updates = server.joins_with_updates
        record = loop.ctx.joins.setdefault(n, [])
        initial = state["descriptor"].cpu().clone() if state is not None and "descriptor" in state else None
        bs = cfg.client.eval_batch
        rows = []
        for jr in range(R + 1):
            r = last + jr
            start = server.join_prompt(state) if (updates and jr > 0) else prompt
            load_into(model, prompt=start, head_weight=w, head_bias=b)
            data = hooks.client_data(loop.ctx, client=n, round=r, data=ClientData(x, y))
            job = LocalJob(client=n, round=r, model=model, data=data,
                           generator=seeds.torch("join.local_train", client=n, round=jr),
                           run_default=partial(sgd_local_training, cfg=cfg.client),
                           augment=clients.augment_stream("join.augment", n, jr))
            with frozen_prompt(model) if jr == 0 else contextlib.nullcontext():  # round 0: the head alone
                result = hooks.local_training(loop.ctx, job)
            with torch.no_grad():
                adapted = model.prompt.prompt.detach().clone()
                w, b = model.head.weight.detach().clone(), model.head.bias.detach().clone()
            row: dict[str, Any] = {"type": "join", "round": r, "join_round": jr, "client": n,
                                   "partition_id": fact.partition_id, "train_loss": result.loss,
                                   "local_steps": result.steps, **result.extra}
            stop = updates and jr > 0 and not self._send(n, r, jr, state, start, adapted, row,
                                                         record=record, initial=initial)
            prompt = adapted
            load_into(model, prompt=adapted, head_weight=w, head_bias=b)
            row["acc_adapted"], row["loss_adapted"] = evaluate(model, xt, yt, batch_size=bs)
            if updates:
                load_into(model, prompt=server.join_prompt(state), head_weight=w, head_bias=b)
                row["acc_generated"], row["loss_generated"] = evaluate(model, xt, yt, batch_size=bs)
            rows.append(row)
            if stop:
                break
        name = loop.roster.names(cfg.data.partition, [fact])[0]
        loop.log(f"new client {n} (partition id {fact.partition_id}, {name}): accuracy after join round 0 "
                 f"(head only) {100 * rows[0]['acc_adapted']:.2f} % -> after join round {rows[-1]['join_round']} "
                 f"{100 * rows[-1]['acc_adapted']:.2f} %")
        return rows

    def _send(self, n: int, r: int, jr: int, state: dict, start: torch.Tensor, adapted: torch.Tensor,
              row: dict[str, Any], *, record: list, initial: torch.Tensor | None) -> bool:
        """New client ``n`` releases ΔP_new through its client-side hooks and the server updates its
        own state for it; False (recorded and logged) when the release is not finite."""
        loop = self.loop
        delta = loop.hooks.outgoing_delta(loop.ctx, client=n, round=r, delta=adapted - start)
        row["delta_norm"] = float(delta.norm())
        if not torch.isfinite(delta).all():  # its remaining join rounds are not run
            row["error"] = f"new client {n} sent a non-finite prompt delta in join round {jr}"
            loop.log(row["error"] + "; its join rounds stop here")
            return False
        row.update(loop.server.join_step(state, delta))
        # What the server saw, kept on the CPU for the probes (ctx.joins).
        record.append({"round": r, "sent": start.cpu().clone(), "delta": delta.detach().cpu().clone(),
                       "descriptor": state["descriptor"].cpu().clone(), "initial_descriptor": initial})
        return True


def new_clients_summary(loop: RoundLoop, rows: list[dict[str, Any]], seconds: float) -> dict[str, Any] | None:
    """summary.json's ``new_clients``: accuracy after each join round 0..R, per new client, mean and
    worst (a round a client did not reach is None); ``seconds`` the join rounds took."""
    new = loop.roster.new
    if not new:
        return None
    cfg, R = loop.cfg, loop.cfg.data.new_client_rounds
    ids = [f.client for f in new]
    got = {(r["client"], r["join_round"]): r for r in rows if r["type"] == "join"}

    def curve(key):
        per = [[got.get((n, j), {}).get(key) for j in range(R + 1)] for n in ids]
        if all(v is None for p in per for v in p):
            return None
        full = [None if any(v is None for v in col) else col for col in zip(*per)]
        return {"mean": [None if col is None else float(np.mean(col)) for col in full],
                "worst": [None if col is None else float(min(col)) for col in full], "per_client": per}

    acc = curve("acc_adapted")
    errors = [r["error"] for r in got.values() if "error" in r]
    k_d = loop.shape.prompt_tokens * loop.shape.dim
    # What one new client exchanges with the server over its join rounds: a prompt every round and a
    # delta every join round when the server updates it, else the one starting prompt (if any).
    updates = loop.server.joins_with_updates
    down = (R + 1) * k_d if updates else (k_d if loop.server.join_state() is not None else 0)
    up = R * k_d if updates else 0
    return {
        "clients": ids, "partition_ids": [f.partition_id for f in new],
        "names": loop.roster.names(cfg.data.partition, new), "join_rounds": R,
        "local_epochs": cfg.client.local_epochs, "budget_epochs": (R + 1) * cfg.client.local_epochs,
        "start": loop.server.join_description,
        "round_0": "the head alone, trained E local epochs on the received prompt",
        "train_per_client": [f.train for f in new], "test_per_client": [f.evaluated for f in new],
        "accuracy": acc, "accuracy_generated": curve("acc_generated"),
        "final": {"mean": acc["mean"][-1], "worst": acc["worst"][-1]} if acc else None,
        "communication": {"down_numbers_per_client": down, "up_numbers_per_client": up,
                          "bytes_per_client": 4 * (down + up)},
        **({"errors": errors} if errors else {}),
        "seconds": seconds,
    }
