"""The served model: rank one request's candidates, or give a user's list.

`ServingModel.from_bundle(bundle)` does all the slow work at load time: the lookups
(serving/lookups.py: the feature snapshot's numpy index, each user's history as rows of the
item-vector matrix, the popularity prior, the nightly lists), the fast feature path
(serving/featurize.py, checked against `bundle.featurize` by serving/selfcheck.py before the
bundle may serve), the text encoder (serving/embedding.py) and an empty live state
(serving/live.py). A request then costs dict lookups, a few small array gathers, one product for
the semantic features and one LightGBM call on the whole candidate batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl

from features import SnapshotIndex
from features.live import epoch_us
from recsys.bundle import Bundle
from recsys.errors import DataError
from recsys.rules import ListRules
from serving.embedding import Embedder, NewItems
from serving.explain import explain
from serving.featurize import Featurizer
from serving.live import LiveState
from serving.lookups import Catalogue, Histories, NightlyLists
from serving.rules import request_rules, top_under_rules
from serving.schemas import RankRequest
from serving.selfcheck import self_check


class ServingModel:
    """A loaded bundle: ranking and recommendations over its lookups. Its model part never
    changes, so a reference to it can be swapped atomically and requests in flight finish on
    the one they got; the live state (`live`, events) changes under `live.lock`.

    Collaborators: `featurizer` (feature rows, the batch and online heads), `embedder` (new
    items' vectors), `live` (events since the cut-off), `catalogue` (known users, items,
    categories); `rules` are the bundle's list rules.
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        preload_encoder: bool = True,
        max_event_lag_s: float | None = None,
    ) -> None:
        self.bundle = bundle
        self.model_version = bundle.model_version
        self.spec = bundle.spec
        self.vectors = bundle.vectors
        snap = bundle.snapshot
        index = SnapshotIndex.of(snap)  # builds the numpy lookups once (kept on the snapshot)
        self.histories = Histories.build(bundle.history, bundle.vectors, snap.as_of)
        pop = bundle.popular.select(
            pl.col("item_id").cast(pl.String), pl.col("score").cast(pl.Float64)
        )
        self.popular_ids: list[str] = pop["item_id"].to_list()
        self.popular_scores = pop["score"].to_numpy()
        self.popularity = dict(zip(self.popular_ids, self.popular_scores.tolist(), strict=True))
        self.lists = NightlyLists.build(bundle.recommendations)
        self.catalogue = Catalogue.build(bundle, index, self.histories)
        self.rules = ListRules.from_dict(bundle.manifest.get("lists", {}).get("rules", {}))
        # Live state (events after the cut-off, serving/events.py feeds it): built on first use.
        lag = max_event_lag_s if max_event_lag_s is not None else bundle.max_event_lag_s
        self.live = LiveState(
            snap, bundle.vectors, self.catalogue, None if lag is None else round(lag * 1e6)
        )
        self.featurizer = Featurizer(bundle, self.histories, self.live)
        self.columns = self.featurizer.batch.columns
        self.as_of_us = self.featurizer.as_of_us
        heads = (self.featurizer.batch, self.featurizer.online)
        semantic = any(h.spec.use_semantic for h in heads if h)
        self.embedder = Embedder(bundle, semantic=semantic, preload=preload_encoder)

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle,
        *,
        preload_encoder: bool = True,
        max_event_lag_s: float | None = None,
    ) -> ServingModel:
        """Prepare `bundle` for serving and check its fast path against `bundle.featurize`.
        `max_event_lag_s`: the live state's limit of silence (default: the bundle's)."""
        model = cls(bundle, preload_encoder=preload_encoder, max_event_lag_s=max_event_lag_s)
        self_check(model.featurizer, model.popular_ids)
        return model

    def served(self, live: bool, stale: bool = False) -> tuple[str, str]:
        """(the ranker's name, the freshness of its features) for a server with events (`live`)
        or without; `stale`: with events, the live state has gone silent."""
        if live and not stale and self.featurizer.online is not None:
            name = self.bundle.manifest.get("online", {}).get("ranker", {}).get("name", "online")
            return str(name), "online: the live state (events) as of each request"
        name = self.bundle.manifest.get("ranker", {}).get("name", "ranker")
        cut = self.bundle.snapshot.as_of.isoformat()
        if live and stale:
            return str(name), (
                f"batch: as of the cut-off {cut}; the live state is stale (no event for longer "
                "than max_event_lag_s), the online ranker returns when events flow again"
            )
        return str(name), f"batch: as of the cut-off {cut} (no events after it are counted)"

    def predict(self, x: np.ndarray, at_us: int | None = None) -> np.ndarray:
        """Ranker scores (n,) of feature rows x (n, F) from `featurizer.features(..., at_us)`:
        the batch job's `ranker.predict` (the online ranker's with `at_us`). (Threads: the
        server caps OpenMP at one per worker, see serving/lifespan.py.)"""
        return self.featurizer.head(at_us).ranker.predict(x)

    def moment(self, at: datetime | None, events: bool) -> int | None:
        """The `at_us` that `rank` takes for a request's `at` (None: not given), on a server
        with events (`events`: features from the live state as of `at`, default now) or
        without (None: the batch ranker, features as of the cut-off, whatever `at` says).
        A live state that has heard no event for longer than its limit before that moment is
        stale (`LiveState.stale`): None, the batch path, until events flow again. A
        `ValueError` naming the cut-off when `at` is before it."""
        if at is not None:
            asked = epoch_us(at)
            if asked < self.as_of_us:
                raise ValueError(
                    f"at {at.isoformat()} is before the bundle's cut-off "
                    f"{self.bundle.snapshot.as_of.isoformat()}; give a later moment"
                )
        else:
            asked = max(epoch_us(datetime.now(UTC)), self.as_of_us)
        if not events or self.live.stale(asked):
            return None
        return asked

    def strategy(self, user_id: str | None, history: Sequence[str]) -> str:
        """profile / profile+history / history / popularity. Any user id is a profile, one the
        bundle never saw included (zero counts): both rankers trained on first-time users'
        rows too, and the nightly's evaluation scores a new user so, batch and online alike
        (on EB-NeRD's next week the popularity prior for users unknown to the bundle cost the
        batch API 0.017 AUC against that figure). Only a request with neither a user id nor a
        history gets the popularity prior."""
        known = user_id is not None
        if known and history:
            return "profile+history"
        if known:
            return "profile"
        return "history" if history else "popularity"

    def rank(
        self, req: RankRequest, new: NewItems | None = None, at_us: int | None = None
    ) -> dict[str, Any]:
        """Rank `req.candidates`; returns the `RankResponse` wire format as plain dicts and
        lists (built without pydantic objects: this is the hot path; the app encodes it and the
        tests validate it against `RankResponse`). See serving/routes/ranking.py for the
        contract."""
        cands = req.candidates
        k = min(req.k or len(cands), len(cands))
        with_text = {i.item_id for i in req.items}
        known = self.catalogue.known_items
        unknown = [c for c in cands if c not in known and c not in with_text]
        strategy = self.strategy(req.user_id, req.history)
        asks = req.exclude_items or req.exclude_categories or req.max_per_category is not None
        rules = self.rules
        if asks or req.diversity is not None:
            rules = request_rules(
                self.rules, self.catalogue,
                exclude_items=req.exclude_items, exclude_categories=req.exclude_categories,
                max_per_category=req.max_per_category, diversity=req.diversity,
                extra_items=[*cands, *with_text],
                extra_categories=[i.category for i in req.items if i.category],
            )  # fmt: skip
        items: list[dict[str, Any]]
        if strategy == "popularity":
            pop = self.popularity
            scores = np.fromiter((pop.get(c, 0.0) for c in cands), np.float64, len(cands))
            top = np.argsort(-scores, kind="stable")[:k]
            if rules.active:
                top = top_under_rules(cands, scores, rules, req.items, k, self.catalogue,
                                      self.vectors)  # fmt: skip
            order = top.tolist()
            items = [
                {"item_id": cands[i], "score": float(scores[i]), "rank": r + 1}
                for r, i in enumerate(order)
            ]
            if req.explain:
                for it in items:
                    s = it["score"]
                    it["explanation"] = [{"feature": "popularity", "value": s, "contribution": s}]
        else:
            user = req.user_id if strategy != "history" else None
            history = req.history
            if user is not None and history:
                history = self.featurizer.unheld(user, history, at_us)
            given = {i.item_id: {"category": i.category, "subcategory": i.subcategory}
                     for i in req.items} if req.items else None  # fmt: skip
            x = self.featurizer.features(user, cands, history, new, at_us, given)
            scores = self.predict(x, at_us)
            if not np.isfinite(scores).all():
                raise DataError("the ranker returned a non-finite score; the bundle is broken")
            top = np.argsort(-scores, kind="stable")[:k]
            if rules.active:
                top = top_under_rules(cands, scores, rules, req.items, k, self.catalogue,
                                      self.vectors)  # fmt: skip
            order = top.tolist()
            items = [
                {"item_id": cands[i], "score": s, "rank": r + 1}
                for r, (i, s) in enumerate(zip(order, scores[top].tolist(), strict=True))
            ]
            if req.explain:
                why = explain(self.featurizer.head(at_us), x[top])
                for it, w in zip(items, why, strict=True):
                    it["explanation"] = w
        return {
            "model_version": self.model_version,
            "strategy": strategy,
            "items": items,
            "unknown_items": unknown,
        }

    def recommendations(
        self, user_id: str, k: int, rules: ListRules | None = None
    ) -> dict[str, Any]:
        """The nightly list of `user_id` (top k), else the popular items the user has not
        consumed, marked `fallback`; the `RecommendationsResponse` wire format. `rules` (a
        request's, see `serving.rules.request_rules`) filter and re-rank either list; without
        them the nightly list is served as the nightly made it (under the bundle's rules
        already) and the fallback gets the bundle's rules. The answer may be shorter than k."""
        span = self.lists.ptr.get(user_id)
        if span is not None:
            lo, hi = span
            ids = self.lists.item_ids[lo:hi]
            scores = self.lists.scores[lo:hi]
            fallback, generated_at = False, self.lists.generated_at
        else:
            rules = rules if rules is not None else self.rules
            ids, scores = self._unseen_popular(user_id, k, rules)
            fallback, generated_at = True, None
        order = np.arange(min(k, len(ids)))
        if rules is not None and rules.active:
            order = top_under_rules(ids, scores, rules, (), k, self.catalogue, self.vectors)
        return {
            "model_version": self.model_version,
            "user_id": user_id,
            "fallback": fallback,
            "generated_at": generated_at,
            "items": [
                {"item_id": ids[j], "score": float(scores[j]), "rank": r + 1}
                for r, j in enumerate(order.tolist())
            ],
        }

    def _unseen_popular(
        self, user_id: str, k: int, rules: ListRules | None
    ) -> tuple[list[str], np.ndarray]:
        """The fallback list: popular items `user_id` has not consumed, in popularity order;
        enough of them for k after any exclusion or category cap of `rules`."""
        plo, phi = self.histories.ptr.get(user_id, (0, 0))
        seen = set(self.histories.item_ids[plo:phi].tolist())
        need = k if rules is None or not rules.active else max(10 * k, 1000)
        ids: list[str] = []
        keep: list[int] = []
        for j, item in enumerate(self.popular_ids):
            if len(ids) == need:
                break
            if item not in seen:
                ids.append(item)
                keep.append(j)
        return ids, self.popular_scores[np.asarray(keep, dtype=np.int64)]
