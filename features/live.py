"""Live behavioural state: a bundle's snapshot plus the events after its cut-off, counted as they
arrive, so that features can be taken as of any moment at or after the cut-off.

    live = LiveFeatures(snapshot)
    live.add_item(...), live.add_impression(...), live.add_click(...)   # events, any order
    live.features(user_id, item_ids, at_us, extra_history=...)  -> (n, F) float64, NaN = null

Counting follows `features.events` exactly: every count is of events strictly before the moment;
a window w at t counts [t - w, t) with the window start from polars' `offset_by` (the offline
expression); per key the counts are kept as cumulative rows at each distinct event time (the
rows `events._cumulate` builds), so "before t" is one binary search. The raw columns go through
`derive_numpy`, the numpy twin of `derive_features` (same bits, tests/test_features.py), so a
request's features equal `point_in_time_features` on the dataset that holds the snapshot's events
plus these (`tests/test_live.py` checks it to 1e-9).

Events as the offline tables hold them (`recsys.importers.events` maps an event log the same way):
- an impression (request_id, user, ts, items) is one shown row per item at ts;
- a click on an item of an impression (same request_id and user) sets that row's `clicked`, so
  it counts at the impression's ts (the impressions table has no click time), whichever of the
  two arrives first; every click is also an interaction (history) at the click's own ts;
- an item event gives the item's category, subcategory and published_at (the latest wins).
Events before the cut-off are already in the snapshot (or too late for it) and are ignored here,
so a moment before the cut-off cannot be asked for.
"""

from __future__ import annotations

import re
from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import TypeVar, cast

import numpy as np
import polars as pl

from features.config import ALL
from features.derive import GROUP_TABLES, derive_numpy
from features.events import AT, GROUPS, ITEM_COUNTS, USER_COUNTS, USER_ITEM_COUNTS
from features.fast import SnapshotIndex
from features.snapshot import RECENT, FeatureSnapshot
from recsys.data.schema import TS
from recsys.errors import DataError

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_SHOW, _CLICK, _HISTORY = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
_NO_META: tuple[str | None, str | None, int | None] = (None, None, None)
K = TypeVar("K")


def epoch_us(t: datetime) -> int:
    return (t - _EPOCH) // _US


def from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


_FIXED_US = {"ns": 0.001, "us": 1, "ms": 1_000, "s": 1_000_000, "m": 60_000_000,
             "h": 3_600_000_000, "d": 86_400_000_000, "w": 604_800_000_000}  # fmt: skip
_PART = re.compile(r"(\d+)(ns|us|ms|s|mo|m|h|d|w|q|y)")


@lru_cache(maxsize=256)
def _fixed_us(window: str) -> int | None:
    """The window's length in microseconds when it has no calendar unit (mo, q, y), else None.
    In UTC a day is always 24 hours, so polars' `offset_by` moves fixed units by exactly this."""
    total = 0.0
    for amount, unit in _PART.findall(window):
        if unit not in _FIXED_US:
            return None
        total += int(amount) * _FIXED_US[unit]
    return int(total)


def window_start(at_us: int, window: str) -> int:
    """at - window as polars' `offset_by` (the offline windows) computes it: exact arithmetic
    for fixed units, polars itself for calendar ones."""
    fixed = _fixed_us(window)
    if fixed is not None:
        return at_us - fixed
    start = pl.select(pl.lit(from_us(at_us), dtype=TS).dt.offset_by(f"-{window}")).item()
    return epoch_us(start)


