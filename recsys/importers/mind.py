"""Import the MIND news-recommendation data set (Microsoft News; MIND-small and MIND-large).

A MIND folder holds two tab-separated files without a header and without quoting:
  news.tsv       news_id, category, subcategory, title, abstract, url, title_entities,
                 abstract_entities
  behaviors.tsv  impression_id, user_id, time ("11/15/2019 8:55:22 AM"), history (space-separated
                 news ids), impressions ("N123-1 N456-0": news id, dash, clicked 1 or 0)

Mapping to the canonical tables:
  items        item_id=news_id, title, description=abstract, category, subcategory,
               published_at null (MIND gives no publication time).
  interactions one row per (user, news id) in any history, weight 1.0, dated by what the log
               shows of when (stats["history_dating"]):
               - "before the log": every user's history is the same on all their rows (MIND,
                 whose histories are the clicks of the weeks before the log), so they predate
                 the whole log: ts just before its first row. A user first seen after a
                 cut-off still has a history at the cut-off, as every request of theirs says.
               - "before the earliest row listing it": some user's history changes between
                 their rows (EB-NeRD: week 2's histories hold week 1's clicks), so an item is
                 known to predate only the earliest row whose history lists it.
               MIND repeats a user's history on each of their rows; the repeats are counted in
               stats["history_rows_deduplicated"], not rejected.
               Every click of the impressions is an interaction too, at its row's time (a
               click extends the history, as the API counts a click event): the earliest of a
               (user, item)'s history date and clicks is kept (stats["click_interactions"]
               counts the pairs the clicks added).
  impressions  one row per shown news item: impression_id, user_id, ts (the row's time, UTC),
               item_id, clicked (the -1/-0 suffix), position (0-based place in the list).

A behaviors row that is ragged or lacks a user id is rejected whole. A row without an impression
id, with an unparseable time or with an empty impression list gives no impressions (one reject
for the row), but its history still counts. A token without a click label (the MIND test set's
"N123") is rejected alone. Everything is vectorised (polars string splits and explodes), so
MIND-large's millions of rows need no Python loop.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import polars as pl

from recsys.data import validate
from recsys.data.schema import IMPRESSIONS, ITEMS
from recsys.importers.base import (
    ROW,
    ImportResult,
    blank_to_null,
    concat_rejects,
    read_text_table,
    reject_ragged,
    reject_where,
    require_dir,
    why,
)

NEWS_COLUMNS = [
    "news_id",
    "category",
    "subcategory",
    "title",
    "abstract",
    "url",
    "title_entities",
    "abstract_entities",
]
BEHAVIOR_COLUMNS = ["impression_id", "user_id", "time", "history", "impressions"]
TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"  # 11/15/2019 8:55:22 AM
_JUST_BEFORE = timedelta(microseconds=1)

LAYOUT = (
    "the mind format expects a folder with news.tsv (news_id, category, subcategory, title, "
    "abstract, url, title_entities, abstract_entities; tab-separated, no header) and "
    "behaviors.tsv (impression_id, user_id, time as 11/15/2019 8:55:22 AM, history as "
    "space-separated news ids, impressions as N123-1 N456-0; tab-separated, no header)"
)


def _tokens(name: str) -> pl.Expr:
    """A space-separated field as a list of ids (runs of spaces and a trailing \\r allowed).

    (A plain split and filter: 3x faster than a regex `extract_all` on MIND-large's lists.)
    """
    return pl.col(name).str.strip_chars().str.split(" ").list.filter(pl.element() != "")


def import_mind(src: str | os.PathLike[str]) -> ImportResult:
    """Import the MIND folder `src` (news.tsv, behaviors.tsv) into validated canonical tables.

    Raises `DataError` naming the file when the folder or a file is missing or unreadable.
    """
    d = require_dir(src, LAYOUT)
    news = _read_tsv(d / "news.tsv", NEWS_COLUMNS)
    behaviors = _read_tsv(d / "behaviors.tsv", BEHAVIOR_COLUMNS)

    items, items_rej = _items(news)
    rows, rows_rej = _behavior_rows(behaviors)
    history, n_history, n_dedup, dating = _history(rows)
    impressions, imp_rej = _impressions(rows)
    interactions, n_clicks = _with_clicks(history, impressions)

    prior = concat_rejects([items_rej, *rows_rej, *imp_rej])
    validated = validate(items, interactions, impressions, prior_rejects=prior)
    stats: dict[str, int | float | str] = {
        "news_rows": news.height,
        "behavior_rows": behaviors.height,
        "history_ids": n_history,
        "history_rows_deduplicated": n_dedup,
        "history_dating": dating,
        "click_interactions": n_clicks,
    }
    return ImportResult(validated, stats)


def _read_tsv(path: Path, columns: list[str]) -> pl.DataFrame:
    return read_text_table(path, columns, LAYOUT, separator="\t", quoted=False, header=False)


def _items(news: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """news.tsv rows → items columns (with `__row`), and rejects for ragged rows."""
    news, rej = reject_ragged(ITEMS, news, f"more than {len(NEWS_COLUMNS)} tab-separated fields")
    items = news.select(
        ROW,
        pl.col("news_id").str.strip_chars().alias("item_id"),
        "title",
        pl.col("abstract").alias("description"),
        "category",
        "subcategory",
    ).with_columns(
        blank_to_null(c) for c in ("item_id", "title", "description", "category", "subcategory")
    )
    return items, rej


def _behavior_rows(b: pl.DataFrame) -> tuple[pl.DataFrame, list[pl.DataFrame]]:
    """Reject whole rows that are ragged or have no user id (as impressions rejects)."""
    b, ragged = reject_ragged(
        IMPRESSIONS, b, f"more than {len(BEHAVIOR_COLUMNS)} tab-separated fields"
    )
    b = b.with_columns(
        pl.col("impression_id").str.strip_chars(), pl.col("user_id").str.strip_chars()
    ).with_columns(blank_to_null("impression_id"), blank_to_null("user_id"))
    b, no_user = reject_where(
        IMPRESSIONS, b, why(pl.col("user_id").is_null(), "null required field: user_id")
    )
    return b, [ragged, no_user]


def _history(b: pl.DataFrame) -> tuple[pl.DataFrame, int, int, str]:
    """History ids → interactions (weight 1.0), one per (user, item), first row kept.

    A history lists clicks made *before* its row's time. Where every user's history is the
    same on all their rows (MIND), the histories predate the whole log: each item's ts is just
    before the log's first readable row. Otherwise nothing more is known of when: an item's ts
    is just before the earliest row whose history holds it (null when no such row has a
    readable time). A null ts, or the log's start, would count it before every impression, and
    data sets whose histories grow between periods (EB-NeRD: week 2's history holds week 1's
    clicks) would then show week 1's rows their own future clicks: a label leak for the ranker
    and the fine-tune alike.

    Returns (interactions with `__row`, history ids read, repeats dropped, the dating used).
    """
    n_ids = int(b.select(_tokens("history").list.len().sum()).item() or 0)
    per_user = (
        b.select("user_id", _tokens("history").list.join(" ").alias("h"))
        .filter(pl.col("h").str.len_chars() > 0)
        .group_by("user_id")
        .agg(pl.col("h").n_unique())
    )
    static = per_user.height > 0 and int(per_user["h"].max()) == 1  # type: ignore[arg-type]
    # A user's history repeats verbatim on each of their rows: drop repeated strings before the
    # explode, so MIND-large explodes each history once, not once per impression.
    h = (
        b.select(ROW, "user_id", "history", _row_time().alias("ts"))
        .drop_nulls("history")
        .with_columns(pl.col("ts").min().over(["user_id", "history"]))
        .unique(["user_id", "history"], keep="first", maintain_order=True)
        .select(ROW, "user_id", _tokens("history").alias("item_id"), "ts")
        .explode("item_id")
        .drop_nulls("item_id")
        .with_columns(pl.col("ts").min().over(["user_id", "item_id"]) - _JUST_BEFORE)
        .unique(["user_id", "item_id"], keep="first", maintain_order=True)
        .with_columns(pl.lit(1.0).alias("weight"))
    )
    dating = "before the earliest row listing it"
    if static:
        start = b.select(_row_time().min()).item()
        h = h.with_columns(pl.lit(start, dtype=h.schema["ts"]).alias("ts") - _JUST_BEFORE)
        dating = "before the log"
    return h, n_ids, n_ids - h.height, dating


def _with_clicks(history: pl.DataFrame, impressions: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """The history plus every clicked impression row as an interaction at its row's time: a
    click extends the user's history, as the API counts a click event and as the events
    importer and the generator write it, so the ranker trains on the histories it is served.
    One row per (user, item), the earliest kept (a week-1 click that week 2's history lists
    counts from its click, not from the row that listed it). Features count events strictly
    before a row's time, so a row never sees its own click.

    Returns (interactions with `__row`, clicks that added a (user, item) the history lacked)."""
    clicks = impressions.filter(pl.col("clicked")).select(
        ROW,
        "user_id",
        "item_id",
        pl.col("ts").cast(history.schema["ts"]),
        pl.lit(1.0).alias("weight"),
    )
    both = (
        pl.concat([history.select(clicks.columns), clicks])
        .with_row_index("__order")
        .sort(["user_id", "item_id", "ts", "__order"], nulls_last=False)
        .unique(["user_id", "item_id"], keep="first", maintain_order=True)
        .sort("__order")
        .drop("__order")
    )
    return both, both.height - history.height


def _row_time() -> pl.Expr:
    """A behaviors row's time as a UTC timestamp (null when unparseable)."""
    return (
        pl.col("time")
        .str.strip_chars()
        .str.strptime(pl.Datetime("us"), TIME_FORMAT, strict=False)
        .dt.replace_time_zone("UTC")
    )


def _impressions(b: pl.DataFrame) -> tuple[pl.DataFrame, list[pl.DataFrame]]:
    """Impression lists → one row per shown item (with `__row`), plus rejects."""
    rows = b.drop("history").with_columns(
        _row_time().alias("ts"),
        _tokens("impressions").alias("token"),
    )
    # Row-level problems: one reject per behaviors row, recording its raw fields.
    rows, row_rej = reject_where(
        IMPRESSIONS,
        rows,
        pl.coalesce(
            why(pl.col("impression_id").is_null(), "null required field: impression_id"),
            why(pl.col("ts").is_null(), "unparseable time"),
            why(pl.col("token").list.len().fill_null(0) == 0, "empty impression list"),
        ),
        record=["impression_id", "user_id", "time", "impressions"],
    )
    shown = rows.select(
        ROW,
        "impression_id",
        "user_id",
        "ts",
        "token",
        pl.int_ranges(0, pl.col("token").list.len(), dtype=pl.Int32).alias("position"),
    ).explode(["token", "position"])
    labelled = pl.col("token").str.ends_with("-1") | pl.col("token").str.ends_with("-0")
    shown, unlabelled = reject_where(
        IMPRESSIONS, shown, why(~labelled, "impression without click label")
    )
    impressions = shown.select(
        ROW,
        "impression_id",
        "user_id",
        "ts",
        pl.col("token").str.head(-2).alias("item_id"),
        pl.col("token").str.ends_with("-1").alias("clicked"),
        "position",
    )
    return impressions, [row_rej, unlabelled]
