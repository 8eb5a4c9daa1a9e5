"""Typed, validated configuration of the data pipeline (DESIGN §2 data, §8 sizing of the embedded default).

``DataConfig(**yaml_dict["data"])`` is the one place where a YAML ``data:`` block becomes an object.
Every field has a default, and ``__post_init__`` rejects bad values with a one-line
:class:`~pfedpg.errors.ConfigError` naming the field, the value and what is allowed, so a sweep fails
on load rather than halfway through. Unknown keys are the caller's job (``TypeError`` from the
dataclass constructor is turned into a ConfigError there, with the valid names listed).

Checks that need the data itself (a domain name that a file does not contain, a partition that cannot
be satisfied) happen later, in :func:`pfedpg.data.load_dataset` and
:func:`pfedpg.data.partition_clients`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pfedpg.data.styles import EMBEDDED_SHIFTS, OVERLAY_DOMAINS
from pfedpg.data.pipeline import AUGMENTS
from pfedpg.errors import ConfigError

# The registries in sources.py / partition.py are the source of truth; these tuples exist so the
# config can be validated without importing loaders (a test keeps them in sync).
SOURCE_NAMES: tuple[str, ...] = ("embedded", "npz", "folder", "cifar10", "cifar100")
PARTITION_NAMES: tuple[str, ...] = ("domain", "dirichlet", "classes")


def _fail(field: str, value: object, allowed: str) -> ConfigError:
    return ConfigError(f"data.{field}: got {value!r}; {allowed}")


def _is_int(value: object) -> bool:
    # bool is an int subclass; `num_clients: true` in YAML is a typo, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _check_int(field: str, value: object, *, low: int, high: int | None = None, optional: bool = False) -> None:
    if value is None and optional:
        return
    bound = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
    if optional:
        bound += " or null"
    if not _is_int(value) or value < low or (high is not None and value > high):
        raise _fail(field, value, f"must be {bound}")


def _check_names(field: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise _fail(field, value, "must be a non-empty list of names or null")
    if not all(isinstance(v, str) for v in value):
        raise _fail(field, value, "must be a list of strings (quote numeric names, e.g. ['0', '1'])")
    if len(set(value)) != len(value):
        raise _fail(field, value, "must not repeat a name")


@dataclass
class DataConfig:
    """Where the images come from, how they are split among clients, and the public split.

    Interactions worth knowing:

    * ``source`` with a train/test ``split`` (CIFAR, npz files carrying ``split``): the train records
      are partitioned and each client gets test records from the source's test split that follow its
      own distribution; ``test_fraction`` is then unused. See :mod:`pfedpg.data.partition`.
    * ``public_fraction`` records are reserved for backbone pretraining and never reach a client.
    * ``num_clients`` is derived for ``partition: domain`` (domains × ``clients_per_domain``).
    * ``domains`` with the embedded source picks shifts by name, so ``num_domains`` must match it.
    """

    source: str = "embedded"  # embedded | npz | folder (root/domain/class/*.jpg) | cifar10 | cifar100
    path: str | None = None  # the npz file, the image folder or the CIFAR pickles' folder (not embedded)
    image_size: int = 16  # the model's input size; records are resized to it per batch
    # Records are held as uint8 at this square size (null: the source's own size, at most
    # max(256, image_size); the embedded source renders at image_size). Memory is records × 3 × S².
    storage_size: int | None = None
    # Training batches only, seeded per client and round: none | crop_flip (reflect-pad S/8, random
    # crop, horizontal flip) | random_resized_crop (area 8-100 %, aspect 3/4-4/3, flip). On the device.
    augment: str = "none"
    partition: str = "domain"  # domain | dirichlet (label skew, alpha) | classes (classes_per_client each)
    num_clients: int | None = None  # required for dirichlet and classes; domain: domains × clients_per_domain
    clients_per_domain: int = 1  # partition domain: each domain dealt to this many clients, stratified
    alpha: float = 0.5  # partition dirichlet: the concentration (small = more label skew)
    classes_per_client: int = 2  # partition classes: disjoint classes per client
    min_size: int = 10  # records a client needs at least (dirichlet redraws; domain: an error naming the knob)
    max_retries: int = 100  # partition dirichlet: draws before giving up with an error
    test_fraction: float = 0.3  # each client's stratified test split (unused when the source has a split)
    val_fraction: float = 0.0  # each client's stratified validation split (evaluate_on: val reads it)
    max_train_per_client: int | None = None  # caps per client (quick runs); null = no cap
    max_test_per_client: int | None = None
    max_val_per_client: int | None = None
    # train records set aside (stratified over domain × class) to pretrain the backbone, never given to a
    # client; 0 with model.weights checkpoint or pretrained
    public_fraction: float = 0.3
    num_domains: int = 4  # embedded source: how many domains (visual shifts, or overlay channels)
    domains: list[str] | None = None  # keep only these domains, by name (embedded: picks the shifts)
    # Embedded source: the styles the public (pretraining) split is rendered in, a subset of the
    # clients' domains; null = all of them. A backbone that never saw a style leaves the prompt
    # something to adapt (bench/README.md, "Positive control", construction 1 used ["plain"]).
    public_domains: list[str] | None = None
    # Embedded source: "overlay" renders num_domains (≤ 3) digits at once, one per colour channel; a
    # record's label is the digit in its domain's channel (domains red, green, blue), the other
    # channels hold distractor digits. The image alone does not say which digit counts — the positive control's
    # latent shift (configs/positive_control.yaml). null: one digit per image, in a visual style.
    composite: str | None = None
    # Embedded source: the domains the clients' (private) records are dealt over, a subset of the
    # domains; null = all. With `public_domains` it separates what the backbone saw from what the
    # clients hold (e.g. pretrain on red and green, give every client green).
    private_domains: list[str] | None = None
    classes: list[str] | None = None  # keep only these classes, by name (embedded: '0'..'9')
    # Clients held out of training (DESIGN §1, "New clients"): a count k (k of the partition's
    # clients, drawn with the run's seed) or a list of partition ids. They take no part in any
    # training round; after the last round each joins for `new_client_rounds` join rounds.
    new_clients: Any = None  # validated below (a count, a list of partition ids, or null)
    # Join rounds of each new client after the last training round: it trains E local epochs from
    # what the server gives it, and pFedPG's server updates its descriptor alone. 0 = only the head
    # trained on the received prompt. (Formerly the top-level new_client_rounds.)
    new_client_rounds: int = 5

    def __post_init__(self) -> None:
        # In this order: the first wrong field is the one the error names.
        self._check_source()
        self._check_partition()
        self._check_splits()
        self._check_domains_and_classes()

    def _check_source(self) -> None:
        if self.source not in SOURCE_NAMES:
            raise _fail("source", self.source, f"must be one of {', '.join(SOURCE_NAMES)}")
        if self.source == "embedded":
            if self.path is not None:  # refuse rather than silently ignore a file the user meant to use
                raise _fail("path", self.path, "is not used by source 'embedded'; drop it or set data.source")
        elif not isinstance(self.path, str) or not self.path:
            raise _fail("path", self.path, f"is required for source {self.source!r} (a file or directory)")
        _check_int("image_size", self.image_size, low=1)
        _check_int("storage_size", self.storage_size, low=1, optional=True)
        if self.source == "embedded" and self.storage_size not in (None, self.image_size):
            raise _fail("storage_size", self.storage_size, "is not used by source 'embedded' (it renders at "
                        "data.image_size); drop it")
        if self.augment not in AUGMENTS:
            raise _fail("augment", self.augment, f"must be one of {', '.join(AUGMENTS)}")

    def _check_partition(self) -> None:
        if self.partition not in PARTITION_NAMES:
            raise _fail("partition", self.partition, f"must be one of {', '.join(PARTITION_NAMES)}")
        _check_int("num_clients", self.num_clients, low=1, optional=True)
        if self.partition in ("dirichlet", "classes") and self.num_clients is None:
            raise _fail("num_clients", None, f"is required for partition {self.partition!r} (an integer >= 1)")
        _check_int("clients_per_domain", self.clients_per_domain, low=1)
        if not _is_number(self.alpha) or self.alpha <= 0:
            raise _fail("alpha", self.alpha, "must be a number > 0 (Dirichlet concentration; small = more skew)")
        self.alpha = float(self.alpha)
        _check_int("classes_per_client", self.classes_per_client, low=1)
        _check_int("min_size", self.min_size, low=1)
        _check_int("new_client_rounds", self.new_client_rounds, low=0)
        if self.new_clients is not None:
            nc = self.new_clients
            ok = (_is_int(nc) and nc >= 1) or (isinstance(nc, (list, tuple)) and nc and all(_is_int(c) and c >= 0 for c in nc)
                                                and len(set(nc)) == len(nc))
            if not ok:
                raise _fail("new_clients", nc, "must be a count >= 1, a list of distinct partition ids (integers >= 0), "
                            "or null")
            if isinstance(nc, (list, tuple)):
                self.new_clients = sorted(nc)

    def _check_splits(self) -> None:
        _check_int("max_retries", self.max_retries, low=1)
        if not _is_number(self.test_fraction) or not 0 < self.test_fraction < 1:
            raise _fail("test_fraction", self.test_fraction, "must be a number in (0, 1)")
        if not _is_number(self.val_fraction) or not 0 <= self.val_fraction < 1:
            raise _fail("val_fraction", self.val_fraction, "must be a number in [0, 1)")
        if self.test_fraction + self.val_fraction >= 1:
            raise _fail(
                "val_fraction",
                self.val_fraction,
                f"test_fraction + val_fraction must be < 1 (test_fraction is {self.test_fraction})",
            )
        self.test_fraction = float(self.test_fraction)
        self.val_fraction = float(self.val_fraction)
        _check_int("max_train_per_client", self.max_train_per_client, low=1, optional=True)
        _check_int("max_test_per_client", self.max_test_per_client, low=1, optional=True)
        _check_int("max_val_per_client", self.max_val_per_client, low=1, optional=True)
        if not _is_number(self.public_fraction) or not 0 <= self.public_fraction < 1:
            raise _fail("public_fraction", self.public_fraction, "must be a number in [0, 1) (0 disables)")
        self.public_fraction = float(self.public_fraction)

    def _check_domains_and_classes(self) -> None:
        _check_int("num_domains", self.num_domains, low=1, high=len(EMBEDDED_SHIFTS))
        _check_names("domains", self.domains)
        _check_names("classes", self.classes)
        _check_names("public_domains", self.public_domains)
        if self.composite is not None and self.source != "embedded":
            raise _fail("composite", self.composite, "is for source 'embedded' only; drop it")
        if self.public_domains is not None:
            self.public_domains = list(self.public_domains)
            if self.source != "embedded":
                raise _fail("public_domains", self.public_domains, "is for source 'embedded' only; drop it")
        if self.domains is not None:
            self.domains = list(self.domains)
        if self.classes is not None:
            self.classes = list(self.classes)
        if self.source == "embedded":
            self._check_embedded()
        if (
            self.partition == "domain"
            and self.num_clients is not None
            and self.source == "embedded"
            and self.num_clients != len(self.private_domains or range(self.num_domains)) * self.clients_per_domain
        ):
            raise _fail(
                "num_clients",
                self.num_clients,
                f"partition 'domain' gives domains × clients_per_domain = {len(self.private_domains or range(self.num_domains))} × "
                f"{self.clients_per_domain} = {len(self.private_domains or range(self.num_domains)) * self.clients_per_domain} clients; "
                "drop num_clients or make them agree",
            )

    def _check_embedded(self) -> None:
        if self.composite is not None:
            if self.composite != "overlay":
                raise _fail("composite", self.composite, "must be 'overlay' or null")
            if self.domains is not None:
                raise _fail("domains", self.domains, "is set by composite 'overlay' (red, green, blue); drop it")
            if self.num_domains > len(OVERLAY_DOMAINS):
                raise _fail("num_domains", self.num_domains, f"must be <= {len(OVERLAY_DOMAINS)} with composite 'overlay'")
        if self.domains is not None:
            unknown = [d for d in self.domains if d not in EMBEDDED_SHIFTS]
            if unknown:
                raise _fail("domains", self.domains, f"embedded domains are {', '.join(EMBEDDED_SHIFTS)}")
            if len(self.domains) != self.num_domains:
                raise _fail(
                    "num_domains",
                    self.num_domains,
                    f"must equal len(data.domains) = {len(self.domains)} for the embedded source",
                )
        names = self.domains or list(OVERLAY_DOMAINS if self.composite else EMBEDDED_SHIFTS)[: self.num_domains]
        for key in ("public_domains", "private_domains"):
            value = getattr(self, key)
            if value is not None and any(d not in names for d in value):
                raise _fail(key, value, f"must be a non-empty subset of the data set's domains ({', '.join(names)})")
        if self.classes is not None:
            digits = [str(d) for d in range(10)]
            unknown = [c for c in self.classes if c not in digits]
            if unknown:
                raise _fail("classes", self.classes, "embedded classes are '0'..'9' (strings)")
