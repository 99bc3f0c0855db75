"""Feature snapshots: every statistic as of one moment, for serving and batch scoring.

    build_snapshot(data, as_of, config) -> FeatureSnapshot     (events strictly before as_of)
    snapshot.save(directory); FeatureSnapshot.load(directory)  (Parquet per table + snapshot.json)
    snapshot_features(snapshot, requests, extra_history=...)   -> requests + feature columns

The tables hold raw counts, not features; `snapshot_features` joins them to the requests under
the same raw column names that `point_in_time_features` computes per row, and both call the one
`derive_features`. So for requests at time T, `point_in_time_features` equals
`snapshot_features(build_snapshot(data, T))`.

Tables (counts Float64):
    items             item_id, category, subcategory, published_at, shows_{w}, clicks_{w},
                      interactions_{w} per window, last_click_at, first_seen_at
    users             user_id, shows, clicks, history
    user_category     user_id, category, shows, clicks, history
    user_subcategory  user_id, subcategory, shows, clicks, history
    user_item         user_id, item_id, shows, history
    item_recent       item_id, ts, shows, clicks, interactions: the item events of the last
                      (longest finite) window before as_of, summed per (item, ts), so that
                      `features.live` can slide the windows past as_of (optional on load:
                      snapshots written before it exist)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from features.behavioural import ITEM_META
from features.config import ALL, FeatureConfig
from features.derive import GROUP_TABLES, derive_features, feature_names, prefixed
from features.events import (
    AT,
    GROUPS,
    ITEM_COUNTS,
    Events,
    group_stats,
    item_stats,
    prepare_events,
    user_item_stats,
    user_stats,
)
from features.requests import check_requests
from recsys.data.dataset import Dataset
from recsys.data.schema import TS
from recsys.errors import DataError
from recsys.io import file_digest, write_json, write_parquet

FORMAT_VERSION = 1
MANIFEST = "snapshot.json"
TABLE_NAMES = ("items", "users", *GROUP_TABLES.values(), "user_item")
RECENT = "item_recent"
_OPTIONAL = (RECENT,)
_KEYS = {
    "items": ["item_id"],
    "users": ["user_id"],
    **{table: ["user_id", g] for g, table in GROUP_TABLES.items()},
    "user_item": ["user_id", "item_id"],
}
_HINT = "build one with features.build_snapshot(data, as_of, config).save(directory)"


def as_utc(moment: datetime, name: str) -> datetime:
    """`moment` in UTC; a naive datetime is read as UTC (as the dataset tables are)."""
    if not isinstance(moment, datetime):
        raise DataError(f"{name} must be a datetime, got {moment!r}")
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


@dataclass(frozen=True, eq=False)
class FeatureSnapshot:
    """The state of every statistic as of `as_of` (events strictly before it)."""

    as_of: datetime
    config: FeatureConfig
    tables: dict[str, pl.DataFrame] = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "as_of", as_utc(self.as_of, "FeatureSnapshot.as_of"))
        missing = [t for t in TABLE_NAMES if t not in self.tables]
        if missing:
            raise DataError(f"FeatureSnapshot: missing table(s) {missing}; {_HINT}")

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write one Parquet file per table, then snapshot.json (as_of, config, feature names,
        file digests). Each file is written atomically and the manifest last, so a reader sees
        a complete snapshot or an error, never a mix."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        files = {}
        for name in [*TABLE_NAMES, *(t for t in _OPTIONAL if t in self.tables)]:
            path = write_parquet(self.tables[name], out / f"{name}.parquet")
            files[name] = {
                "file": path.name,
                "rows": self.tables[name].height,
                "sha256": file_digest(path),
            }
        manifest = {
            "format_version": FORMAT_VERSION,
            "as_of": self.as_of.isoformat(),
            "config": self.config.to_dict(),
            "feature_names": feature_names(self.config),
            "tables": files,
        }
        write_json(manifest, out / MANIFEST)
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> FeatureSnapshot:
        """Read a saved snapshot; a missing, changed or foreign file is a DataError naming it."""
        d = Path(directory)
        manifest = _read_manifest(d / MANIFEST)
        config = FeatureConfig.from_dict(manifest["config"])
        if manifest.get("feature_names") != feature_names(config):
            raise DataError(
                f"{d / MANIFEST}: its feature names differ from this version's for the same "
                f"config; rebuild the snapshot ({_HINT})"
            )
        tables = {}
        for name in TABLE_NAMES:
            entry = manifest["tables"].get(name)
            path = d / (entry["file"] if entry else f"{name}.parquet")
            if entry is None or not path.is_file():
                raise DataError(f"{path}: snapshot table missing; {_HINT}")
            if file_digest(path) != entry["sha256"]:
                raise DataError(
                    f"{path}: contents differ from the digest in {MANIFEST} (partly "
                    f"overwritten?); save the snapshot again ({_HINT})"
                )
            tables[name] = pl.read_parquet(path)
        for name in _OPTIONAL:
            entry = manifest["tables"].get(name)
            if entry is not None:
                path = d / entry["file"]
                if not path.is_file() or file_digest(path) != entry["sha256"]:
                    raise DataError(f"{path}: snapshot table missing or changed; {_HINT}")
                tables[name] = pl.read_parquet(path)
        return cls(datetime.fromisoformat(manifest["as_of"]), config, tables)


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: file missing; not a feature snapshot directory ({_HINT})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}); {_HINT}") from e
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise DataError(
            f"{path}: snapshot format {version!r}, this version reads {FORMAT_VERSION}; "
            f"rebuild it ({_HINT})"
        )
    return manifest  # type: ignore[no-any-return]


def build_snapshot(
    data: Dataset, as_of: datetime, config: FeatureConfig | None = None
) -> FeatureSnapshot:
    """Every statistic as of `as_of`, from events strictly before it (history with a null ts
    included). Items: the catalogue plus any item seen in events; users and pairs: those with
    an event before as_of (all others read as unknown, i.e. zero counts)."""
    config = config or FeatureConfig()
    as_of = as_utc(as_of, "build_snapshot: as_of")
    events = prepare_events(data)
    at = pl.lit(as_of, dtype=TS).alias(AT)

    def keys_before(log: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
        before = log.filter(pl.col("ts") < at)
        return before.select(keys).unique().sort(keys).with_columns(at)

    items_q = events.items.select("item_id", *ITEM_META).sort("item_id").with_columns(at)
    items = pl.concat(
        [items_q.drop(AT), item_stats(events, items_q, config.windows)], how="horizontal"
    )
    users_q = keys_before(events.user_log, ["user_id"])
    tables = {
        "items": items,
        "users": pl.concat([users_q.drop(AT), user_stats(events, users_q)], how="horizontal"),
    }
    for g in GROUPS:
        q = keys_before(events.group_logs[g], ["user_id", g])
        stats = group_stats(events, q, g)
        tables[GROUP_TABLES[g]] = pl.concat([q.drop(AT), stats], how="horizontal")
    ui_q = keys_before(events.user_item_log, ["user_id", "item_id"])
    tables["user_item"] = pl.concat(
        [ui_q.drop(AT), user_item_stats(events, ui_q)], how="horizontal"
    )
    tables[RECENT] = recent_item_events(events, as_of, config)
    return FeatureSnapshot(as_of, config, tables)


def recent_item_events(events: Events, as_of: datetime, config: FeatureConfig) -> pl.DataFrame:
    """item_id, ts, shows, clicks, interactions: per (item, ts) sums of the item events in
    [start, as_of), start the earliest finite window's start at as_of (empty: no finite window)."""
    starts = [
        pl.select(pl.lit(as_of, dtype=TS).dt.offset_by(f"-{w}")).item()
        for w in config.windows
        if w != ALL
    ]
    log = events.item_log.sort("item_id", "ts")
    per_time = log.select(
        "item_id",
        "ts",
        *[
            (pl.col(c) - pl.col(c).shift(1).over("item_id").fill_null(0.0)).alias(c)
            for c in ITEM_COUNTS
        ],
    )
    if not starts:
        return per_time.clear()
    ts = pl.col("ts")
    window = (ts >= pl.lit(min(starts), dtype=TS)) & (ts < pl.lit(as_of, dtype=TS))
    return per_time.filter(window).sort("ts", "item_id")


