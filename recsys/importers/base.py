"""What every importer shares: the result type, reading source files with errors that name the
file and the expected layout, and parsing values so that a bad value becomes a reject.

Row numbers: every source table carries a `__row` column, the 0-based index of the record among
the file's data rows (a header line is not counted). Rejects report it in their `row` column.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recsys.data import Validated, make_rejects
from recsys.data.schema import empty_rejects
from recsys.errors import DataError

ROW = "__row"
EXTRA = "__extra"  # catches fields beyond the expected ones; non-null means a ragged row

Stats = dict[str, int | float | str]


@dataclass(frozen=True)
class ImportResult:
    """An imported source: clean canonical tables with their rejects, and extra counts.

    `validated`: items, interactions, impressions in the canonical schemas, plus rejects
    (table, row, reason, record). `stats`: counts that are neither kept rows nor rejects, e.g.
    {"ratings_below_threshold": n, "history_rows_deduplicated": n}.
    """

    validated: Validated
    stats: Stats


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, at most `limit` characters.

    Polars parse errors span several lines and end with the parser's own reason ("Original
    error: ...") after tuning hints that do not apply here; keep the reason.
    """
    text = str(e)
    if "Original error:" in text:
        text = text.rsplit("Original error:", 1)[1]
    text = " ".join(text.replace("`", "").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def require_dir(src: str | os.PathLike[str], layout: str) -> Path:
    """`src` as a Path, or a `DataError` that names it and the expected `layout`."""
    d = Path(src)
    if not d.is_dir():
        raise DataError(f"{d}: no such directory; {layout}")
    return d


def require_file(path: Path, layout: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: file missing; {layout}")
    return path


def read_text_table(
    path: Path,
    columns: list[str],
    layout: str,
    *,
    separator: str,
    quoted: bool,
    header: bool,
) -> pl.DataFrame:
    """Read a delimited text file as strings: `__row`, `columns`, `__extra`.

    With `header`, the first line must name every column in `columns` (in any order; other
    columns are read and dropped). A record with fewer fields gets nulls; one with more fields
    gets a non-null `__extra` (reject it). Invalid UTF-8 is replaced, not fatal.
    Raises `DataError` naming the file when it is missing, unreadable or has the wrong header.
    """
    require_file(path, layout)
    names = columns
    try:
        if header:
            names = pl.read_csv(
                path,
                n_rows=0,
                separator=separator,
                quote_char='"' if quoted else None,
                infer_schema=False,
                encoding="utf8-lossy",
            ).columns
            missing = [c for c in columns if c not in names]
            if missing:
                raise DataError(
                    f"{path}: header lacks column(s) {', '.join(missing)} "
                    f"(found {', '.join(names) or 'no header'}); {layout}"
                )
        df = pl.read_csv(
            path,
            has_header=False,
            skip_rows=1 if header else 0,
            separator=separator,
            quote_char='"' if quoted else None,
            schema={c: pl.String for c in [*names, EXTRA]},
            missing_columns="insert",
            truncate_ragged_lines=True,
            row_index_name=ROW,
            raise_if_empty=False,
            encoding="utf8-lossy",
        )
    except DataError:
        raise
    except (pl.exceptions.PolarsError, OSError) as e:
        raise DataError(f"{path}: cannot read ({one_line(e)}); {layout}") from e
    return df.select(pl.col(ROW).cast(pl.Int64), *columns, EXTRA)


def read_parquet_columns(path: Path, columns: list[str], layout: str) -> pl.DataFrame:
    """Read `columns` of a Parquet file, with `__row`; a `DataError` names a missing column."""
    require_file(path, layout)
    try:
        found = pl.read_parquet_schema(path)
        missing = [c for c in columns if c not in found]
        if missing:
            raise DataError(
                f"{path}: missing column(s) {', '.join(missing)} "
                f"(found {', '.join(found) or 'none'}); {layout}"
            )
        df = pl.read_parquet(path, columns=columns)
    except DataError:
        raise
    except (pl.exceptions.PolarsError, OSError) as e:
        raise DataError(f"{path}: cannot read as Parquet ({one_line(e)}); {layout}") from e
    return df.with_row_index(ROW).with_columns(pl.col(ROW).cast(pl.Int64))


def blank_to_null(name: str) -> pl.Expr:
    """Column `name` with empty or whitespace-only strings as null."""
    c = pl.col(name)
    return pl.when(c.str.strip_chars() == "").then(None).otherwise(c).alias(name)


def reject_where(
    table: str, df: pl.DataFrame, reason: pl.Expr, record: list[str] | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split `df` (with `__row`) by `reason`, a string expression that is null for good rows.

    Returns (good rows, rejects of `table` whose record holds the `record` columns (default:
    all but `__row`), so a reject shows the raw source fields rather than parsed ones).
    """
    flagged = df.with_columns(reason.alias("__reason"))
    bad = flagged.filter(pl.col("__reason").is_not_null())
    cols = record if record is not None else [c for c in df.columns if c != ROW]
    rejects = make_rejects(table, bad.select(ROW, *cols, "__reason"), pl.col("__reason"))
    return flagged.filter(pl.col("__reason").is_null()).drop("__reason"), rejects


def why(condition: pl.Expr, reason: str) -> pl.Expr:
    """`reason` where `condition` holds, else null (combine several with `pl.coalesce`)."""
    return pl.when(condition.fill_null(False)).then(pl.lit(reason))


def reject_ragged(table: str, df: pl.DataFrame, reason: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Reject rows with fields beyond the expected ones (`__extra` set); drop `__extra`."""
    kept, rej = reject_where(table, df, why(pl.col(EXTRA).is_not_null(), reason))
    return kept.drop(EXTRA), rej


def int_id(name: str) -> pl.Expr:
    """A numeric id column as its canonical string ("007" and " 7" become "7"); null if not an
    integer."""
    return pl.col(name).str.strip_chars().cast(pl.Int64, strict=False).cast(pl.String).alias(name)


def to_utc(expr: pl.Expr, dtype: pl.DataType, *, date_format: str | None = None) -> pl.Expr:
    """`expr` (of `dtype`: Date, Datetime or String) as a UTC timestamp; null where unparseable.

    A Date is midnight UTC, a naive Datetime is taken as UTC. A String is parsed with
    `date_format` (a prefix match, so "2020-09-16 00:00:00" reads with "%Y-%m-%d").
    """
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is None:
            expr = expr.dt.replace_time_zone("UTC")
        return expr.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
    if dtype == pl.Date:
        return expr.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    if dtype == pl.String:
        text = expr.str.strip_chars()
        if date_format is None:  # format inferred from the first value; an offset is honoured
            return text.str.to_datetime(time_unit="us", time_zone="UTC", strict=False)
        parsed = text.str.to_datetime(date_format, time_unit="us", strict=False, exact=False)
        return parsed.dt.replace_time_zone("UTC")
    raise TypeError(f"cannot read timestamps from {dtype}")


def concat_rejects(parts: list[pl.DataFrame]) -> pl.DataFrame:
    return pl.concat([r for r in parts if r.height] or [empty_rejects()])
