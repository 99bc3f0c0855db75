"""Data contracts: canonical schemas, validation with rejects, dataset directories."""

from recsys.data.dataset import (
    Dataset,
    dataset_fingerprint,
    read_dataset,
    read_rejects,
    validate_dataset,
    write_dataset,
)
from recsys.data.schema import IMPRESSIONS, INTERACTIONS, ITEMS, SCHEMAS, TABLES, conform
from recsys.data.validate import Validated, make_rejects, validate

__all__ = [
    "IMPRESSIONS",
    "INTERACTIONS",
    "ITEMS",
    "SCHEMAS",
    "TABLES",
    "Dataset",
    "Validated",
    "conform",
    "dataset_fingerprint",
    "make_rejects",
    "read_dataset",
    "read_rejects",
    "validate",
    "validate_dataset",
    "write_dataset",
]
