"""One scoring contract for every model, baselines included.

A `Scorer` maps a frame of candidate rows (one row per (request, item), with feature columns) to
one finite float per row, higher = ranked higher. Evaluation treats them all alike:

    scored = add_scores(test_rows, [RandomScorer(0), PopularityScorer(), LGBMScorer("lgbm", r)])
    evaluation_table(scored, ["random", "popularity", "lgbm"])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import polars as pl

from recsys.errors import DataError
from recsys.ranker import Ranker

__all__ = [
    "ColumnScorer",
    "LGBMScorer",
    "PopularityScorer",
    "RandomScorer",
    "Scorer",
    "add_scores",
]


@runtime_checkable
class Scorer(Protocol):
    """A model that scores candidate rows: `score(frame)` -> (frame.height,) finite float64."""

    @property
    def name(self) -> str: ...

    def score(self, frame: pl.DataFrame) -> np.ndarray: ...


def _column(frame: pl.DataFrame, column: str, fill_value: float, who: str) -> np.ndarray:
    if column not in frame.columns:
        raise DataError(
            f"{who}: frame has no column {column!r} (columns: {frame.columns}); compute it "
            "first or choose another column"
        )
    values = frame[column].cast(pl.Float64).fill_null(fill_value).fill_nan(fill_value)
    return values.to_numpy().astype(np.float64, copy=False)


@dataclass(frozen=True)
class RandomScorer:
    """Uniform random scores from `seed`: the same frame always gets the same scores. `offset`:
    the frame is the rows from `offset` on of a larger one, and gets their scores (a frame
    scored in pieces gets the scores it gets whole)."""

    seed: int = 0
    name: str = "random"
    offset: int = 0

    def score(self, frame: pl.DataFrame) -> np.ndarray:
        stream = np.random.PCG64(self.seed)  # what default_rng(seed) draws from
        stream.advance(self.offset)  # one 64-bit draw per uniform double
        return np.random.Generator(stream).random(frame.height)


@dataclass(frozen=True)
class PopularityScorer:
    """Scores by item popularity: a column of `frame` (default `item_clicks_all`, clicks to date
    from the behavioural features) or a callable frame -> (n,) array. Missing values score 0."""

    column: str | Callable[[pl.DataFrame], np.ndarray] = "item_clicks_all"
    name: str = "popularity"

    def score(self, frame: pl.DataFrame) -> np.ndarray:
        if isinstance(self.column, str):
            return _column(frame, self.column, 0.0, f"scorer {self.name!r}")
        values = np.asarray(self.column(frame), dtype=np.float64)
        if values.shape != (frame.height,):
            raise DataError(
                f"scorer {self.name!r}: popularity callable returned shape {values.shape}, "
                f"expected ({frame.height},)"
            )
        return np.where(np.isfinite(values), values, 0.0)


@dataclass(frozen=True)
class ColumnScorer:
    """Scores by one column, e.g. semantic-only = ColumnScorer("semantic_frozen", "sem_cos_mean").

    Null/NaN values (no history, no vector) score `fill_value`; `higher_is_better=False` negates.
    """

    name: str
    column: str
    fill_value: float = 0.0
    higher_is_better: bool = True

    def score(self, frame: pl.DataFrame) -> np.ndarray:
        values = _column(frame, self.column, self.fill_value, f"scorer {self.name!r}")
        return values if self.higher_is_better else -values


@dataclass(frozen=True)
class LGBMScorer:
    """Scores with a trained `Ranker` (frame must hold its feature columns)."""

    name: str
    ranker: Ranker

    def score(self, frame: pl.DataFrame) -> np.ndarray:
        return self.ranker.predict(frame)


def add_scores(frame: pl.DataFrame, scorers: Sequence[Scorer]) -> pl.DataFrame:
    """`frame` with one Float64 column per scorer, named by `scorer.name` (names must differ)."""
    names = [s.name for s in scorers]
    if len(set(names)) != len(names):
        raise DataError(f"add_scores: scorer names repeat: {names}; give each a distinct name")
    return frame.with_columns(pl.Series(s.name, s.score(frame), dtype=pl.Float64) for s in scorers)
