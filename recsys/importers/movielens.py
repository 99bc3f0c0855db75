"""Import MovieLens ratings with plot overviews (ml-latest-small plus TMDB overviews).

A movielens folder holds two comma-separated files with a header line and "-quoting:
  movies_with_overview.csv  movieId, title, genres ("Adventure|Comedy"), tmdb_id, overview
  ratings.csv               userId, movieId, rating (0.5-5.0), timestamp (Unix seconds)

Mapping to the canonical tables:
  items        item_id=str(movieId), title, description=overview (null if empty),
               category=the first genre, subcategory=the whole genre list as given
               ("Adventure|Comedy"; the first genre alone is not lost, and the list keeps its
               order), both null for "(no genres listed)"; published_at=1 January (UTC) of the
               year in the title's trailing "(1995)", null without one.
  interactions ratings >= `min_rating` (a common protocol's positives): user_id=str(userId),
               item_id, ts from the Unix timestamp (UTC), weight 1.0. Lower ratings are not
               rejects: they are counted in stats["ratings_below_threshold"].
  impressions  none (MovieLens logs no impressions).

Ids are integers; "007" and "7" are the same movie. A movieId, rating or timestamp that does not
parse is a reject with its reason.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import polars as pl

from recsys.data import validate
from recsys.data.schema import IMPRESSIONS, INTERACTIONS, ITEMS, empty
from recsys.errors import ConfigError
from recsys.importers.base import (
    ROW,
    ImportResult,
    blank_to_null,
    concat_rejects,
    int_id,
    read_text_table,
    reject_ragged,
    reject_where,
    require_dir,
    why,
)

MOVIES_COLUMNS = ["movieId", "title", "genres", "overview"]
RATINGS_COLUMNS = ["userId", "movieId", "rating", "timestamp"]
NO_GENRES = "(no genres listed)"

LAYOUT = (
    "the movielens format expects a folder with movies_with_overview.csv (header: movieId, "
    "title, genres as Adventure|Comedy, tmdb_id, overview; comma-separated, quoted) and "
    "ratings.csv (header: userId, movieId, rating, timestamp as Unix seconds)"
)


def import_movielens(src: str | os.PathLike[str], *, min_rating: float = 4.0) -> ImportResult:
    """Import the MovieLens folder `src`; ratings >= `min_rating` become interactions.

    Raises `DataError` naming the file when the folder or a file is missing, unreadable or lacks
    a header column; `ConfigError` for a non-finite `min_rating`.
    """
    if not math.isfinite(min_rating):
        raise ConfigError(f"min_rating: must be a finite number, got {min_rating}")
    d = require_dir(src, LAYOUT)
    movies = _read_csv(d / "movies_with_overview.csv", MOVIES_COLUMNS)
    ratings = _read_csv(d / "ratings.csv", RATINGS_COLUMNS)

    items, items_rej = _items(movies)
    interactions, inter_rej, n_below = _interactions(ratings, min_rating)

    prior = concat_rejects([*items_rej, *inter_rej])
    validated = validate(items, interactions, empty(IMPRESSIONS), prior_rejects=prior)
    stats: dict[str, int | float | str] = {
        "movie_rows": movies.height,
        "rating_rows": ratings.height,
        "min_rating": float(min_rating),
        "ratings_below_threshold": n_below,
    }
    return ImportResult(validated, stats)


def _read_csv(path: Path, columns: list[str]) -> pl.DataFrame:
    return read_text_table(path, columns, LAYOUT, separator=",", quoted=True, header=True)


def _items(movies: pl.DataFrame) -> tuple[pl.DataFrame, list[pl.DataFrame]]:
    """Movie rows → items columns (with `__row`), and rejects."""
    movies, ragged = reject_ragged(ITEMS, movies, "more fields than the header names")
    genres = pl.col("genres").str.strip_chars()
    genres = pl.when(genres.is_in([NO_GENRES, ""])).then(None).otherwise(genres)
    title = pl.col("title").str.strip_chars()
    year = title.str.extract(r"\((\d{4})\)$", 1).cast(pl.Int32)
    parsed = movies.with_columns(
        int_id("movieId").alias("item_id"),
        title.alias("title_"),
        pl.col("overview").alias("description"),
        genres.str.split("|").list.first().str.strip_chars().alias("category"),
        genres.alias("subcategory"),
        pl.datetime(year, 1, 1, time_unit="us", time_zone="UTC").alias("published_at"),
    )
    unparsed = pl.col("movieId").str.strip_chars().ne("") & pl.col("item_id").is_null()
    parsed, bad_id = reject_where(
        ITEMS, parsed, why(unparsed, "unparseable movieId"), record=MOVIES_COLUMNS
    )
    items = parsed.select(
        ROW,
        "item_id",
        pl.col("title_").alias("title"),
        "description",
        "category",
        "subcategory",
        "published_at",
    ).with_columns(blank_to_null(c) for c in ("title", "description", "category"))
    return items, [ragged, bad_id]


def _interactions(
    ratings: pl.DataFrame, min_rating: float
) -> tuple[pl.DataFrame, list[pl.DataFrame], int]:
    """Rating rows → interactions (with `__row`) for ratings >= `min_rating`.

    Returns (interactions, rejects, number of parsed ratings below `min_rating`).
    """
    ratings, ragged = reject_ragged(INTERACTIONS, ratings, "more fields than the header names")
    seconds = pl.col("timestamp").str.strip_chars().cast(pl.Float64, strict=False)
    micros = (seconds * 1_000_000).round().cast(pl.Int64, strict=False)
    parsed = ratings.with_columns(
        blank_to_null("userId").str.strip_chars().alias("user_id"),
        int_id("movieId").alias("item_id"),
        pl.col("rating").str.strip_chars().cast(pl.Float64, strict=False).alias("rating_"),
        pl.when(seconds.is_finite())
        .then(pl.from_epoch(micros, time_unit="us"))
        .dt.replace_time_zone("UTC")
        .alias("ts"),
    )
    unparsed_id = pl.col("movieId").str.strip_chars().ne("") & pl.col("item_id").is_null()
    parsed, bad = reject_where(
        INTERACTIONS,
        parsed,
        pl.coalesce(
            why(unparsed_id, "unparseable movieId"),
            why(~pl.col("rating_").is_finite().fill_null(False), "unparseable rating"),
            why(pl.col("ts").is_null(), "unparseable timestamp"),
        ),
        record=RATINGS_COLUMNS,
    )
    positive = pl.col("rating_") >= min_rating
    n_below = parsed.height - int(parsed.select(positive.sum()).item())
    interactions = parsed.filter(positive).select(
        ROW, "user_id", "item_id", "ts", pl.lit(1.0).alias("weight")
    )
    return interactions, [ragged, bad], n_below
