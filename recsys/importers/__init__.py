"""Dataset importers: public data layouts → validated canonical tables with rejects.

    result = import_source("movielens", "data/ml", min_rating=4.0)
    write_dataset(out_dir, result.validated, source={...})

Formats (see each module's docstring for the mapping to the canonical tables):
  mind       MIND news.tsv + behaviors.tsv            (`recsys.importers.mind`)
  movielens  movies_with_overview.csv + ratings.csv   (`recsys.importers.movielens`)
  hm         H&M articles.parquet + transactions.parquet (`recsys.importers.hm`)
  parquet    a canonical dataset directory, re-validated (`recsys.importers.parquet`)
  events     the API's event log, on top of a base dataset (`recsys.importers.events`)

Every source row either lands in a canonical table or in the rejects with its reason and its
0-based row number in the source file; counts that are neither (ratings below the threshold,
repeated MIND history) are in `ImportResult.stats`.
"""

from __future__ import annotations

import os

from recsys.errors import DataError
from recsys.importers.base import ImportResult
from recsys.importers.events import import_events
from recsys.importers.hm import import_hm
from recsys.importers.mind import import_mind
from recsys.importers.movielens import import_movielens
from recsys.importers.parquet import import_parquet

FORMATS: tuple[str, ...] = ("mind", "movielens", "hm", "parquet", "events")

__all__ = [
    "FORMATS",
    "ImportResult",
    "import_events",
    "import_hm",
    "import_mind",
    "import_movielens",
    "import_parquet",
    "import_source",
]


def import_source(
    fmt: str,
    src: str | os.PathLike[str],
    *,
    min_rating: float = 4.0,
    base: str | os.PathLike[str] | None = None,
) -> ImportResult:
    """Import the source folder `src` laid out as `fmt` (one of `FORMATS`).

    `min_rating` applies to movielens only (ratings at or above it are positives); `base` (a
    dataset directory the events extend) to events only.
    Raises `DataError` (one line, naming the file and the expected layout) for an unknown
    format or a missing or unreadable file.
    """
    if fmt == "mind":
        return import_mind(src)
    if fmt == "movielens":
        return import_movielens(src, min_rating=min_rating)
    if fmt == "hm":
        return import_hm(src)
    if fmt == "parquet":
        return import_parquet(src)
    if fmt == "events":
        return import_events(src, base=base)
    raise DataError(f"unknown import format {fmt!r}; choose one of {', '.join(FORMATS)}")
