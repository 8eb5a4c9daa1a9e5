"""Client partitions and per-client stratified splits (DESIGN §2, §8).

Three partitions, registered by name in :data:`PARTITIONERS`, each drawing from its own stream
``Seeds(seed).numpy("data.partition")``:

* ``domain`` — every domain is one client, or is dealt to ``clients_per_domain`` clients stratified
  by label (client id = domain × k + j);
* ``dirichlet`` — label skew: for each class, client shares ~ Dir(alpha · 1_N) (Hsu et al. 2019).
  Draws that leave a client below ``min_size`` are redrawn at most ``max_retries`` times, then a
  :class:`DataError` — unbounded rejection loops are a known bug in other code bases;
* ``classes`` — each client gets ``classes_per_client`` classes, disjoint between clients. Records of
  classes no client draws go to nobody.

Public records (``ImageDataset.public``) never enter a partition.

**Train/test/val.** Without a source split, each client splits its *own* records, stratified by label
(stream ``"data.split", client=n``): ``round(test_fraction · n)`` test records (at least one),
``round(val_fraction · n)`` validation records (at least one when val_fraction > 0), the rest train.
Classes with a single record in that client are pooled into one stratum, since they cannot be
stratified.

**With a source split** (``ImageDataset.split``: CIFAR, npz files carrying one) the source's test set
is kept as the test set and ``test_fraction`` is not used: the partition runs on the train records
only, and every source test record of a (domain, class) cell is dealt to the clients in proportion to
their train records in that same cell (stream ``"data.split.source_test"``). A client's test set thus
follows its own distribution — same domain under ``domain``, same label proportions under
``dirichlet``/``classes`` — and every test record in a cell that some client trains on lands in exactly
one client. A client whose share rounds to zero takes one record from the best-supplied client of a
shared cell. Validation records (``val_fraction`` of the client's train records) come out of its train
records.

**Caps.** ``max_train_per_client`` / ``max_test_per_client`` / ``max_val_per_client`` subsample each
split, stratified, from a separate stream per split (``"data.subsample.train"`` / ``".test"`` /
``".val"``, client=n) so changing a cap never moves the split itself, nor the other split's
subsample. Capped-away records belong to no client.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from pfedpg.data.base import ClientSplit, ImageDataset, private_mask
from pfedpg.errors import ConfigError, DataError
from pfedpg.seeding import Seeds

if TYPE_CHECKING:
    from pfedpg.data.config import DataConfig


# --------------------------------------------------------------------------------------------------
# Stratification helpers (also used by the loaders to carve the public split)
# --------------------------------------------------------------------------------------------------


def _round(x: float) -> int:
    # Half-up, not Python's banker's rounding, so 0.5 · 3 records gives 2 test records, not 2 or 1.
    return int(np.floor(x + 0.5))


def _apportion(sizes: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``total`` over strata in proportion to ``sizes`` (largest remainder, random ties).

    Integer arithmetic keeps it exact: every count lies in [floor(q), ceil(q)] of its quota q and
    never exceeds its stratum.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    whole = int(sizes.sum())
    if total <= 0 or whole == 0:
        return np.zeros(sizes.shape, dtype=np.int64)
    if total > whole:
        raise ValueError(f"cannot take {total} of {whole}")
    num = sizes * int(total)
    base = num // whole
    rem = num % whole
    order = np.lexsort((rng.random(sizes.size), -rem))
    base[order[: total - int(base.sum())]] += 1
    return base


def _groups(keys: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(unique keys, positions of each) in O(n log n): DomainNet has ~2000 (domain, class) cells."""
    keys = np.asarray(keys)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]) if keys.size else np.empty(0, int)
    return sorted_keys[starts], np.split(order, starts[1:])


def _strata(keys: np.ndarray) -> list[np.ndarray]:
    """Positions grouped by key; keys seen once are pooled into one stratum (they cannot be stratified)."""
    if not np.asarray(keys).size:
        return []
    _, groups = _groups(keys)
    strata = [g for g in groups if g.size >= 2]
    singles = [g for g in groups if g.size == 1]
    if singles:
        strata.append(np.sort(np.concatenate(singles)))
    return strata