class _Log:
    """Cumulative counts of one key at each distinct event time, grown one event at a time.

    times ascending; deltas[i] the sums of the events at times[i]; cum[i] the sums of all events
    with time <= times[i], correct for i < valid and settled on demand. An event at the last
    time or later costs O(1); a late one (an older time) only marks the rows after it stale,
    and the next lookup past it settles them once, so late events arriving in any order cost no
    more than in-order ones."""

    __slots__ = ("cum", "deltas", "times", "valid")

    def __init__(self) -> None:
        self.times: list[int] = []
        self.deltas: list[list[float]] = []
        self.cum: list[list[float]] = []
        self.valid = 0

    def add(self, t: int, deltas: Sequence[float]) -> None:
        times = self.times
        if times and t == times[-1] and self.valid == len(times):  # more at the latest time
            row, cum = self.deltas[-1], self.cum[-1]
            for j, d in enumerate(deltas):
                row[j] += d
                cum[j] += d
            return
        if not times or t > times[-1]:  # the common case: a new latest time
            times.append(t)
            self.deltas.append(list(deltas))
            if self.valid == len(times) - 1:
                prev = self.cum[-1] if self.cum else None
                self.cum.append(
                    [p + d for p, d in zip(prev, deltas, strict=True)] if prev else list(deltas)
                )
                self.valid += 1
            else:
                self.cum.append([])
            return
        i = bisect_left(times, t)
        if i < len(times) and times[i] == t:
            row = self.deltas[i]
            for j, d in enumerate(deltas):
                row[j] += d
            self.valid = min(self.valid, i)
            return
        times.insert(i, t)
        self.deltas.insert(i, list(deltas))
        if i == len(times) - 1 and self.valid == i:  # in order: extend the settled prefix
            prev = self.cum[i - 1] if i else None
            self.cum.append([p + d for p, d in zip(prev, deltas, strict=True)] if prev else
                            list(deltas))  # fmt: skip
            self.valid = i + 1
        else:
            self.cum.insert(i, [])
            self.valid = min(self.valid, i)

    def settle(self) -> None:
        """Make every cumulative row correct (after late events)."""
        k, n = self.valid, len(self.times)
        if k == n:
            return
        prev = self.cum[k - 1] if k else [0.0] * len(self.deltas[0])
        for j in range(k, n):
            prev = [p + d for p, d in zip(prev, self.deltas[j], strict=True)]
            self.cum[j] = prev
        self.valid = n

    def before(self, t: int) -> list[float] | None:
        """The sums of the events strictly before t (None: none)."""
        i = bisect_left(self.times, t)
        if not i:
            return None
        if self.valid < i:
            self.settle()
        return self.cum[i - 1]


