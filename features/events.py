"""Event logs prepared for point-in-time counting, and the counts as of any moment.

Every statistic the features use is a count of events *strictly before* a moment t (or in a
window [t - w, t)). We keep, per key (an item, a user, a user and category, ...), the cumulative
counts at each distinct event time, sorted by time; the counts before t are then one backward
as-of join with exact matches excluded, so events at exactly t (the other items of the same
impression, the click that the label records) never count. The same functions answer per
training row (each request's own ts) and for a snapshot (every key at one `as_of`): that is the
one definition shared by training and serving.

History with no timestamp (interactions from before the log) gets the time `BEFORE_ALL`, so it
counts before every request and falls out of every finite window.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import polars as pl

from features.config import ALL
from recsys.data.dataset import Dataset
from recsys.data.schema import TS

BEFORE_ALL = datetime(1, 1, 1, tzinfo=UTC)
AT = "__t"  # the column of a query frame holding the moment its counts are taken at
_Q = "__q"
_AT = "__at"

# The counts each log keeps (Float64 column names in the logs and the snapshot tables).
# Interactions count one each: their `weight` is not used.
ITEM_COUNTS = ("shows", "clicks", "interactions")
USER_COUNTS = ("shows", "clicks", "history")
USER_ITEM_COUNTS = ("shows", "history")
GROUPS = ("category", "subcategory")


@dataclass(frozen=True)
class Events:
    """Cumulative event logs of one dataset (each sorted by ts; counts are Float64).

    items: item_id, category, subcategory, published_at, first_seen_at (earliest timestamped
        impression or interaction, null when none) - one row per catalogue or event item.
    item_log: item_id, ts, shows, clicks, interactions, last_click_at - counts up to and
        including ts.
    user_log: user_id, ts, shows, clicks, history.
    group_logs: {"category": user_id, category, ts, shows, clicks, history; "subcategory": ...}.
    user_item_log: user_id, item_id, ts, shows, history.
    """

    items: pl.DataFrame
    item_log: pl.DataFrame
    user_log: pl.DataFrame
    group_logs: dict[str, pl.DataFrame]
    user_item_log: pl.DataFrame


def prepare_events(data: Dataset) -> Events:
    """Build the cumulative logs of `data` (impressions and interactions may be empty)."""
    meta = data.items.select("item_id", "category", "subcategory", "published_at")
    shown = data.impressions.select(
        "user_id",
        "item_id",
        "ts",
        pl.lit(1.0).alias("shows"),
        pl.col("clicked").cast(pl.Float64).alias("clicks"),
        pl.lit(0.0).alias("history"),
        pl.when(pl.col("clicked")).then(pl.col("ts")).alias("click_at"),
    )
    consumed = data.interactions.select(
        "user_id",
        "item_id",
        pl.col("ts").fill_null(pl.lit(BEFORE_ALL, dtype=TS)),
        pl.lit(0.0).alias("shows"),
        pl.lit(0.0).alias("clicks"),
        pl.lit(1.0).alias("history"),
    )
    events = pl.concat([shown, consumed], how="diagonal").join(
        meta.select("item_id", *GROUPS), on="item_id", how="left"
    )

    first_seen = (
        events.filter(pl.col("ts") > pl.lit(BEFORE_ALL, dtype=TS))
        .group_by("item_id")
        .agg(pl.col("ts").min().alias("first_seen_at"))
    )
    event_items = events.select("item_id").unique()
    items = (
        pl.concat([meta, event_items], how="diagonal")
        .unique("item_id", keep="first", maintain_order=True)
        .join(first_seen, on="item_id", how="left")
    )

    item_log = _cumulate(
        events.rename({"history": "interactions"}),
        ["item_id"],
        ITEM_COUNTS,
        extra=[pl.col("click_at").max().alias("last_click_at")],
    ).with_columns(pl.col("last_click_at").forward_fill().over("item_id"))
    group_logs = {
        g: _cumulate(events.filter(pl.col(g).is_not_null()), ["user_id", g], USER_COUNTS)
        for g in GROUPS
    }
    return Events(
        items=items,
        item_log=item_log,
        user_log=_cumulate(events, ["user_id"], USER_COUNTS),
        group_logs=group_logs,
        user_item_log=_cumulate(events, ["user_id", "item_id"], USER_ITEM_COUNTS),
    )


def _cumulate(
    events: pl.DataFrame,
    keys: list[str],
    counts: tuple[str, ...],
    extra: list[pl.Expr] | None = None,
) -> pl.DataFrame:
    """Per key and distinct ts: the counts of all events up to and including ts; sorted by ts.

    Events sharing a ts are summed first, so an as-of lookup never lands inside a group of
    simultaneous events.
    """
    per_time = events.group_by([*keys, "ts"]).agg(
        *[pl.col(c).sum() for c in counts], *(extra or [])
    )
    return (
        per_time.sort([*keys, "ts"])
        .with_columns(pl.col(c).cum_sum().over(keys) for c in counts)
        .sort("ts")
    )


def _before(
    queries: pl.DataFrame, log: pl.DataFrame, by: list[str], at: pl.Expr, cols: list[str]
) -> pl.DataFrame:
    """`cols` of the last `log` row of each query's key strictly before `at`, in query order.

    queries: a frame with the `by` columns, `AT` and `_Q` (its row index). Null where the key
    has no event before `at` (or the key is null).
    """
    left = queries.select(_Q, *by, at.alias(_AT)).sort(_AT)
    found = left.join_asof(
        log.select(*by, "ts", *cols),
        left_on=_AT,
        right_on="ts",
        by=by,
        allow_exact_matches=False,
        check_sortedness=False,  # both sides are sorted by time above
    )
    return found.sort(_Q).select(cols)


def _window_start(window: str) -> pl.Expr:
    return pl.col(AT).dt.offset_by(f"-{window}")


def item_stats(events: Events, queries: pl.DataFrame, windows: tuple[str, ...]) -> pl.DataFrame:
    """Item counts as of each query row.

    queries: item_id, AT (n rows). Returns n rows in query order: shows_{w}, clicks_{w},
    interactions_{w} for each window w (Float64, 0 when none), last_click_at and first_seen_at
    (null when no click / no timestamped event before AT).
    """
    q = queries.select("item_id", AT).with_row_index(_Q)
    cols = [*ITEM_COUNTS, "last_click_at"]
    now = _before(q, events.item_log, ["item_id"], pl.col(AT), cols)
    out = {"last_click_at": now["last_click_at"]}
    totals = {c: now[c].fill_null(0.0) for c in ITEM_COUNTS}
    for w in windows:
        if w == ALL:
            for c in ITEM_COUNTS:
                out[f"{c}_{w}"] = totals[c]
            continue
        earlier = _before(q, events.item_log, ["item_id"], _window_start(w), list(ITEM_COUNTS))
        for c in ITEM_COUNTS:
            out[f"{c}_{w}"] = totals[c] - earlier[c].fill_null(0.0)
    first = q.join(events.items.select("item_id", "first_seen_at"), on="item_id", how="left").sort(
        _Q
    )
    out["first_seen_at"] = first.select(
        pl.when(pl.col("first_seen_at") < pl.col(AT)).then(pl.col("first_seen_at"))
    ).to_series()
    names = [f"{c}_{w}" for w in windows for c in ITEM_COUNTS]
    return pl.DataFrame([out[n].alias(n) for n in [*names, "last_click_at", "first_seen_at"]])


def user_stats(events: Events, queries: pl.DataFrame) -> pl.DataFrame:
    """queries: user_id, AT. Returns shows, clicks (impressions), history (interactions)."""
    return _counts(events.user_log, queries, ["user_id"], USER_COUNTS)


def group_stats(events: Events, queries: pl.DataFrame, group: str) -> pl.DataFrame:
    """queries: user_id, `group` (category or subcategory), AT. Returns shows, clicks, history
    of the user on items of that group (0 when none, or when the group is null)."""
    return _counts(events.group_logs[group], queries, ["user_id", group], USER_COUNTS)


def user_item_stats(events: Events, queries: pl.DataFrame) -> pl.DataFrame:
    """queries: user_id, item_id, AT. Returns shows (times shown to the user), history."""
    return _counts(events.user_item_log, queries, ["user_id", "item_id"], USER_ITEM_COUNTS)


def _counts(
    log: pl.DataFrame, queries: pl.DataFrame, by: list[str], counts: tuple[str, ...]
) -> pl.DataFrame:
    q = queries.select(*by, AT).with_row_index(_Q)
    found = _before(q, log, by, pl.col(AT), list(counts))
    return found.select(pl.col(c).fill_null(0.0) for c in counts)


def longest_gap_seconds(times: pl.Series, until: datetime, days: float = 7.0) -> float | None:
    """The longest wait, in seconds, between consecutive distinct event times of the `days`
    before `until` (the wait from the last of them to `until` included): how long this log's
    event feed has gone quiet while it worked. None when fewer than two times fall there.

    A live server sizes its "no event for too long" limit from it (`live_lag_seconds`)."""
    t = times.drop_nulls()
    if t.dtype != TS:
        t = t.cast(TS)
    start = until - timedelta(days=days)
    t = t.filter((t >= start) & (t < until)).unique().sort()
    if t.len() < 2:
        return None
    t = t.append(pl.Series([until], dtype=TS))
    gaps = t.diff().drop_nulls().dt.total_microseconds()
    return float(gaps.max()) / 1e6  # type: ignore[arg-type]


# the live state is stale after this many times the log's longest quiet spell (at least
# LIVE_LAG_FLOOR seconds): a feed that works goes quiet that long, twice that long is an outage
LIVE_LAG_FACTOR = 2.0
LIVE_LAG_FLOOR = 60.0


def live_lag_seconds(times: pl.Series, until: datetime) -> float | None:
    """The default limit (seconds) of a live server's silence: LIVE_LAG_FACTOR x the longest
    gap between the event `times` (a log's impressions and interactions) in the last week
    before `until`, at least LIVE_LAG_FLOOR; None when too few dated events say."""
    gap = longest_gap_seconds(times, until)
    return None if gap is None else max(LIVE_LAG_FACTOR * gap, LIVE_LAG_FLOOR)
