"""The live state of a served bundle: events after its cut-off, counted as they come.

    live = LiveState(bundle.snapshot, bundle.vectors, catalogue)
    live.apply(events, vectors)        count normalised events (serving/events.py feeds them)
    with live.lock:
        live.features()                the live feature state (features/live.py)
        live.with_items(new)           the items that came as events, then a request's own

`lock` serialises event writers against feature readers of the live features and the live
catalogue (ids, vectors and categories of items that came as events).

Freshness: the state knows the newest behaviour it holds (`last_event_us`: the newest impression
or click event, at least the cut-off, whose events the snapshot holds). A moment more than
`max_lag_us` after it is `stale`: the feed has gone silent (an outage upstream), so the counts
would read as fresh while they are not, and the server ranks as the batch path does. Events that
flow again make it fresh by themselves.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from features.live import LiveFeatures, epoch_us, from_us
from features.snapshot import FeatureSnapshot
from recsys.errors import DataError
from recsys.vectors import ItemVectors
from serving.embedding import NewItems
from serving.lookups import Catalogue


@dataclass(frozen=True)
class Freshness:
    """What /readyz and /metrics say of the live state (`LiveState.freshness`)."""

    stale: bool
    last_event: datetime  # the newest impression or click held (the cut-off before any)
    stale_since: datetime | None  # last_event + the limit, when stale
    max_lag_s: float | None  # the limit of silence (None: never stale)


class LiveState:
    """Events since the cut-off: the live features (built on first use), the vectors of items
    that came as events (`items`), and what they add to the model's `catalogue`."""

    def __init__(
        self,
        snapshot: FeatureSnapshot,
        vectors: ItemVectors,
        catalogue: Catalogue,
        max_lag_us: int | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.vectors = vectors
        self.catalogue = catalogue
        self.lock = threading.Lock()
        self.max_lag_us = max_lag_us  # None: never stale
        self.last_event_us = epoch_us(snapshot.as_of)  # the snapshot holds every event before
        self.asked_us: int | None = None  # the latest moment a request asked for
        self._features: LiveFeatures | None = None
        fz = vectors.frozen
        self.items = NewItems(
            [], np.zeros((0, vectors.dim), dtype=np.float32),
            np.zeros((0, fz.dim), dtype=np.float32) if fz is not None else None,
        )  # fmt: skip

    def features(self) -> LiveFeatures:
        """The live feature state (the snapshot plus events since), built on first use; call
        with `lock` held."""
        if self._features is None:
            self._features = LiveFeatures(self.snapshot)
        return self._features

    def stale(self, at_us: int) -> bool:
        """True when the newest behaviour event is more than `max_lag_us` before `at_us` (the
        feed is silent: rank as the batch path); records `at_us` as the latest moment asked."""
        if self.asked_us is None or at_us > self.asked_us:
            self.asked_us = at_us
        return self._silent_at(at_us)

    def _silent_at(self, at_us: int) -> bool:
        return self.max_lag_us is not None and at_us - self.last_event_us > self.max_lag_us

    def freshness(self, now_us: int) -> Freshness:
        """The state's freshness at the latest moment a request asked for (`now_us` before
        any): whether it is stale, since when, and the newest event it holds."""
        at = self.asked_us if self.asked_us is not None else now_us
        last, lag = self.last_event_us, self.max_lag_us
        stale = self._silent_at(at)
        return Freshness(
            stale=stale,
            last_event=from_us(last),
            stale_since=from_us(last + lag) if stale and lag is not None else None,
            max_lag_s=None if lag is None else lag / 1e6,
        )

    def with_items(self, new: NewItems | None) -> NewItems | None:
        """The items that came as events, then `new` (a request's own texts), as one block."""
        live = self.items
        if not live.ids:
            return new
        if new is None or not new.ids:
            return live
        frozen = None
        if live.frozen is not None and new.frozen is not None:
            frozen = np.vstack([live.frozen, new.frozen])
        return NewItems([*live.ids, *new.ids], np.vstack([live.matrix, new.matrix]), frozen)

    def apply(self, events: Sequence[dict[str, Any]], vectors: NewItems | None) -> None:
        """Count normalised events (serving/events.py) into the live state; `vectors` holds the
        item events' embeddings (None without semantic features). Holds `lock`."""
        with self.lock:
            live = self.features()
            if vectors is not None and vectors.ids:
                self.add_vectors(vectors)
            known = self.catalogue
            for e in events:
                kind, ts = e["type"], epoch_us(datetime.fromisoformat(e["ts"]))
                if kind == "item":
                    pub = e.get("published_at")
                    live.add_item(
                        e["item_id"], e.get("category"), e.get("subcategory"),
                        epoch_us(datetime.fromisoformat(pub)) if pub else None,
                    )  # fmt: skip
                    known.known_items.add(e["item_id"])  # read by membership only
                    cat = e.get("category")
                    if cat and known.item_category.get(e["item_id"]) != cat:
                        # copied, not changed in place: requests iterate these (rules)
                        known.item_category = {**known.item_category, e["item_id"]: cat}
                        if cat not in known.categories:
                            known.categories = known.categories | {cat}
                elif kind == "impression":
                    live.add_impression(e["request_id"], e["user_id"], ts, e["items"])
                    known.known_users.add(e["user_id"])
                    self.last_event_us = max(self.last_event_us, ts)
                else:
                    live.add_click(e["user_id"], e["item_id"], ts, e.get("request_id"))
                    known.known_users.add(e["user_id"])
                    self.last_event_us = max(self.last_event_us, ts)

    def add_vectors(self, vectors: NewItems) -> None:
        """Put `vectors` into the live catalogue: a changed item's new vector replaces its old
        one, an item the bundle has a vector for keeps that one. DataError when the bundle's
        ranker reads frozen-encoder cosines and `vectors` lacks them."""
        live = self.items
        index = live.index
        matrix_ = live.matrix.copy()
        frozen = live.frozen.copy() if live.frozen is not None else None
        if frozen is not None and vectors.frozen is None:
            raise DataError("live items need the frozen encoder's vectors too")
        ids = list(live.ids)
        fresh = []
        for n, item in enumerate(vectors.ids):
            if item in index:  # a changed item: its new text's vector replaces the old one
                matrix_[index[item]] = vectors.matrix[n]
                if frozen is not None:
                    frozen[index[item]] = vectors.frozen[n]  # type: ignore[index]
            elif item not in self.vectors.index:
                fresh.append(n)
                ids.append(item)
        if fresh:
            matrix_ = np.vstack([matrix_, vectors.matrix[fresh]])
            if frozen is not None:
                frozen = np.vstack([frozen, vectors.frozen[fresh]])  # type: ignore[index]
        self.items = NewItems(ids, matrix_, frozen)
