"""The per-request hot path: rank one user's candidates with arrays prepared once per bundle.

`ServingModel.from_bundle(bundle)` does all the slow work at load time: the feature snapshot's
numpy index (`features.fast`), each user's history as rows of the item-vector matrix, the
popularity prior and the nightly lists as dicts. A request then costs dict lookups, a few small
array gathers, one (K, d) x (d, M) product for the semantic features and one LightGBM call on the
whole candidate batch.

The feature matrix equals `bundle.featurize` (the polars path shared with training and the
nightly lists) for the same request: the behavioural block is `features.snapshot_features_numpy`
and the semantic block repeats, for one context, the array operations of
`recsys.semantic.semantic_features` in the same shapes and dtypes. `ServingModel.self_check`
compares the two on probe requests whenever a bundle is loaded, and tests/test_serving.py does so
on many random requests; a difference refuses the bundle rather than serving skewed scores.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import polars as pl

from features import SnapshotIndex, snapshot_features_numpy
from features.derive import derive_numpy
from features.live import LiveFeatures, epoch_us, from_us
from recsys.bundle import Bundle
from recsys.errors import DataError
from recsys.featurize import ONLINE, FeatureSpec, matrix
from recsys.ranker import Ranker
from recsys.relative import relative_columns, within_request
from recsys.rules import ListRules, apply_rules
from recsys.semantic import recency_weights
from recsys.vectors import ItemVectors
from serving.schemas import EXPLAIN_TOP, ItemText, RankRequest

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
ANONYMOUS = "\x00anonymous"  # the user id a request without a known user has in the polars path


def _epoch_us(t: datetime) -> int:
    return (t - _EPOCH) // _US


@dataclass(frozen=True)
class NewItems:
    """Vectors of items embedded for one request: ids (m,), matrix (m, d) float32 unit rows,
    and `frozen` (m, d') the frozen base encoder's, when the bundle's ranker reads them."""

    ids: list[str]
    matrix: np.ndarray
    frozen: np.ndarray | None = None

    @property
    def index(self) -> dict[str, int]:
        return {i: n for n, i in enumerate(self.ids)}


@dataclass(frozen=True)
class _Histories:
    """Every user's stored history in the order `semantic_features` windows it.

    Rows sorted by (user, ts with nulls first, row of bundle.history); user u owns rows
    ptr[u] = (lo, hi). item_ids (H,) str, vrow (H,) int64 row of the vector matrix or -1,
    ts (H,) float64 epoch microseconds (NaN: no time). Only rows before the snapshot's as_of.
    """

    ptr: dict[str, tuple[int, int]]
    item_ids: np.ndarray
    vrow: np.ndarray
    ts: np.ndarray

    @classmethod
    def build(cls, history: pl.DataFrame, vectors: ItemVectors, as_of: datetime) -> _Histories:
        ts = (
            pl.col("ts").dt.epoch("us")
            if "ts" in history.columns and isinstance(history.schema["ts"], pl.Datetime)
            else pl.lit(None, dtype=pl.Int64)
        )
        h = (
            history.select(
                pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String), ts.alias("t")
            )
            .with_row_index("__h")
            .filter(pl.col("user_id").is_not_null() & pl.col("item_id").is_not_null())
            .filter(pl.col("t").is_null() | (pl.col("t") < _epoch_us(as_of)))
            .sort(["user_id", "t", "__h"], nulls_last=False)
        )
        item_ids = h["item_id"].to_numpy().astype(object)
        vrow = np.fromiter((vectors.index.get(i, -1) for i in item_ids), np.int64, len(item_ids))
        bounds = (
            h.select("user_id")
            .with_row_index("__r")
            .group_by("user_id", maintain_order=True)
            .agg(pl.col("__r").min().alias("lo"), pl.len().alias("n"))
        )
        ptr = {
            u: (int(lo), int(lo) + int(n))
            for u, lo, n in zip(
                bounds["user_id"].to_list(),
                bounds["lo"].to_list(),
                bounds["n"].to_list(),
                strict=True,
            )
        }
        return cls(ptr, item_ids, vrow, h["t"].cast(pl.Float64).fill_null(np.nan).to_numpy())


