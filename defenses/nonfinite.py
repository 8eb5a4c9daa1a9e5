"""``reject_nonfinite``: the server drops deltas holding NaN or Inf and logs which client sent them.

Without this hook the runner stops with an error on such a delta rather than corrupting φ,
P_base and the descriptors; with it the round goes on without that client.
"""
from __future__ import annotations

import torch

from pfedpg.context import RunContext, ServerSide
from pfedpg.hooks import Hook, register_hook


@register_hook("reject_nonfinite")
class RejectNonFinite(Hook):
    def __init__(self):
        super().__init__()
        self.rejected: list[tuple[int, int]] = []  # (round, client)

    def incoming_deltas(self, ctx: ServerSide, *, round, deltas):
        kept = {}
        for n, d in deltas.items():
            if torch.isfinite(d).all():
                kept[n] = d
            else:
                self.rejected.append((round, n))
                ctx.log(f"round {round}: rejected a non-finite delta from client {n}")
        return kept

    def end_of_round(self, ctx: RunContext, *, round, record):
        return {"rejected": [n for r, n in self.rejected if r == round]}

    def end_of_run(self, ctx: RunContext, *, summary):
        return {"rejected": [list(x) for x in self.rejected]}

    def state_dict(self):
        return {"rejected": [list(x) for x in self.rejected]}

    def load_state_dict(self, state):
        self.rejected = [tuple(x) for x in state.get("rejected", [])]
