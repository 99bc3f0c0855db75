"""Split each table into clean rows and rejects, with the reason for every reject.

Nothing is dropped silently: every row either stays in its table or lands in the rejects table
(table, row index in the table as given, reason, the row as JSON).
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from recsys.data.schema import (
    IMPRESSIONS,
    INTERACTIONS,
    ITEMS,
    REQUIRED,
    TABLES,
    UNIQUE_KEYS,
    conform,
    empty_rejects,
)

_ROW = "__row"


@dataclass(frozen=True)
class Validated:
    """Clean tables plus the rejects table (columns: table, row, reason, record)."""

    items: pl.DataFrame
    interactions: pl.DataFrame
    impressions: pl.DataFrame
    rejects: pl.DataFrame

    def counts(self) -> dict[str, dict[str, int]]:
        """{table: {"kept": n, "rejected": m}}."""
        out = {}
        for t in TABLES:
            kept = getattr(self, t).height
            rejected = self.rejects.filter(pl.col("table") == t).height
            out[t] = {"kept": kept, "rejected": rejected}
        return out

    def reasons(self) -> pl.DataFrame:
        """Reject counts by table and reason."""
        return self.rejects.group_by("table", "reason").len("count").sort("table", "reason")


def make_rejects(table: str, df: pl.DataFrame, reason: str | pl.Expr) -> pl.DataFrame:
    """Rejects rows for `df` (which must hold a `__row` column with the source row index)."""
    if df.height == 0:
        return empty_rejects()
    record_cols = [c for c in df.columns if c not in (_ROW, "__reason")]
    reason_expr = reason if isinstance(reason, pl.Expr) else pl.lit(reason)
    return df.select(
        pl.lit(table).alias("table"),
        pl.col(_ROW).cast(pl.Int64).alias("row"),
        reason_expr.cast(pl.String).alias("reason"),
        pl.struct(record_cols).struct.json_encode().alias("record"),
    )


def _split(
    table: str, df: pl.DataFrame, bad: pl.Expr, reason: str | pl.Expr
) -> tuple[pl.DataFrame, pl.DataFrame]:
    flagged = df.with_columns(bad.fill_null(False).alias("__bad"))
    rejected = flagged.filter(pl.col("__bad")).drop("__bad")
    kept = flagged.filter(~pl.col("__bad")).drop("__bad")
    return kept, make_rejects(table, rejected, reason)


def _first_occurrence(df: pl.DataFrame, keys: list[str]) -> pl.Series:
    """Mask (length `df.height`): True where the row's `keys` occur for the first time in frame
    order.

    Hash first: when all key hashes differ (clean data) that settles it with one hash and one
    `n_unique`; only rows whose hash repeats are compared exactly. A hash-table pass over every
    row (`is_first_distinct`, or a window rank) grows slow on MIND-sized impression tables
    (tens of millions of rows): 13 s and 33 s on 18.5M rows against about 1 s.
    """
    key = pl.struct(keys) if len(keys) > 1 else pl.col(keys[0])
    h = df.select(key.hash(seed=0)).to_series()
    first = pl.repeat(True, df.height, dtype=pl.Boolean, eager=True)
    if h.n_unique() == df.height:
        return first
    ordered = h.sort()
    repeated = ordered.filter(ordered == ordered.shift(1))
    idx = h.is_in(repeated.implode()).arg_true()
    exact = df[idx].select(key.is_first_distinct()).to_series()
    return first.scatter(idx, exact)


def _validate_table(
    table: str, df: pl.DataFrame, known_items: pl.Series | None
) -> tuple[pl.DataFrame, list[pl.DataFrame]]:
    rejects: list[pl.DataFrame] = []
    if _ROW in df.columns:
        df = conform(table, df).with_columns(df[_ROW].cast(pl.Int64))
    else:
        df = conform(table, df).with_row_index(_ROW).with_columns(pl.col(_ROW).cast(pl.Int64))
    # Rows sharing a source row (one MIND impression list) keep their given order: sort stably
    # once; the filters and windows below preserve the order.
    if not df[_ROW].is_sorted():
        df = df.sort(_ROW, maintain_order=True)
    # 1. Nulls in required columns (reason names the first null column).
    null_reason = pl.coalesce(
        [
            pl.when(pl.col(c).is_null()).then(pl.lit(f"null required field: {c}"))
            for c in REQUIRED[table]
        ]
    )
    df, rej = _split(table, df, null_reason.is_not_null(), null_reason)
    rejects.append(rej)
    # 2. Non-finite weights.
    if table == INTERACTIONS:
        df, rej = _split(table, df, ~pl.col("weight").is_finite(), "non-finite weight")
        rejects.append(rej)
    # 3. References to items that are not in the catalogue.
    if known_items is not None:
        df, rej = _split(
            table, df, ~pl.col("item_id").is_in(known_items.implode()), "unknown item_id"
        )
        rejects.append(rej)
    # 4. Duplicate keys: the first occurrence stays.
    if table in UNIQUE_KEYS:
        keys = list(UNIQUE_KEYS[table])
        dup = ~_first_occurrence(df, keys)
        df, rej = _split(table, df, pl.lit(dup), f"duplicate {'+'.join(keys)}")
        rejects.append(rej)
    return df.drop(_ROW), rejects


def validate(
    items: pl.DataFrame,
    interactions: pl.DataFrame,
    impressions: pl.DataFrame,
    prior_rejects: pl.DataFrame | None = None,
) -> Validated:
    """Validate the three tables against the contracts and each other.

    Tables may already carry a `__row` column (the row index in the source file), which the
    rejects then report; otherwise the row index within the given table is used.
    `prior_rejects` (e.g. unparseable values found by an importer) are kept in the result.
    """
    all_rejects = [prior_rejects] if prior_rejects is not None else []
    clean_items, rej = _validate_table(ITEMS, items, None)
    all_rejects += rej
    known = clean_items["item_id"]
    clean_inter, rej = _validate_table(INTERACTIONS, interactions, known)
    all_rejects += rej
    clean_imp, rej = _validate_table(IMPRESSIONS, impressions, known)
    all_rejects += rej
    rejects = pl.concat([r for r in all_rejects if r.height] or [empty_rejects()])
    return Validated(clean_items, clean_inter, clean_imp, rejects)