@dataclass(frozen=True)
class _Lists:
    """The nightly lists: user u's rows are lo:hi of item_ids / scores, in rank order."""

    ptr: dict[str, tuple[int, int]]
    item_ids: list[str]
    scores: np.ndarray
    generated_at: str | None

    @classmethod
    def build(cls, recs: pl.DataFrame | None) -> _Lists:
        if recs is None or recs.height == 0:
            return cls({}, [], np.zeros(0), None)
        r = recs.sort(["user_id", "rank"]).with_row_index("__r")
        b = r.group_by("user_id", maintain_order=True).agg(
            pl.col("__r").min().alias("lo"), pl.len().alias("n")
        )
        ptr = {
            u: (int(lo), int(lo) + int(n))
            for u, lo, n in zip(
                b["user_id"].to_list(), b["lo"].to_list(), b["n"].to_list(), strict=True
            )
        }
        gen = r["generated_at"].max() if "generated_at" in r.columns else None
        return cls(
            ptr,
            r["item_id"].to_list(),
            r["score"].cast(pl.Float64).to_numpy(),
            gen.isoformat() if isinstance(gen, datetime) else None,
        )


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


class ServingModel:
    """A loaded bundle plus the lookups of the hot path. Its model part never changes, so a
    reference to it can be swapped atomically and requests in flight finish on the one they got;
    the live state (events) changes under `live_lock`.
    """

    def __init__(self, bundle: Bundle, *, preload_encoder: bool = True) -> None:
        self.bundle = bundle
        self.model_version = bundle.model_version
        self.batch = Head.of(bundle.spec, bundle.ranker)
        self.online = (
            Head.of(bundle.online_spec, bundle.online_ranker)
            if bundle.online_spec is not None and bundle.online_ranker is not None
            else None
        )
        self.spec = bundle.spec
        self.columns = self.batch.columns
        self.semantic = any(h.spec.use_semantic for h in (self.batch, self.online) if h)
        self.vectors = bundle.vectors
        snap = bundle.snapshot
        self.index = SnapshotIndex.of(snap)  # builds the numpy lookups once (kept on the snapshot)
        self.as_of_us = _epoch_us(snap.as_of)
        self.histories = _Histories.build(bundle.history, bundle.vectors, snap.as_of)
        self.known_users = set(self.index.user_row) | set(self.histories.ptr)
        pop = bundle.popular.select(
            pl.col("item_id").cast(pl.String), pl.col("score").cast(pl.Float64)
        )
        self.popular_ids: list[str] = pop["item_id"].to_list()
        self.popular_scores = pop["score"].to_numpy()
        self.popularity = dict(zip(self.popular_ids, self.popular_scores.tolist(), strict=True))
        self.known_items = set(self.index.item_row) | set(self.vectors.index)
        self.lists = _Lists.build(bundle.recommendations)
        cat = snap.tables["items"].select(
            pl.col("item_id").cast(pl.String), pl.col("category").cast(pl.String)
        )
        self.item_category: dict[str, str] = dict(cat.drop_nulls().iter_rows())
        self.categories = set(self.item_category.values())
        self.rules = ListRules.from_dict(bundle.manifest.get("lists", {}).get("rules", {}))
        self.encoder: Any = bundle.encoder("auto") if preload_encoder else None
        if preload_encoder and self.vectors.frozen is not None:
            bundle.encoder("auto", frozen=True)  # new items get both views' vectors
        self._encoder_lock = threading.Lock()
        # Live state (events after the cut-off, serving/app.py feeds it): built on first use.
        # live_lock serialises event writers against feature readers of `_live` and the live
        # catalogue (ids, vectors, categories of items that came as events).
        self.live_lock = threading.Lock()
        self._live: LiveFeatures | None = None
        fz = self.vectors.frozen
        self.live_items = NewItems(
            [], np.zeros((0, self.vectors.dim), dtype=np.float32),
            np.zeros((0, fz.dim), dtype=np.float32) if fz is not None else None,
        )  # fmt: skip

    @classmethod
    def from_bundle(cls, bundle: Bundle, *, preload_encoder: bool = True) -> ServingModel:
        """Prepare `bundle` for serving and check its fast path against `bundle.featurize`."""
        model = cls(bundle, preload_encoder=preload_encoder)
        model.self_check()
        return model

    # ------------------------------------------------------------------ live state

    def live(self) -> LiveFeatures:
        """The live feature state (the snapshot plus events since), built on first use; call
        with `live_lock` held."""
        if self._live is None:
            self._live = LiveFeatures(self.bundle.snapshot)
        return self._live

    def head(self, at_us: int | None) -> Head:
        """The ranker for a request: the online one when features come from the live state
        (`at_us` given) and the bundle has one, else the bundle's (batch) ranker."""
        return self.online if at_us is not None and self.online is not None else self.batch

    def served(self, live: bool) -> tuple[str, str]:
        """(the ranker's name, the freshness of its features) for a server with events (`live`)
        or without."""
        if live and self.online is not None:
            name = self.bundle.manifest.get("online", {}).get("ranker", {}).get("name", "online")
            return str(name), "online: the live state (events) as of each request"
        name = self.bundle.manifest.get("ranker", {}).get("name", "ranker")
        cut = self.bundle.snapshot.as_of.isoformat()
        return str(name), f"batch: as of the cut-off {cut} (no events after it are counted)"

    def moment(self, at_us: int) -> int:
        """The moment whose features a request at `at_us` gets: itself for a ranker trained on
        online features, else the start of its refresh period (never before the cut-off)."""
        refresh = self.head(at_us).spec.refresh
        if refresh == ONLINE:
            return at_us
        start = pl.select(pl.lit(from_us(at_us)).dt.truncate(refresh)).item()
        return max(epoch_us(start), self.as_of_us)

    def with_live(self, new: NewItems | None) -> NewItems | None:
        """The items that came as events, then `new` (a request's own texts), as one block."""
        live = self.live_items
        if not live.ids:
            return new
        if new is None or not new.ids:
            return live
        frozen = None
        if live.frozen is not None and new.frozen is not None:
            frozen = np.vstack([live.frozen, new.frozen])
        return NewItems([*live.ids, *new.ids], np.vstack([live.matrix, new.matrix]), frozen)

    def apply_events(self, events: Sequence[dict[str, Any]], vectors: NewItems | None) -> None:
        """Count normalised events (serving/events.py) into the live state; `vectors` holds the
        item events' embeddings (None without semantic features). Holds `live_lock`."""
        with self.live_lock:
            live = self.live()
            if vectors is not None and vectors.ids:
                self._add_live_vectors(vectors)
            for e in events:
                kind, ts = e["type"], epoch_us(datetime.fromisoformat(e["ts"]))
                if kind == "item":
                    pub = e.get("published_at")
                    live.add_item(
                        e["item_id"], e.get("category"), e.get("subcategory"),
                        epoch_us(datetime.fromisoformat(pub)) if pub else None,
                    )  # fmt: skip
                    self.known_items.add(e["item_id"])  # read by membership only
                    cat = e.get("category")
                    if cat and self.item_category.get(e["item_id"]) != cat:
                        # copied, not changed in place: requests iterate these (rules)
                        self.item_category = {**self.item_category, e["item_id"]: cat}
                        if cat not in self.categories:
                            self.categories = self.categories | {cat}
                elif kind == "impression":
                    live.add_impression(e["request_id"], e["user_id"], ts, e["items"])
                    self.known_users.add(e["user_id"])
                else:
                    live.add_click(e["user_id"], e["item_id"], ts, e.get("request_id"))
                    self.known_users.add(e["user_id"])

    def _add_live_vectors(self, vectors: NewItems) -> None:
        live = self.live_items
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
        self.live_items = NewItems(ids, matrix_, frozen)

    # ------------------------------------------------------------------ features

    def features(
        self,
        user_id: str | None,
        candidates: Sequence[str],
        history: Sequence[str] = (),
        new: NewItems | None = None,
        at_us: int | None = None,
    ) -> np.ndarray:
        """The ranker's feature matrix (len(candidates), len(columns)) float64, NaN = missing.

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
                self.bundle.snapshot, user_id, candidates, extra_history=history
            )
            live_history: list[tuple[int, str]] = []
        else:
            moment = self.moment(at_us)
            with self.live_lock:
                live = self.live()
                raw = live.raw(user_id, candidates, moment, history)
                live_history = live.history_before(user_id, moment) if user_id is not None else []
                new = self.with_live(new)
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
        `rows` (rows of the virtual [base; new] matrix, -1 = no vector)."""
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
            hts = ts.reshape(1, m)
            sims = np.matmul(cv, hv.transpose(0, 2, 1))  # (1, K, M) cosines
            for slot, w in (
                (0, hmask.astype(np.float64)),
                (3, recency_weights(hmask, hts, self.spec.half_life_days)),
            ):
                centre = np.einsum("bm,bmd->bd", w.astype(np.float32), hv)
                norm = np.linalg.norm(centre, axis=1)
                with np.errstate(invalid="ignore", divide="ignore"):
                    cos = np.einsum("bkm,bm->bk", sims, w.astype(np.float32)) / norm[:, None]
                out[slot, cmask[0]] = cos[cmask]
            masked = np.where(hmask[:, None, :], sims, -np.inf)
            top = -np.sort(-masked, axis=2)[:, :, :3]  # (1, K, <=3) largest first
            n_top = np.minimum(np.array([m]), 3)[:, None]  # (1, 1)
            top_valid = np.arange(top.shape[2])[None, None, :] < n_top[:, :, None]
            top3 = np.where(top_valid, top, 0.0).sum(axis=2) / n_top
            out[1, cmask[0]] = top[:, :, 0][cmask]
            out[2, cmask[0]] = top3[cmask]
        return out

    # ------------------------------------------------------------------ requests

    def predict(self, x: np.ndarray, at_us: int | None = None) -> np.ndarray:
        """Ranker scores (n,) of feature rows x (n, F) from `features(..., at_us)`: the batch
        job's `ranker.predict` (the online ranker's with `at_us`). (Threads: the server caps
        OpenMP at one per worker, see serving/app.py.)"""
        return self.head(at_us).ranker.predict(x)

    def text_encoder(self, *, frozen: bool = False) -> Any:
        """The bundle's encoder in the CPU's fast form ("auto": int8 with VNNI/AMX, else fp32,
        as the embed job chooses on this machine), loaded on first use by one thread (requests
        run on a thread pool: two first requests must not both load it); frozen: the base
        model it was tuned from."""
        with self._encoder_lock:
            if frozen:
                return self.bundle.encoder("auto", frozen=True)
            if self.encoder is None:
                self.encoder = self.bundle.encoder("auto")
            return self.encoder

    def embed(self, items: Sequence[ItemText], needed: set[str]) -> NewItems | None:
        """Vectors of the `items` the bundle has no vector for and that `needed` names.

        Text is built by `recsys.encoder.item_texts` with the bundle encoder's template and
        embedded by its encoder (`text_encoder`); rows are normalised as
        `ItemVectors.from_arrays` does."""
        todo = [i for i in items if i.item_id in needed and i.item_id not in self.vectors.index]
        if not todo or not self.semantic:
            return None
        return self._embed_texts(todo)

    def _embed_texts(self, todo: Sequence[ItemText]) -> NewItems:
        from recsys.encoder import item_texts

        encoder = self.text_encoder()
        frame = pl.DataFrame(
            [i.model_dump() for i in todo],
            schema={c: pl.String for c in ("item_id", "title", "description", "category",
                                           "subcategory")},
        )  # fmt: skip
        texts, _ = item_texts(frame, encoder.template)
        ids = [i.item_id for i in todo]
        fresh = ItemVectors.from_arrays(ids, encoder.embed(texts))
        frozen = None
        if self.vectors.frozen is not None:  # the ranker reads the frozen encoder's cosines too
            frozen = ItemVectors.from_arrays(ids, self.text_encoder(frozen=True).embed(texts))
        return NewItems(fresh.ids, fresh.matrix, frozen.matrix if frozen is not None else None)

    def embed_events(self, items: Sequence[dict[str, Any]]) -> NewItems | None:
        """Vectors of item events (normalised dicts), embedded as `embed` does; None without
        semantic features or items."""
        if not items or not self.semantic:
            return None
        texts = [ItemText.model_validate({k: e[k] for k in ItemText.model_fields if k in e})
                 for e in items]  # fmt: skip
        last = {t.item_id: t for t in texts}  # the latest text of an item sent twice
        return self._embed_texts(list(last.values()))

    def strategy(self, user_id: str | None, history: Sequence[str], live: bool = False) -> str:
        """profile / profile+history / history / popularity. With live features (`live`) any
        user id is a profile: the online ranker trained on first-time users' rows too (zero
        counts), so it ranks a new user as the offline evaluation scores them."""
        known = user_id is not None and (live or user_id in self.known_users)
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
        tests validate it against `RankResponse`). See serving/app.py for the contract."""
        cands = req.candidates
        k = min(req.k or len(cands), len(cands))
        with_text = {i.item_id for i in req.items}
        known = self.known_items
        unknown = [c for c in cands if c not in known and c not in with_text]
        strategy = self.strategy(req.user_id, req.history, live=at_us is not None)
        asks = req.exclude_items or req.exclude_categories or req.max_per_category is not None
        rules = self.rules
        if asks or req.diversity is not None:
            rules = self.request_rules(
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
                top = self._ruled(cands, scores, rules, req.items, k)
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
            x = self.features(user, cands, req.history, new, at_us)
            scores = self.predict(x, at_us)
            if not np.isfinite(scores).all():
                raise DataError("the ranker returned a non-finite score; the bundle is broken")
            top = np.argsort(-scores, kind="stable")[:k]
            if rules.active:
                top = self._ruled(cands, scores, rules, req.items, k)
            order = top.tolist()
            items = [
                {"item_id": cands[i], "score": s, "rank": r + 1}
                for r, (i, s) in enumerate(zip(order, scores[top].tolist(), strict=True))
            ]
            if req.explain:
                for it, why in zip(items, self.explain(x[top], at_us=at_us), strict=True):
                    it["explanation"] = why
        return {
            "model_version": self.model_version,
            "strategy": strategy,
            "items": items,
            "unknown_items": unknown,
        }

    def request_rules(
        self,
        *,
        exclude_items: Sequence[str] = (),
        exclude_categories: Sequence[str] = (),
        max_per_category: int | None = None,
        diversity: float | None = None,
        extra_items: Sequence[str] = (),
        extra_categories: Sequence[str] = (),
    ) -> ListRules:
        """The bundle's rules plus a request's; ConfigError (a 422) names an excluded item or
        category that neither the bundle nor the request knows."""
        rules = self.rules.with_request(
            exclude_items=exclude_items, exclude_categories=exclude_categories,
            max_per_category=max_per_category, diversity=diversity,
        )  # fmt: skip
        if exclude_items or exclude_categories:
            known_items, extra = self.known_items, set(extra_items)
            bad = [i for i in exclude_items if i not in known_items and i not in extra]
            cats = self.categories | set(extra_categories)
            bad_cats = [c for c in exclude_categories if c not in cats]
            if bad or bad_cats:
                ListRules(tuple(bad), tuple(bad_cats)).check(
                    (), sorted(self.categories), where="invalid request"
                )
        return rules

    def _ruled(
        self,
        cands: Sequence[str],
        scores: np.ndarray,
        rules: ListRules,
        texts: Sequence[ItemText],
        k: int,
    ) -> np.ndarray:
        """Positions in `cands` of the top k under `rules` (the nightly lists' `apply_rules`);
        categories from the bundle, else from the request's item texts."""
        cat_of = {**self.item_category, **{i.item_id: i.category for i in texts if i.category}}
        frame = pl.DataFrame(
            {
                "user_id": pl.Series([""] * len(cands), dtype=pl.String),
                "item_id": pl.Series(list(cands), dtype=pl.String),
                "score": np.asarray(scores, dtype=np.float64),
                "pos": np.arange(len(cands)),
            }
        )
        cats = pl.DataFrame(
            {"item_id": list(cands), "category": [cat_of.get(c) for c in cands]},
            schema={"item_id": pl.String, "category": pl.String},
        )
        out = apply_rules(frame, k, rules, categories=cats, vectors=self.vectors, tiebreak="pos")
        return out.join(frame.select("item_id", "pos"), on="item_id", maintain_order="left")[
            "pos"
        ].to_numpy()

    def explain(
        self, x: np.ndarray, top: int = EXPLAIN_TOP, at_us: int | None = None
    ) -> list[list[dict[str, Any]]]:
        """Each row's `top` features by |contribution| (LightGBM pred_contrib, bias left out):
        [{feature, value (None = missing), contribution}] per row of x (n, F)."""
        if x.shape[0] == 0:
            return []
        head = self.head(at_us)
        contrib = head.ranker.contributions(x)[:, :-1]  # (n, F), bias dropped
        order = np.argsort(-np.abs(contrib), axis=1, kind="stable")[:, :top]
        return [
            [
                {
                    "feature": head.columns[c],
                    "value": None if np.isnan(x[row, c]) else float(x[row, c]),
                    "contribution": float(contrib[row, c]),
                }
                for c in cols
            ]
            for row, cols in enumerate(order.tolist())
        ]

    def recommendations(
        self, user_id: str, k: int, rules: ListRules | None = None
    ) -> dict[str, Any]:
        """The nightly list of `user_id` (top k), else the popular items the user has not
        consumed, marked `fallback`; the `RecommendationsResponse` wire format. `rules` (a
        request's, see `request_rules`) filter and re-rank either list; without them the nightly
        list is served as the nightly made it (under the bundle's rules already) and the
        fallback gets the bundle's rules. The answer may be shorter than k."""
        span = self.lists.ptr.get(user_id)
        if span is not None:
            lo, hi = span
            ids = self.lists.item_ids[lo:hi]
            scores = self.lists.scores[lo:hi]
            fallback, generated_at = False, self.lists.generated_at
        else:
            rules = rules if rules is not None else self.rules
            plo, phi = self.histories.ptr.get(user_id, (0, 0))
            seen = set(self.histories.item_ids[plo:phi].tolist())
            # enough unseen popular items for k after any exclusion or category cap
            need = k if rules is None or not rules.active else max(10 * k, 1000)
            ids, keep = [], []
            for j, item in enumerate(self.popular_ids):
                if len(ids) == need:
                    break
                if item not in seen:
                    ids.append(item)
                    keep.append(j)
            scores = self.popular_scores[np.asarray(keep, dtype=np.int64)]
            fallback, generated_at = True, None
        order = np.arange(min(k, len(ids)))
        if rules is not None and rules.active:
            order = self._ruled(ids, scores, rules, (), k)
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

    # ------------------------------------------------------------------ checks

    def reference_features(
        self,
        user_id: str | None,
        candidates: Sequence[str],
        history: Sequence[str] = (),
        new: NewItems | None = None,
        head: Head | None = None,
    ) -> np.ndarray:
        """The same matrix through the shared polars featurisation (`bundle.featurize`), as of
        the cut-off, for `head` (default the batch one)."""
        head = head or self.batch
        user = user_id if user_id is not None else ANONYMOUS
        req = pl.DataFrame(
            {"user_id": [user] * len(candidates), "item_id": list(candidates)},
            schema={"user_id": pl.String, "item_id": pl.String},
        )
        extra = (
            pl.DataFrame(
                {"user_id": [user] * len(history), "item_id": list(history)},
                schema={"user_id": pl.String, "item_id": pl.String},
            )
            if history
            else None
        )
        vectors = None
        if new is not None and new.ids:
            vectors = self.vectors.extended(new.ids, new.matrix, new.frozen)
        frame = self.bundle.featurize(req, extra_history=extra, vectors=vectors, spec=head.spec)
        return matrix(frame, head.columns)

    def self_check(self, tol: float = 1e-9) -> None:
        """Compare `features` with `reference_features` on probe requests (a stored user, an
        anonymous history, cold start); a difference is a DataError and the bundle is refused."""
        items = [*self.popular_ids[:50], "\x00unknown-item"]
        users = sorted(self.histories.ptr)[:1]
        probes: list[tuple[str | None, list[str]]] = [(None, []), (None, items[:3])]
        probes += [(u, []) for u in users] + [(u, items[3:5]) for u in users]
        # the batch path (snapshot), and the live path of the online ranker at the cut-off
        paths: list[int | None] = [None] + ([self.as_of_us] if self.online is not None else [])
        for at_us in paths:
            head = self.head(at_us)
            for user, hist in probes:
                fast = self.features(user, items, hist, at_us=at_us)
                ref = self.reference_features(user, items, hist, head=head)
                diffs = [_max_diff(fast[:, j], ref[:, j]) for j in range(len(head.columns))]
                worst = int(np.argmax(diffs))
                if not diffs[worst] <= tol:
                    path = "live" if at_us is not None else "fast"
                    raise DataError(
                        f"serving features ({path} path) differ from bundle.featurize by "
                        f"{diffs[worst]:.3g} in {head.columns[worst]!r} for user {user!r}; "
                        "refusing the bundle: serving/ranking.py or features/live.py must be "
                        "fixed"
                    )
                if not np.isfinite(self.predict(fast, at_us)).all():
                    raise DataError("the bundle's ranker gives non-finite scores on probes")


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| where both are numbers; inf where only one is NaN or shapes differ."""
    if a.shape != b.shape:
        return float("inf")
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if (nan_a != nan_b).any():
        return float("inf")
    if a.size == 0 or nan_a.all():
        return 0.0
    return float(np.max(np.abs(a[~nan_a] - b[~nan_b])))
