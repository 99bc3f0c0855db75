"""Semantic match features: how close a candidate item's vector is to a user's history, as of
a time.

A *request* is one (user, time, candidate item) row. Its history window is the user's most recent
`max_history` history items (with a known vector) strictly before the request time; history rows
without a time count as older than everything, a request without a time sees all history. Since
the rows of a user's time-sorted history before a given time form a prefix, every window is a
contiguous slice of one sorted array, found with a binary search - no join that grows with
history length times requests.

Requests that share (user, time) share a window (a *context*: an impression, or a user "now").
Contexts are processed in chunks: the candidates of a chunk as a padded (B, K, d) tensor, their
windows as (B, M, d), and one batched matrix product gives every candidate-to-history cosine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from recsys.errors import ConfigError, DataError
from recsys.vectors import ItemVectors

__all__ = [
    "FROZEN_SEMANTIC",
    "SEMANTIC_FEATURES",
    "recency_weights",
    "semantic_features",
    "user_profile_vectors",
    "window_cosines",
]

SEMANTIC_FEATURES = [
    "sem_cos_mean",
    "sem_cos_max",
    "sem_cos_top3",
    "sem_cos_recency",
    "sem_history_len",
]
# The same cosines from the frozen base encoder's vectors (a second view of the text, which no
# click tuned; the window, hence sem_history_len, is the same); FeatureSpec.frozen_semantic.
FROZEN_SEMANTIC = [f"{c}_frozen" for c in SEMANTIC_FEATURES if c.startswith("sem_cos_")]

# Upper bound on B * max(K, M) per chunk: bounds the (B, K, d) and (B, M, d) float32 tensors
# (16384 * 384 * 4 bytes = 25 MB each for a MiniLM-sized encoder).
_CHUNK_SLOTS = 16384
_US_PER_DAY = 86_400_000_000.0


@dataclass(frozen=True)
class _Windows:
    """Each context's history window as a slice [begin, begin + length) of the hist_* arrays."""

    hist_rows: np.ndarray  # (H,) int64 rows of ItemVectors.matrix, sorted by (user, time)
    hist_ts: np.ndarray  # (H,) float64 epoch microseconds, NaN where the history row has no time
    begin: np.ndarray  # (C,) int64
    length: np.ndarray  # (C,) int64, 0 <= length <= max_history


def _check_columns(df: pl.DataFrame, name: str, needed: tuple[str, ...]) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataError(
            f"{name}: missing column(s) {missing}; it needs {list(needed)} (ts optional), "
            f"got {df.columns}"
        )


def _epoch_us(df: pl.DataFrame) -> pl.Expr:
    """`ts` as Int64 epoch microseconds (null stays null); a missing or all-null column is null."""
    if "ts" not in df.columns or df.schema["ts"] == pl.Null:
        return pl.lit(None, dtype=pl.Int64)
    if not isinstance(df.schema["ts"], pl.Datetime):
        raise DataError(f"ts must be a datetime column, got {df.schema['ts']}; parse it first")
    return pl.col("ts").dt.epoch("us")


