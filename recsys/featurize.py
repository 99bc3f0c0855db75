"""The one featurisation shared by training, evaluation, the nightly lists and the API.

Training and evaluation see each (impression, candidate) *as of the impression* (point in time);
the nightly lists and the API see (user, candidate) pairs *as of the bundle's cut-off*, through the
feature snapshot stored in the bundle. Both paths compute the same columns with the same code
(`features` for behaviour, `recsys.semantic` for text), so a score at serving time equals the
batch score for the same pair.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import polars as pl

from features import (
    FeatureConfig,
    FeatureSnapshot,
    feature_names,
    features_as_of,
)
from features import snapshot_features as _snapshot_features
from features.config import valid_duration
from features.events import GROUPS, Events, prepare_events
from recsys.data.dataset import Dataset
from recsys.data.schema import TS
from recsys.errors import ConfigError, DataError
from recsys.relative import relative_columns, with_relative
from recsys.semantic import FROZEN_SEMANTIC, SEMANTIC_FEATURES, semantic_features
from recsys.vectors import ItemVectors

# Raw counts and ages: their scale grows with the log's length and the clock, so a ranker over
# them puts tomorrow's rows into leaves it never trained on. The stable column set leaves them
# out and keeps their within-request ranks and z-scores instead (`recsys.relative`).
_DRIFTING_PREFIXES = ("item_shows_", "item_clicks_", "item_interactions_")
_DRIFTING = {"item_age_hours", "item_hours_since_click", "user_shows", "user_clicks",
             "user_history", "user_category_shows", "user_category_clicks",
             "user_subcategory_shows", "user_subcategory_clicks"}  # fmt: skip
# Columns that also enter relative to the request's other candidates.
_RELATIVE_PREFIXES = ("item_", "sem_cos_")
_RELATIVE = {"user_category_share", "user_subcategory_share", "user_category_ctr",
             "user_subcategory_ctr", "user_item_shows"}  # fmt: skip


def drifts(column: str) -> bool:
    """True for a raw count or age, whose scale changes with the log's length and the clock."""
    return column in _DRIFTING or column.startswith(_DRIFTING_PREFIXES)


def ranks_within_request(column: str) -> bool:
    """True for a column the stable set also gives as a within-request rank and z-score."""
    return column in _RELATIVE or column.startswith(_RELATIVE_PREFIXES)


@dataclass(frozen=True)
class FeatureSpec:
    """Which columns the ranker sees, and the semantic-feature settings.

    stable: the ranker sees no column that drifts (`drifts`): rates, shares, cosines and
        within-request ranks/z-scores (`recsys.relative`) of the candidate-side columns. False:
        every raw column as computed (the ablation, and bundles written before this existed).
    refresh: how fresh the features of a row are, as a polars duration ("1d") or "online".
        A row at time t gets the features of the last refresh at or before t (t truncated to
        the period, UTC): what the API serves from a bundle that a nightly job rebuilds once per
        period. "online": features as of t itself, which only an event stream keeps up to date.
    frozen_semantic: with use_semantic, the semantic cosines also from the frozen base
        encoder's vectors (`FROZEN_SEMANTIC`, from `ItemVectors.frozen`), beside the tuned
        encoder's. The tuned encoder's columns are fitted, not predicted, on the rows it was
        tuned on, so the nightly hides them there (`tuned_semantic`); the frozen ones are
        honest on every row, and the ranker learns from them on all of its training rows.
    """

    config: FeatureConfig
    use_semantic: bool = True
    max_history: int = 50
    half_life_days: float = 7.0
    stable: bool = True
    refresh: str = "online"
    frozen_semantic: bool = False

    @property
    def base_behavioural(self) -> list[str]:
        """The behavioural columns `features` computes (raw counts included)."""
        return feature_names(self.config)

    @property
    def base_columns(self) -> list[str]:
        """Every column the featurisation computes before the within-request step."""
        if not self.use_semantic:
            return self.base_behavioural
        frozen = list(FROZEN_SEMANTIC) if self.frozen_semantic else []
        return self.base_behavioural + list(SEMANTIC_FEATURES) + frozen

    @property
    def relative_base(self) -> list[str]:
        """The base columns that enter within-request ranks and z-scores (stable only)."""
        return [c for c in self.base_columns if self.stable and ranks_within_request(c)]

    def _model_columns(self, base: list[str]) -> list[str]:
        if not self.stable:
            return base
        kept = [c for c in base if not drifts(c)]
        return kept + relative_columns([c for c in base if ranks_within_request(c)])

    @property
    def behavioural(self) -> list[str]:
        """The ranker columns that need no text encoder (the lgbm_behavioural model's)."""
        return self._model_columns(self.base_behavioural)

    @property
    def columns(self) -> list[str]:
        """The ranker's columns, in model order."""
        return self._model_columns(self.base_columns)

    @property
    def tuned_semantic(self) -> list[str]:
        """The ranker columns computed from the (tuned) encoder's vectors: the semantic ones
        but the frozen encoder's (and, beside them, the window length both share)."""
        other = set(self.behavioural) | set(self._model_columns(list(FROZEN_SEMANTIC)))
        if self.frozen_semantic:
            other.add("sem_history_len")
        return [c for c in self.columns if c not in other]

    def __post_init__(self) -> None:
        check_refresh(self.refresh, "refresh")

    def at(self, ts: pl.Expr) -> pl.Expr:
        """The moment whose features a row at `ts` gets (see `refresh`)."""
        return ts if self.refresh == ONLINE else ts.dt.truncate(self.refresh)


