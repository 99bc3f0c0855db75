"""The canonical tables of a dataset directory (see DESIGN.md, "Contracts").

Each table is a Parquet file in the dataset directory; these polars schemas are the contract.
`REQUIRED` names the columns that may not be null; the others are nullable.
"""

from __future__ import annotations

import polars as pl

from recsys.errors import DataError

TS = pl.Datetime("us", "UTC")

ITEMS = "items"
INTERACTIONS = "interactions"
IMPRESSIONS = "impressions"
TABLES = (ITEMS, INTERACTIONS, IMPRESSIONS)


def _schema(columns: dict[str, pl.DataType | type[pl.DataType]]) -> pl.Schema:
    # A typed parameter: mypy would join dtype classes and instances in a bare literal to `object`.
    return pl.Schema(columns)


SCHEMAS: dict[str, pl.Schema] = {
    ITEMS: _schema(
        {
            "item_id": pl.String,
            "title": pl.String,
            "description": pl.String,
            "category": pl.String,
            "subcategory": pl.String,
            "published_at": TS,
        }
    ),
    INTERACTIONS: _schema(
        {"user_id": pl.String, "item_id": pl.String, "ts": TS, "weight": pl.Float64}
    ),
    IMPRESSIONS: _schema(
        {
            "impression_id": pl.String,
            "user_id": pl.String,
            "ts": TS,
            "item_id": pl.String,
            "clicked": pl.Boolean,
            "position": pl.Int32,
        }
    ),
}

REQUIRED: dict[str, tuple[str, ...]] = {
    ITEMS: ("item_id", "title"),
    INTERACTIONS: ("user_id", "item_id", "weight"),
    IMPRESSIONS: ("impression_id", "user_id", "ts", "item_id", "clicked"),
}

# Columns whose combination must be unique within a table.
UNIQUE_KEYS: dict[str, tuple[str, ...]] = {
    ITEMS: ("item_id",),
    IMPRESSIONS: ("impression_id", "item_id"),
}

REJECTS_SCHEMA = pl.Schema(
    {"table": pl.String, "row": pl.Int64, "reason": pl.String, "record": pl.String}
)


def empty(table: str) -> pl.DataFrame:
    return pl.DataFrame(schema=SCHEMAS[table])


def empty_rejects() -> pl.DataFrame:
    return pl.DataFrame(schema=REJECTS_SCHEMA)


def conform(table: str, df: pl.DataFrame) -> pl.DataFrame:
    """Select and cast `df` to the canonical schema of `table`.

    Missing nullable columns are added as nulls; a missing required column is an error.
    Extra columns are dropped. Casting is strict: a value that cannot be cast is an error here,
    so importers parse and reject bad values before they call this.
    """
    schema = SCHEMAS[table]
    missing = [c for c in REQUIRED[table] if c not in df.columns]
    if missing:
        raise DataError(
            f"{table}: missing required column(s) {missing}; expected columns {list(schema)}"
        )
    exprs = []
    for name, dtype in schema.items():
        if name not in df.columns:
            exprs.append(pl.lit(None, dtype=dtype).alias(name))
        elif dtype == TS and isinstance(source := df.schema[name], pl.Datetime):
            col = pl.col(name)
            if source.time_zone is None:
                col = col.dt.replace_time_zone("UTC")
            exprs.append(col.dt.convert_time_zone("UTC").dt.cast_time_unit("us").alias(name))
        else:
            exprs.append(pl.col(name).cast(dtype).alias(name))
    return df.select(exprs)
