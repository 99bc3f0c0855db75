"""Live behavioural state: a bundle's snapshot plus the events after its cut-off, counted as they
arrive, so that features can be taken as of any moment at or after the cut-off.

    live = LiveFeatures(snapshot)
    live.add_item(...), live.add_impression(...), live.add_click(...)   # events, any order
    live.features(user_id, item_ids, at_us, extra_history=...)  -> (n, F) float64, NaN = null

Counting follows `features.events` exactly: every count is of events strictly before the moment;
a window w at t counts [t - w, t) with the window start from polars' `offset_by` (the offline
expression); per key the counts are kept as cumulative rows at each distinct event time (the
rows `events._cumulate` builds), so "before t" is one binary search. The raw columns go through
the one `derive_features`, so a request's features equal `point_in_time_features` on the
dataset that holds the snapshot's events plus these (`tests/test_live.py` checks it to 1e-9).

Events as the offline tables hold them (`recsys.importers.events` maps an event log the same way):
- an impression (request_id, user, ts, items) is one shown row per item at ts;
- a click on an item of an impression the state has seen sets that row's `clicked`, so it counts
  at the impression's ts (the impressions table has no click time); every click is also an
  interaction (history) at the click's own ts;
- an item event gives the item's category, subcategory and published_at (the latest wins).
Events before the cut-off are already in the snapshot (or too late for it) and are ignored here,
so a moment before the cut-off cannot be asked for.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache

import numpy as np
import polars as pl

from features.config import ALL, FeatureConfig
from features.derive import GROUP_TABLES, derive_features, feature_names
from features.events import AT, GROUPS, ITEM_COUNTS, USER_COUNTS, USER_ITEM_COUNTS
from features.snapshot import RECENT, FeatureSnapshot
from recsys.data.schema import TS
from recsys.errors import DataError

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_SHOW, _CLICK, _HISTORY = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)


def epoch_us(t: datetime) -> int:
    return (t - _EPOCH) // _US


def from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


@lru_cache(maxsize=65536)
def window_start(at_us: int, window: str) -> int:
    """at - window by polars' `offset_by` (calendar-aware, as the offline windows)."""
    start = pl.select(pl.lit(from_us(at_us), dtype=TS).dt.offset_by(f"-{window}")).item()
    return epoch_us(start)


def derive_matrix(raw: pl.DataFrame, config: FeatureConfig) -> np.ndarray:
    """`derive_features` of raw rows as a float64 matrix, null as NaN."""
    return derive_features(raw, config).select(pl.all().fill_null(np.nan)).to_numpy()


class _Log:
    """Cumulative counts of one key at each distinct event time, grown one event at a time.

    times ascending; rows[i] the sums of all events with time <= times[i]. An event at the last
    time or later costs O(1); an older one shifts the later rows (rare: late events)."""

    __slots__ = ("rows", "times")

    def __init__(self) -> None:
        self.times: list[int] = []
        self.rows: list[list[float]] = []

    def add(self, t: int, deltas: Sequence[float]) -> None:
        times, rows = self.times, self.rows
        i = bisect_left(times, t)
        if i == len(times) or times[i] != t:
            times.insert(i, t)
            rows.insert(i, list(rows[i - 1]) if i else [0.0] * len(deltas))
        for row in rows[i:]:
            for j, d in enumerate(deltas):
                row[j] += d

    def before(self, t: int) -> list[float] | None:
        """The sums of the events strictly before t (None: none)."""
        i = bisect_left(self.times, t)
        return self.rows[i - 1] if i else None


@dataclass
class _Impression:
    user_id: str
    ts: int
    items: frozenset[str]


