"""Checking request frames (the rows features are computed for) before any work is done."""

from __future__ import annotations

import polars as pl

from recsys.data.schema import TS
from recsys.errors import DataError


def check_requests(
    requests: pl.DataFrame, required: tuple[str, ...], reserved: list[str], where: str
) -> None:
    """Raise a DataError naming what is wrong with `requests` (missing columns, clashes)."""
    if not isinstance(requests, pl.DataFrame):
        raise DataError(f"{where}: requests must be a polars DataFrame, got {type(requests)}")
    missing = [c for c in required if c not in requests.columns]
    if missing:
        raise DataError(
            f"{where}: requests lack column(s) {missing}; expected {list(required)} "
            "(one row per request and candidate item)"
        )
    clash = [c for c in requests.columns if c in reserved or c.startswith("__")]
    if clash:
        raise DataError(
            f"{where}: requests already have column(s) {clash}, which the features would "
            "overwrite; drop or rename them first"
        )


def utc_ts(requests: pl.DataFrame, where: str) -> pl.Series:
    """The requests' `ts` as Datetime(us, UTC) (naive times are read as UTC); no nulls allowed."""
    dtype = requests.schema["ts"]
    if not isinstance(dtype, pl.Datetime):
        raise DataError(f"{where}: requests.ts must be a datetime column, got {dtype}")
    ts = requests["ts"]
    if dtype.time_zone is None:
        ts = ts.dt.replace_time_zone("UTC")
    ts = ts.dt.convert_time_zone("UTC").dt.cast_time_unit("us").cast(TS)
    nulls = ts.null_count()
    if nulls:
        raise DataError(f"{where}: requests.ts has {nulls} null value(s); give every row a time")
    return ts
