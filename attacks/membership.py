"""Record-level membership inference scores (DESIGN §6). Members (a client's training records) are
the positive class; every score is "higher = more likely a member".

* ``loss_scores`` / ``confidence_scores`` — an observer who can query the client's final model
  (adapted prompt and head): members tend to have lower loss and higher confidence.
* ``alignment_scores`` — the honest-but-curious server, which sees P_n it sent and the released
  ΔP_n but not the head: cos(−ΔP_n, ∇_P ℓ(x)) with a proxy head fitted on auxiliary data. Local SGD
  makes −ΔP_n ≈ γ Σ_members ∇_P ℓ, so members' gradients align with it.
* ``generated_prompt_scores`` — the same server reading the descriptor instead of an update: it
  generates the client's prompt G(P_base, d_n) from its own state, fits a proxy head on auxiliary
  data under that prompt and scores a record by its loss and confidence there; calibrated by the
  loss under the prompts it generates for its own (shadow) clients, which never saw the record
  (reference-model calibration, Watson et al., ICLR 2022).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pfedpg.client import load_into


def batches(model, x: torch.Tensor, y: torch.Tensor, batch_size: int):
    """(logits, labels) of records (x, y) in batches, both on the model's device."""
    for i in range(0, x.shape[0], batch_size):
        logits = model(x[i:i + batch_size])
        yield logits, y[i:i + batch_size].to(logits.device)


@torch.no_grad()
def loss_scores(model, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """−cross-entropy per record (on the model's device)."""
    model.eval()
    return -torch.cat([F.cross_entropy(z, yy, reduction="none") for z, yy in batches(model, x, y, batch_size)])


@torch.no_grad()
def confidence_scores(model, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Probability the model gives the record's true label."""
    model.eval()
    return torch.cat([F.softmax(z, dim=1).gather(1, yy[:, None])[:, 0] for z, yy in batches(model, x, y, batch_size)])


def prompt_gradients(model, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Per-record ∇_P ℓ(x_i) (B × L·K × D) at the model's loaded prompt and head, in batches.

    Each record's loss depends on the prompt only through its own copy of the prompt tokens (the
    prompt module's output), so the gradient of the summed loss at that output is exactly the
    per-record gradient (the same fact the DP-SGD grad sampler uses)."""
    model.eval()
    mod = model.prompt
    captured = {}

    def keep(_m, _inp, out):
        out.retain_grad()
        captured["out"] = out

    handle = mod.register_forward_hook(keep)
    out = []
    try:
        for i in range(0, x.shape[0], batch_size):
            with torch.enable_grad():
                logits = model(x[i:i + batch_size])
                loss = F.cross_entropy(logits, y[i:i + batch_size].to(logits.device), reduction="sum")
                loss.backward()
            out.append(captured["out"].grad.detach().clone())
            model.zero_grad(set_to_none=True)
    finally:
        handle.remove()
    return torch.cat(out)


def alignment_scores(model, *, prompt: torch.Tensor, delta: torch.Tensor, head_weight: torch.Tensor,
                     head_bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """cos(−ΔP, ∇_P ℓ(x_i)) per record, gradients taken at the prompt P the server sent."""
    load_into(model, prompt=prompt, head_weight=head_weight, head_bias=head_bias)
    g = prompt_gradients(model, x, y).reshape(x.shape[0], -1)
    return F.cosine_similarity(g, (-delta).reshape(1, -1), dim=1)


@torch.no_grad()
def prompt_features(model, prompt: torch.Tensor, x: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Final CLS features of x with ``prompt`` loaded (what a linear head reads)."""
    model.prompt.prompt.copy_(prompt)
    model.eval()
    return torch.cat([model.features(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def fit_proxy_head(features: torch.Tensor, y: torch.Tensor, num_classes: int, *, weight_decay: float = 1e-3,
                   steps: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear head fitted by L-BFGS on (features, y): the curious server's stand-in for the
    client's private head, trained on auxiliary data it owns. Deterministic (zero init). Features
    so degenerate that L-BFGS' line search breaks down (a generated prompt that swamps the input
    makes every record's features nearly the same) are fitted standardised instead; a head that
    still cannot be fitted raises ValueError (the audit records the probe as failed)."""
    try:
        w, b = _lbfgs_head(features, y, num_classes, weight_decay=weight_decay, steps=steps)
        if bool(torch.isfinite(w).all() and torch.isfinite(b).all()):
            return w, b
    except RuntimeError:
        pass
    mu, sd = features.mean(0), features.std(0).clamp_min(1e-6)
    try:
        w, b = _lbfgs_head((features - mu) / sd, y, num_classes, weight_decay=weight_decay, steps=steps)
        w = w / sd
        b = b - w @ mu
        if bool(torch.isfinite(w).all() and torch.isfinite(b).all()):
            return w, b
    except RuntimeError:
        pass
    raise ValueError("no proxy head could be fitted on these features (finite: "
                     f"{bool(torch.isfinite(features).all())}, spread {float(features.std(0).max()):.3g})")


def _lbfgs_head(features: torch.Tensor, y: torch.Tensor, num_classes: int, *, weight_decay: float,
                steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(num_classes, features.shape[1], requires_grad=True, device=features.device)
    b = torch.zeros(num_classes, requires_grad=True, device=features.device)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")
    f = features.detach()
    y = y.to(features.device)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(f @ w.T + b, y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def proxy_model_scores(model, prompt: torch.Tensor, *, aux_x: torch.Tensor, aux_y: torch.Tensor, num_classes: int,
                       targets: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per target set (x, y): (−loss, true-class probability) under ``prompt`` and a proxy head
    fitted on (aux_x, aux_y) under the same prompt — a model the server builds from what it holds."""
    w, b = fit_proxy_head(prompt_features(model, prompt, aux_x), aux_y, num_classes)
    load_into(model, prompt=prompt, head_weight=w, head_bias=b)
    return [(loss_scores(model, x, y), confidence_scores(model, x, y)) for x, y in targets]


def generated_prompt_scores(model, *, prompts: dict[int, torch.Tensor], references: list[torch.Tensor],
                            aux_x: torch.Tensor, aux_y: torch.Tensor, num_classes: int,
                            targets: dict[int, tuple[torch.Tensor, torch.Tensor]]
                            ) -> dict[int, dict[str, torch.Tensor]]:
    """Membership scores from the descriptor: for each target client n (``prompts[n]`` =
    G(P_base, d_n), ``targets[n]`` = its candidate records), the records' ``loss`` (−ℓ) and
    ``confidence`` under that prompt with a proxy head, and ``calibrated`` = mean_ref ℓ_ref − ℓ_n,
    the loss under each ``references`` prompt (with its own proxy head) minus the loss under the
    client's. A record the client trained on should be easier under its own prompt than under
    prompts that never saw it; calibration removes how hard the record is for everyone."""
    names = sorted(targets)
    sets = [targets[n] for n in names]
    ref_losses = [torch.zeros(x.shape[0], device=model.device) for x, _ in sets]
    for ref in references:
        for i, (neg_loss, _) in enumerate(proxy_model_scores(model, ref, aux_x=aux_x, aux_y=aux_y,
                                                             num_classes=num_classes, targets=sets)):
            ref_losses[i] += -neg_loss / max(1, len(references))
    out = {}
    for i, n in enumerate(names):
        (neg_loss, conf), = proxy_model_scores(model, prompts[n], aux_x=aux_x, aux_y=aux_y, num_classes=num_classes,
                                               targets=[sets[i]])
        out[n] = {"loss": neg_loss, "confidence": conf}
        if references:
            out[n]["calibrated"] = ref_losses[i] + neg_loss
    return out