def snapshot_features(
    snapshot: FeatureSnapshot,
    requests: pl.DataFrame,
    *,
    extra_history: pl.DataFrame | None = None,
    now: datetime | None = None,
) -> pl.DataFrame:
    """Features of each (user, candidate) row as of the snapshot, for batch scoring or serving.

    requests: user_id, item_id (n rows; request_id and other columns are kept; a ts column is
        ignored); optional category / subcategory columns give an item's group where the
        snapshot has none (an item published after the cut-off whose text and sections a
        request carries): the user's category features then describe it as the offline path,
        which reads every item's sections, does. extra_history: user_id, item_id rows a caller
        says the user consumed (e.g. an API request's history, or events since as_of), with
        the same optional group columns; each row adds one to that user's history, category /
        subcategory history and user_item_history. now: the moment item
        ages and hours since click are measured at (default `snapshot.as_of`); counts stay as
        of `as_of`. Returns the n rows in order with `feature_names(snapshot.config)` appended,
        the same numbers `point_in_time_features` gives for requests at as_of. Unknown users
        and items get zero counts, prior CTRs, zero shares and null ages.
    """
    config = snapshot.config
    where = "snapshot_features"
    check_requests(requests, ("user_id", "item_id"), feature_names(config), where)
    at = as_utc(now, f"{where}: now") if now is not None else snapshot.as_of
    queries = requests.select(
        pl.col("user_id").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        *_given(requests),
    ).with_columns(pl.lit(at, dtype=TS).alias(AT))
    raw = raw_from_snapshot(snapshot, queries, extra_history)
    return requests.hstack(derive_features(raw, config).get_columns())


