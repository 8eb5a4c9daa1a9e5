"""One training round (DESIGN §1): the participants' local training, the server step with its hook
points, evaluation, and the record of a round that diverged."""
from __future__ import annotations

import json
import time
from functools import partial
from typing import Any

import torch

from pfedpg.client import evaluate, load_into, sgd_local_training
from pfedpg.errors import NonFiniteDeltaError
from pfedpg.jobs import ClientData, LocalJob
from pfedpg.run.summary import round_eval_stats, round_train_stats
from pfedpg.server import plain_aggregate


class Rounds:
    """The Trainer's rounds: train, step, evaluate (the Flower engine overrides how clients are reached)."""

    def run_round(self, r: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.current_round = r
        participants = self.schedule[r - 1]
        sent = self.server.prompts_for(participants)
        client_rows = self.train_participants(r, participants, sent)
        deltas: dict[int, torch.Tensor] = {}
        for n, row in client_rows.items():
            delta = row.pop("_delta", None)
            if delta is not None:
                deltas[n] = delta
                row["delta_norm"] = float(delta.norm())
        failed = {n: row["error"] for n, row in client_rows.items() if "error" in row}
        deltas.update(self.audit_releases(r))
        t_train = time.perf_counter() - t0
        server_info = self.server_step(r, deltas)
        record: dict[str, Any] = {"type": "round", "round": r, "participants": participants,
                                  **round_train_stats(client_rows.values()), **server_info}
        if self.audit_ids:
            record["audit_clients"] = len(self.audit_ids)
        if failed:
            record["failed_clients"] = {str(n): e for n, e in sorted(failed.items())}
        rows = []
        t_eval = time.perf_counter()
        if r % self.cfg.eval_every == 0 or r == self.cfg.rounds:
            evals = self.evaluate_all()
            for e in evals:
                n = e["client"]
                rows.append({"type": "client", "round": r, "participated": n in client_rows,
                             **client_rows.get(n, {}), **e})
            if all(e.get("withheld") for e in evals):  # kept by the clients (DESIGN §5, "What leaves a client")
                record["client_metrics"] = "withheld"
            elif not any(e.get("acc_adapted") is not None for e in evals):
                raise RuntimeError(f"round {r}: no client could be evaluated; "
                                   f"see the errors in {self.run_dir / 'log.txt'}")
            else:
                record.update(round_eval_stats(evals))
            record["generated_prompt_spread"] = self._prompt_spread
        else:
            rows = [{"type": "client", "round": r, "client": n, "participated": True, **row}
                    for n, row in client_rows.items()]
        record["time_eval_s"] = time.perf_counter() - t_eval
        record["clients"] = rows
        record.update(self.hooks.end_of_round(self.ctx, round=r, record=record))
        record["time_train_s"] = t_train
        record["time_round_s"] = time.perf_counter() - t0
        record["clients"] = record.pop("clients")  # keep it last (the run pops it into client records)
        return record

    def train_participants(self, r: int, participants: list[int],
                           sent: dict[int, torch.Tensor]) -> dict[int, dict[str, Any]]:
        """Round r's local training: one row per participant, its outgoing delta under ``_delta``
        (absent for methods that send nothing). A row with ``error`` is a client that failed (the
        Flower engine); the round goes on without its delta."""
        together = [n for n in participants if self.cfg.batched_clients and not self.hooks.has_local_training(n)]
        done = self.train_clients_batched(r, {n: sent.get(n, self.states[n].prompt) for n in together}) \
            if together else {}
        rows = {}
        for n in participants:
            row, delta = done[n] if n in done else self.train_client(n, r, sent.get(n, self.states[n].prompt))
            if delta is not None:
                row["_delta"] = delta
            rows[n] = row
        return rows

    def audit_releases(self, r: int) -> dict[int, torch.Tensor]:
        """Round r's releases of the clients hooks added for an audit (``Hook.audit_clients``): they do
        not train, so each sends the zero update through the client-side ``outgoing_delta`` chain."""
        zero = torch.zeros(self.prompt_tokens, self.dim, device=self.device)
        return {c: self.hooks.outgoing_delta(self.ctx, client=c, round=r, delta=zero.clone()) for c in self.audit_ids}

    def train_client(self, n: int, r: int, start_prompt: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor | None]:
        st = self.states[n]
        load_into(self.model, prompt=start_prompt, head_weight=st.head_weight, head_bias=st.head_bias)
        x, y = self.train_data[n]
        data = self.hooks.client_data(self.ctx, client=n, round=r, data=ClientData(x, y))
        job = LocalJob(client=n, round=r, model=self.model, data=data,
                       generator=self.seeds.torch("local_train", client=n, round=r),
                       run_default=partial(sgd_local_training, cfg=self.cfg.client),
                       augment=self.augment_stream("augment", n, r))
        result = self.hooks.local_training(self.ctx, job)
        with torch.no_grad():
            final = {"prompt": self.model.prompt.prompt.detach().clone(),
                     "head_weight": self.model.head.weight.detach().clone(),
                     "head_bias": self.model.head.bias.detach().clone()}
        return self._finish_client(n, r, start_prompt, result, final)

    def train_clients_batched(self, r: int, starts: dict[int, torch.Tensor]
                              ) -> dict[int, tuple[dict[str, Any], torch.Tensor | None]]:
        """The round's clients in ``starts`` trained in one batch (``batched_clients: true``)."""
        from pfedpg.batched import batched_sgd_local_training

        clients = list(starts)
        jobs, init = [], []
        for n in clients:
            st = self.states[n]
            x, y = self.train_data[n]
            data = self.hooks.client_data(self.ctx, client=n, round=r, data=ClientData(x, y))
            jobs.append(LocalJob(client=n, round=r, model=self.model, data=data,
                                 generator=self.seeds.torch("local_train", client=n, round=r), run_default=None,
                                 augment=self.augment_stream("augment", n, r)))
            init.append({"prompt": starts[n], "head_weight": st.head_weight, "head_bias": st.head_bias})
        results, finals = batched_sgd_local_training(self.model, jobs, init, self.cfg.client)
        return {n: self._finish_client(n, r, starts[n], res, fin) for n, res, fin in zip(clients, results, finals)}

    def _finish_client(self, n: int, r: int, start_prompt: torch.Tensor, result, final: dict[str, torch.Tensor]):
        st = self.states[n]
        adapted = final["prompt"]
        st.prompt, st.head_weight, st.head_bias = adapted, final["head_weight"], final["head_bias"]
        st.rounds_joined += 1
        record = {"train_loss": result.loss, "local_steps": result.steps, **result.extra}
        if not self.server.sends_prompts:
            return record, None
        delta = self.hooks.outgoing_delta(self.ctx, client=n, round=r, delta=adapted - start_prompt)
        return record, delta

    def server_step(self, r: int, deltas: dict[int, torch.Tensor]) -> dict[str, Any]:
        deltas = self.hooks.incoming_deltas(self.ctx, round=r, deltas=deltas)
        for n, d in deltas.items():
            if not torch.isfinite(d).all():
                raise NonFiniteDeltaError(
                    f"client {n} sent a non-finite prompt delta in round {r}; add the hook "
                    "`{name: reject_nonfinite}` (defenses) to drop and log such deltas"
                )
        if not deltas:
            return {"aggregation_ms": 0.0, "clients_aggregated": 0}
        grads = self.hooks.shared_gradients(self.ctx, round=r, grads=self.server.client_gradients(deltas))
        t0 = time.perf_counter()
        update = self.hooks.aggregate(self.ctx, round=r, grads=grads, default=plain_aggregate)
        agg_ms = (time.perf_counter() - t0) * 1e3
        step = self.server.apply(update, grads)
        # The step itself can blow the state up (an attack, an unbounded step under DP noise): that
        # is the round it diverged in, even if no client ever sends a non-finite delta afterwards.
        if not all(bool(torch.isfinite(p).all()) for p in self.server.parameters()):
            raise NonFiniteDeltaError(f"the server state became non-finite in round {r}'s step "
                                      f"(update norm {step.get('server_update_norm', float('nan')):.3g}); "
                                      "bound it with server.update_bound or a robust rule")
        return {"aggregation_ms": agg_ms, "clients_aggregated": len(grads.clients), **step}

    def evaluate_client(self, n: int, x: torch.Tensor, y: torch.Tensor) -> float:
        """Accuracy of client n's personalised model (adapted prompt, head) on (x, y)."""
        st = self.states[n]
        load_into(self.model, prompt=st.prompt, head_weight=st.head_weight, head_bias=st.head_bias)
        return evaluate(self.model, x, y, batch_size=self.cfg.client.eval_batch_size)[0]

    def evaluate_one(self, n: int, generated: torch.Tensor | None) -> dict[str, Any]:
        """Client n's evaluation row: its adapted prompt with its head, and the generated prompt
        ``generated`` (None for methods that send nothing) with the same head."""
        st = self.states[n]
        x, y = self.test_data[n]
        bs = self.cfg.client.eval_batch_size
        load_into(self.model, prompt=st.prompt, head_weight=st.head_weight, head_bias=st.head_bias)
        acc, loss = evaluate(self.model, x, y, batch_size=bs)
        row = {"client": n, "acc_adapted": acc, "loss_adapted": loss, "acc_generated": None}
        row.update(self.hooks.client_metrics(self.ctx, client=n,
                                             evaluate=lambda xs, ys: self.evaluate_client(n, xs, ys)))
        if generated is not None:
            load_into(self.model, prompt=generated, head_weight=st.head_weight, head_bias=st.head_bias)
            row["acc_generated"], row["loss_generated"] = evaluate(self.model, x, y, batch_size=bs)
        return row

    def evaluate_clients(self, generated: dict[int, torch.Tensor]) -> list[dict[str, Any]]:
        """Every client's evaluation row (in-process; the Flower engine asks the clients)."""
        return [self.evaluate_one(n, generated.get(n)) for n in range(self.num_clients)]

    def evaluate_all(self) -> list[dict[str, Any]]:
        generated = self.server.prompts_for(list(range(self.num_clients))) if self.server.sends_prompts else {}
        rows = self.evaluate_clients(generated)
        if len(generated) > 1:
            p = torch.stack([generated[n].reshape(-1) for n in sorted(generated)])
            dist = torch.cdist(p, p)
            off = dist[~torch.eye(len(p), dtype=torch.bool, device=dist.device)]
            self._prompt_spread = float(off.mean() / p.norm(dim=1).mean().clamp_min(1e-12))
        else:
            self._prompt_spread = None
        return rows

    def _record_divergence(self, r: int, error: Exception) -> None:
        """A run that diverged is a result (an attack that makes training diverge has succeeded,
        DESIGN §7): ``diverged.json`` keeps the round and every client's accuracy as measured at that
        point, non-finite outputs counted wrong — with its own adapted prompt, and with the prompt the
        server would now send (``accuracy_generated_per_client``)."""
        out: dict[str, Any] = {"round": r, "error": f"{type(error).__name__}: {error}", "hook_state": {}}
        for h in self.hooks.hooks:  # what each hook knows so far (e.g. an attack's malicious clients)
            try:
                out["hook_state"][h.name] = json.loads(json.dumps(h.state_dict()))
            except (TypeError, ValueError):  # not JSON (tensors): left out
                pass
        try:
            generated = self.server.prompts_for(list(range(self.num_clients))) if self.server.sends_prompts else {}
            rows = self.evaluate_clients(generated)
            # The clients' own models as they stand, and what the server would now give them.
            out["accuracy_per_client"] = [row["acc_adapted"] for row in rows]
            if generated:
                out["accuracy_generated_per_client"] = [row["acc_generated"] for row in rows]
        except Exception as e:  # the measurement is best effort; the divergence itself is the result
            out["accuracy_error"] = f"{type(e).__name__}: {e}"
        (self.run_dir / "diverged.json").write_text(json.dumps(out, indent=2))
        self.log(f"diverged in round {r}: {error}")
