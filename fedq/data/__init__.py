"""Offline data sets and client partitioners.

``load_dataset(name, **kw)`` returns a :class:`DataSplit`; ``partition(labels, num_clients, scheme,
seed=...)`` cuts its training set into client shards. Importing this package registers the built-in
and user sources but loads no data and imports no heavy library (scikit-learn, mnist1d are imported
by the loaders that need them).
"""

from fedq.data import builtin as _builtin  # noqa: F401  (registers digits, mnist1d, rotten_tomatoes)
from fedq.data import instruct as _instruct  # noqa: F401  (registers jsonl:, instructions)
from fedq.data import user as _user  # noqa: F401  (registers npz:, csv:, py:)
from fedq.data.datasets import (
    AnyDataset,
    ArrayDataset,
    DataSplit,
    InstructionDataset,
    Record,
    Shard,
    TextDataset,
)
from fedq.data.holdout import stratified_holdout
from fedq.data.partition import SCHEMES, label_histogram, partition
from fedq.data.registry import (
    check_dataset_name,
    dataset_names,
    dataset_options,
    load_dataset,
    register_dataset,
    register_source,
)

__all__ = [
    "SCHEMES",
    "AnyDataset",
    "ArrayDataset",
    "DataSplit",
    "InstructionDataset",
    "Record",
    "Shard",
    "TextDataset",
    "check_dataset_name",
    "dataset_names",
    "dataset_options",
    "label_histogram",
    "load_dataset",
    "partition",
    "register_dataset",
    "register_source",
    "stratified_holdout",
]