def stratified_choice(keys: np.ndarray, *, total: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of ``total`` of ``keys``' elements, each stratum represented in proportion."""
    groups = _strata(np.asarray(keys))
    counts = _apportion(np.array([g.size for g in groups], dtype=np.int64), total, rng)
    picked = [rng.choice(g, size=c, replace=False) for g, c in zip(groups, counts) if c]
    return np.sort(np.concatenate(picked)).astype(np.int64) if picked else np.empty(0, dtype=np.int64)


def stratified_deal(keys: np.ndarray, *, n_groups: int, rng: np.random.Generator) -> np.ndarray:
    """Group id (0..n_groups-1) for each element: shuffle within each key, then deal round-robin.

    Every group gets within one of every key's share and within one of the total share.
    """
    keys = np.asarray(keys)
    groups = np.empty(keys.size, dtype=np.int64)
    if not keys.size:
        return groups
    _, by_key = _groups(keys)
    order = np.concatenate([rng.permutation(by_key[i]) for i in rng.permutation(len(by_key))])
    groups[order] = (int(rng.integers(n_groups)) + np.arange(keys.size)) % n_groups
    return groups


def stratified_public_mask(
    labels: np.ndarray,
    domains: np.ndarray,
    candidates: np.ndarray,
    *,
    fraction: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Bool mask of ``round(fraction · #candidates)`` records stratified over (domain, class) cells.

    Every class with at least two candidate records gets at least one public record, so a backbone
    pretrained on the public split has seen all classes (DESIGN §8).
    """
    mask = np.zeros(labels.shape[0], dtype=bool)
    cand = np.flatnonzero(candidates)
    if fraction <= 0 or cand.size == 0:
        return mask
    width = int(labels.max()) + 1
    keys = domains[cand] * width + labels[cand]
    mask[cand[stratified_choice(keys, total=_round(fraction * cand.size), rng=rng)]] = True
    for c in np.unique(labels[cand]):
        of_c = cand[labels[cand] == c]
        if of_c.size >= 2 and not mask[of_c].any():
            mask[rng.choice(of_c)] = True
    return mask


# --------------------------------------------------------------------------------------------------
# Partitioners: (ds, pool, cfg, rng) -> (records per client, domain per client or None)
# --------------------------------------------------------------------------------------------------

Partitioner = Callable[..., "tuple[list[np.ndarray], list[int | None]]"]


def _domain(ds: ImageDataset, pool: np.ndarray, *, cfg: "DataConfig", rng: np.random.Generator):
    k = cfg.clients_per_domain
    # data.private_domains (embedded): only those domains hold client records.
    dealt = [d for d, name in enumerate(ds.domain_names) if cfg.private_domains is None or name in cfg.private_domains]
    expected = len(dealt) * k
    if cfg.num_clients is not None and cfg.num_clients != expected:
        raise ConfigError(
            f"data.num_clients: got {cfg.num_clients}; partition 'domain' gives num_domains × clients_per_domain = "
            f"{len(dealt)} × {k} = {expected} clients here; drop num_clients or set it to {expected}"
        )
    parts: list[np.ndarray] = []
    doms: list[int | None] = []
    for d in dealt:
        name = ds.domain_names[d]
        members = pool[ds.domains[pool] == d]
        if members.size < k:
            raise DataError(
                f"domain {name!r} has {members.size} records available to clients, fewer than "
                f"clients_per_domain={k}; lower data.clients_per_domain or leave the domain out with data.domains"
            )
        if members.size // k < cfg.min_size:
            raise DataError(
                f"domain {name!r} has {members.size} records for clients_per_domain={k} clients, about "
                f"{members.size // k} each, below data.min_size={cfg.min_size}; lower data.clients_per_domain "
                f"(at most {max(1, members.size // cfg.min_size)} here) or data.min_size"
            )
        groups = stratified_deal(ds.labels[members], n_groups=k, rng=rng)
        for j in range(k):
            parts.append(members[groups == j])
            doms.append(d)
    return parts, doms


def _dirichlet(ds: ImageDataset, pool: np.ndarray, *, cfg: "DataConfig", rng: np.random.Generator):
    n_clients, alpha, min_size = cfg.num_clients, cfg.alpha, cfg.min_size
    failure = (
        f"Dirichlet(alpha={alpha}) partition could not give every one of {n_clients} clients ≥ {min_size} records "
        f"in {cfg.max_retries} draws; raise alpha, lower num_clients or min_size"
    )
    if n_clients * min_size > pool.size:
        # No draw can succeed: say so now instead of burning max_retries draws.
        raise DataError(f"{failure} (only {pool.size} records are available to clients, < {n_clients} × {min_size})")
    labels = ds.labels[pool]
    by_class = [pool[labels == c] for c in np.unique(labels)]
    sizes = np.array([m.size for m in by_class])
    smallest = 0
    for _ in range(cfg.max_retries):
        cuts = []
        totals = np.zeros(n_clients, dtype=np.int64)
        for n_c in sizes:
            p = rng.dirichlet(np.full(n_clients, alpha))
            if not np.isfinite(p).all() or p.sum() <= 0:
                # Tiny alpha can underflow every share to zero: that draw is "all to one client".
                p = np.eye(n_clients)[rng.integers(n_clients)]
            cut = (np.cumsum(p) * n_c).astype(np.int64)[:-1].clip(0, n_c)
            cuts.append(cut)
            totals += np.diff(np.concatenate(([0], cut, [n_c])))
        smallest = int(totals.min())
        if smallest >= min_size:
            chunks: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
            for members, cut in zip(by_class, cuts):
                for n, chunk in enumerate(np.split(rng.permutation(members), cut)):
                    chunks[n].append(chunk)
            return [np.concatenate(c) for c in chunks], [None] * n_clients
    raise DataError(f"{failure} (smallest client in the last draw: {smallest})")


def _classes(ds: ImageDataset, pool: np.ndarray, *, cfg: "DataConfig", rng: np.random.Generator):
    n_clients, c = cfg.num_clients, cfg.classes_per_client
    present = np.unique(ds.labels[pool])
    if n_clients * c > present.size:
        raise DataError(
            f"partition 'classes' needs num_clients × classes_per_client ≤ number of classes "
            f"({n_clients} × {c} = {n_clients * c} > {present.size}); "
            "lower data.num_clients or data.classes_per_client"
        )
    order = rng.permutation(present)
    labels = ds.labels[pool]
    parts = [pool[np.isin(labels, order[n * c : (n + 1) * c])] for n in range(n_clients)]
    return parts, [None] * n_clients


PARTITIONERS: dict[str, Partitioner] = {"domain": _domain, "dirichlet": _dirichlet, "classes": _classes}
"""Partition name → function(ds, pool, *, cfg, rng) returning (records per client, domain per client)."""


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------


def _split_own(ds: ImageDataset, records: np.ndarray, *, client: int, cfg: "DataConfig", rng: np.random.Generator):
    """Stratified (train, test, val) of one client's own records."""
    n = records.size
    n_test = max(1, _round(cfg.test_fraction * n))
    n_val = max(1, _round(cfg.val_fraction * n)) if cfg.val_fraction > 0 else 0
    if n - n_test - n_val < 1:
        raise DataError(
            f"client {client} has {n} records, too few for a non-empty train/test"
            f"{'/val' if n_val else ''} split; "
            + ("lower data.clients_per_domain" if cfg.partition == "domain" else
               "raise data.min_size or data.alpha, or lower data.num_clients")
        )
    test_pos = stratified_choice(ds.labels[records], total=n_test, rng=rng)
    rest = np.delete(records, test_pos)
    val_pos = stratified_choice(ds.labels[rest], total=n_val, rng=rng)
    return np.delete(rest, val_pos), records[test_pos], rest[val_pos]


def _split_val(ds: ImageDataset, train: np.ndarray, *, client: int, cfg: "DataConfig", rng: np.random.Generator):
    """Carve ``val_fraction`` of a client's train records into validation (source-split case)."""
    if cfg.val_fraction <= 0:
        return train, np.empty(0, dtype=np.int64)
    n_val = max(1, _round(cfg.val_fraction * train.size))
    if train.size - n_val < 1:
        raise DataError(
            f"client {client} has {train.size} train records, too few to also give a validation split; "
            "lower data.val_fraction or data.num_clients"
        )
    pos = stratified_choice(ds.labels[train], total=n_val, rng=rng)
    return np.delete(train, pos), train[pos]


def _deal_source_test(
    ds: ImageDataset, parts: list[np.ndarray], test_pool: np.ndarray, *, rng: np.random.Generator
) -> list[np.ndarray]:
    """Give each client source-test records in proportion to its train records per (domain, class) cell."""
    width = ds.num_classes
    n_cells = ds.num_domains * width
    key = ds.domains * width + ds.labels
    weights = np.stack([np.bincount(key[p], minlength=n_cells) for p in parts])  # (clients, cells)
    test_key = key[test_pool]
    owner = np.full(test_pool.size, -1, dtype=np.int64)
    cells, members = _groups(test_key)
    for cell, pos in zip(cells, members):
        w = weights[:, cell]
        if w.sum() == 0:
            continue  # nobody trains on this cell, so nobody is tested on it
        pos = rng.permutation(pos)
        owner[pos] = np.repeat(np.arange(len(parts)), _apportion(w, pos.size, rng))
    # Rounding can leave a small client without test records; lend it one from a shared cell.
    for n in range(len(parts)):
        if (owner == n).any():
            continue
        totals = np.bincount(owner[owner >= 0], minlength=len(parts))
        cand = np.flatnonzero(np.isin(test_key, np.flatnonzero(weights[n] > 0)) & (owner >= 0))
        cand = cand[totals[owner[cand]] >= 2]
        if cand.size:
            best = cand[totals[owner[cand]] == totals[owner[cand]].max()]
            owner[rng.choice(best)] = n
    return [test_pool[owner == n] for n in range(len(parts))]


def cap_records(ds: ImageDataset, idx: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """``idx`` if it holds at most ``cap`` records (or cap is null), else ``cap`` of them drawn stratified by label."""
    if cap is None or idx.size <= cap:
        return idx
    return idx[stratified_choice(ds.labels[idx], total=cap, rng=rng)]


def partition_clients(ds: ImageDataset, cfg: "DataConfig", *, seed: int) -> list[ClientSplit]:
    """Partition the non-public records of ``ds`` among clients and split each client's records.

    See the module docstring for the rules; raises :class:`DataError` (naming the setting to change)
    when a partition cannot be satisfied or a client would get an empty train or test set.
    """
    ds.validate()
    if cfg.partition not in PARTITIONERS:
        raise ConfigError(f"data.partition: got {cfg.partition!r}; must be one of {', '.join(PARTITIONERS)}")
    seeds = Seeds(seed)
    private = private_mask(ds)
    has_split = ds.split is not None
    pool = np.flatnonzero(private & (ds.split == 0)) if has_split else np.flatnonzero(private)
    if pool.size == 0:
        raise DataError(
            "no non-public training records to give to clients; lower data.public_fraction or check the source"
        )
    parts, doms = PARTITIONERS[cfg.partition](ds, pool, cfg=cfg, rng=seeds.numpy("data.partition"))
    if has_split:
        test_pool = np.flatnonzero(private & (ds.split == 1))
        tests = _deal_source_test(ds, parts, test_pool, rng=seeds.numpy("data.split.source_test"))

    clients: list[ClientSplit] = []
    for n, records in enumerate(parts):
        rng = seeds.numpy("data.split", client=n)
        records = np.sort(records)
        if has_split:
            train, val = _split_val(ds, records, client=n, cfg=cfg, rng=rng)
            test = tests[n]
        else:
            train, test, val = _split_own(ds, records, client=n, cfg=cfg, rng=rng)
        # One stream per cap, so changing the train cap never reshuffles the capped test set.
        train = cap_records(ds, train, cfg.max_train_per_client, seeds.numpy("data.subsample.train", client=n))
        test = cap_records(ds, test, cfg.max_test_per_client, seeds.numpy("data.subsample.test", client=n))
        val = cap_records(ds, val, cfg.max_val_per_client, seeds.numpy("data.subsample.val", client=n))
        if train.size == 0 or test.size == 0:
            what = "train" if train.size == 0 else "test"
            raise DataError(
                f"client {n} got no {what} records (the source's test split has too few records in its "
                "domains/classes); lower data.num_clients, or raise data.min_size or data.alpha"
            )
        domain = doms[n]
        if domain is None:  # non-domain partitions: the client's dominant domain (ties → lower id)
            domain = int(np.bincount(ds.domains[train], minlength=ds.num_domains).argmax())
        clients.append(
            ClientSplit(
                client=n,
                train=np.sort(train).astype(np.int64),
                test=np.sort(test).astype(np.int64),
                val=np.sort(val).astype(np.int64),
                domain=domain,
            )
        )
    return clients


def new_client_ids(num_clients: int, cfg: "DataConfig", *, seed: int) -> list[int]:
    """The partition ids held out of training as new clients (``data.new_clients``): a listed set,
    or k drawn with the run's seed from their own stream (so the choice moves nothing else)."""
    spec = cfg.new_clients
    if spec is None:
        return []
    if isinstance(spec, list):
        bad = [c for c in spec if c >= num_clients]
        if bad:
            raise ConfigError(f"data.new_clients lists partition id {bad[0]}, but the partition has {num_clients} clients "
                              f"(0..{num_clients - 1}); pick ids in range")
    asked = len(spec) if isinstance(spec, list) else spec
    if asked >= num_clients:
        more = "data.clients_per_domain or data.num_domains" if cfg.partition == "domain" else "data.num_clients"
        raise ConfigError(f"data.new_clients={spec!r} asks for {asked} of the partition's {num_clients} clients, and at "
                          f"least one must train; lower it, or raise {more}")
    if isinstance(spec, list):
        return list(spec)
    return sorted(int(c) for c in Seeds(seed).numpy("data.new_clients").choice(num_clients, spec, replace=False))


def split_new_clients(splits: list[ClientSplit], cfg: "DataConfig", *, seed: int) -> tuple[list[ClientSplit], list[ClientSplit]]:
    """(training clients, new clients) of a partition, each in partition order."""
    held = set(new_client_ids(len(splits), cfg, seed=seed))
    return [s for s in splits if s.client not in held], [s for s in splits if s.client in held]
