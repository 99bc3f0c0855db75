"""The nightly's first stages: validate the dataset, split it in time."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from recsys.data import Dataset, read_dataset, validate_dataset
from recsys.data.schema import IMPRESSIONS, INTERACTIONS, ITEMS
from recsys.errors import ConfigError, DataError
from recsys.io import write_json, write_parquet
from recsys.sampling import impressions_from_interactions

from .stages import StageContext, StageResult

MAX_SAMPLED_IMPRESSIONS = 60_000


@dataclass(frozen=True)
class DataSource:
    """A dataset folder, fingerprinted by its content (`recsys.data.dataset_fingerprint`)."""

    path: Path
    fingerprint: str


@dataclass(frozen=True)
class Validated:
    counts: dict[str, int]
    rejects: int
    reject_reasons: list[dict[str, Any]]
    synthesized_impressions: int


@dataclass(frozen=True)
class Split:
    encoder_at: datetime  # the encoder tunes on impressions before it
    valid_at: datetime  # [valid_at, test_at): the validation slice
    test_at: datetime  # the cut-off: test rows at or after it
    first: datetime
    last: datetime


def read_tables(d: Path) -> Dataset:
    return Dataset(
        pl.read_parquet(d / "items.parquet"),
        pl.read_parquet(d / "interactions.parquet"),
        pl.read_parquet(d / "impressions.parquet"),
    )


def sampled_impressions(data: Dataset, negatives: int, seed: int, popular_share: float) -> Dataset:
    """`data` with impressions sampled from its interactions when it has none."""
    if data.impressions.height:
        return data
    imp = impressions_from_interactions(
        data.interactions, data.items, negatives=negatives, max_impressions=MAX_SAMPLED_IMPRESSIONS,
        seed=seed, popular_share=popular_share,
    )  # fmt: skip
    return Dataset(data.items, data.interactions, imp)


def validate(
    ctx: StageContext, source: DataSource, negatives: int, seed: int, popular_share: float
) -> Validated:
    """The dataset's valid rows (rejects set aside with their reasons), with impressions
    sampled from the interactions when the log has none."""
    v = validate_dataset(read_dataset(source.path))
    logged = Dataset.from_validated(v)
    data = sampled_impressions(logged, negatives, seed, popular_share)
    for name in (ITEMS, INTERACTIONS, IMPRESSIONS):
        write_parquet(data.table(name), ctx.work / f"{name}.parquet")
    write_parquet(v.rejects, ctx.work / "rejects.parquet")
    return Validated(
        counts=data.counts(),
        rejects=v.rejects.height,
        reject_reasons=v.reasons().to_dicts(),
        synthesized_impressions=0
        if data is logged
        else data.impressions["impression_id"].n_unique(),
    )


def logged_data(validated: StageResult[Validated]) -> Dataset:
    """The validated tables with logged impressions only: retrieval and list evaluation read
    real shows, never sampled negatives."""
    data = read_tables(validated.path)
    if validated.summary.synthesized_impressions:
        return Dataset(data.items, data.interactions, data.impressions.clear())
    return data


def parse_time(value: str) -> datetime:
    try:
        t = datetime.fromisoformat(value)
    except ValueError as e:
        raise ConfigError(
            f"--split-at {value!r} is not an ISO time; use e.g. 2026-01-15T00:00:00Z"
        ) from e
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def as_time(value: object) -> datetime:
    """A polars datetime scalar as a `datetime` (they always are, for a Datetime column)."""
    if not isinstance(value, datetime):
        raise DataError(f"expected a timestamp, got {value!r}")
    return value


def _quantile_time(ts: pl.Series, q: float) -> datetime:
    return as_time(ts.sort()[min(int(q * ts.len()), ts.len() - 1)])


def split(
    ctx: StageContext,
    validated: StageResult[Validated],
    split_at: str | None,
    test_fraction: float,
    valid_fraction: float,
    encoder_fraction: float,
) -> Split:
    """The cut-off (`split_at`, else the last `test_fraction` of the impressions), the
    validation start before it and the encoder's end before that."""
    ts = read_tables(validated.path).impressions["ts"]
    if ts.len() == 0:
        raise DataError(f"{validated.path}: no impressions or timed interactions to split")
    first, last = as_time(ts.min()), as_time(ts.max())
    test_at = parse_time(split_at) if split_at else _quantile_time(ts, 1.0 - test_fraction)
    before = ts.filter(ts < test_at)
    if before.len() == 0 or ts.filter(ts >= test_at).len() == 0:
        raise ConfigError(
            f"split at {test_at.isoformat()} leaves an empty "
            f"{'train' if before.len() == 0 else 'test'} set: the impressions run from "
            f"{first.isoformat()} to {last.isoformat()}; pick --split-at between them"
        )
    valid_at = _quantile_time(before, 1.0 - valid_fraction)
    if before.filter(before < valid_at).len() == 0:
        raise ConfigError(
            f"split at {test_at.isoformat()} leaves no training data before the validation "
            f"slice (from {valid_at.isoformat()}); pick a later --split-at"
        )
    encoder_at = _quantile_time(before.filter(before < valid_at), encoder_fraction)
    out = Split(encoder_at, valid_at, test_at, first, last)
    write_json({k: t.isoformat() for k, t in vars(out).items()}, ctx.work / "split.json")
    return out


def labelled(impressions: pl.DataFrame, s: Split) -> pl.DataFrame:
    """`impressions` with `split`: train before the validation start, valid before the
    cut-off, test after."""
    part = (
        pl.when(pl.col("ts") < s.valid_at)
        .then(pl.lit("train"))
        .when(pl.col("ts") < s.test_at)
        .then(pl.lit("valid"))
        .otherwise(pl.lit("test"))
    )
    return impressions.with_columns(part.alias("split"))
