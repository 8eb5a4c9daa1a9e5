"""The clients' records as a process holds them (DESIGN §2, "Storage and transforms"): the run's
data set partitioned (new clients held out first), and per client its training and evaluated
records as uint8 tensors on the host — the model's input pipeline resizes, normalises and augments
each batch on the run's device; no float copy of a client is ever made.

In-process, every client's records sit in one store (:func:`gather`: one uint8 image tensor and one
label tensor, client after client), and a client's pair is a view of its rows, made when asked for
(:class:`ClientPairs`): no tensor pair, allocation or heap fragment per client (issue 31)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from pfedpg.config import RunConfig
from pfedpg.data import load_dataset, partition_clients, split_new_clients
from pfedpg.run.clients import ClientFacts, Roster

Pair = tuple[torch.Tensor, torch.Tensor]


class Records(Protocol):
    """Where an :class:`~pfedpg.run.inprocess.InProcessClients` finds its clients' records:
    ``train_data`` / ``test_data`` per client ("test" is what evaluation reads: the test split, or
    the validation split when tuning), the same for the new clients, the :class:`Roster`, and
    ``hold(n)``, called before client ``n`` trains or is evaluated (a Flower simulation actor reads
    that client's shard then)."""

    roster: Roster
    train_data: Sequence[Pair]
    test_data: Sequence[Pair]
    new_train_data: Sequence[Pair]
    new_test_data: Sequence[Pair]

    def hold(self, n: int) -> None: ...


@dataclass
class ClientRecords:
    """Every client's records in memory (the in-process run, as :class:`ClientPairs` of one store;
    a Flower node with its own files, as lists)."""

    roster: Roster
    train_data: Sequence[Pair]
    test_data: Sequence[Pair]
    new_train_data: Sequence[Pair] = field(default_factory=list)
    new_test_data: Sequence[Pair] = field(default_factory=list)

    def hold(self, n: int) -> None:
        """Every client's records are held already."""


def partition_run(cfg: RunConfig):
    """(data set, training clients' splits, new clients' splits) from the config and seed. New
    clients (data.new_clients) are held out of the partition before anything else sees it:
    training clients are numbered 0..N-1 in partition order, new clients N, N+1, ..."""
    dataset = load_dataset(cfg.data, seed=cfg.seed)
    splits, new = split_new_clients(partition_clients(dataset, cfg.data, seed=cfg.seed), cfg.data, seed=cfg.seed)
    return dataset, splits, new


def client_indices(cfg: RunConfig, split) -> tuple[np.ndarray, np.ndarray]:
    """(training, evaluated) record indices of one client's split: the evaluated split is the test
    split, or the validation split when tuning (evaluate_on: val)."""
    return split.train, (split.val if cfg.evaluate_on == "val" else split.test)


def as_tensors(images: np.ndarray, labels: np.ndarray) -> Pair:
    """Records as a client holds them: uint8 images (N, 3, S, S) at their stored size, on the host,
    and int64 labels."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(np.asarray(labels)).long()


def client_tensors(cfg: RunConfig, dataset, split) -> tuple[Pair, Pair]:
    """One client's (training, evaluated) tensors."""
    return tuple(as_tensors(dataset.images[idx], dataset.labels[idx]) for idx in client_indices(cfg, split))


def client_fact(cfg: RunConfig, dataset, i: int, split) -> ClientFacts:
    """Client ``i``'s facts in the :class:`Roster` (from its split of ``dataset``)."""
    return ClientFacts(client=i, partition_id=split.client, train=len(split.train), test=len(split.test),
                       val=len(split.val), domain=split.domain,
                       evaluated=len(split.val if cfg.evaluate_on == "val" else split.test),
                       label_counts=np.bincount(dataset.labels[split.train], minlength=dataset.num_classes).tolist())


def roster_of(cfg: RunConfig, dataset, splits, new) -> Roster:
    """The :class:`Roster` of a partition: training clients 0..N-1, new clients N, N+1, ..."""
    return Roster(clients=[client_fact(cfg, dataset, i, s) for i, s in enumerate(splits)],
                  num_classes=dataset.num_classes,
                  domain_names=list(getattr(dataset, "domain_names", []) or []),
                  class_names=list(getattr(dataset, "class_names", []) or []),
                  new=[client_fact(cfg, dataset, len(splits) + j, s) for j, s in enumerate(new)])


class ClientPairs(Sequence):
    """A list of (images, labels) pairs, one per client, that holds the store's two tensors and each
    client's row span: item n is a view of rows ``starts[n]:stops[n]`` (contiguous, the values
    :func:`as_tensors` gives for the same records)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, starts: np.ndarray, stops: np.ndarray):
        self.images, self.labels, self.starts, self.stops = images, labels, starts, stops

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, n):
        if isinstance(n, slice):
            return [self[i] for i in range(*n.indices(len(self)))]
        a, b = int(self.starts[n]), int(self.stops[n])  # (an IndexError past the end ends iteration)
        return self.images[a:b], self.labels[a:b]


def gather(dataset, parts: list[np.ndarray], chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The records ``parts`` (index arrays into ``dataset``), one after another, as one uint8 image
    tensor (R, 3, S, S) and one int64 label tensor (R,), and where each part ends; filled a chunk at
    a time, so no second full copy exists on the way."""
    order = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    h, w = dataset.images.shape[1:3]
    images = torch.empty((order.size, 3, h, w), dtype=torch.uint8, device="cpu")  # the host-side record store
    for a in range(0, order.size, chunk):
        images[a:a + chunk] = torch.from_numpy(dataset.images[order[a:a + chunk]]).permute(0, 3, 1, 2)
    labels = torch.from_numpy(np.asarray(dataset.labels[order])).long()
    return images, labels, np.cumsum([p.size for p in parts], dtype=np.int64)


def load_records(cfg: RunConfig):
    """(every client's records, the data set they came from) — the caller may pretrain on the data
    set, then drops it: the pool is not kept beside the clients' records, which are one store of
    the records the clients hold (client by client: training, then evaluated)."""
    dataset, splits, new = partition_run(cfg)
    parts = [idx for s in (*splits, *new) for idx in client_indices(cfg, s)]
    images, labels, stops = gather(dataset, parts)
    starts = stops - np.array([p.size for p in parts], dtype=np.int64)
    k = 2 * len(splits)

    def pairs(first: int, end: int) -> ClientPairs:  # every other part: training or evaluated
        return ClientPairs(images, labels, starts[first:end:2].copy(), stops[first:end:2].copy())

    records = ClientRecords(roster=roster_of(cfg, dataset, splits, new),
                            train_data=pairs(0, k), test_data=pairs(1, k),
                            new_train_data=pairs(k, len(parts)), new_test_data=pairs(k + 1, len(parts)))
    return records, dataset