ONLINE = "online"


def check_refresh(value: str, where: str) -> None:
    """A ConfigError unless `value` is "online" or a polars duration such as "1d"."""
    if value != ONLINE and not valid_duration(value):
        raise ConfigError(
            f"{where} must be {ONLINE!r} or a polars duration such as '1d' or '6h' (the "
            f"nightly's period), got {value!r}"
        )


def _semantic(
    spec: FeatureSpec, requests: pl.DataFrame, history: pl.DataFrame, vectors: ItemVectors
) -> pl.DataFrame:
    req = requests.select("request_id", "user_id", "ts", "item_id")
    hist = history.select("user_id", "item_id", "ts")

    def cosines(v: ItemVectors) -> pl.DataFrame:
        return semantic_features(
            req, hist, v, max_history=spec.max_history, half_life_days=spec.half_life_days
        )

    sem = cosines(vectors).select(SEMANTIC_FEATURES)
    if not spec.frozen_semantic:
        return sem
    if vectors.frozen is None:
        raise DataError(
            "semantic features of the frozen encoder need its item vectors: pass "
            "ItemVectors.with_frozen(<the base encoder's vectors>)"
        )
    fz = cosines(vectors.frozen)
    return sem.hstack(
        fz.select(pl.col(c.removesuffix("_frozen")).alias(c) for c in FROZEN_SEMANTIC).get_columns()
    )


def point_in_time_frame(
    spec: FeatureSpec,
    requests: pl.DataFrame,
    data: Dataset,
    vectors: ItemVectors | None,
) -> pl.DataFrame:
    """Features of each row of `requests` (request_id, user_id, ts, item_id) as of its ts, or
    of the last refresh before it (`spec.refresh`).

    Returns `requests` with the base columns (`spec.base_columns`; the semantic ones only when
    `vectors` is given) and the within-request columns appended (same rows, same order).
    """
    parts = list(point_in_time_chunks(spec, requests, data, vectors, chunk_rows=None))
    return parts[0] if len(parts) == 1 else pl.concat(parts)


# How the chunks are computed: map(fn, shared, pieces) -> the results in order. The default
# is in this process; the nightly hands in one that runs them as Ray tasks on a cluster.
ChunkMap = Callable[
    [Callable[[Any, "ChunkInput"], pl.DataFrame], Any, Iterable["ChunkInput"]],
    Iterator[pl.DataFrame],
]


@dataclass(frozen=True)
class ChunkInput:
    """One chunk's rows: the requests, their feature moments, semantic and extra columns."""

    requests: pl.DataFrame
    at: pl.DataFrame
    semantic: pl.DataFrame | None
    extra: pl.DataFrame | None


def in_process(
    fn: Callable[[Any, ChunkInput], pl.DataFrame], shared: Any, pieces: Iterable[ChunkInput]
) -> Iterator[pl.DataFrame]:
    """The default ChunkMap: one chunk after another, here."""
    return (fn(shared, piece) for piece in pieces)


def chunk_frame(shared: tuple[FeatureSpec, Events], piece: ChunkInput) -> pl.DataFrame:
    """One chunk of `point_in_time_chunks` (shared: the spec and the prepared event logs)."""
    spec, events = shared
    behaviour = features_as_of(piece.at, events, spec.config).select(spec.base_behavioural)
    out = piece.requests.hstack(behaviour.get_columns())
    if piece.semantic is not None:
        out = out.hstack(piece.semantic.get_columns())
    out = _relative(spec, out, "request_id")
    return out if piece.extra is None else out.with_columns(piece.extra.get_columns())


def point_in_time_chunks(
    spec: FeatureSpec,
    requests: pl.DataFrame,
    data: Dataset,
    vectors: ItemVectors | None,
    *,
    chunk_rows: int | None,
    events: Events | None = None,
    extra: pl.DataFrame | None = None,
    map_chunks: ChunkMap = in_process,
) -> Iterator[pl.DataFrame]:
    """`point_in_time_frame` in consecutive pieces of about `chunk_rows` rows (None: one piece),
    each holding whole requests, so the feature table of a large log never exists at once:
    memory is set by the chunk size. Concatenated, the pieces are exactly
    `point_in_time_frame`'s rows and values: the behavioural counts are per row (the event logs
    prepared once), the semantic columns are computed once for every row (their matrix
    products block by batch shape, so they are not recomputed per piece), and the
    within-request columns see whole requests.

    Requests must be contiguous (every row of a request next to the others) when chunked; a
    DataError says so otherwise. `extra`: columns (same rows as `requests`) set on each piece
    (replacing those of the same name, others appended). `events`: `prepare_events(data)`,
    when the caller has it. `map_chunks`: where the chunks are computed (`ChunkMap`).
    """
    at = _refreshed(spec, requests)
    sem = None if vectors is None else _semantic(spec, at, data.interactions, vectors)
    shared = (spec, events if events is not None else prepare_events(data))

    def piece(lo: int, hi: int) -> ChunkInput:
        def rows(frame: pl.DataFrame | None) -> pl.DataFrame | None:
            return None if frame is None else frame.slice(lo, hi - lo)

        return ChunkInput(requests.slice(lo, hi - lo), at.slice(lo, hi - lo), rows(sem),
                          rows(extra))  # fmt: skip

    bounds = request_chunks(requests["request_id"], chunk_rows)
    return map_chunks(chunk_frame, shared, (piece(lo, hi) for lo, hi in bounds))