def _given(frame: pl.DataFrame) -> list[pl.Expr]:
    """A request's own item groups (category, subcategory columns), as `given.<group>`."""
    return [pl.col(g).cast(pl.String).alias(f"given.{g}") for g in GROUPS if g in frame.columns]


def _fill_given(frame: pl.DataFrame, prefix: str) -> pl.DataFrame:
    """`<prefix><group>` filled from `given.<group>` where null, the given columns dropped."""
    given = [g for g in GROUPS if f"given.{g}" in frame.columns]
    return frame.with_columns(
        pl.col(f"{prefix}{g}").fill_null(pl.col(f"given.{g}")) for g in given
    ).drop(f"given.{g}" for g in given)


def raw_from_snapshot(
    snapshot: FeatureSnapshot, queries: pl.DataFrame, extra_history: pl.DataFrame | None
) -> pl.DataFrame:
    """The raw columns `derive_features` reads, for queries (user_id, item_id, AT, optional
    given.<group>), in order."""
    raw = queries
    users = queries["user_id"].unique().implode()
    for name in TABLE_NAMES:
        table = snapshot.tables[name]
        keys = _KEYS[name]
        if "user_id" in keys:  # a scan is cheaper than hashing the whole table in the join
            table = table.filter(pl.col("user_id").is_in(users))
        # The left keys: the request's user and item, and the candidate's category/subcategory.
        left = [k if k in ("user_id", "item_id") else f"items.{k}" for k in keys]
        raw = raw.join(
            prefixed(table, name),
            left_on=left,
            right_on=[f"{name}.{k}" for k in keys],
            how="left",
            maintain_order="left",
        )
        if name == "items":  # the candidate's groups, before the user-group tables join on them
            raw = _fill_given(raw, "items.")
    if extra_history is not None:
        raw = _add_extra_history(raw, snapshot.tables["items"], extra_history)
    return raw


def _add_extra_history(
    raw: pl.DataFrame, items: pl.DataFrame, extra_history: pl.DataFrame
) -> pl.DataFrame:
    missing = [c for c in ("user_id", "item_id") if c not in extra_history.columns]
    if missing:
        raise DataError(
            f"snapshot_features: extra_history lacks column(s) {missing}; give user_id, item_id"
        )
    extra = extra_history.select(
        pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String),
        *_given(extra_history),
    ).join(items.select("item_id", *GROUPS), on="item_id", how="left")  # fmt: skip
    extra = _fill_given(extra, "")
    # (table whose history grows, request-side keys, extra-side keys)
    targets = [
        ("users", ["user_id"], ["user_id"]),
        *[(GROUP_TABLES[g], ["user_id", f"items.{g}"], ["user_id", g]) for g in GROUPS],
        ("user_item", ["user_id", "item_id"], ["user_id", "item_id"]),
    ]
    for table, left, right in targets:
        counts = extra.group_by(right).agg(pl.len().cast(pl.Float64).alias("__extra"))
        col = f"{table}.history"
        raw = (
            raw.join(counts, left_on=left, right_on=right, how="left", maintain_order="left")
            .with_columns(
                (pl.col(col).fill_null(0.0) + pl.col("__extra").fill_null(0.0)).alias(col)
            )
            .drop("__extra")
        )
    return raw
