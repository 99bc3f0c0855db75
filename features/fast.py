"""The serving fast path: one user's candidates from dict and array lookups, no polars per call.

    snapshot_features_numpy(snapshot, user_id, item_ids, extra_history=..., given=...)
        -> (n, F) float64

`SnapshotIndex.build` runs once per snapshot (`SnapshotIndex.of` keeps it on the snapshot): the
item columns of every catalogue item (and of an unknown item) are computed by the polars path
itself, so they are the same numbers; the per-user part is a few array gathers, then the user
groups' numpy evaluation (`features.groups`), the twin of the polars one. Column order is
`feature_names(config)`; NaN marks what the polars path leaves null.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import polars as pl

from features.config import FeatureConfig
from features.derive import GROUP_TABLES, feature_names, item_feature_names, user_feature_names
from features.events import GROUPS, USER_COUNTS
from features.groups import USER_GROUPS
from features.groups.item_counts import TIME_FEATURES
from features.snapshot import FeatureSnapshot, as_utc, snapshot_features

Given = Mapping[str, Mapping[str, str | None]]  # item id -> {group: value} a request gives
_US_PER_HOUR = 3_600_000_000.0
_ONE_US = timedelta(microseconds=1)
_CACHED = "_snapshot_index"


@dataclass(frozen=True)
class _UserRows:
    """Per-user rows of a (user, key) table in CSR form: user u owns rows ptr[u]:ptr[u + 1].

    key: int64 codes (a group code, or an item row), ascending within each user.
    values: (rows, n_stats) float64, columns as the table's stats.
    """

    ptr: np.ndarray
    key: np.ndarray
    values: np.ndarray

    @classmethod
    def build(
        cls, table: pl.DataFrame, user_row: pl.DataFrame, key_row: pl.DataFrame, stats: list[str]
    ) -> _UserRows:
        """table: user_id, <key column>, stats; user_row: user_id, __u; key_row: <key>, __k."""
        rows = (
            table.join(user_row, on="user_id", how="inner")
            .join(key_row, on=key_row.columns[0], how="inner")
            .sort("__u", "__k")
        )
        counts = np.bincount(rows["__u"].to_numpy(), minlength=user_row.height)
        ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        values = rows.select(pl.col(s).cast(pl.Float64) for s in stats).to_numpy()
        return cls(ptr, rows["__k"].to_numpy().astype(np.int64), values.reshape(-1, len(stats)))

    def of(self, u: int | None) -> tuple[np.ndarray, np.ndarray]:
        if u is None:
            return self.key[:0], self.values[:0]
        lo, hi = self.ptr[u], self.ptr[u + 1]
        return self.key[lo:hi], self.values[lo:hi]


@dataclass(frozen=True)
class SnapshotIndex:
    """Lookups prepared once from a snapshot (see module doc). Arrays are read-only in use."""

    config: FeatureConfig
    as_of: datetime
    names: list[str]
    position: dict[str, int]  # feature name -> output column
    item_row: dict[str, int]  # item_id -> row; unknown items use row len(item_row)
    item_block: np.ndarray  # (n_items + 1, n_item_features): item columns at as_of
    item_cols: np.ndarray  # positions of the item columns in the output
    time_cols: np.ndarray  # positions of item_age_hours, item_hours_since_click
    user_cols: np.ndarray  # positions of the user groups' columns
    user_row: dict[str, int]
    user_counts: np.ndarray  # (n_users, 3): shows, clicks, history
    item_group: dict[str, np.ndarray]  # group -> (n_items + 1,) code, -1 when null / unknown
    group_code: dict[str, dict[str, int]]  # group -> value -> code
    n_codes: dict[str, int]
    user_groups: dict[str, _UserRows]  # group -> stats shows, clicks, history per (user, code)
    user_items: _UserRows  # stats shows, history per (user, item row)

    @classmethod
    def of(cls, snapshot: FeatureSnapshot) -> SnapshotIndex:
        """The index of `snapshot`, built on first use and kept on the snapshot object."""
        index = snapshot.__dict__.get(_CACHED)
        if index is None:
            index = cls.build(snapshot)
            snapshot.__dict__[_CACHED] = index  # as functools.cached_property stores its value
        return index  # type: ignore[no-any-return]

    @classmethod
    def build(cls, snapshot: FeatureSnapshot) -> SnapshotIndex:
        config, tables = snapshot.config, snapshot.tables
        names = feature_names(config)
        items = tables["items"]
        item_ids = items["item_id"].to_list()
        item_row = {i: r for r, i in enumerate(item_ids)}
        # The item columns by the polars path itself; the last row (item_id null) is "unknown".
        probe = pl.DataFrame(
            {"user_id": [None] * (len(item_ids) + 1), "item_id": [*item_ids, None]},
            schema={"user_id": pl.String, "item_id": pl.String},
        )
        item_names = item_feature_names(config)
        item_block = snapshot_features(snapshot, probe).select(item_names).to_numpy()
        item_rows = pl.DataFrame(
            {"item_id": item_ids, "__k": np.arange(len(item_ids))},
            schema={"item_id": pl.String, "__k": pl.Int64},
        )

        users = tables["users"]
        user_rows = (
            users.select("user_id").with_row_index("__u").with_columns(pl.col("__u").cast(pl.Int64))
        )
        item_group, group_code, n_codes, user_groups = {}, {}, {}, {}
        for g in GROUPS:
            codes = items.select(pl.col(g).drop_nulls().unique().sort()).with_row_index("__k")
            codes = codes.with_columns(pl.col("__k").cast(pl.Int64))
            group_code[g] = dict(zip(codes[g].to_list(), codes["__k"].to_list(), strict=True))
            per_item = items.select(g).join(codes, on=g, how="left", maintain_order="left")
            item_group[g] = np.append(per_item["__k"].fill_null(-1).to_numpy(), -1).astype(np.int64)
            n_codes[g] = codes.height
            user_groups[g] = _UserRows.build(
                tables[GROUP_TABLES[g]], user_rows, codes.select(g, "__k"), list(USER_COUNTS)
            )
        return cls(
            config=config,
            as_of=snapshot.as_of,
            names=names,
            position={name: i for i, name in enumerate(names)},
            item_row=item_row,
            item_block=np.ascontiguousarray(item_block, dtype=np.float64),
            item_cols=np.array([names.index(n) for n in item_names], dtype=np.int64),
            time_cols=np.array([names.index(n) for n in TIME_FEATURES], dtype=np.int64),
            user_cols=np.array(
                [names.index(n) for n in user_feature_names(config)], dtype=np.int64
            ),
            user_row={u: r for r, u in enumerate(users["user_id"].to_list())},
            user_counts=users.select(pl.col(c).cast(pl.Float64) for c in USER_COUNTS).to_numpy(),
            item_group=item_group,
            group_code=group_code,
            n_codes=n_codes,
            user_groups=user_groups,
            user_items=_UserRows.build(
                tables["user_item"], user_rows, item_rows, ["shows", "history"]
            ),
        )

    def features(
        self,
        user_id: str | None,
        item_ids: Sequence[str],
        extra_history: Sequence[str] = (),
        now: datetime | None = None,
        given: Given | None = None,
    ) -> np.ndarray:
        """(len(item_ids), n_features) float64, the numbers `snapshot_features` gives (with
        `given` as its requests' and extra history's category / subcategory columns)."""
        n, unknown = len(item_ids), len(self.item_row)
        rows = np.fromiter((self.item_row.get(i, unknown) for i in item_ids), np.int64, n)
        out = np.empty((n, len(self.names)))
        out[:, self.item_cols] = self.item_block[rows]
        if now is not None:
            shift = as_utc(now, "snapshot_features_numpy: now") - self.as_of
            out[:, self.time_cols] += shift // _ONE_US / _US_PER_HOUR

        u = self.user_row.get(user_id) if user_id is not None else None
        raw = self._user_raw(u, rows, item_ids, extra_history, given or {})
        user = (a for g in USER_GROUPS for a in g.arrays(raw, self.config))
        for c, values in zip(self.user_cols, user, strict=True):
            out[:, c] = values  # the user's own counts are one value: broadcast
        return out

    def _user_raw(
        self,
        u: int | None,
        rows: np.ndarray,
        item_ids: Sequence[str],
        extra_history: Sequence[str],
        given: Given,
    ) -> dict[str, np.ndarray]:
        """The user-side raw columns (see `features.groups`) of user row `u` with the candidate
        item rows `rows`, each item of `extra_history` one more history item; `given` fills
        the groups the snapshot lacks."""
        n, unknown = len(rows), len(self.item_row)
        shows, clicks, history = self.user_counts[u] if u is not None else (0.0, 0.0, 0.0)
        extra = np.fromiter(
            (self.item_row.get(i, unknown) for i in extra_history), np.int64, len(extra_history)
        )
        history = history + float(len(extra_history))
        raw: dict[str, np.ndarray] = {  # the user's own counts, (1,) arrays broadcast
            "users.shows": np.array([shows], dtype=np.float64),
            "users.clicks": np.array([clicks], dtype=np.float64),
            "users.history": np.array([history], dtype=np.float64),
        }
        for g in GROUPS:
            fresh: dict[str, int] = {}  # given values the snapshot never saw: codes after its
            extra_codes = self._codes(g, extra, extra_history, given, fresh)
            code = self._codes(g, rows, item_ids, given, fresh)
            dense = np.zeros((self.n_codes[g] + 1 + len(fresh), 3))  # shows, clicks, history
            keys, values = self.user_groups[g].of(u)
            dense[keys] = values
            np.add.at(dense[:, 2], extra_codes[extra_codes >= 0], 1.0)
            known = code >= 0
            stats = dense[np.where(known, code, 0)]
            raw[f"items.{g}"] = known
            for c, col in zip(USER_COUNTS, stats.T, strict=True):
                raw[f"{GROUP_TABLES[g]}.{c}"] = col
        ui = np.zeros((n, 2))  # shows, history of this user with each candidate
        keys, values = self.user_items.of(u)
        if len(keys):
            at = np.minimum(np.searchsorted(keys, rows), len(keys) - 1)
            found = keys[at] == rows
            ui[found] = values[at[found]]
        if len(extra_history):
            seen = Counter(extra_history)
            ui[:, 1] += np.fromiter((seen.get(i, 0) for i in item_ids), np.float64, n)
        raw["user_item.shows"], raw["user_item.history"] = ui[:, 0], ui[:, 1]
        return raw

    def _codes(
        self, g: str, rows: np.ndarray, item_ids: Sequence[str], given: Given,
        fresh: dict[str, int],
    ) -> np.ndarray:  # fmt: skip
        """Group `g`'s code of each item row; where the snapshot has none, the `given` value's
        (a value it never saw gets a code of its own in `fresh`, with no user counts)."""
        code = self.item_group[g][rows]
        if not given:
            return code
        code = code.copy()
        for j in np.flatnonzero(code < 0):
            value = given.get(item_ids[int(j)], {}).get(g)
            if value is not None:
                known = self.group_code[g].get(value)
                if known is None:
                    known = fresh.setdefault(value, self.n_codes[g] + 1 + len(fresh))
                code[j] = known
        return code


def snapshot_features_numpy(
    snapshot: FeatureSnapshot,
    user_id: str | None,
    item_ids: Sequence[str],
    *,
    extra_history: Sequence[str] = (),
    now: datetime | None = None,
    given: Given | None = None,
) -> np.ndarray:
    """Features of one user's candidates, (len(item_ids), len(feature_names)) float64.

    The same numbers as `snapshot_features` for rows (user_id, item_id) with extra_history rows
    (user_id, h) for h in extra_history, and with `given` (item id -> {group: value}) as the
    rows' category / subcategory columns; NaN where that gives null.
    """
    return SnapshotIndex.of(snapshot).features(user_id, item_ids, extra_history, now, given)
