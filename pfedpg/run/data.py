"""The clients' records as a process holds them (DESIGN §2, "Storage and transforms"): the run's
data set partitioned (new clients held out first), and per client its training and evaluated
records as uint8 tensors on the host — the model's input pipeline resizes, normalises and augments
each batch on the run's device; no float copy of a client is ever made."""
from __future__ import annotations

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
    train_data: list[Pair]
    test_data: list[Pair]
    new_train_data: list[Pair]
    new_test_data: list[Pair]

    def hold(self, n: int) -> None: ...


@dataclass
class ClientRecords:
    """Every client's records in memory (the in-process run; a Flower node with its own files)."""

    roster: Roster
    train_data: list[Pair]
    test_data: list[Pair]
    new_train_data: list[Pair] = field(default_factory=list)
    new_test_data: list[Pair] = field(default_factory=list)

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


def load_records(cfg: RunConfig):
    """(every client's records, the data set they came from) — the caller may pretrain on the data
    set, then drops it: the pool is not kept beside the clients' records."""
    dataset, splits, new = partition_run(cfg)
    held = [client_tensors(cfg, dataset, s) for s in splits]
    fresh = [client_tensors(cfg, dataset, s) for s in new]
    records = ClientRecords(roster=roster_of(cfg, dataset, splits, new),
                            train_data=[t for t, _ in held], test_data=[e for _, e in held],
                            new_train_data=[t for t, _ in fresh], new_test_data=[e for _, e in fresh])
    return records, dataset