def _request_starts(request_ids: pl.Series) -> np.ndarray:
    """The rows where a new run of one request id begins."""
    return np.flatnonzero(request_ids.ne_missing(request_ids.shift(1)).fill_null(True).to_numpy())


def requests_contiguous(request_ids: pl.Series) -> bool:
    """True when every request's rows are next to each other (it can be chunked)."""
    return request_ids.n_unique() == _request_starts(request_ids).size


def chunkable_rows(request_ids: pl.Series, chunk_rows: int | None) -> int | None:
    """`chunk_rows` when the requests can be cut into chunks of that size (their rows
    contiguous, more rows than one chunk), else None: one piece, the same values."""
    if chunk_rows is None or request_ids.len() <= chunk_rows:
        return None
    return chunk_rows if requests_contiguous(request_ids) else None


def request_chunks(request_ids: pl.Series, chunk_rows: int | None) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) of about `chunk_rows` rows each (at least one whole request) that
    split no request. None: one range."""
    n = request_ids.len()
    if chunk_rows is None or n <= chunk_rows:
        return [(0, n)]
    if chunk_rows < 1:
        raise ConfigError(f"chunk_rows must be >= 1, got {chunk_rows}")
    starts = _request_starts(request_ids)
    if request_ids.n_unique() != starts.size:
        raise DataError(
            "features in chunks need each request's rows next to each other; sort the requests "
            "by request_id (keeping their order within a request) first"
        )
    bounds, i = [], 0  # i: the index of the chunk's first request
    while i < starts.size:
        # up to the first request starting chunk_rows or more rows on (one request at least)
        k = max(int(np.searchsorted(starts, starts[i] + chunk_rows)), i + 1)
        bounds.append((int(starts[i]), int(starts[k]) if k < starts.size else n))
        i = k
    return bounds


def _refreshed(spec: FeatureSpec, requests: pl.DataFrame) -> pl.DataFrame:
    """request_id, user_id, item_id and ts moved to the moment the features describe."""
    req = requests.select("request_id", "user_id", "ts", "item_id")
    if spec.refresh == ONLINE:
        return req
    return req.with_columns(spec.at(pl.col("ts")).alias("ts"))


def _relative(spec: FeatureSpec, frame: pl.DataFrame, group_col: str) -> pl.DataFrame:
    base = [c for c in spec.relative_base if c in frame.columns]
    return with_relative(frame, base, group_col)


def semantic_only(
    spec: FeatureSpec, requests: pl.DataFrame, data: Dataset, vectors: ItemVectors
) -> pl.DataFrame:
    """Only the semantic columns of `requests` (point in time, `spec.refresh` applied), e.g. for a
    baseline encoder."""
    return _semantic(spec, _refreshed(spec, requests), data.interactions, vectors)


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

    Each user's rows are one request for the within-request columns, unless `requests` has a
    `request_id` column (e.g. the impression: a storefront's call ranks one impression's list).
    Optional category / subcategory columns give the sections of items the snapshot does not
    know (`features.snapshot_features`), as a request's item texts do.

    `history` (user_id, item_id, ts) is the users' stored history before the cut-off;
    `extra_history` (user_id, item_id) adds items a caller says the user consumed (counted as
    the most recent history).
    """
    as_of: datetime = snapshot.as_of
    given = [g for g in GROUPS if g in requests.columns]  # sections a request carries
    req = requests.select("user_id", "item_id", *given).with_columns(
        pl.col("user_id").alias("request_id"), pl.lit(as_of, dtype=TS).alias("ts")
    )
    out = _snapshot_features(
        snapshot, req.select("user_id", "item_id", *given), extra_history=extra_history
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
    if "request_id" not in requests.columns:
        return _relative(spec, out, "user_id")
    out = out.with_columns(requests["request_id"].alias("__request"))
    return _relative(spec, out, "__request").drop("__request")


def matrix(frame: pl.DataFrame, columns: list[str]) -> np.ndarray:
    """The (n_rows, n_columns) float64 feature matrix of `frame`, nulls as NaN."""
    return frame.select(pl.col(columns).cast(pl.Float64).fill_null(np.nan)).to_numpy()
