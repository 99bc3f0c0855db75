"""Import the H&M Personalized Fashion Recommendations data (articles and transactions).

An hm folder holds two Parquet files:
  articles.parquet      article_id, prod_name, product_type_name, product_group_name,
                        detail_desc, ... (colour, department, index, section, garment group)
  transactions.parquet  t_dat, customer_id, article_id, price, sales_channel_id

Mapping to the canonical tables:
  items        item_id=article_id, title=prod_name, description=detail_desc,
               category=product_group_name, subcategory=product_type_name, published_at null.
  interactions one per purchase: user_id=customer_id, item_id=article_id, ts=t_dat (midnight
               UTC; a date, a datetime or a "2020-09-16" string), weight 1.0. Repeat purchases
               stay separate rows.
  impressions  none (H&M logs purchases only).

Article ids: H&M writes them as 10 digits with a leading zero ("0108775015"), but copies of the
data hold them as integers or unpadded strings, sometimes differently in the two files. A numeric
id is therefore written in H&M's 10-digit form in both tables; any other id is kept as it is.
"""

from __future__ import annotations

import os

import polars as pl

from recsys.data import validate
from recsys.data.schema import IMPRESSIONS, INTERACTIONS, ITEMS, empty
from recsys.errors import DataError
from recsys.importers.base import (
    ROW,
    ImportResult,
    blank_to_null,
    concat_rejects,
    read_parquet_columns,
    reject_where,
    require_dir,
    to_utc,
    why,
)

ARTICLE_COLUMNS = [
    "article_id",
    "prod_name",
    "product_type_name",
    "product_group_name",
    "detail_desc",
]
TRANSACTION_COLUMNS = ["t_dat", "customer_id", "article_id"]
ARTICLE_ID_DIGITS = 10
_unparsed_id = pl.col("article_id").is_not_null() & pl.col("item_id").is_null()

LAYOUT = (
    "the hm format expects a folder with articles.parquet (article_id, prod_name, "
    "product_type_name, product_group_name, detail_desc, ...) and transactions.parquet (t_dat, "
    "customer_id, article_id, price, sales_channel_id)"
)


def import_hm(src: str | os.PathLike[str]) -> ImportResult:
    """Import the H&M folder `src` (articles.parquet, transactions.parquet).

    Raises `DataError` naming the file when the folder or a file is missing, unreadable, lacks a
    column or holds a column of a type that cannot be read (e.g. a list where an id belongs).
    """
    d = require_dir(src, LAYOUT)
    articles_path, transactions_path = d / "articles.parquet", d / "transactions.parquet"
    articles = read_parquet_columns(articles_path, ARTICLE_COLUMNS, LAYOUT)
    transactions = read_parquet_columns(transactions_path, TRANSACTION_COLUMNS, LAYOUT)
    try:
        items, items_rej = _items(articles)
        interactions, inter_rej = _interactions(transactions)
    except (pl.exceptions.InvalidOperationError, pl.exceptions.SchemaError, TypeError) as e:
        raise DataError(
            f"{d}: a column has a type that cannot be read ({' '.join(str(e).split())}); {LAYOUT}"
        ) from e
    prior = concat_rejects([items_rej, inter_rej])
    validated = validate(items, interactions, empty(IMPRESSIONS), prior_rejects=prior)
    stats: dict[str, int | float | str] = {
        "article_rows": articles.height,
        "transaction_rows": transactions.height,
    }
    return ImportResult(validated, stats)


def article_id(dtype: pl.DataType) -> pl.Expr:
    """The `article_id` column (of `dtype`) as a string; numeric ids in H&M's 10-digit form.

    Null where a float id is not a whole number.
    """
    c = pl.col("article_id")
    if dtype.is_float():
        c = pl.when(c == c.round()).then(c).cast(pl.Int64, strict=False)
        dtype = pl.Int64()
    if dtype.is_integer():
        return c.cast(pl.String).str.zfill(ARTICLE_ID_DIGITS)
    text = c.cast(pl.String).str.strip_chars()
    digits = text.str.contains(r"^\d+$")
    padded = text.str.strip_chars_start("0").str.zfill(ARTICLE_ID_DIGITS)
    return pl.when(digits).then(padded).otherwise(text)


def _items(articles: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Article rows → items columns (with `__row`), and rejects for unreadable ids."""
    parsed = articles.with_columns(
        article_id(articles.schema["article_id"]).alias("item_id"),
        pl.col("prod_name").cast(pl.String).alias("title"),
        pl.col("detail_desc").cast(pl.String).alias("description"),
        pl.col("product_group_name").cast(pl.String).alias("category"),
        pl.col("product_type_name").cast(pl.String).alias("subcategory"),
    )
    parsed, rej = reject_where(
        ITEMS,
        parsed,
        why(_unparsed_id, "unparseable article_id"),
        record=ARTICLE_COLUMNS,
    )
    items = parsed.select(ROW, "item_id", "title", "description", "category", "subcategory")
    return items.with_columns(
        blank_to_null(c) for c in ("item_id", "title", "description", "category", "subcategory")
    ), rej


def _interactions(transactions: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Transaction rows → interactions (with `__row`), and rejects for unreadable values."""
    schema = transactions.schema
    parsed = transactions.with_columns(
        pl.col("customer_id").cast(pl.String).str.strip_chars().alias("user_id"),
        article_id(schema["article_id"]).alias("item_id"),
        to_utc(pl.col("t_dat"), schema["t_dat"], date_format="%Y-%m-%d").alias("ts"),
        pl.lit(1.0).alias("weight"),
    )
    parsed, rej = reject_where(
        INTERACTIONS,
        parsed,
        pl.coalesce(
            why(_unparsed_id, "unparseable article_id"),
            # A purchase has a date; without one a time split could not place it.
            why(pl.col("ts").is_null(), "unparseable t_dat"),
        ),
        record=TRANSACTION_COLUMNS,
    )
    interactions = parsed.select(ROW, "user_id", "item_id", "ts", "weight")
    return interactions.with_columns(blank_to_null("user_id")), rej