def _log_of(logs: dict[K, _Log], key: K) -> _Log:
    """logs[key], created when missing (without building a _Log per call as setdefault does)."""
    log = logs.get(key)
    if log is None:
        log = logs[key] = _Log()
    return log


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
        self.windows = [w for w in self.config.windows if w != ALL]
        index = SnapshotIndex.of(snapshot)
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
        # item -> its sums before the cut-off (the snapshot's recent events), kept on first use:
        # they never change, as the add_* methods count no event before the cut-off
        self._cut: dict[str, tuple[float, ...]] = {}
        recent = snapshot.tables.get(RECENT)
        if recent is None and self.windows:
            raise DataError(
                "the bundle's feature snapshot has no item_recent table (written before live "
                "features existed); rebuild the bundle with this version's nightly"
            )
        if recent is not None:
            for item, ts, *deltas in recent.sort("ts").iter_rows():
                _log_of(self.item_log, item).add(epoch_us(ts), deltas)
        self._clicks_at: dict[str, list[int]] = {}  # item -> live click times (impression ts)
        self._first_live: dict[str, int] = {}
        self.users: dict[str, _Log] = {}
        self.groups: dict[str, dict[tuple[str, str], _Log]] = {g: {} for g in GROUPS}
        self.user_items: dict[tuple[str, str], _Log] = {}
        self.impressions: dict[str, _Impression] = {}
        self._clicked: set[tuple[str, str]] = set()
        self._pending: dict[str, list[tuple[str, str]]] = {}  # request_id -> clicks before it
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
        for user, item in self._pending.pop(request_id, []):  # clicks that came first
            self._click(request_id, user, item)
        return True

    def add_click(self, user_id: str, item_id: str, ts_us: int, request_id: str | None) -> None:
        """A click: the shown row's click (at the impression's ts) when `request_id` names an
        impression of this user that showed the item, and one history item at ts_us."""
        if request_id is not None:
            if request_id in self.impressions:
                self._click(request_id, user_id, item_id)
            else:  # its impression may still come (events in any order, as the importer reads)
                self._pending.setdefault(request_id, []).append((user_id, item_id))
        if ts_us < self.cutoff_us:
            return
        self._count(user_id, item_id, ts_us, _HISTORY)
        self._seq += 1
        insort(self.history.setdefault(user_id, []), (ts_us, self._seq, item_id))

    def _click(self, request_id: str, user_id: str, item_id: str) -> None:
        """The click of a shown row: counted once, at the impression's ts."""
        imp = self.impressions[request_id]
        if imp.user_id != user_id or item_id not in imp.items:
            return
        if (request_id, item_id) in self._clicked:
            return
        self._clicked.add((request_id, item_id))
        self._count(user_id, item_id, imp.ts, _CLICK)
        insort(self._clicks_at.setdefault(item_id, []), imp.ts)

    def _count(self, user_id: str, item_id: str, ts: int, deltas: tuple[float, ...]) -> None:
        """One event in every log it counts in (the keys of `events.prepare_events`)."""
        _log_of(self.item_log, item_id).add(ts, deltas)
        if ts < self._first_live.get(item_id, ts + 1):
            self._first_live[item_id] = ts
        _log_of(self.users, user_id).add(ts, deltas)
        meta = self.meta.get(item_id, _NO_META)
        for g, value in zip(GROUPS, meta[:2], strict=True):
            if value is not None:
                _log_of(self.groups[g], (user_id, value)).add(ts, deltas)
        _log_of(self.user_items, (user_id, item_id)).add(ts, (deltas[0], deltas[2]))

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
        NaN where `derive_features` gives null (via `derive_numpy`). extra_history: items the
        caller says the user consumed, each one more history item (as `snapshot_features`'
        extra_history)."""
        return derive_numpy(self.raw(user_id, item_ids, at_us, extra_history), self.config)

    def raw(
        self,
        user_id: str | None,
        item_ids: Sequence[str],
        at_us: int,
        extra_history: Sequence[str] = (),
    ) -> dict[str, np.ndarray]:
        """The raw columns `derive_numpy` reads (see features/derive.py), one row per item:
        float64 arrays, NaN = null, times in epoch microseconds, groups as "has one" flags."""
        if at_us < self.cutoff_us:
            raise DataError(
                f"at {from_us(at_us).isoformat()} is before the bundle's cut-off "
                f"{self.snapshot.as_of.isoformat()}; live features start there"
            )
        n = len(item_ids)
        nan = float("nan")
        out: dict[str, np.ndarray] = {AT: np.full(n, float(at_us))}
        meta = [self.meta.get(i, _NO_META) for i in item_ids]
        published = np.fromiter((nan if m[2] is None else m[2] for m in meta), np.float64, n)
        out["items.published_at"] = published
        starts = [(w, window_start(at_us, w)) for w in self.windows]
        # rows of (shows, clicks, interactions) per window, one per item, made arrays at the end
        # (a numpy row assignment per item and window cost more than the counting)
        counts: dict[str, list[tuple[float, ...]]] = {w: [] for w in self.config.windows}
        windowed = [(counts[w], start) for w, start in starts]
        counts_all = counts.get(ALL)
        last_click, first_seen = np.full(n, nan), np.full(n, nan)
        zero = (0.0, 0.0, 0.0)
        item_log, cuts, base_all = self.item_log, self._cut, self._base_all
        for k, item in enumerate(item_ids):
            log = item_log.get(item)
            if log is not None:  # `_Log.before`, inlined: this loop is the hot path
                if log.valid != len(log.times):
                    log.settle()
                times, rows = log.times, log.cum
                i = bisect_left(times, at_us)
                now = rows[i - 1] if i else zero
                for per_window, start in windowed:
                    i = bisect_left(times, start)
                    if i:
                        before = rows[i - 1]
                        per_window.append(
                            (now[0] - before[0], now[1] - before[1], now[2] - before[2])
                        )
                    else:
                        per_window.append((now[0] - 0.0, now[1] - 0.0, now[2] - 0.0))
            else:
                now = zero
                for per_window, _ in windowed:
                    per_window.append(zero)
            if counts_all is not None:
                cut = cuts.get(item) if log is not None else zero
                if cut is None:  # fixed once the state is built: live events are never before
                    cut = cuts[item] = tuple(log.before(self.cutoff_us) or zero)  # type: ignore[union-attr]
                b = base_all.get(item, zero)
                counts_all.append((b[0] + now[0] - cut[0], b[1] + now[1] - cut[1],
                                   b[2] + now[2] - cut[2]))  # fmt: skip
            clicks = self._clicks_at.get(item)
            j = bisect_left(clicks, at_us) if clicks else 0
            t = clicks[j - 1] if clicks and j else self._base_last_click.get(item)  # type: ignore[index]
            if t is not None:
                last_click[k] = t
            first = self._base_first_seen.get(item, self._first_live.get(item))
            if first is not None and first < at_us:
                first_seen[k] = first
        for w, got in counts.items():
            window_block = np.array(got, dtype=np.float64).reshape(n, 3)
            for c, col in zip(ITEM_COUNTS, window_block.T, strict=True):
                out[f"items.{c}_{w}"] = col
        out["items.last_click_at"] = last_click
        out["items.first_seen_at"] = first_seen

        extra_meta = [self.meta.get(i, _NO_META) for i in extra_history]
        user = self._user_counts(user_id, at_us)
        user[2] += len(extra_history)
        for c, v in zip(USER_COUNTS, user, strict=True):
            out[f"users.{c}"] = np.full(n, v)
        for gi, g in enumerate(GROUPS):
            table = GROUP_TABLES[g]
            values = [cast("str | None", m[gi]) for m in meta]
            out[f"items.{g}"] = np.fromiter((v is not None for v in values), bool, n)
            found: dict[str, list[float]] = {}
            for value in {v for v in values if v is not None}:
                stats = self._group_counts(user_id, g, value, at_us)
                stats[2] += sum(1 for m in extra_meta if m[gi] == value)
                found[value] = stats
            block = np.array([found[v] if v is not None else (nan, nan, nan) for v in values])
            for c, col in zip(USER_COUNTS, block.reshape(n, 3).T, strict=True):
                out[f"{table}.{c}"] = col
        pairs = self._user_item_block(user_id, item_ids, at_us)
        if extra_history:
            seen = Counter(extra_history)
            pairs[:, 1] += np.fromiter((seen.get(i, 0) for i in item_ids), np.float64, n)
        for c, col in zip(USER_ITEM_COUNTS, pairs.T, strict=True):
            out[f"user_item.{c}"] = col
        return out

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

    def _user_item_block(
        self, user_id: str | None, item_ids: Sequence[str], at_us: int
    ) -> np.ndarray:
        """(n, 2) shows, history of the user with each item: the snapshot's plus the live."""
        n = len(item_ids)
        out = np.zeros((n, 2))
        if user_id is None:
            return out
        idx = self._index
        row = idx.user_row.get(user_id)
        if row is not None:
            keys, values = idx.user_items.of(row)
            if len(keys):
                unknown = len(idx.item_row)
                rows = np.fromiter((idx.item_row.get(i, unknown) for i in item_ids), np.int64, n)
                at = np.minimum(np.searchsorted(keys, rows), len(keys) - 1)
                found = keys[at] == rows
                out[found] = values[at[found]]
        live = self.user_items
        for k, item in enumerate(item_ids):
            log = live.get((user_id, item))
            if log is not None:
                got = log.before(at_us)
                if got is not None:
                    out[k] += got
        return out
