"""The one featurisation shared by training, evaluation, the nightly lists and the API.

Training and evaluation see each (impression, candidate) *as of the impression* (point in time);
the nightly lists and the API see (user, candidate) pairs *as of the bundle's cut-off*, through the
feature snapshot stored in the bundle. Both paths compute the same columns with the same code
(`features` for behaviour, `recsys.semantic` for text), so a score at serving time equals the
batch score for the same pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import polars as pl

from features import FeatureConfig, FeatureSnapshot, feature_names, point_in_time_features
from features import snapshot_features as _snapshot_features
from recsys.data.dataset import Dataset
from recsys.data.schema import TS
from recsys.semantic import SEMANTIC_FEATURES, semantic_features
from recsys.vectors import ItemVectors


@dataclass(frozen=True)
class FeatureSpec:
    """Which columns the ranker sees, and the semantic-feature settings."""

    config: FeatureConfig
    use_semantic: bool = True
    max_history: int = 50
    half_life_days: float = 7.0

    @property
    def behavioural(self) -> list[str]:
        return feature_names(self.config)

    @property
    def columns(self) -> list[str]:
        return self.behavioural + (list(SEMANTIC_FEATURES) if self.use_semantic else [])


def _semantic(
    spec: FeatureSpec, requests: pl.DataFrame, history: pl.DataFrame, vectors: ItemVectors
) -> pl.DataFrame:
    sem = semantic_features(
        requests.select("request_id", "user_id", "ts", "item_id"),
        history.select("user_id", "item_id", "ts"),
        vectors,
        max_history=spec.max_history,
        half_life_days=spec.half_life_days,
    )
    return sem.select(SEMANTIC_FEATURES)


def point_in_time_frame(
    spec: FeatureSpec,
    requests: pl.DataFrame,
    data: Dataset,
    vectors: ItemVectors | None,
) -> pl.DataFrame:
    """Features of each row of `requests` (request_id, user_id, ts, item_id) as of its ts.

    Returns `requests` with the behavioural columns and, when `vectors` is given, the semantic
    columns appended (same rows, same order).
    """
    out = point_in_time_features(requests, data, spec.config)
    if vectors is not None:
        out = out.hstack(_semantic(spec, requests, data.interactions, vectors))
    return out


def semantic_only(
    spec: FeatureSpec, requests: pl.DataFrame, data: Dataset, vectors: ItemVectors
) -> pl.DataFrame:
    """Only the semantic columns of `requests` (point in time), e.g. for a baseline encoder."""
    return _semantic(spec, requests, data.interactions, vectors)


def snapshot_frame(
    spec: FeatureSpec,
    snapshot: FeatureSnapshot,
    requests: pl.DataFrame,
    history: pl.DataFrame,
    vectors: ItemVectors | None,
    *,
    extra_history: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Features of (user_id, item_id) pairs as of `snapshot.as_of` (nightly lists and the API).

    `history` (user_id, item_id, ts) is the users' stored history before the cut-off;
    `extra_history` (user_id, item_id) adds items a caller says the user consumed (counted as
    the most recent history).
    """
    as_of: datetime = snapshot.as_of
    req = requests.select("user_id", "item_id").with_columns(
        pl.col("user_id").alias("request_id"), pl.lit(as_of, dtype=TS).alias("ts")
    )
    out = _snapshot_features(
        snapshot, req.select("user_id", "item_id"), extra_history=extra_history
    )
    if vectors is not None:
        hist = history.select("user_id", "item_id", "ts")
        if extra_history is not None and extra_history.height:
            recent = as_of - timedelta(microseconds=1)
            hist = pl.concat(
                [
                    hist,
                    extra_history.select("user_id", "item_id").with_columns(
                        pl.lit(recent, dtype=TS).alias("ts")
                    ),
                ]
            )
        out = out.hstack(_semantic(spec, req, hist, vectors))
    return out


def matrix(frame: pl.DataFrame, columns: list[str]) -> np.ndarray:
    """The (n_rows, n_columns) float64 feature matrix of `frame`, nulls as NaN."""
    return frame.select(pl.col(columns).cast(pl.Float64).fill_null(np.nan)).to_numpy()
