"""Every client of a run in this process (DESIGN §1, Algorithm 1 step 2; §9: the reference): their
records, their states (adapted prompt P̃_n and head H_n, kept across rounds), the one shared prompted
model each client's state is loaded into in turn, and the batched path (``batched_clients``). A Flower
node runs one of these for the client it serves."""
from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch

from pfedpg.client import ClientState, evaluate, load_into, sgd_local_training
from pfedpg.context import RunContext, ServerView
from pfedpg.jobs import ClientData, LocalJob
from pfedpg.models.prompted_vit import PromptedViT
from pfedpg.run.clients import ClientUpdate, ClientViews, EvalRow, ModelShape, Roster
from pfedpg.run.data import Records
from pfedpg.run.env import RunEnv


def fresh_head(shape: ModelShape, g: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear head with nn.Linear's default init, drawn from the client's own stream ``g`` (on the
    CPU: the same numbers on every device) and moved to ``device``."""
    d, c = shape.dim, shape.num_classes
    bound = 1.0 / math.sqrt(d)
    w = torch.empty(c, d).uniform_(-bound, bound, generator=g)
    b = torch.empty(c).uniform_(-bound, bound, generator=g)
    return w.to(device), b.to(device)


def vpt_prompt(shape: ModelShape, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """VPT's uniform prompt init, drawn from ``g`` (on the CPU) and moved to ``device``."""
    p = torch.empty(shape.prompt_tokens, shape.dim).uniform_(-shape.init_bound, shape.init_bound, generator=g)
    return p.to(device)


class InProcessClients:
    """The :class:`~pfedpg.run.clients.Clients` of this process (see the module docstring).

    ``states[n]`` is client n's :class:`ClientState`; ``model`` the shared prompted model (set by
    :meth:`start`); ``records`` where the clients' records come from."""

    def __init__(self, env: RunEnv, records: Records):
        self.cfg, self.seeds, self.device, self.hooks = env.cfg, env.seeds, env.device, env.hooks
        self.records = records
        self.states: list[ClientState] = []
        self.model: PromptedViT | None = None
        self.shape: ModelShape | None = None
        self.ctx: RunContext | None = None
        self.sends_prompts = True

    # -- the seam ----------------------------------------------------------------------------------
    def facts(self) -> Roster:
        return self.records.roster

    def views(self) -> ClientViews:
        return ClientViews(train_data=self.records.train_data, eval_data=self.records.test_data,
                           evaluate=self.evaluate_client, client_states=lambda: self.states)

    def start(self, *, model: PromptedViT, shape: ModelShape, server: ServerView, ctx: RunContext) -> None:
        """Every client's initial state: a fresh head from its own stream, and the server's first
        prompt for it (or, for a method that sends nothing, the VPT init from its own stream)."""
        self.model, self.shape, self.ctx = model, shape, ctx
        self.sends_prompts = server.sends_prompts
        self.states = []
        for n in range(self.records.roster.num_clients):
            w, b = fresh_head(shape, self.seeds.torch("init.head", client=n), self.device)
            prompt = server.prompts_for([n])[n] if server.sends_prompts else \
                vpt_prompt(shape, self.seeds.torch("init.prompt", client=n), self.device)
            self.states.append(ClientState(prompt=prompt, head_weight=w, head_bias=b))

    def train(self, round: int, participants: list[int], sent: dict[int, torch.Tensor]) -> dict[int, ClientUpdate]:
        """Round ``round``'s local training, in participant order; with ``batched_clients`` the clients
        without a ``local_training`` hook first, in one batch. A participant not in ``sent`` starts
        from its own prompt."""
        r = round
        together = [n for n in participants if self.cfg.batched_clients and not self.hooks.has_local_training(n)]
        done = self._train_batched(r, {n: sent.get(n, self.states[n].prompt) for n in together}) if together else {}
        return {n: done[n] if n in done else self.train_one(n, r, sent.get(n, self.states[n].prompt))
                for n in participants}

    def evaluate(self, round: int, generated: dict[int, torch.Tensor]) -> list[EvalRow]:
        return [self.evaluate_one(n, generated.get(n)) for n in range(self.records.roster.num_clients)]

    def state_dict(self) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self.states]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        self.states = [ClientState.from_dict(d).to(self.device) for d in states]

    def communication(self) -> dict[str, Any]:
        return {}

    # -- one client ----------------------------------------------------------------------------------
    def hold(self, n: int) -> None:
        """Have client ``n``'s records in memory (a Flower actor switching clients reads its shard)."""
        self.records.hold(n)

    def augment_stream(self, component: str, client: int, round: int) -> torch.Generator | None:
        """The augmentation stream of one local training (None when ``data.augment`` is none)."""
        return None if self.cfg.data.augment == "none" else self.seeds.torch(component, client=client, round=round)

    def train_one(self, n: int, r: int, start_prompt: torch.Tensor) -> ClientUpdate:
        """Client ``n`` trains from ``start_prompt`` in round ``r`` (its local_training hook, or SGD)."""
        st, model = self.states[n], self.model
        load_into(model, prompt=start_prompt, head_weight=st.head_weight, head_bias=st.head_bias)
        x, y = self.records.train_data[n]
        data = self.hooks.client_data(self.ctx, client=n, round=r, data=ClientData(x, y))
        job = LocalJob(client=n, round=r, model=model, data=data,
                       generator=self.seeds.torch("local_train", client=n, round=r),
                       run_default=partial(sgd_local_training, cfg=self.cfg.client),
                       augment=self.augment_stream("augment", n, r))
        result = self.hooks.local_training(self.ctx, job)
        with torch.no_grad():
            final = {"prompt": model.prompt.prompt.detach().clone(),
                     "head_weight": model.head.weight.detach().clone(),
                     "head_bias": model.head.bias.detach().clone()}
        return self._finish(n, r, start_prompt, result, final)

    def _train_batched(self, r: int, starts: dict[int, torch.Tensor]) -> dict[int, ClientUpdate]:
        """The round's clients in ``starts`` trained in one batch (``batched_clients: true``)."""
        from pfedpg.batched import batched_sgd_local_training

        clients = list(starts)
        jobs, init = [], []
        for n in clients:
            st = self.states[n]
            x, y = self.records.train_data[n]
            data = self.hooks.client_data(self.ctx, client=n, round=r, data=ClientData(x, y))
            jobs.append(LocalJob(client=n, round=r, model=self.model, data=data,
                                 generator=self.seeds.torch("local_train", client=n, round=r), run_default=None,
                                 augment=self.augment_stream("augment", n, r)))
            init.append({"prompt": starts[n], "head_weight": st.head_weight, "head_bias": st.head_bias})
        results, finals = batched_sgd_local_training(self.model, jobs, init, self.cfg.client)
        return {n: self._finish(n, r, starts[n], res, fin) for n, res, fin in zip(clients, results, finals)}

    def _finish(self, n: int, r: int, start_prompt: torch.Tensor, result, final: dict[str, torch.Tensor]
                ) -> ClientUpdate:
        """Client ``n`` keeps its adapted prompt and head, and releases ΔP_n = P̃_n − P_n through its
        client-side ``outgoing_delta`` hooks (methods that send prompts)."""
        st = self.states[n]
        adapted = final["prompt"]
        st.prompt, st.head_weight, st.head_bias = adapted, final["head_weight"], final["head_bias"]
        st.rounds_joined += 1
        metrics = {"train_loss": result.loss, "local_steps": result.steps, **result.extra}
        if not self.sends_prompts:
            return ClientUpdate(metrics)
        delta = self.hooks.outgoing_delta(self.ctx, client=n, round=r, delta=adapted - start_prompt)
        return ClientUpdate(metrics, delta)

    def evaluate_client(self, n: int, x: torch.Tensor, y: torch.Tensor) -> float:
        """Accuracy of client n's personalised model (adapted prompt, head) on (x, y)."""
        st = self.states[n]
        load_into(self.model, prompt=st.prompt, head_weight=st.head_weight, head_bias=st.head_bias)
        return evaluate(self.model, x, y, batch_size=self.cfg.client.eval_batch)[0]

    def evaluate_one(self, n: int, generated: torch.Tensor | None) -> EvalRow:
        """Client n's evaluation row: its adapted prompt with its head, and the generated prompt
        ``generated`` (None for methods that send nothing) with the same head."""
        st, model = self.states[n], self.model
        x, y = self.records.test_data[n]
        bs = self.cfg.client.eval_batch
        load_into(model, prompt=st.prompt, head_weight=st.head_weight, head_bias=st.head_bias)
        acc, loss = evaluate(model, x, y, batch_size=bs)
        row = EvalRow(client=n, acc_adapted=acc, loss_adapted=loss, hook_metrics=self.hooks.client_metrics(
            self.ctx, client=n, evaluate=lambda xs, ys: self.evaluate_client(n, xs, ys)))
        if generated is not None:
            load_into(model, prompt=generated, head_weight=st.head_weight, head_bias=st.head_bias)
            row.acc_generated, row.loss_generated = evaluate(model, x, y, batch_size=bs)
        return row
