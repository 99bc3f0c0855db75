"""Import a dataset directory already in the canonical layout, re-validating every row.

The folder holds items.parquet, interactions.parquet and impressions.parquet with the canonical
columns (see `recsys.data.schema`); extra columns are dropped. Values of another type are cast:
a value that does not cast (e.g. "abc" in an integer `position`, "yesterday" in `ts`) is a reject
"unparseable <column>"; timestamps may be dates, datetimes (naive ones are taken as UTC) or
strings. A type that cannot be cast at all (e.g. a list), or a missing required column, is a
`DataError` naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from recsys.data import validate
from recsys.data.dataset import LAYOUT_HINT
from recsys.data.schema import (
    IMPRESSIONS,
    INTERACTIONS,
    ITEMS,
    REQUIRED,
    SCHEMAS,
    TABLES,
    TS,
    empty_rejects,
)
from recsys.errors import DataError
from recsys.importers.base import (
    ROW,
    ImportResult,
    concat_rejects,
    one_line,
    reject_where,
    require_dir,
    require_file,
    to_utc,
    why,
)

LAYOUT = f"the parquet format expects {LAYOUT_HINT}"


def import_parquet(src: str | os.PathLike[str]) -> ImportResult:
    """Read the canonical dataset directory `src` and validate it again.

    Raises `DataError` naming the file when the directory or a table file is missing or
    unreadable, or a table lacks a required column.
    """
    d = require_dir(src, LAYOUT)
    tables: dict[str, pl.DataFrame] = {}
    rejects = []
    stats: dict[str, int | float | str] = {}
    for t in TABLES:
        path = require_file(d / f"{t}.parquet", LAYOUT)
        try:
            raw = pl.read_parquet(path)
        except (pl.exceptions.PolarsError, OSError) as e:
            raise DataError(f"{path}: cannot read as Parquet ({one_line(e)}); {LAYOUT}") from e
        stats[f"{t}_rows"] = raw.height
        tables[t], rej = _coerce(t, raw, path)
        rejects.append(rej)
    validated = validate(
        tables[ITEMS],
        tables[INTERACTIONS],
        tables[IMPRESSIONS],
        prior_rejects=concat_rejects(rejects),
    )
    return ImportResult(validated, stats)


def _coerce(table: str, raw: pl.DataFrame, path: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Cast `raw`'s canonical columns to their canonical types; uncastable values → rejects.

    Returns (the canonical columns present, with `__row`; rejects of values that did not cast).
    """
    schema = SCHEMAS[table]
    missing = [c for c in REQUIRED[table] if c not in raw.columns]
    if missing:
        raise DataError(
            f"{path}: missing required column(s) {', '.join(missing)} "
            f"(expected {', '.join(schema)}); {LAYOUT}"
        )
    present = [c for c in schema if c in raw.columns]
    df = raw.select(present).with_row_index(ROW).with_columns(pl.col(ROW).cast(pl.Int64))
    casts, reasons = [], []
    for name in present:
        source, target = raw.schema[name], schema[name]
        if source == target:
            continue
        try:
            if target == TS:
                parsed = to_utc(pl.col(name), source)
            else:
                parsed = pl.col(name).cast(target, strict=False)
            # Check the cast is possible now, so a type error names the file and column.
            df.head(1).select(parsed)
        except (pl.exceptions.PolarsError, TypeError) as e:
            raise DataError(
                f"{path}: column {name} has type {source}, which cannot be read as {target} "
                f"({one_line(e)}); {LAYOUT}"
            ) from e
        casts.append(parsed.alias(f"__{name}"))
        bad = pl.col(name).is_not_null() & pl.col(f"__{name}").is_null()
        reasons.append(why(bad, f"unparseable {name}"))
    if not casts:
        return df, empty_rejects()
    df = df.with_columns(casts)
    df, rej = reject_where(table, df, pl.coalesce(reasons), record=present)
    parsed_names = [pl.col(f"__{c}").alias(c) for c in present if f"__{c}" in df.columns]
    return df.with_columns(parsed_names).select(ROW, *present), rej