def _history_windows(
    history: pl.DataFrame,
    vectors: ItemVectors,
    ctx_users: pl.Series,
    ctx_ts: pl.Series,
    max_history: int,
) -> _Windows:
    """Windows of the contexts (ctx_users[c], ctx_ts[c]); ctx_ts is Int64 epoch us, null = now."""
    n_ctx = ctx_users.len()
    users = ctx_users.drop_nulls().unique().sort()
    codes = pl.DataFrame({"user_id": users, "__u": np.arange(users.len(), dtype=np.int64)})
    hist = history.select(
        pl.col("user_id").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        _epoch_us(history).alias("__t"),
    ).with_row_index("__h")
    rows, found = vectors.lookup(hist["item_id"])
    hist = (
        hist.with_columns(pl.Series("__row", rows))
        .filter(pl.Series(found))
        .join(codes, on="user_id", how="inner")
        .sort(["__u", "__t", "__h"], nulls_last=False)
    )
    hist_u = hist["__u"].to_numpy()
    hist_t = hist["__t"].to_numpy().astype(np.float64)  # float64: NaN for null, exact below 2**53

    ctx = pl.DataFrame({"user_id": ctx_users, "__t": ctx_ts}).join(
        codes, on="user_id", how="left", maintain_order="left"
    )
    ctx_u = ctx["__u"].fill_null(-1).to_numpy()
    ctx_t = ctx["__t"].to_numpy().astype(np.float64)

    # Dense time ranks make (user, time) a single sortable int64 key: history without a time
    # ranks 0 (before everything), a context without a time ranks n+1 (after everything).
    times = np.unique(np.concatenate([hist_t[~np.isnan(hist_t)], ctx_t[~np.isnan(ctx_t)]]))
    span = times.size + 2
    hist_r = np.where(np.isnan(hist_t), 0, np.searchsorted(times, hist_t) + 1)
    ctx_r = np.where(np.isnan(ctx_t), span - 1, np.searchsorted(times, ctx_t) + 1)
    hist_key = hist_u * span + hist_r
    ctx_key = np.maximum(ctx_u, 0) * span + ctx_r
    end = np.searchsorted(hist_key, ctx_key, side="left")  # first row at/after the request time
    user_first = np.searchsorted(hist_key, np.maximum(ctx_u, 0) * span, side="left")
    begin = np.maximum(user_first, end - max_history)
    length = np.where(ctx_u >= 0, end - begin, 0).astype(np.int64)
    assert length.shape == (n_ctx,)
    return _Windows(
        hist_rows=hist["__row"].to_numpy().astype(np.int64),
        hist_ts=hist_t,
        begin=begin.astype(np.int64),
        length=length,
    )


