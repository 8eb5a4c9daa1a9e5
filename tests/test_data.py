"""Tests for pfedpg.data: sources, partitions, splits (DESIGN §2). Each reads prepare / execute / assert.

Every file-based source is exercised on tiny files written into tmp_path; nothing here reads
../shared/data.
"""
from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pfedpg.data import (
    EMBEDDED_SHIFTS,
    PARTITION_NAMES,
    PARTITIONERS,
    SOURCE_NAMES,
    SOURCES,
    ClientSplit,
    DataConfig,
    ImageDataset,
    load_dataset,
    partition_clients,
    public_indices,
)
from pfedpg.data.partition import _apportion, stratified_deal
from pfedpg.errors import ConfigError, DataError

PARTITION_CASES = {
    "domain": dict(partition="domain", clients_per_domain=2),
    "dirichlet": dict(partition="dirichlet", num_clients=5, alpha=0.5),
    "classes": dict(partition="classes", num_clients=5, classes_per_client=2),  # 5 × 2 = all 10 digits
}


@pytest.fixture(scope="module")
def embedded() -> ImageDataset:
    return load_dataset(DataConfig(), seed=0)


def _all_indices(c: ClientSplit) -> np.ndarray:
    return np.concatenate([c.train, c.test, c.val])


def _write_npz(path: Path, *, n_train: int, n_test: int = 0, n_classes: int = 4, n_domains: int = 2, size=(6, 6),
               seed: int = 0):
    """A small npz in the project's format; images encode (domain, label) so resizing keeps them apart."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    labels = np.arange(n) % n_classes
    domains = rng.integers(0, n_domains, size=n)
    images = np.zeros((n, *size, 3), dtype=np.uint8)
    images[..., 0] = (labels * 40)[:, None, None]
    images[..., 1] = (domains * 100)[:, None, None]
    arrays = dict(
        images=images,
        labels=labels.astype(np.int64),
        domains=domains.astype(np.int64),
        class_names=np.array([f"c{i}" for i in range(n_classes)]),
        domain_names=np.array([f"d{i}" for i in range(n_domains)]),
    )
    if n_test:
        arrays["split"] = (np.arange(n) >= n_train).astype(np.int64)
    np.savez(path, **arrays)
    return arrays


# --------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(source="imagenet"), "source"),
        (dict(source="npz"), "path"),
        (dict(path="digits.npz"), "path"),  # embedded takes no file
        (dict(image_size=0), "image_size"),
        (dict(partition="iid"), "partition"),
        (dict(partition="dirichlet"), "num_clients"),
        (dict(num_clients=0), "num_clients"),
        (dict(num_clients=True, partition="classes"), "num_clients"),
        (dict(num_clients=3), "num_clients"),  # domain partition on embedded: 4 domains × 1
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(classes_per_client=0), "classes_per_client"),
        (dict(min_size=0), "min_size"),
        (dict(max_retries=0), "max_retries"),
        (dict(test_fraction=1.0), "test_fraction"),
        (dict(val_fraction=-0.1), "val_fraction"),
        (dict(test_fraction=0.6, val_fraction=0.4), "val_fraction"),
        (dict(max_train_per_client=0), "max_train_per_client"),
        (dict(public_fraction=1.0), "public_fraction"),
        (dict(num_domains=len(EMBEDDED_SHIFTS) + 1), "num_domains"),
        (dict(domains="plain"), "domains"),
        (dict(domains=["plain", "sepia"], num_domains=2), "domains"),
        (dict(domains=["plain", "inverted"]), "num_domains"),
        (dict(classes=[0, 1]), "classes"),
    ],
)
def test_bad_config_raises_config_error_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"data\.{field}"):
        DataConfig(**overrides)


def test_config_builds_from_a_plain_dict():
    raw = {"source": "npz", "path": "x.npz", "partition": "dirichlet", "num_clients": 4, "alpha": 1, "domains": ["a"]}

    cfg = DataConfig(**raw)

    assert cfg.alpha == 1.0 and isinstance(cfg.alpha, float)
    assert cfg.domains == ["a"]


def test_registries_match_the_names_the_config_accepts():
    assert set(SOURCES) == set(SOURCE_NAMES)
    assert set(PARTITIONERS) == set(PARTITION_NAMES)


# --------------------------------------------------------------------------------------------------
# embedded source
# --------------------------------------------------------------------------------------------------


def test_embedded_shapes_and_dtypes(embedded):
    ds = embedded

    assert ds.images.shape == (1797, 16, 16, 3) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == ds.domains.dtype == np.int64
    assert ds.public.dtype == np.bool_ and ds.split is None
    assert ds.class_names == [str(i) for i in range(10)]
    assert ds.domain_names == list(EMBEDDED_SHIFTS)[:4]
    assert ds.num_classes == 10 and len(ds) == 1797


def test_embedded_domains_look_different_and_hold_every_digit(embedded):
    private = ~embedded.public

    means = [embedded.images[private & (embedded.domains == d)].astype(float).mean(axis=0) for d in range(4)]
    labels = [set(embedded.labels[private & (embedded.domains == d)]) for d in range(4)]

    for a in range(4):
        assert labels[a] == set(range(10))
        for b in range(a + 1, 4):
            assert np.abs(means[a] - means[b]).mean() > 10, (embedded.domain_names[a], embedded.domain_names[b])


def test_embedded_all_six_shifts_render_at_another_size():
    cfg = DataConfig(num_domains=len(EMBEDDED_SHIFTS), image_size=12, public_fraction=0.0)

    ds = load_dataset(cfg, seed=1)

    assert ds.images.shape[1:] == (12, 12, 3)
    assert ds.domain_names == list(EMBEDDED_SHIFTS)
    assert not ds.public.any()
    assert set(ds.domains) == set(range(len(EMBEDDED_SHIFTS)))


def test_public_split_is_stratified_and_disjoint_from_clients(embedded):
    cfg = DataConfig(**PARTITION_CASES["dirichlet"])

    pub = public_indices(embedded)
    clients = partition_clients(embedded, cfg, seed=0)

    assert pub.dtype == np.int64 and pub.size == round(0.3 * len(embedded))
    assert set(embedded.labels[pub]) == set(range(10))
    assert set(embedded.domains[pub]) == set(range(4))  # the backbone sees every style
    for c in clients:
        assert not np.intersect1d(_all_indices(c), pub).size


def test_public_domains_render_the_public_split_in_those_styles_only():
    from pfedpg.config import config_from_dict
    from pfedpg.pretrain import pretrain_key

    base = dict(image_size=8, num_domains=4)
    full = load_dataset(DataConfig(**base), seed=0)
    plain = load_dataset(DataConfig(**base, public_domains=["plain", "rotated"]), seed=0)
    pub = public_indices(plain)
    assert np.array_equal(pub, public_indices(full))  # the same records, only their style differs
    assert set(plain.domains[pub]) == {0, 3}
    private = ~plain.public  # the clients' records are untouched
    assert np.array_equal(plain.images[private], full.images[private])
    assert np.array_equal(plain.domains[private], full.domains[private])
    # A different public split is a different backbone: the pretraining cache key changes.
    keys = {pretrain_key(config_from_dict({"data": {"public_domains": v}})) for v in (None, ["plain"])}
    assert len(keys) == 2
    with pytest.raises(ConfigError, match="public_domains.*subset of the data set's domains"):
        DataConfig(**base, public_domains=["blurred"])
    # private_domains: the clients' records come from those domains only, the public split is unchanged.
    cfg = DataConfig(**base, private_domains=["tinted"], clients_per_domain=3)
    only = load_dataset(cfg, seed=0)
    assert set(only.domains[~only.public]) == {2} and np.array_equal(public_indices(only), pub)
    splits = partition_clients(only, cfg, seed=0)
    assert len(splits) == 3 and {s.domain for s in splits} == {2}
    with pytest.raises(ConfigError, match="domains × clients_per_domain = 1 × 3 = 3"):
        DataConfig(**base, private_domains=["tinted"], clients_per_domain=3, num_clients=12)
    with pytest.raises(ConfigError, match="public_domains.*for source 'embedded' only"):
        DataConfig(source="npz", path="x.npz", public_domains=["plain"])


def test_overlay_composite_puts_the_labelled_digit_in_the_domain_channel():
    overlay = load_dataset(DataConfig(image_size=8, composite="overlay", num_domains=2), seed=0)
    plain = load_dataset(DataConfig(image_size=8, domains=["plain"], num_domains=1), seed=0)
    assert overlay.domain_names == ["red", "green"] and np.array_equal(overlay.labels, plain.labels)
    rows = np.arange(len(overlay))
    own = overlay.images[rows, :, :, overlay.domains]  # the channel of each record's domain
    assert np.array_equal(own, plain.images[..., 0])  # ... holds the record's own digit
    other = overlay.images[rows, :, :, 1 - overlay.domains]
    assert (other != own).any(axis=(1, 2)).mean() > 0.95  # the other channel: another record's digit
    assert not overlay.images[..., 2].any()  # two domains: blue stays black
    assert set(overlay.domains[~overlay.public]) == {0, 1}
    with pytest.raises(ConfigError, match="composite"):
        DataConfig(composite="mosaic")
    with pytest.raises(ConfigError, match="domains.*set by composite"):
        DataConfig(composite="overlay", domains=["plain"], num_domains=1)
    with pytest.raises(ConfigError, match="num_domains"):
        DataConfig(composite="overlay", num_domains=4)
    with pytest.raises(ConfigError, match="composite.*embedded' only"):
        DataConfig(source="npz", path="x.npz", composite="overlay")


def test_public_indices_is_empty_without_a_public_mask():
    ds = ImageDataset(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int64), np.zeros(2, np.int64), ["a"], ["d"])

    assert public_indices(ds).size == 0 and public_indices(ds).dtype == np.int64


# --------------------------------------------------------------------------------------------------
# partitions
# --------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=12), st.data())
def test_apportion_hits_the_total_within_one_of_each_quota(sizes, data):
    sizes = np.array(sizes)
    total = data.draw(st.integers(0, int(sizes.sum())))

    counts = _apportion(sizes, total, np.random.default_rng(0))

    assert counts.sum() == total and np.all(counts <= sizes)
    if sizes.sum():
        assert np.all(np.abs(counts - sizes * total / sizes.sum()) < 1)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=60), st.integers(1, 5))
def test_stratified_deal_balances_every_key_within_one(keys, n_groups):
    keys = np.array(keys)

    groups = stratified_deal(keys, n_groups=n_groups, rng=np.random.default_rng(0))

    table = np.zeros((5, n_groups), dtype=int)
    np.add.at(table, (keys, groups), 1)
    assert np.all(table.max(axis=1) - table.min(axis=1) <= 1)
    assert np.ptp(table.sum(axis=0)) <= 1


@pytest.mark.parametrize("name", list(PARTITION_CASES))
@pytest.mark.parametrize("val_fraction", [0.0, 0.1])
def test_every_private_record_lands_in_exactly_one_client_split(embedded, name, val_fraction):
    cfg = DataConfig(**PARTITION_CASES[name], val_fraction=val_fraction)

    clients = partition_clients(embedded, cfg, seed=0)

    everything = np.concatenate([_all_indices(c) for c in clients])
    assert everything.size == np.unique(everything).size  # disjoint within and across clients
    assert np.array_equal(np.sort(everything), np.flatnonzero(~embedded.public))
    for n, c in enumerate(clients):
        assert c.client == n and c.train.size and c.test.size
        assert (c.val.size > 0) == (val_fraction > 0)
        for arr in (c.train, c.test, c.val):
            assert arr.dtype == np.int64 and np.all(np.diff(arr) > 0)
        assert abs(c.test.size / len(c) - 0.3) < 0.02


@pytest.mark.parametrize("name", list(PARTITION_CASES))
def test_same_seed_same_partition_other_seed_different(embedded, name):
    cfg = DataConfig(**PARTITION_CASES[name])

    a = partition_clients(embedded, cfg, seed=3)
    b = partition_clients(embedded, cfg, seed=3)
    c = partition_clients(embedded, cfg, seed=4)

    assert all(np.array_equal(x.train, y.train) and np.array_equal(x.test, y.test) for x, y in zip(a, b))
    assert any(not np.array_equal(x.train, y.train) for x, y in zip(a, c))


def test_domain_partition_deals_each_domain_to_its_clients_stratified(embedded):
    cfg = DataConfig(partition="domain", clients_per_domain=2)

    clients = partition_clients(embedded, cfg, seed=0)

    assert len(clients) == 8
    for c in clients:
        assert c.domain == c.client // 2
        assert set(embedded.domains[_all_indices(c)]) == {c.domain}
    for a, b in zip(clients[::2], clients[1::2]):
        counts = [np.bincount(embedded.labels[_all_indices(x)], minlength=10) for x in (a, b)]
        assert np.abs(counts[0] - counts[1]).max() <= 1


def test_per_client_split_is_stratified_by_label(embedded):
    cfg = DataConfig(partition="domain")

    clients = partition_clients(embedded, cfg, seed=0)

    for c in clients:
        assert set(embedded.labels[c.test]) == set(range(10))
        share = (np.bincount(embedded.labels[c.test], minlength=10)
                 / np.bincount(embedded.labels[_all_indices(c)], minlength=10))
        assert np.all(np.abs(share - 0.3) < 0.1)


def test_classes_partition_gives_disjoint_classes(embedded):
    cfg = DataConfig(partition="classes", num_clients=3, classes_per_client=3)

    clients = partition_clients(embedded, cfg, seed=0)

    held = [set(embedded.labels[_all_indices(c)]) for c in clients]
    assert all(len(h) == 3 for h in held)
    assert len(set.union(*held)) == 9


def test_dirichlet_small_alpha_skews_labels(embedded):
    skewed = DataConfig(partition="dirichlet", num_clients=10, alpha=0.1, min_size=5)
    even = DataConfig(partition="dirichlet", num_clients=10, alpha=100.0, min_size=5)

    def mean_max_share(cfg):
        shares = [np.bincount(embedded.labels[_all_indices(c)], minlength=10)
                  for c in partition_clients(embedded, cfg, seed=0)]
        return np.mean([s.max() / s.sum() for s in shares])

    assert mean_max_share(skewed) > 0.5
    assert mean_max_share(even) < 0.2


def test_dirichlet_infeasible_fails_fast(embedded):
    # 4 × 300 ≤ 1258 private records, so draws are really attempted — and all fail at alpha 1e-3.
    cfg = DataConfig(partition="dirichlet", num_clients=4, alpha=1e-3, min_size=300, max_retries=100)

    start = time.perf_counter()
    with pytest.raises(DataError, match=r"Dirichlet\(alpha=0.001\).*100 draws; raise alpha"):
        partition_clients(embedded, cfg, seed=0)
    assert time.perf_counter() - start < 2.0


def test_dirichlet_impossible_min_size_fails_before_drawing(embedded):
    cfg = DataConfig(partition="dirichlet", num_clients=50, min_size=1000, max_retries=10**9)

    start = time.perf_counter()
    with pytest.raises(DataError, match="min_size"):
        partition_clients(embedded, cfg, seed=0)
    assert time.perf_counter() - start < 2.0


def test_classes_partition_with_too_many_classes_raises(embedded):
    cfg = DataConfig(partition="classes", num_clients=6, classes_per_client=2)

    with pytest.raises(DataError, match=r"6 × 2 = 12 > 10.*num_clients"):
        partition_clients(embedded, cfg, seed=0)


def test_client_too_small_to_split_raises(embedded):
    # min_size applies to the domain partition too, and the error names clients_per_domain.
    cfg = DataConfig(partition="domain", clients_per_domain=300)
    with pytest.raises(DataError, match=r"clients_per_domain=300 clients, about 1 each, below data.min_size=10; lower "
                                        r"data.clients_per_domain \(at most 31 here\)"):
        partition_clients(embedded, cfg, seed=0)
    # With min_size lowered, a client too small for a train/test split names the same knob.
    cfg = DataConfig(partition="domain", clients_per_domain=300, min_size=1)
    with pytest.raises(DataError, match=r"client \d+ has 1 records.*lower data.clients_per_domain"):
        partition_clients(embedded, cfg, seed=0)


def test_caps_subsample_each_split_stratified(embedded):
    cfg = DataConfig(partition="domain", max_train_per_client=50, max_test_per_client=20)

    capped = partition_clients(embedded, cfg, seed=0)
    full = partition_clients(embedded, DataConfig(partition="domain"), seed=0)

    for c, f in zip(capped, full):
        assert c.train.size == 50 and c.test.size == 20
        assert np.isin(c.train, f.train).all() and np.isin(c.test, f.test).all()  # caps never move the split
        assert set(embedded.labels[c.train]) == set(range(10))


# --------------------------------------------------------------------------------------------------
# npz source
# --------------------------------------------------------------------------------------------------


def test_npz_round_trip(tmp_path):
    path = tmp_path / "tiny.npz"
    arrays = _write_npz(path, n_train=40, n_test=12, size=(6, 8))
    cfg = DataConfig(source="npz", path=str(path), image_size=6, public_fraction=0.0)

    ds = load_dataset(cfg, seed=0)

    assert ds.images.shape == (52, 6, 6, 3)  # 6×8 centre-cropped to 6×6, no resize needed
    assert np.array_equal(ds.images, arrays["images"][:, :, 1:7])
    assert np.array_equal(ds.labels, arrays["labels"]) and np.array_equal(ds.domains, arrays["domains"])
    assert np.array_equal(ds.split, arrays["split"])
    assert ds.class_names == ["c0", "c1", "c2", "c3"] and ds.domain_names == ["d0", "d1"]
    assert not ds.public.any()


def test_npz_public_split_comes_from_train_records_and_resizes(tmp_path):
    path = tmp_path / "tiny.npz"
    _write_npz(path, n_train=80, n_test=20)
    cfg = DataConfig(source="npz", path=str(path), image_size=4, storage_size=4, public_fraction=0.25)

    ds = load_dataset(cfg, seed=0)

    assert ds.images.shape == (100, 4, 4, 3)  # stored at data.storage_size
    # Without storage_size the records stay at the file's 6×6 (the model's 4×4 is reached per batch).
    assert load_dataset(DataConfig(source="npz", path=str(path), image_size=4), seed=0).images.shape == (100, 6, 6, 3)
    pub = public_indices(ds)
    assert pub.size == 20 and np.all(ds.split[pub] == 0)
    assert set(ds.labels[pub]) == set(range(4)) and set(ds.domains[pub]) == {0, 1}


def test_npz_subsets_renumber_classes_and_domains(tmp_path):
    path = tmp_path / "tiny.npz"
    _write_npz(path, n_train=60, n_classes=4, n_domains=3)
    cfg = DataConfig(source="npz", path=str(path), classes=["c1", "c3"], domains=["d2"], public_fraction=0.0,
                     image_size=6)

    ds = load_dataset(cfg, seed=0)

    assert ds.class_names == ["c1", "c3"] and ds.domain_names == ["d2"]
    assert set(ds.labels) == {0, 1} and set(ds.domains) == {0}
    assert np.all(ds.images[..., 0] == np.where(ds.labels == 0, 40, 120)[:, None, None])


def test_npz_unknown_domain_lists_available_names(tmp_path):
    path = tmp_path / "tiny.npz"
    _write_npz(path, n_train=20)
    cfg = DataConfig(source="npz", path=str(path), domains=["nope"])

    with pytest.raises(ConfigError, match="available: d0, d1"):
        load_dataset(cfg, seed=0)


def test_npz_missing_file_raises(tmp_path):
    cfg = DataConfig(source="npz", path=str(tmp_path / "absent.npz"))

    with pytest.raises(DataError, match=r"not found; set data\.path"):
        load_dataset(cfg, seed=0)


def test_npz_corrupt_file_raises(tmp_path):
    path = tmp_path / "broken.npz"
    _write_npz(path, n_train=20)
    path.write_bytes(path.read_bytes()[:200])  # truncated zip

    with pytest.raises(DataError, match="broken.npz"):
        load_dataset(DataConfig(source="npz", path=str(path)), seed=0)


def test_npz_missing_key_and_bad_shape_name_the_key(tmp_path):
    arrays = _write_npz(tmp_path / "ok.npz", n_train=10)
    no_domains = {k: v for k, v in arrays.items() if k != "domains"}
    np.savez(tmp_path / "a.npz", **no_domains)
    np.savez(tmp_path / "b.npz", **{**arrays, "images": arrays["images"][..., 0]})

    with pytest.raises(DataError, match="'domains'"):
        load_dataset(DataConfig(source="npz", path=str(tmp_path / "a.npz")), seed=0)
    with pytest.raises(DataError, match="'images'"):
        load_dataset(DataConfig(source="npz", path=str(tmp_path / "b.npz")), seed=0)


@pytest.mark.parametrize("name", ["domain", "dirichlet", "classes"])
def test_source_split_keeps_source_test_records_and_client_distribution(tmp_path, name):
    path = tmp_path / "split.npz"
    _write_npz(path, n_train=600, n_test=200, n_classes=4, n_domains=2, size=(4, 4))
    case = {
        "domain": dict(partition="domain", clients_per_domain=2),
        "dirichlet": dict(partition="dirichlet", num_clients=4, alpha=0.3, min_size=20),
        "classes": dict(partition="classes", num_clients=2, classes_per_client=2),
    }[name]
    cfg = DataConfig(source="npz", path=str(path), image_size=4, public_fraction=0.2, **case)
    ds = load_dataset(cfg, seed=0)

    clients = partition_clients(ds, cfg, seed=0)

    tests = np.concatenate([c.test for c in clients])
    trains = np.concatenate([np.concatenate([c.train, c.val]) for c in clients])
    assert np.all(ds.split[tests] == 1) and np.all(ds.split[trains] == 0)
    assert np.array_equal(np.sort(tests), np.flatnonzero(ds.split == 1))  # every test cell has a trainer here
    assert np.array_equal(np.sort(trains), np.flatnonzero((ds.split == 0) & ~ds.public))
    for c in clients:
        cells = lambda idx: np.bincount(ds.domains[idx] * 4 + ds.labels[idx], minlength=8) / idx.size  # noqa: E731
        assert 0.5 * np.abs(cells(c.train) - cells(c.test)).sum() < 0.2  # total variation distance
        if name == "domain":
            assert set(ds.domains[c.test]) == {c.domain}


def test_source_split_uses_val_from_train(tmp_path):
    path = tmp_path / "split.npz"
    _write_npz(path, n_train=200, n_test=60, size=(4, 4))
    cfg = DataConfig(source="npz", path=str(path), image_size=4, public_fraction=0.0, val_fraction=0.2)
    ds = load_dataset(cfg, seed=0)

    clients = partition_clients(ds, cfg, seed=0)

    for c in clients:
        assert np.all(ds.split[c.val] == 0) and c.val.size == round(0.2 * (c.val.size + c.train.size))


@pytest.mark.parametrize("n_test, ok", [(10, True), (4, False)])
def test_scarce_source_test_split_still_gives_every_client_one_or_fails_clearly(tmp_path, n_test, ok):
    path = tmp_path / "scarce.npz"
    _write_npz(path, n_train=400, n_test=n_test, size=(4, 4))
    cfg = DataConfig(
        source="npz", path=str(path), image_size=4, public_fraction=0.0,
        partition="dirichlet", num_clients=8, alpha=0.3, min_size=20,
    )
    ds = load_dataset(cfg, seed=0)

    if ok:
        clients = partition_clients(ds, cfg, seed=0)
        assert all(c.test.size >= 1 for c in clients)
        assert np.array_equal(np.sort(np.concatenate([c.test for c in clients])), np.flatnonzero(ds.split == 1))
    else:
        with pytest.raises(DataError, match=r"got no test records.*lower data\.num_clients"):
            partition_clients(ds, cfg, seed=0)


def test_domain_partition_num_clients_must_match_data(tmp_path):
    path = tmp_path / "tiny.npz"
    _write_npz(path, n_train=40, n_domains=2)
    cfg = DataConfig(source="npz", path=str(path), num_clients=3, image_size=6)
    ds = load_dataset(cfg, seed=0)

    with pytest.raises(ConfigError, match=r"data\.num_clients.*set it to 2"):
        partition_clients(ds, cfg, seed=0)


# --------------------------------------------------------------------------------------------------
# folder source
# --------------------------------------------------------------------------------------------------


def _write_images(root: Path, layout: dict[str, int], size=(10, 14)):
    for rel, count in layout.items():
        (root / rel).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", size, color=(20 * i, 50, 200)).save(root / rel / f"img{i}.png")


def test_folder_loader_reads_domain_class_layout(tmp_path):
    _write_images(tmp_path, {"amazon/bike": 3, "amazon/mug": 2, "webcam/mug": 4, "webcam/pen": 1})
    (tmp_path / "webcam" / "pen" / "notes.txt").write_text("not an image")
    cfg = DataConfig(source="folder", path=str(tmp_path), image_size=8, storage_size=8, public_fraction=0.0)

    ds = load_dataset(cfg, seed=0)

    assert ds.images.shape == (10, 8, 8, 3) and ds.images.dtype == np.uint8
    assert ds.domain_names == ["amazon", "webcam"] and ds.class_names == ["bike", "mug", "pen"]
    assert np.bincount(ds.domains).tolist() == [5, 5]
    assert np.bincount(ds.labels).tolist() == [3, 6, 1]
    assert np.all(ds.images[..., 2] > 190)  # colour survives crop + resize


def test_folder_loader_accepts_single_domain_layout_and_filters(tmp_path):
    root = tmp_path / "office"
    _write_images(root, {"bike": 2, "mug": 3, "pen": 2})
    cfg = DataConfig(source="folder", path=str(root), image_size=5, classes=["mug", "pen"], public_fraction=0.0)

    ds = load_dataset(cfg, seed=0)

    assert ds.domain_names == ["office"] and ds.class_names == ["mug", "pen"]
    # Stored at the files' own centre square (10×14 -> 10×10), not at the model's 5×5.
    assert len(ds) == 5 and ds.images.shape[1:] == (10, 10, 3)


def test_folder_without_images_raises(tmp_path):
    (tmp_path / "dom" / "cls").mkdir(parents=True)

    with pytest.raises(DataError, match="no images"):
        load_dataset(DataConfig(source="folder", path=str(tmp_path)), seed=0)


def test_an_empty_class_folder_is_an_error_not_a_class(tmp_path):
    _write_images(tmp_path, {"a/cat": 2, "a/dog": 2, "b/cat": 2})
    (tmp_path / "a" / "bird").mkdir()
    with pytest.raises(DataError, match=r"class folder '.*a/bird' holds no images.*data.classes"):
        load_dataset(DataConfig(source="folder", path=str(tmp_path), public_fraction=0.0), seed=0)
    ds = load_dataset(DataConfig(source="folder", path=str(tmp_path), public_fraction=0.0, classes=["cat", "dog"]),
                      seed=0)
    assert ds.class_names == ["cat", "dog"]


# --------------------------------------------------------------------------------------------------
# CIFAR source
# --------------------------------------------------------------------------------------------------


def _write_cifar10(root: Path, *, per_batch: int = 6, n_batches: int = 2) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(name: str, n: int, start: int):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        data[:, :1024] = 255  # red plane full on: checks the channel-major → HWC reshape
        data[:, 1024:2048] = 0
        labels = [(start + i) % 10 for i in range(n)]
        with open(d / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)

    for b in range(n_batches):
        batch(f"data_batch_{b + 1}", per_batch, b * per_batch)
    batch("test_batch", 5, 0)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, f)
    return d


def test_cifar10_pickle_loader(tmp_path):
    _write_cifar10(tmp_path)
    cfg = DataConfig(source="cifar10", path=str(tmp_path), image_size=32, public_fraction=0.0)

    ds = load_dataset(cfg, seed=0)

    assert ds.images.shape == (17, 32, 32, 3)
    assert np.all(ds.images[..., 0] == 255) and np.all(ds.images[..., 1] == 0)
    assert ds.split.tolist() == [0] * 12 + [1] * 5
    assert ds.labels[:12].tolist() == [i % 10 for i in range(12)]
    assert ds.class_names[3] == "class3" and ds.domain_names == ["cifar10"]


def test_cifar10_resizes_and_reports_missing_files(tmp_path):
    d = _write_cifar10(tmp_path)
    ds = load_dataset(DataConfig(source="cifar10", path=str(d), image_size=8, storage_size=8, public_fraction=0.0),
                      seed=0)
    (d / "test_batch").unlink()

    assert ds.images.shape == (17, 8, 8, 3)
    with pytest.raises(DataError, match="test_batch not found"):
        load_dataset(DataConfig(source="cifar10", path=str(d)), seed=0)


def test_cifar100_pickle_loader(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for name, n in (("train", 8), ("test", 4)):
        with open(d / name, "wb") as f:
            pickle.dump({b"data": np.zeros((n, 3072), np.uint8), b"fine_labels": list(range(n)),
                         b"coarse_labels": [0] * n}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}, f)
    cfg = DataConfig(source="cifar100", path=str(tmp_path), image_size=32, public_fraction=0.0)

    ds = load_dataset(cfg, seed=0)

    assert len(ds) == 12 and ds.num_classes == 100 and ds.split.sum() == 4
    assert ds.domain_names == ["cifar100"]


def test_changing_the_train_cap_leaves_the_capped_test_set_alone():
    from pfedpg.data import DataConfig, load_dataset, partition_clients

    small = DataConfig(max_train_per_client=40, max_test_per_client=30)
    large = DataConfig(max_train_per_client=80, max_test_per_client=30)
    ds = load_dataset(small, seed=0)
    a = partition_clients(ds, small, seed=0)
    b = partition_clients(ds, large, seed=0)
    for sa, sb in zip(a, b):
        assert np.array_equal(sa.test, sb.test)
        assert len(sa.train) == 40 and len(sb.train) == 80


def test_validation_cap_leaves_train_and_test_alone():
    from pfedpg.data import DataConfig, load_dataset, partition_clients

    free = DataConfig(val_fraction=0.3)
    capped = DataConfig(val_fraction=0.3, max_val_per_client=7)
    ds = load_dataset(free, seed=0)
    for sa, sb in zip(partition_clients(ds, free, seed=0), partition_clients(ds, capped, seed=0)):
        assert len(sa.val) > 7 and len(sb.val) == 7 and set(sb.val) <= set(sa.val)
        assert np.array_equal(sa.train, sb.train) and np.array_equal(sa.test, sb.test)
    with pytest.raises(ConfigError, match="max_val_per_client"):
        DataConfig(max_val_per_client=0)
