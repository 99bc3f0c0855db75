"""Evaluation of rankers on logged impressions: the models compared, their scores through the
`Scorer` contract, the ship choice between the two rankers, and the notes printed beside tables.

Pure: frames in, frames and dicts out. The nightly job (`pipelines/`) and `recsys evaluate` call
these; nothing here reads files or knows about stages.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np
import polars as pl

from features.config import ALL
from recsys.baselines import ColumnScorer, LGBMScorer, PopularityScorer, RandomScorer, Scorer
from recsys.baselines import add_scores as _add_scores
from recsys.bundle import Bundle
from recsys.data import Dataset
from recsys.errors import DataError
from recsys.featurize import (
    ONLINE,
    FeatureSpec,
    chunkable_rows,
    matrix,
    point_in_time_chunks,
)
from recsys.metrics import impression_metrics
from recsys.ranker import Ranker

__all__ = [
    "BASELINES",
    "BATCH",
    "MODELS",
    "MODES",
    "RANKERS",
    "baseline_scorers",
    "batch_moments",
    "finetune_note",
    "freshness_note",
    "gate_scores",
    "model_scorers",
    "ranker_spec",
    "requests",
    "score_chunks",
    "score_rows",
    "ship_choice",
    "valid_auc",
]

# Every model of the evaluation table, in its order.
MODELS = (
    "random",
    "popularity",
    "smoothed_ctr",
    "recent_clicks",
    "semantic_frozen",
    "semantic_tuned",
    "lgbm_behavioural",
    "lgbm_full",
)
# The simple baselines every model is compared with (paired, per impression).
BASELINES = ("random", "popularity", "smoothed_ctr", "recent_clicks")
# The two rankers a nightly trains per freshness mode.
RANKERS = ("lgbm_full", "lgbm_behavioural")
# Feature freshness modes, each with its own rankers and table (see freshness_note).
BATCH = "batch"
MODES = (BATCH, ONLINE)


def _popularity(frame: pl.DataFrame) -> np.ndarray:
    """Positive interactions (all time) before the impression, then clicks."""
    pop = frame["item_interactions_all"].fill_null(0).fill_nan(0).cast(pl.Float64)
    clicks = frame["item_clicks_all"].fill_null(0).fill_nan(0).cast(pl.Float64)
    return (pop + 1e-3 * clicks).to_numpy()


def _window(spec: FeatureSpec, window: str) -> str:
    """`window` if configured, else the configured one nearest to it (the longest for ALL)."""
    windows = list(spec.config.windows)
    return window if window in windows else windows[-1 if window == ALL else 0]


def baseline_scorers(spec: FeatureSpec, seed: int) -> list[Scorer]:
    """The BASELINES as scorers over a feature frame of `spec`: random, popularity, smoothed CTR
    over all time, clicks in the last 24 hours."""
    return [
        RandomScorer(seed=seed),
        PopularityScorer(_popularity),
        ColumnScorer("smoothed_ctr", f"item_ctr_{_window(spec, ALL)}"),
        ColumnScorer("recent_clicks", f"item_clicks_{_window(spec, '24h')}"),
    ]


def model_scorers(spec: FeatureSpec, rankers: Mapping[str, Ranker], seed: int) -> list[Scorer]:
    """Every model of MODELS (the rankers of `rankers`, by name) as scorers over a feature frame
    holding `sem_cos_mean` and `sem_cos_mean_frozen`; a missing cosine scores -1."""
    return [
        *baseline_scorers(spec, seed),
        ColumnScorer("semantic_frozen", "sem_cos_mean_frozen", fill_value=-1.0),
        ColumnScorer("semantic_tuned", "sem_cos_mean", fill_value=-1.0),
        *(LGBMScorer(name, r) for name, r in rankers.items()),
    ]


def score_rows(frame: pl.DataFrame, scorers: Sequence[Scorer]) -> pl.DataFrame:
    """impression_id, user_id, item_id, clicked and one Float64 score column per scorer for the
    feature rows of `frame` (request_id, user_id, item_id, clicked and the feature columns)."""
    keys = frame.select(
        pl.col("request_id").alias("impression_id"), "user_id", "item_id", "clicked"
    )
    scored = _add_scores(frame, scorers)
    return keys.with_columns(scored.select(s.name for s in scorers))


def score_chunks(chunks: Iterable[pl.DataFrame], scorers: Sequence[Scorer]) -> pl.DataFrame:
    """`score_rows` of the chunks' rows, one chunk at a time (memory holds one chunk's features
    and everyone's scores): the same scores as the rows scored as one frame, since every scorer
    scores a row alone (the random baseline goes on with its stream at each chunk's offset)."""
    parts, offset = [], 0
    for chunk in chunks:
        placed = [
            dataclasses.replace(s, offset=offset) if isinstance(s, RandomScorer) else s
            for s in scorers
        ]
        parts.append(score_rows(chunk, placed))
        offset += chunk.height
    if not parts:
        raise DataError("score_chunks: no chunk of rows to score")
    return pl.concat(parts) if len(parts) > 1 else parts[0]


def requests(impressions: pl.DataFrame) -> pl.DataFrame:
    """Impression rows as feature requests: request_id, user_id, ts, item_id."""
    return impressions.select(
        pl.col("impression_id").alias("request_id"), "user_id", "ts", "item_id"
    )


def batch_moments(
    req: pl.DataFrame, imp: pl.DataFrame, spec: FeatureSpec, valid_at: datetime, cutoff: datetime
) -> pl.DataFrame:
    """`req` with ts moved to the moment its batch features describe: the cut-off for test rows,
    the validation start for validation rows (a bundle built then serves them), the start of the
    `spec.refresh` period for training rows. `imp`: the same rows with their `split`."""
    utc = pl.Datetime("us", "UTC")
    moment = (
        pl.when(imp["split"] == "test")
        .then(pl.lit(cutoff, dtype=utc))
        .when(imp["split"] == "valid")
        .then(pl.lit(valid_at, dtype=utc))
        .otherwise(spec.at(pl.col("ts")))
    )
    return req.with_columns(moment.alias("ts"))


def valid_auc(valid: pl.DataFrame, ranker: Ranker) -> float:
    """The mean per-impression AUC of `ranker` on the feature rows `valid`."""
    scores = valid.select(pl.col("request_id").alias("impression_id"), "clicked")
    return impression_metrics(scores.with_columns(pl.Series("score", ranker.predict(valid))))["auc"]


def ranker_spec(spec: FeatureSpec, name: str) -> FeatureSpec:
    """The feature spec the named ranker reads: the behavioural ranker's has no semantic
    columns (so serving computes none per request)."""
    return spec if name == "lgbm_full" else dataclasses.replace(spec, use_semantic=False)


def ship_choice(
    auc_diff: float, auc_diff_se: float, use_semantic: bool, margin_se: float, ship: str = "auto"
) -> tuple[str, str]:
    """(the ranker to ship, why): `lgbm_full` only when its paired AUC gain over
    `lgbm_behavioural` on the gate slice (the test impressions) is more than `margin_se`
    standard errors; else the behavioural ranker, which needs no text encoder per request and
    is as good within the noise (fail closed: the more complex model must earn its place).
    `ship` (pipeline.ship) other than "auto" names the ranker to ship whatever the numbers."""
    if not use_semantic:
        return "lgbm_behavioural", "semantic features are off (pipeline.use_semantic = false)"
    gain = f"lgbm_full - lgbm_behavioural AUC {auc_diff:+.4f} (se {auc_diff_se:.4f})"
    if ship != "auto":
        return ship, f"pipeline.ship = {ship!r} ({gain})"
    if math.isfinite(auc_diff) and auc_diff > margin_se * auc_diff_se and auc_diff > 0:
        return "lgbm_full", f"{gain}, more than {margin_se:g} se"
    return "lgbm_behavioural", (
        f"{gain}, not more than {margin_se:g} se (tracking.promote_margin_se): the semantic "
        "half does not pay for itself on this data"
    )


def finetune_note(summary: Mapping[str, Any], method: str) -> str:
    """One line on what fine-tuning shipped: the chosen epoch, or the frozen fallback."""
    if method == "none":
        return "[finetune] method none: the frozen encoder"
    scores = summary.get("val_scores") or []
    shown = ", ".join(f"{x:.4f}" for x in scores)
    if summary.get("fell_back"):
        return (
            f"[finetune] no epoch beat the frozen encoder on validation (AUC per epoch, frozen "
            f"first: {shown}): the frozen encoder is used"
        )
    best = summary.get("best_epoch")
    return f"[finetune] shipped epoch {best} (validation AUC per epoch, frozen first: {shown})"


def freshness_note(
    mode: str, spec: FeatureSpec, cutoff: datetime, chosen_from: Mapping[str, Any] | None = None
) -> str:
    """Which feature freshness a mode's evaluation numbers assume (printed with its table);
    `chosen_from`: the candidate periods' validation scores, when the period was chosen."""
    if mode == ONLINE:
        return (
            "online: every test impression's features as of its own moment (what /v1/rank "
            "serves when POST /v1/events keeps the state fresh); the ranker trained the same way"
        )
    trained = (
        f"refreshed every {spec.refresh} (each row as of the start of its period)"
        if spec.refresh != ONLINE
        else "as of each row's moment"
    )
    if chosen_from and len(chosen_from) > 1:
        trained += (
            f", the period chosen among {', '.join(chosen_from)} on the validation rows as of "
            "the validation start"
        )
    return (
        f"batch: every test impression's features as of the cut-off {cutoff.isoformat()} "
        f"(what the nightly lists and an API without events serve); the ranker trained on "
        f"features {trained}"
    )


def gate_scores(
    bundle_path: str | os.PathLike[str],
    data: Dataset,
    imp: pl.DataFrame,
    refresh: str,
    *,
    chunk_rows: int | None = None,
) -> pl.DataFrame:
    """A bundle's ranker scores on the promotion gate's slice, the rows of `imp` whose split is
    test (impression_id, clicked, score), with features at freshness `refresh` whatever the
    bundle was trained for, so that champion and challenger are compared as they would be
    served. `chunk_rows`: the features are computed and scored that many rows at a time
    (`point_in_time_chunks`; the scores are the same), None: at once."""
    bundle = Bundle.load(bundle_path)
    spec = dataclasses.replace(bundle.spec, refresh=refresh)
    rows = imp.filter(pl.col("split") == "test")
    vectors = bundle.vectors if spec.use_semantic else None
    req = requests(rows)
    chunks = chunkable_rows(req["request_id"], chunk_rows)
    frames = point_in_time_chunks(spec, req, data, vectors, chunk_rows=chunks)
    scores = [bundle.ranker.predict(matrix(frame, spec.columns)) for frame in frames]
    return rows.select("impression_id", "clicked").with_columns(
        pl.Series("score", np.concatenate(scores))
    )
