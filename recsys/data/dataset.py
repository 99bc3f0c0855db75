"""A dataset directory: one Parquet file per canonical table, plus rejects and a manifest.

DATA_DIR/items.parquet          item_id, title, description, category, subcategory, published_at
DATA_DIR/interactions.parquet   user_id, item_id, ts, weight
DATA_DIR/impressions.parquet    impression_id, user_id, ts, item_id, clicked, position
DATA_DIR/rejects.parquet        table, row, reason, record
DATA_DIR/manifest.json          counts, source, fingerprint
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from recsys.data.schema import IMPRESSIONS, INTERACTIONS, ITEMS, TABLES, conform, empty_rejects
from recsys.data.validate import Validated, validate
from recsys.errors import DataError
from recsys.io import file_digest, json_digest, write_json, write_parquet

LAYOUT_HINT = (
    "a dataset directory holds items.parquet, interactions.parquet and impressions.parquet "
    "(make one with `recsys import` or `recsys generate`)"
)


@dataclass(frozen=True)
class Dataset:
    """The three canonical tables, as polars DataFrames in their canonical schemas."""

    items: pl.DataFrame
    interactions: pl.DataFrame
    impressions: pl.DataFrame

    @classmethod
    def from_validated(cls, v: Validated) -> Dataset:
        return cls(v.items, v.interactions, v.impressions)

    def table(self, name: str) -> pl.DataFrame:
        return getattr(self, name)  # type: ignore[no-any-return]

    def before(self, t: datetime) -> Dataset:
        """The data strictly before `t` (history without a time counts as before)."""
        inter = self.interactions.filter(pl.col("ts").is_null() | (pl.col("ts") < t))
        return Dataset(self.items, inter, self.impressions.filter(pl.col("ts") < t))

    def counts(self) -> dict[str, int]:
        return {t: self.table(t).height for t in TABLES}


def write_dataset(
    out_dir: str | os.PathLike[str],
    data: Dataset | Validated,
    *,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the tables (and rejects, if given a `Validated`) atomically; return the manifest.

    Each file is written to a temporary name and renamed; the manifest is written last, so a
    directory with a manifest is complete.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rejects = data.rejects if isinstance(data, Validated) else empty_rejects()
    files = {}
    for t in TABLES:
        files[t] = write_parquet(conform(t, getattr(data, t)), out / f"{t}.parquet")
    write_parquet(rejects, out / "rejects.parquet")
    manifest = {
        "created_at": datetime.now(UTC).isoformat(),
        "source": source or {},
        "counts": {t: getattr(data, t).height for t in TABLES},
        "rejects": rejects.height,
        "fingerprint": json_digest({t: file_digest(p) for t, p in files.items()}),
    }
    write_json(manifest, out / "manifest.json")
    return manifest


def read_dataset(data_dir: str | os.PathLike[str]) -> Dataset:
    """Read a dataset directory; a missing or malformed file is a `DataError` naming it."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"{d}: no such directory; {LAYOUT_HINT}")
    frames = {}
    for t in TABLES:
        p = d / f"{t}.parquet"
        if not p.is_file():
            raise DataError(f"{p}: file missing; {LAYOUT_HINT}")
        try:
            frames[t] = conform(t, pl.read_parquet(p))
        except DataError:
            raise
        except Exception as e:  # polars raises several types for unreadable/mis-typed files
            raise DataError(
                f"{p}: cannot read as the canonical {t} table ({e}); {LAYOUT_HINT}"
            ) from e
    return Dataset(frames[ITEMS], frames[INTERACTIONS], frames[IMPRESSIONS])


def read_rejects(data_dir: str | os.PathLike[str]) -> pl.DataFrame:
    p = Path(data_dir) / "rejects.parquet"
    return pl.read_parquet(p) if p.is_file() else empty_rejects()


def dataset_fingerprint(data_dir: str | os.PathLike[str]) -> str:
    """A digest of the three table files' bytes (the manifest's, when present and current)."""
    d = Path(data_dir)
    return json_digest({t: file_digest(d / f"{t}.parquet") for t in TABLES})


def validate_dataset(data: Dataset) -> Validated:
    return validate(data.items, data.interactions, data.impressions)