class LiveFeatures:
    """The state behind online features (see the module doc). Not thread-safe: the caller
    serialises writers against readers (serving holds one lock around both)."""

    def __init__(self, snapshot: FeatureSnapshot) -> None:
        self.snapshot = snapshot
        self.config = snapshot.config
        self.cutoff_us = epoch_us(snapshot.as_of)
        self.names = feature_names(self.config)
        self.windows = [w for w in self.config.windows if w != ALL]
        index = snapshot.index()
        self._index = index
        items = snapshot.tables["items"]
        self.meta: dict[str, tuple[str | None, str | None, int | None]] = {
            i: (c, s, epoch_us(p) if p is not None else None)
            for i, c, s, p in items.select(
                "item_id", "category", "subcategory", "published_at"
            ).iter_rows()
        }
        self._base_all: dict[str, tuple[float, ...]] = {}
        if ALL in self.config.windows:
            cols = [f"{c}_{ALL}" for c in ITEM_COUNTS]
            self._base_all = {
                r[0]: tuple(r[1:]) for r in items.select("item_id", *cols).iter_rows()
            }
        self._base_last_click = {
            i: epoch_us(t)
            for i, t in items.select("item_id", "last_click_at").drop_nulls().iter_rows()
        }
        self._base_first_seen = {
            i: epoch_us(t)
            for i, t in items.select("item_id", "first_seen_at").drop_nulls().iter_rows()
        }
        self.item_log: dict[str, _Log] = {}
        recent = snapshot.tables.get(RECENT)
        if recent is None and self.windows:
            raise DataError(
                "the bundle's feature snapshot has no item_recent table (written before live "
                "features existed); rebuild the bundle with this version's nightly"
            )
        if recent is not None:
            for item, ts, *deltas in recent.sort("ts").iter_rows():
                self.item_log.setdefault(item, _Log()).add(epoch_us(ts), deltas)
        self._clicks_at: dict[str, list[int]] = {}  # item -> live click times (impression ts)
        self._first_live: dict[str, int] = {}
        self.users: dict[str, _Log] = {}
        self.groups: dict[str, dict[tuple[str, str], _Log]] = {g: {} for g in GROUPS}
        self.user_items: dict[tuple[str, str], _Log] = {}
        self.impressions: dict[str, _Impression] = {}
        self._clicked: set[tuple[str, str]] = set()
        # user -> [(ts, seq, item)] live history, sorted; seq keeps arrival order within a ts
        self.history: dict[str, list[tuple[int, int, str]]] = {}
        self._seq = 0
        self._codes = {
            g: {v: k for k, v in enumerate(items[g].drop_nulls().unique().sort().to_list())}
            for g in GROUPS
        }

    # ------------------------------------------------------------------ events

    def add_item(
        self,
        item_id: str,
        category: str | None,
        subcategory: str | None,
        published_at_us: int | None,
    ) -> None:
        self.meta[item_id] = (category, subcategory, published_at_us)

    def add_impression(
        self, request_id: str, user_id: str, ts_us: int, items: Sequence[str]
    ) -> bool:
        """Count one shown list; False (nothing counted) when it is before the cut-off or its
        request_id was seen already."""
        if ts_us < self.cutoff_us or request_id in self.impressions:
            return False
        self.impressions[request_id] = _Impression(user_id, ts_us, frozenset(items))
        for item in items:
            self._count(user_id, item, ts_us, _SHOW)
        return True

    def add_click(self, user_id: str, item_id: str, ts_us: int, request_id: str | None) -> None:
        """A click: the shown row's click (at the impression's ts) when `request_id` names an
        impression of this user that showed the item, and one history item at ts_us."""
        imp = self.impressions.get(request_id) if request_id is not None else None
        if (
            imp is not None
            and imp.user_id == user_id
            and item_id in imp.items
            and (request_id, item_id) not in self._clicked
        ):
            assert request_id is not None
            self._clicked.add((request_id, item_id))
            self._count(user_id, item_id, imp.ts, _CLICK)
            insort(self._clicks_at.setdefault(item_id, []), imp.ts)
        if ts_us < self.cutoff_us:
            return
        self._count(user_id, item_id, ts_us, _HISTORY)
        self._seq += 1
        insort(self.history.setdefault(user_id, []), (ts_us, self._seq, item_id))

    def _count(self, user_id: str, item_id: str, ts: int, deltas: tuple[float, ...]) -> None:
        """One event in every log it counts in (the keys of `events.prepare_events`)."""
        self.item_log.setdefault(item_id, _Log()).add(ts, deltas)
        if ts < self._first_live.get(item_id, ts + 1):
            self._first_live[item_id] = ts
        self.users.setdefault(user_id, _Log()).add(ts, deltas)
        meta = self.meta.get(item_id, (None, None, None))
        for g, value in zip(GROUPS, meta[:2], strict=True):
            if value is not None:
                self.groups[g].setdefault((user_id, value), _Log()).add(ts, deltas)
        self.user_items.setdefault((user_id, item_id), _Log()).add(ts, (deltas[0], deltas[2]))

    def history_before(self, user_id: str, at_us: int) -> list[tuple[int, str]]:
        """The user's live history strictly before at_us: (ts, item_id), oldest first."""
        rows = self.history.get(user_id, [])
        end = bisect_left(rows, (at_us, -1, ""))
        return [(t, i) for t, _, i in rows[:end]]

    # ------------------------------------------------------------------ features

    def features(
        self,
        user_id: str | None,
        item_ids: Sequence[str],
        at_us: int,
        extra_history: Sequence[str] = (),
    ) -> np.ndarray:
        """(len(item_ids), F) float64 in `feature_names` order as of at_us (>= the cut-off),
        NaN where `derive_features` gives null. extra_history: items the caller says the user
        consumed, each one more history item (as `snapshot_features`' extra_history)."""
        return derive_matrix(self.raw(user_id, item_ids, at_us, extra_history), self.config)

    def raw(
        self,
        user_id: str | None,
        item_ids: Sequence[str],
        at_us: int,
        extra_history: Sequence[str] = (),
    ) -> pl.DataFrame:
        """The raw columns `derive_features` reads (see features/derive.py), one row per item."""
        if at_us < self.cutoff_us:
            raise DataError(
                f"at {from_us(at_us).isoformat()} is before the bundle's cut-off "
                f"{self.snapshot.as_of.isoformat()}; live features start there"
            )
        n = len(item_ids)
        cols: dict[str, list[object]] = {}
        meta: list[tuple[str | None, str | None, int | None]] = [
            self.meta.get(i, (None, None, None)) for i in item_ids
        ]
        cols["items.category"] = [m[0] for m in meta]
        cols["items.subcategory"] = [m[1] for m in meta]
        cols["items.published_at"] = [m[2] for m in meta]
        starts = {w: window_start(at_us, w) for w in self.windows}
        for w in self.config.windows:
            for c in ITEM_COUNTS:
                cols[f"items.{c}_{w}"] = []
        last_click: list[int | None] = []
        first_seen: list[int | None] = []
        for item in item_ids:
            log = self.item_log.get(item)
            now = (log.before(at_us) if log is not None else None) or (0.0, 0.0, 0.0)
            for w in self.config.windows:
                if w == ALL:
                    cut = (log.before(self.cutoff_us) if log is not None else None) or (0.0,) * 3
                    base = self._base_all.get(item, (0.0, 0.0, 0.0))
                    vals = [b + x - y for b, x, y in zip(base, now, cut, strict=True)]
                else:
                    start = (log.before(starts[w]) if log is not None else None) or (0.0,) * 3
                    vals = [x - y for x, y in zip(now, start, strict=True)]
                for c, v in zip(ITEM_COUNTS, vals, strict=True):
                    cols[f"items.{c}_{w}"].append(v)
            clicks = self._clicks_at.get(item, [])
            j = bisect_left(clicks, at_us)
            last_click.append(clicks[j - 1] if j else self._base_last_click.get(item))
            first = self._base_first_seen.get(item, self._first_live.get(item))
            first_seen.append(first if first is not None and first < at_us else None)
        cols["items.last_click_at"] = last_click  # type: ignore[assignment]
        cols["items.first_seen_at"] = first_seen  # type: ignore[assignment]

        extra_meta = [self.meta.get(i, (None, None, None)) for i in extra_history]
        user = self._user_counts(user_id, at_us)
        user[2] += len(extra_history)
        for c, v in zip(USER_COUNTS, user, strict=True):
            cols[f"users.{c}"] = [v] * n
        for gi, g in enumerate(GROUPS):
            table = GROUP_TABLES[g]
            found: dict[str, list[float]] = {}
            for value in {str(m[gi]) for m in meta if m[gi] is not None}:
                counts = self._group_counts(user_id, g, value, at_us)
                counts[2] += sum(1 for m in extra_meta if m[gi] == value)
                found[value] = counts
            for k, c in enumerate(USER_COUNTS):
                cols[f"{table}.{c}"] = [
                    found[str(m[gi])][k] if m[gi] is not None else None for m in meta
                ]
        pairs = [self._user_item_counts(user_id, i, at_us) for i in item_ids]
        if extra_history:
            for p, item in zip(pairs, item_ids, strict=True):
                p[1] += sum(1 for h in extra_history if h == item)
        for k, c in enumerate(USER_ITEM_COUNTS):
            cols[f"user_item.{c}"] = [p[k] for p in pairs]

        schema: dict[str, pl.DataType] = {c: pl.Float64() for c in cols}
        for c in ("items.category", "items.subcategory"):
            schema[c] = pl.String()
        for c in ("items.published_at", "items.last_click_at", "items.first_seen_at"):
            schema[c] = pl.Int64()
        frame = pl.DataFrame(cols, schema=schema)
        return frame.with_columns(
            pl.lit(from_us(at_us), dtype=TS).alias(AT),
            *[
                pl.from_epoch(pl.col(c), time_unit="us").dt.replace_time_zone("UTC").alias(c)
                for c in ("items.published_at", "items.last_click_at", "items.first_seen_at")
            ],
        )

    def _user_counts(self, user_id: str | None, at_us: int) -> list[float]:
        idx = self._index
        row = idx.user_row.get(user_id) if user_id is not None else None
        base = idx.user_counts[row].tolist() if row is not None else [0.0, 0.0, 0.0]
        log = self.users.get(user_id) if user_id is not None else None
        live = (log.before(at_us) if log is not None else None) or (0.0, 0.0, 0.0)
        return [b + x for b, x in zip(base, live, strict=True)]

    def _group_counts(self, user_id: str | None, g: str, value: str, at_us: int) -> list[float]:
        if user_id is None:
            return [0.0, 0.0, 0.0]
        idx = self._index
        base = [0.0, 0.0, 0.0]
        row, code = idx.user_row.get(user_id), self._codes[g].get(value)
        if row is not None and code is not None:
            keys, values = idx.user_groups[g].of(row)
            at = int(np.searchsorted(keys, code))
            if at < len(keys) and keys[at] == code:
                base = values[at].tolist()
        log = self.groups[g].get((user_id, value))
        live = (log.before(at_us) if log is not None else None) or (0.0, 0.0, 0.0)
        return [b + x for b, x in zip(base, live, strict=True)]

    def _user_item_counts(self, user_id: str | None, item_id: str, at_us: int) -> list[float]:
        if user_id is None:
            return [0.0, 0.0]
        idx = self._index
        base = [0.0, 0.0]
        row, item_row = idx.user_row.get(user_id), idx.item_row.get(item_id)
        if row is not None and item_row is not None:
            keys, values = idx.user_items.of(row)
            at = int(np.searchsorted(keys, item_row))
            if at < len(keys) and keys[at] == item_row:
                base = values[at].tolist()
        log = self.user_items.get((user_id, item_id))
        live = (log.before(at_us) if log is not None else None) or (0.0, 0.0)
        return [b + x for b, x in zip(base, live, strict=True)]
