"""Data for pFedPG evaluation: sources, client partitions and splits (DESIGN §2).

``load_dataset(cfg, seed=...)`` builds an :class:`ImageDataset` from a named source (registry
:data:`SOURCES`), ``partition_clients(ds, cfg, seed=...)`` gives each client a :class:`ClientSplit`
(registry :data:`PARTITIONERS`), and ``public_indices(ds)`` lists the records reserved for backbone
pretraining, which no client ever receives.
"""
from pfedpg.data.base import ClientSplit, ImageDataset, public_indices, resize_images
from pfedpg.data.config import PARTITION_NAMES, SOURCE_NAMES, DataConfig
from pfedpg.data.styles import EMBEDDED_SHIFTS
from pfedpg.data.partition import PARTITIONERS, new_client_ids, partition_clients, split_new_clients
from pfedpg.data.sources import SOURCES, load_dataset

__all__ = [
    "ClientSplit",
    "DataConfig",
    "EMBEDDED_SHIFTS",
    "ImageDataset",
    "PARTITIONERS",
    "PARTITION_NAMES",
    "SOURCES",
    "SOURCE_NAMES",
    "load_dataset",
    "new_client_ids",
    "partition_clients",
    "public_indices",
    "resize_images",
    "split_new_clients",
]
