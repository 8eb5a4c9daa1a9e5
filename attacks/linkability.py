"""Linkability of released updates and source inference (DESIGN §6).

* **Linkability** — the server sees ΔP_n round after round. If client ids were hidden (a shuffler,
  pseudonyms), could it still tell which releases come from the same client? Each client's early
  releases (the first half of the rounds it joined) form its reference, the normalised mean; every
  later release is matched to the reference with the highest cosine. Top-1 accuracy against chance
  1/N, and the ROC of "same client" over all (release, reference) pairs.
* **Source inference** — which client holds record x: given a score s_m(x) for each candidate
  client m (e.g. the update-alignment score at m's release), predict argmax_m. Accuracy against
  1/N, and the ROC of "m holds x" over all (record, client) pairs.
"""
from __future__ import annotations

import numpy as np
import torch

from attacks.metrics import probe_metrics


def _unit(v: torch.Tensor) -> torch.Tensor:
    v = v.reshape(-1).double()
    return v / v.norm().clamp_min(1e-12)


def linkability(releases: dict[int, list[torch.Tensor]], *, query_clients: list[int] | None = None) -> dict:
    """``releases[n]``: client n's released ΔP_n in round order (clients with < 2 are skipped).
    ``query_clients``: match only these clients' later releases (e.g. new clients' join rounds)
    against every client's reference."""
    clients = [n for n, r in sorted(releases.items()) if len(r) >= 2]
    if len(clients) < 2:
        return {"status": "not applicable: fewer than 2 clients released twice"}
    if query_clients is not None and not set(query_clients) & set(clients):
        return {"status": "not applicable: no queried client released twice"}
    refs, queries = [], []
    for n in clients:
        half = len(releases[n]) // 2
        refs.append(_unit(torch.stack([_unit(d) for d in releases[n][:half]]).mean(0)))
        if query_clients is None or n in query_clients:
            queries += [(n, _unit(d)) for d in releases[n][half:]]
    ref = torch.stack(refs)
    scores, labels, hits = [], [], 0
    for n, q in queries:
        s = (ref @ q).cpu().numpy()
        hits += int(clients[int(np.argmax(s))] == n)
        scores.append(s)
        labels.append(np.array([m == n for m in clients]))
    scores, labels = np.concatenate(scores), np.concatenate(labels)
    out = probe_metrics(scores, labels)
    out.update(top1_accuracy=hits / len(queries), chance=1.0 / len(clients), queries=len(queries),
               clients=len(clients))
    return {**out, "_curve": (scores, labels)}


def source_inference(scores: np.ndarray, owners: np.ndarray, candidates: list[int]) -> dict:
    """``scores``: n_records × n_candidates (higher = more likely the holder); ``owners``: each
    record's true client id, one of ``candidates``."""
    s = np.asarray(scores, dtype=float)
    owners = np.asarray(owners)
    labels = owners[:, None] == np.asarray(candidates)[None, :]
    pred = np.asarray(candidates)[np.argmax(s, axis=1)]
    out = probe_metrics(s.reshape(-1), labels.reshape(-1))
    out.update(top1_accuracy=float((pred == owners).mean()), chance=1.0 / len(candidates), records=int(len(owners)),
               clients=len(candidates))
    return {**out, "_curve": (s.reshape(-1), labels.reshape(-1))}


__all__ = ["linkability", "source_inference"]
