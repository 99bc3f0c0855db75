"""The ranker's feature matrix for one request, from arrays prepared once per bundle.

    featurizer.features(user_id, candidates, history, new, at_us) -> (K, F) float64
    featurizer.reference(user_id, candidates, history, new, head) -> the same, the slow way

A request costs dict lookups, a few small array gathers and one (K, d) x (d, M) product for the
semantic features. The matrix equals `bundle.featurize` (the polars path shared with training
and the nightly lists) for the same request: the behavioural block is
`features.snapshot_features_numpy` (or, with events, the live state's, `features.live`) and the
semantic block repeats, for one context, the array operations of
`recsys.semantic.semantic_features` in the same shapes and dtypes. serving/selfcheck.py compares
the two on probe requests whenever a bundle is loaded, and tests/test_serving.py does so on many
random requests; a difference refuses the bundle rather than serving skewed scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from features import snapshot_features_numpy
from features.derive import derive_numpy
from features.events import GROUPS
from features.fast import Given
from features.live import epoch_us, from_us
from recsys.bundle import Bundle
from recsys.featurize import ONLINE, FeatureSpec, matrix
from recsys.ranker import Ranker
from recsys.relative import relative_columns, within_request
from recsys.semantic import window_cosines
from serving.embedding import NewItems
from serving.live import LiveState
from serving.lookups import Histories

ANONYMOUS = "\x00anonymous"  # the user id a request without a known user has in the polars path


@dataclass(frozen=True)
class Head:
    """One ranker and the columns it reads: the bundle's (batch: features as of the cut-off) or
    its online one (features as of the request, from the live state)."""

    spec: FeatureSpec
    ranker: Ranker
    columns: list[str]
    n_base: int
    n_behavioural: int
    relative_idx: np.ndarray  # base columns that get within-request ranks / z-scores
    model_idx: np.ndarray  # the model columns as positions in [base, within-request columns]

    @classmethod
    def of(cls, spec: FeatureSpec, ranker: Ranker) -> Head:
        base = spec.base_columns
        every = [*base, *relative_columns(spec.relative_base)]
        return cls(
            spec, ranker, list(spec.columns), len(base), len(spec.base_behavioural),
            np.array([base.index(c) for c in spec.relative_base], dtype=np.int64),
            np.array([every.index(c) for c in spec.columns], dtype=np.int64),
        )  # fmt: skip


class Featurizer:
    """The feature rows of a bundle's heads: `batch` (the bundle's ranker) and `online` (its
    online ranker, None if it has none), from the stored `histories`, the snapshot and, for a
    request with a moment, the `live` state."""

    def __init__(self, bundle: Bundle, histories: Histories, live: LiveState) -> None:
        self.bundle = bundle
        self.batch = Head.of(bundle.spec, bundle.ranker)
        self.online = (
            Head.of(bundle.online_spec, bundle.online_ranker)
            if bundle.online_spec is not None and bundle.online_ranker is not None
            else None
        )
        self.spec = bundle.spec
        self.vectors = bundle.vectors
        self.as_of_us = epoch_us(bundle.snapshot.as_of)
        self.histories = histories
        self.live = live

    def head(self, at_us: int | None) -> Head:
        """The ranker for a request: the online one when features come from the live state
        (`at_us` given) and the bundle has one, else the bundle's (batch) ranker."""
        return self.online if at_us is not None and self.online is not None else self.batch

    def moment(self, at_us: int) -> int:
        """The moment whose features a request at `at_us` gets: itself for a ranker trained on
        online features, else the start of its refresh period (never before the cut-off)."""
        refresh = self.head(at_us).spec.refresh
        if refresh == ONLINE:
            return at_us
        start = pl.select(pl.lit(from_us(at_us)).dt.truncate(refresh)).item()
        return max(epoch_us(start), self.as_of_us)

    def features(
        self,
        user_id: str | None,
        candidates: Sequence[str],
        history: Sequence[str] = (),
        new: NewItems | None = None,
        at_us: int | None = None,
        given: Given | None = None,
    ) -> np.ndarray:
        """The ranker's feature matrix (len(candidates), len(columns)) float64, NaN = missing.

        given: item id -> {category, subcategory} of the request's item texts: the sections of
        items the snapshot does not know, for the user's category features (the live state
        takes them from item events).

        Without `at_us`: equals `matrix(bundle.featurize(requests, extra_history=...,
        vectors=...), columns)` for rows (user_id or ANONYMOUS, c) and extra history (user, h)
        for h in `history`, with `vectors` the bundle's plus `new` appended: the snapshot at the
        cut-off. With `at_us`: as of `moment(at_us)` from the live state (features/live.py),
        the history extended by the user's clicks before then, the live catalogue's vectors
        joining the bundle's; equal to the offline point-in-time features of the same moment.
        """
        n = len(candidates)
        head = self.head(at_us)
        base = np.empty((n, head.n_base))
        moment = None
        if at_us is None:
            base[:, : head.n_behavioural] = snapshot_features_numpy(
                self.bundle.snapshot, user_id, candidates, extra_history=history, given=given
            )
            live_history: list[tuple[int, str]] = []
        else:
            moment = self.moment(at_us)
            with self.live.lock:
                live = self.live.features()
                raw = live.raw(user_id, candidates, moment, history)
                live_history = live.history_before(user_id, moment) if user_id is not None else []
                new = self.live.with_items(new)
            base[:, : head.n_behavioural] = derive_numpy(raw, live.config)
        if head.spec.use_semantic:
            base[:, head.n_behavioural :] = self._semantic(
                user_id, candidates, history, new, live_history, moment,
                frozen=head.spec.frozen_semantic,
            )  # fmt: skip
        rel = within_request(base[:, head.relative_idx], np.zeros(n, dtype=np.int64))
        return np.hstack([base, rel])[:, head.model_idx]

    def _semantic(
        self,
        user_id: str | None,
        candidates: Sequence[str],
        history: Sequence[str],
        new: NewItems | None,
        live_history: Sequence[tuple[int, str]] = (),
        moment: int | None = None,
        frozen: bool = False,
    ) -> np.ndarray:
        """The SEMANTIC_FEATURES block (K, 5) of one context, then with `frozen` the
        FROZEN_SEMANTIC block (K, 4), as `semantic_features` computes them for a chunk of that
        single context (B = 1): same gathers, products and reductions."""
        vec = self.vectors
        nb = len(vec.ids)
        new_index = new.index if new is not None else {}

        def row_of(item: str) -> int:  # a row of the virtual [bundle; new] matrix, or -1
            r = vec.index.get(item, -1)
            if r < 0 and item in new_index:
                r = nb + new_index[item]
            return r

        # The window: the user's stored history, their clicks since the cut-off (live), then
        # the request's history (at the moment - 1us), items without a vector skipped, the last
        # max_history kept.
        h = self.histories
        lo, hi = h.ptr.get(user_id, (0, 0)) if user_id is not None else (0, 0)
        rows = h.vrow[lo:hi]
        if new is not None and (rows < 0).any():
            rows = rows.copy()
            missing = np.flatnonzero(rows < 0)
            rows[missing] = [row_of(i) for i in h.item_ids[lo:hi][missing]]
        ts = h.ts[lo:hi]
        if live_history:
            rows = np.concatenate([rows, [row_of(i) for _, i in live_history]]).astype(np.int64)
            ts = np.concatenate([ts, [float(t) for t, _ in live_history]])
        if history:
            at = self.as_of_us if moment is None else moment
            extra = np.fromiter((row_of(i) for i in history), np.int64, len(history))
            rows = np.concatenate([rows, extra])
            ts = np.concatenate([ts, np.full(len(history), float(at - 1))])
        keep = rows >= 0
        rows, ts = rows[keep][-self.spec.max_history :], ts[keep][-self.spec.max_history :]
        k = len(candidates)
        if new is None:  # the common case, without a function call per candidate
            get = vec.index.get
            cand = np.array([get(c, -1) for c in candidates], dtype=np.int64)
        else:
            cand = np.fromiter((row_of(c) for c in candidates), np.int64, k)

        # float32 -> float64, as matrix() casts the Float32 columns
        tuned = self._cosines(vec.matrix, new.matrix if new is not None else None, rows, ts, cand)
        blocks = [tuned.T.astype(np.float64), np.full((k, 1), float(rows.size))]
        if frozen:
            assert vec.frozen is not None  # Bundle.load checks
            new_frozen = new.frozen if new is not None else None
            blocks.append(self._cosines(vec.frozen.matrix, new_frozen, rows, ts, cand).T)
        return np.hstack(blocks)

    def _cosines(
        self,
        base: np.ndarray,
        new: np.ndarray | None,
        rows: np.ndarray,
        ts: np.ndarray,
        cand: np.ndarray,
    ) -> np.ndarray:
        """(4, K) float32: mean, max, top3 and recency cosines of candidates `cand` to history
        `rows` (rows of the virtual [base; new] matrix, -1 = no vector), by the batch path's
        `window_cosines` over this one context."""
        nb, dim = base.shape
        m, k = rows.size, cand.size

        def take(r: np.ndarray) -> np.ndarray:
            if new is None:
                return base[r]
            got = np.empty((r.size, dim), dtype=np.float32)
            inside = r < nb
            got[inside] = base[r[inside]]
            got[~inside] = new[r[~inside] - nb]
            return got

        out = np.full((4, k), np.nan, dtype=np.float32)  # mean, max, top3, recency
        if m and k and dim:
            cmask = (cand >= 0)[None, :]  # (1, K)
            cv = take(np.where(cmask[0], cand, 0)).reshape(1, k, dim)  # (1, K, d)
            hv = take(rows).reshape(1, m, dim)  # (1, M, d)
            hmask = np.ones((1, m), dtype=bool)
            sims = np.matmul(cv, hv.transpose(0, 2, 1))  # (1, K, M) cosines
            half_life = self.spec.half_life_days
            stats = window_cosines(sims, hv, hmask, ts.reshape(1, m), np.array([m]), half_life)
            for slot, values in enumerate(stats):
                out[slot, cmask[0]] = values[cmask]
        return out

    def unheld(self, user_id: str, history: Sequence[str], at_us: int | None = None) -> list[str]:
        """`history` without the items the user's profile already holds (stored before the
        cut-off, and with `at_us` live before that moment). A storefront that sends the whole
        history with every request (MIND's layout) then counts each item once, as the offline
        data does, not once in the profile and again as extra history."""
        if not history:
            return []
        lo, hi = self.histories.ptr.get(user_id, (0, 0))
        held = set(self.histories.item_ids[lo:hi].tolist())
        if at_us is not None:
            with self.live.lock:
                live = self.live.features().history_before(user_id, self.moment(at_us))
            held.update(i for _, i in live)
        return [i for i in history if i not in held]

    def reference(
        self,
        user_id: str | None,
        candidates: Sequence[str],
        history: Sequence[str] = (),
        new: NewItems | None = None,
        head: Head | None = None,
        given: Given | None = None,
    ) -> np.ndarray:
        """The same matrix through the shared polars featurisation (`bundle.featurize`), as of
        the cut-off, for `head` (default the batch one); `given` as category / subcategory
        columns of the requests and the extra history."""
        head = head or self.batch
        user = user_id if user_id is not None else ANONYMOUS
        g = given or {}

        def rows(items: Sequence[str]) -> pl.DataFrame:
            cols: dict[str, list[Any]] = {"user_id": [user] * len(items), "item_id": list(items)}
            for group in GROUPS:
                cols[group] = [g.get(i, {}).get(group) for i in items]
            return pl.DataFrame(cols, schema={k: pl.String for k in cols})

        req = rows(candidates)
        extra = rows(history) if history else None
        vectors = None
        if new is not None and new.ids:
            vectors = self.vectors.extended(new.ids, new.matrix, new.frozen)
        frame = self.bundle.featurize(req, extra_history=extra, vectors=vectors, spec=head.spec)
        return matrix(frame, head.columns)
