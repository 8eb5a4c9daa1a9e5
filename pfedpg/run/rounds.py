"""The round loop (DESIGN §1, Algorithm 1): the participants' local training through the run's
:class:`~pfedpg.run.clients.Clients`, the server step with its hook points, evaluation, and the
record of a round that diverged. :class:`RoundLoop` holds the run's state — server, participation
schedule, seeds, device, hook chain and the hooks' context — and the clients; it never reaches past
the clients' verbs, so the same loop runs in-process clients and Flower's."""
from __future__ import annotations

import json
import time
from typing import Any

import torch

from pfedpg import jsonio
from pfedpg.context import RunContext
from pfedpg.errors import NonFiniteDeltaError
from pfedpg.run.clients import Clients, EvalRow, ModelShape, Roster
from pfedpg.run.env import RunEnv
from pfedpg.run.stats import round_eval_stats, round_train_stats
from pfedpg.server import Server, plain_aggregate


@torch.no_grad()
def all_finite(t: torch.Tensor) -> bool:
    """``bool(torch.isfinite(t).all())``, in one pass without a tensor of t's size: a sum is finite only
    if every entry is (a NaN or an infinity stays one), and the entry-wise test runs only when it is
    not (finite entries can overflow it). At N = 10,000 the descriptors hold 19 M numbers a round."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


class RoundLoop:
    """One run's rounds over its clients (see the module docstring). ``audit_ids``: the clients hooks
    added for an audit (``Hook.audit_clients``), which release every round but hold no data."""

    def __init__(self, env: RunEnv, *, clients: Clients, roster: Roster, server: Server, schedule: list[list[int]],
                 ctx: RunContext, shape: ModelShape, audit_ids: list[int]):
        self.cfg, self.run_dir, self.log = env.cfg, env.run_dir, env.log
        self.device, self.seeds, self.hooks = env.device, env.seeds, env.hooks
        self.clients, self.roster = clients, roster
        self.server, self.schedule, self.ctx = server, schedule, ctx
        self.shape, self.audit_ids = shape, audit_ids

    @property
    def num_clients(self) -> int:
        return self.roster.num_clients

    def run_round(self, r: int) -> dict[str, Any]:
        """Round ``r``: its record for metrics.jsonl, the clients' rows under ``clients`` (last)."""
        t0 = time.perf_counter()
        participants = self.schedule[r - 1]
        updates = self.clients.train(r, participants, self.server.prompts_for(participants))
        client_rows = {n: u.row() for n, u in updates.items()}
        deltas = {n: u.delta for n, u in updates.items() if u.delta is not None}
        failed = {n: u.error for n, u in updates.items() if u.error is not None}
        deltas.update(self.audit_releases(r))
        t_train = time.perf_counter() - t0
        server_info = self.server_step(r, deltas)
        record: dict[str, Any] = {"type": "round", "round": r, "participants": participants,
                                  **round_train_stats(client_rows.values()), **server_info}
        if self.audit_ids:
            record["audit_clients"] = len(self.audit_ids)
        if failed:
            record["failed_clients"] = {str(n): e for n, e in sorted(failed.items())}
        t_eval = time.perf_counter()
        if r % self.cfg.eval_every == 0 or r == self.cfg.rounds:
            evals, spread = self.evaluate_all(r)
            rows = [{"type": "client", "round": r, "participated": e.client in client_rows,
                     **client_rows.get(e.client, {}), **e.to_record()} for e in evals]
            record.update(self._eval_figures(r, evals))
            record["generated_prompt_spread"] = spread
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

    def _eval_figures(self, r: int, evals: list[EvalRow]) -> dict[str, Any]:
        if all(e.withheld for e in evals):  # kept by the clients (DESIGN §5, "What leaves a client")
            return {"client_metrics": "withheld"}
        if not any(e.acc_adapted is not None for e in evals):
            raise RuntimeError(f"round {r}: no client could be evaluated; see the errors in {self.run_dir / 'log.txt'}")
        return round_eval_stats([e.to_record() for e in evals])

    def audit_releases(self, r: int) -> dict[int, torch.Tensor]:
        """Round r's releases of the clients hooks added for an audit (``Hook.audit_clients``): they do
        not train, so each sends the zero update through the client-side ``outgoing_delta`` chain."""
        zero = torch.zeros(self.shape.prompt_tokens, self.shape.dim, device=self.device)
        return {c: self.hooks.outgoing_delta(self.ctx, client=c, round=r, delta=zero.clone()) for c in self.audit_ids}

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
        if not all(all_finite(p) for p in self.server.parameters()):
            raise NonFiniteDeltaError(f"the server state became non-finite in round {r}'s step "
                                      f"(update norm {step.get('server_update_norm', float('nan')):.3g}); "
                                      "bound it with server.update_bound or a robust rule")
        return {"aggregation_ms": agg_ms, "clients_aggregated": len(grads.clients), **step}

    def generated_prompts(self) -> dict[int, torch.Tensor]:
        """The prompt the server would now send every client (empty for methods that send nothing)."""
        return self.server.prompts_for(list(range(self.num_clients))) if self.server.sends_prompts else {}

    def evaluate_all(self, r: int) -> tuple[list[EvalRow], float | None]:
        """Every client's evaluation row in round ``r``, and the spread of the generated prompts (their
        mean pairwise distance over their mean norm; None with fewer than two)."""
        generated = self.generated_prompts()
        rows = self.clients.evaluate(r, generated)
        if len(generated) < 2:
            return rows, None
        p = torch.stack([generated[n].reshape(-1) for n in sorted(generated)])
        del generated  # (the N prompts are not held beside their stack and the N × N distances)
        dist, k = torch.cdist(p, p), len(p)
        # The off-diagonal distances in row-major order, as dist[~eye] lists them, without two N × N masks:
        # after the first diagonal entry, every (k + 1)-th entry is the next one.
        off = dist.reshape(-1)[1:].view(k - 1, k + 1)[:, :-1].reshape(-1)
        return rows, float(off.mean() / p.norm(dim=1).mean().clamp_min(1e-12))

    def record_divergence(self, r: int, error: Exception) -> None:
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
            generated = self.generated_prompts()
            rows = self.clients.evaluate(r, generated)
            # The clients' own models as they stand, and what the server would now give them.
            out["accuracy_per_client"] = [row.acc_adapted for row in rows]
            if generated:
                out["accuracy_generated_per_client"] = [row.acc_generated for row in rows]
        except Exception as e:  # the measurement is best effort; the divergence itself is the result
            out["accuracy_error"] = f"{type(e).__name__}: {e}"
        (self.run_dir / "diverged.json").write_text(jsonio.dumps(out, indent=2))
        self.log(f"diverged in round {r}: {error}")