def _gather_windows(
    win: _Windows, vectors: ItemVectors, cidx: np.ndarray, m: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Padded windows of contexts `cidx` (B,): vectors (B, m, d), mask (B, m), times (B, m).

    Padding slots hold an arbitrary real vector (not zeros, to save a pass over the tensor):
    callers give them weight 0 or mask them out.
    """
    slots = np.arange(m)
    pos = win.begin[cidx, None] + slots[None, :]
    mask = slots[None, :] < win.length[cidx, None]
    pos = np.where(mask, pos, 0)
    rows = np.where(mask, win.hist_rows[pos], 0)
    hv = np.take(vectors.matrix, rows, axis=0)
    ts = np.where(mask, win.hist_ts[pos], np.nan)
    return hv, mask, ts


def recency_weights(mask: np.ndarray, ts: np.ndarray, half_life_days: float) -> np.ndarray:
    """Weights (B, m) = 0.5 ** (age_days / half_life_days), age measured from the newest dated row.

    Measuring age from the newest row instead of the request time scales a window's weights by
    one constant, which leaves the cosine to the normalised weighted mean unchanged and keeps
    weights in (0, 1]. Rows without a time get the window's smallest (oldest) weight; a window
    with no dated row gets equal weights.
    """
    dated = mask & ~np.isnan(ts)
    ref = np.where(dated, ts, -np.inf).max(axis=1, keepdims=True)
    age = np.where(dated, (ref - ts) / _US_PER_DAY, 0.0)
    w = np.where(dated, 0.5 ** (age / half_life_days), np.nan)
    oldest = np.where(dated, w, np.inf).min(axis=1, keepdims=True)
    oldest = np.where(np.isfinite(oldest), oldest, 1.0)
    w = np.where(dated, w, oldest)
    return np.where(mask, w, 0.0)


def _chunks(k_sorted: np.ndarray, width_floor: int) -> list[tuple[int, int]]:
    """Split contexts (sorted by candidate count K ascending) so each chunk's B * max(K, M) fits."""
    bounds = []
    i, n = 0, k_sorted.size
    while i < n:
        window = np.maximum(k_sorted[i : i + _CHUNK_SLOTS], width_floor)
        cost = np.arange(1, window.size + 1) * window  # nondecreasing
        j = i + max(1, int(np.searchsorted(cost, _CHUNK_SLOTS, side="right")))
        bounds.append((i, j))
        i = j
    return bounds


def window_cosines(
    sims: np.ndarray,
    hv: np.ndarray,
    hmask: np.ndarray,
    hts: np.ndarray,
    lengths: np.ndarray,
    half_life_days: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four cosines of SEMANTIC_FEATURES for B contexts of K candidates each: (mean, max,
    top3, recency), each (B, K). The one computation behind the batch features
    (`semantic_features`, chunks of contexts) and the API (`serving.featurize`, one context).

    sims: (B, K, M) float32 cosines of each candidate to each history slot; hv: (B, M, d)
    float32 unit history vectors, 0 on padding; hmask: (B, M) bool, real history slots; hts:
    (B, M) their epoch microseconds (see `recency_weights`); lengths: (B,) int, real slots per
    context (>= 1).
    """
    cos = {}
    for slot, w in (
        (0, hmask.astype(np.float64)),
        (3, recency_weights(hmask, hts, half_life_days)),
    ):
        w32 = w.astype(np.float32)  # (B, M), 0 on padding
        centre = np.einsum("bm,bmd->bd", w32, hv)  # (B, d)
        norm = np.linalg.norm(centre, axis=1)  # 0 only if history vectors cancel out
        with np.errstate(invalid="ignore", divide="ignore"):
            cos[slot] = np.einsum("bkm,bm->bk", sims, w32) / norm[:, None]  # (B, K)
    masked = np.where(hmask[:, None, :], sims, -np.inf)
    top = -np.sort(-masked, axis=2)[:, :, :3]  # (B, K, <=3) largest first
    n_top = np.minimum(lengths, 3)[:, None]  # (B, 1)
    top_valid = np.arange(top.shape[2])[None, None, :] < n_top[:, :, None]
    top3 = np.where(top_valid, top, 0.0).sum(axis=2) / n_top
    return cos[0], top[:, :, 0], top3, cos[3]


def semantic_features(
    requests: pl.DataFrame,
    history: pl.DataFrame,
    vectors: ItemVectors,
    *,
    max_history: int = 50,
    half_life_days: float = 7.0,
) -> pl.DataFrame:
    """Semantic match features of each request's candidate item against the user's history.

    requests: user_id, item_id, ts (datetime; null = now, after all history) and any other
        columns (request_id, ...), which are kept.
    history: user_id, item_id, ts (datetime, nullable = before everything; optional).
    A request sees the user's most recent `max_history` history rows with ts null or ts < its ts
    whose item has a vector (history items without a vector are skipped).

    Returns `requests` (same rows, same order) with Float32 columns
      sem_cos_mean     cosine of the candidate to the normalised mean history vector
      sem_cos_max      largest cosine to a single history item
      sem_cos_top3     mean of the three largest cosines (of all of them with < 3 history items)
      sem_cos_recency  cosine to the normalised recency-weighted mean history vector; weights
                       0.5 ** (age_days / half_life_days), undated history gets the oldest weight
    and Int32 `sem_history_len` (history items used, 0..max_history). The cosines are NaN when
    the window is empty or the candidate has no vector. Existing columns of these names are
    replaced.
    """
    if max_history < 1:
        raise ConfigError(f"semantic_features: max_history must be >= 1, got {max_history}")
    if not half_life_days > 0:
        raise ConfigError(f"semantic_features: half_life_days must be > 0, got {half_life_days}")
    _check_columns(requests, "requests", ("user_id", "item_id"))
    _check_columns(history, "history", ("user_id", "item_id"))

    n = requests.height
    keys = requests.select(pl.col("user_id").cast(pl.String), _epoch_us(requests).alias("__t"))
    ctx = keys.unique(maintain_order=True).with_row_index("__c")
    req_ctx = (
        keys.join(ctx, on=["user_id", "__t"], how="left", nulls_equal=True, maintain_order="left")[
            "__c"
        ]
        .to_numpy()
        .astype(np.int64)
    )
    win = _history_windows(history, vectors, ctx["user_id"], ctx["__t"], max_history)
    cand_rows, cand_found = vectors.lookup(requests["item_id"].cast(pl.String))

    out = np.full((4, n), np.nan, dtype=np.float32)  # mean, max, top3, recency
    n_ctx = ctx.height
    order = np.argsort(req_ctx, kind="stable")  # request rows grouped by context
    k = np.bincount(req_ctx, minlength=n_ctx)
    first = np.concatenate([[0], np.cumsum(k)[:-1]]) if n_ctx else np.zeros(0, np.int64)
    active = np.flatnonzero(win.length > 0) if vectors.dim else np.zeros(0, np.int64)
    active = active[np.lexsort((win.length[active], k[active]))]
    width_floor = int(win.length.max()) if n_ctx else 0

    for i, j in _chunks(k[active], width_floor):
        cidx = active[i:j]
        kk, mm = int(k[cidx].max()), int(win.length[cidx].max())
        hv, hmask, hts = _gather_windows(win, vectors, cidx, mm)  # (B, M, d), (B, M), (B, M)

        slots = np.arange(kk)
        cmask = slots[None, :] < k[cidx, None]  # (B, K)
        req = order[np.where(cmask, first[cidx, None] + slots[None, :], 0)]  # request row ids
        cmask &= cand_found[req]
        cv = np.take(vectors.matrix, np.where(cmask, cand_rows[req], 0), axis=0)  # (B, K, d)
        sims = np.matmul(cv, hv.transpose(0, 2, 1))  # (B, K, M) cosines

        stats = window_cosines(sims, hv, hmask, hts, win.length[cidx], half_life_days)
        for slot, values in enumerate(stats):
            out[slot, req[cmask]] = values[cmask]

    hist_len = win.length[req_ctx] if n else np.zeros(0, np.int64)
    return requests.with_columns(
        pl.Series("sem_cos_mean", out[0], dtype=pl.Float32),
        pl.Series("sem_cos_max", out[1], dtype=pl.Float32),
        pl.Series("sem_cos_top3", out[2], dtype=pl.Float32),
        pl.Series("sem_cos_recency", out[3], dtype=pl.Float32),
        pl.Series("sem_history_len", hist_len, dtype=pl.Int32),
    )


def user_profile_vectors(
    history: pl.DataFrame, vectors: ItemVectors, *, max_history: int = 50
) -> tuple[list[str], np.ndarray]:
    """Each user's profile: the normalised mean vector of their `max_history` latest history items.

    history: user_id, item_id, ts (nullable = oldest; optional). Items without a vector are
    skipped; users with no such item are left out (serve them popular items).
    Returns (user_ids sorted, matrix (n_users, d) float32 unit rows), for candidate retrieval.
    """
    if max_history < 1:
        raise ConfigError(f"user_profile_vectors: max_history must be >= 1, got {max_history}")
    _check_columns(history, "history", ("user_id", "item_id"))
    users = history["user_id"].cast(pl.String).drop_nulls().unique().sort()
    win = _history_windows(
        history, vectors, users, pl.Series([None] * users.len(), dtype=pl.Int64), max_history
    )
    keep = np.flatnonzero(win.length > 0)
    out = np.zeros((keep.size, vectors.dim), dtype=np.float32)
    m = int(win.length.max()) if users.len() else 0
    step = max(1, _CHUNK_SLOTS // max(m, 1))
    for i in range(0, keep.size, step):
        cidx = keep[i : i + step]
        hv, mask, _ = _gather_windows(win, vectors, cidx, m)
        centre = np.einsum("bm,bmd->bd", mask.astype(np.float32), hv)
        norm = np.linalg.norm(centre, axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[i : i + step] = centre / norm
    ok = np.isfinite(out).all(axis=1) if keep.size else np.zeros(0, bool)
    ids = users.gather(keep[ok]).to_list()
    return ids, out[ok]
