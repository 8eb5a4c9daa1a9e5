"""The server-side prompt generator of pFedPG (Yang, Wang & Wang, ICCV 2023, Eq. 3) and the
generator ablations of its Table 4.

``P_n = G(P_base, d_n) = softmax((d_n W_Q)(P_base W_K)^T / sqrt(l_k)) (P_base W_V) W_O``: the query
comes from the client descriptor d_n (K×D: K query tokens per client), keys and values from the
shared prompt basis P_base (K×D). Single head and no residual is the literal reading and the
default (DESIGN §1). Every variant maps (P_base, d_n) -> K×D and depends on d_n and the shared
parameters only, never on another client's descriptor.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from pfedpg.errors import ConfigError
from pfedpg.registry import Registry

GENERATORS: Registry[type["PromptGenerator"]] = Registry("generator")


class PromptGenerator(nn.Module):
    """Shared generator parameters φ; ``forward(p_base, descriptor) -> prompts``. A generator owns its
    options (its constructor's keyword arguments after ``num_prompts`` and ``dim``) and how the
    clients' descriptors start (``init_descriptors``)."""

    def __init__(self, *, num_prompts: int, dim: int):
        super().__init__()
        self.num_prompts, self.dim = num_prompts, dim

    def forward(self, p_base: torch.Tensor, descriptor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def init_descriptors(self, draw: Callable[[int], torch.Generator], served: list[int], *, p_base: torch.Tensor,
                         init_bound: float, logit_std: float, num_clients: int) -> torch.Tensor:
        """One K×D descriptor per served client, client n's from its own stream ``draw(n)`` (adding
        clients never changes the others): U(−init_bound, init_bound), the VPT prompt init."""
        k, d = self.num_prompts, self.dim
        return torch.stack([torch.empty(k, d).uniform_(-init_bound, init_bound, generator=draw(n)) for n in served])


@GENERATORS.register("cross_attention")
class CrossAttentionGenerator(PromptGenerator):
    """Eq. 3, with l_k = l_v = D. ``residual=True`` returns ``P_base + attention(...)`` instead."""

    def __init__(self, *, num_prompts: int, dim: int, residual: bool = False):
        super().__init__(num_prompts=num_prompts, dim=dim)
        self.residual = bool(residual)
        self.w_q = nn.Parameter(torch.empty(dim, dim))
        self.w_k = nn.Parameter(torch.empty(dim, dim))
        self.w_v = nn.Parameter(torch.empty(dim, dim))
        self.w_o = nn.Parameter(torch.empty(dim, dim))

    def reset_parameters(self, generator: torch.Generator) -> None:
        for w in (self.w_q, self.w_k, self.w_v, self.w_o):
            nn.init.xavier_uniform_(w, generator=generator)

    def attention(self, p_base: torch.Tensor, descriptor: torch.Tensor) -> torch.Tensor:
        q = descriptor @ self.w_q
        k = p_base @ self.w_k
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.dim), dim=-1)

    def forward(self, p_base: torch.Tensor, descriptor: torch.Tensor) -> torch.Tensor:
        out = self.attention(p_base, descriptor) @ (p_base @ self.w_v) @ self.w_o
        return p_base + out if self.residual else out

    def init_descriptors(self, draw, served, *, p_base, init_bound, logit_std, num_clients):
        """N(0, 1) descriptors rescaled so that the training clients' attention logits have std
        ``logit_std`` (``server.attention_logit_std``): near-uniform attention would give every client
        the same prompt. An audit's clients (after the training clients) are scaled as theirs."""
        d = torch.stack([torch.randn(self.num_prompts, self.dim, generator=draw(n)) for n in served])
        return d * (logit_std / self.logits_std(p_base.detach(), d[:num_clients]))

    def logits_std(self, p_base: torch.Tensor, descriptors: torch.Tensor) -> float:
        with torch.no_grad():
            q = descriptors @ self.w_q
            k = p_base @ self.w_k
            return float((q @ k.transpose(-1, -2) / math.sqrt(self.dim)).std())


@GENERATORS.register("mlp")
class MLPGenerator(PromptGenerator):
    """pFedHN-style (Table 4 "MLP"): a token-wise two-layer MLP maps each descriptor token to a
    prompt token; P_base is unused. Token-wise (shared over the K tokens) keeps φ at O(D·hidden)
    instead of O((K·D)²)."""

    def __init__(self, *, num_prompts: int, dim: int, hidden: int | None = None):
        super().__init__(num_prompts=num_prompts, dim=dim)
        if hidden is not None and not (isinstance(hidden, int) and not isinstance(hidden, bool) and hidden > 0):
            raise ConfigError(f"generator mlp: hidden={hidden!r} must be a positive integer, or null (= D)")
        hidden = hidden or dim
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def reset_parameters(self, generator: torch.Generator) -> None:
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight, generator=generator)
            nn.init.zeros_(fc.bias)

    def forward(self, p_base: torch.Tensor, descriptor: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(descriptor)))


@GENERATORS.register("adain")
class AdaINGenerator(PromptGenerator):
    """Table 4 "AdaIN": P_base normalised per channel over its K tokens, then re-scaled with the
    per-channel std and mean of d_n. No parameters of its own: φ is empty."""

    eps = 1e-5

    def reset_parameters(self, generator: torch.Generator) -> None:
        pass

    def forward(self, p_base: torch.Tensor, descriptor: torch.Tensor) -> torch.Tensor:
        mu_b, sd_b = p_base.mean(-2, keepdim=True), p_base.std(-2, keepdim=True) + self.eps
        mu_d, sd_d = descriptor.mean(-2, keepdim=True), descriptor.std(-2, keepdim=True)
        return (p_base - mu_b) / sd_b * sd_d + mu_d


@GENERATORS.register("basis")
class BasisGenerator(PromptGenerator):
    """Table 4 "basis only": every client gets P_base (the descriptor is ignored)."""

    def reset_parameters(self, generator: torch.Generator) -> None:
        pass

    def forward(self, p_base: torch.Tensor, descriptor: torch.Tensor) -> torch.Tensor:
        return p_base.expand(*descriptor.shape[:-2], *p_base.shape) if descriptor.dim() > 2 else p_base
