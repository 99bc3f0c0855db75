"""Business rules and diversity for ranked lists, the same for the nightly lists and the API.

`ListRules` excludes items and categories, caps the items per category, and re-ranks with
maximal marginal relevance (MMR): each next item maximises
    (1 - diversity) * relevance - diversity * (highest similarity to an item already chosen),
relevance being the ranker's score and similarity the items' cosine, both min-max scaled over
the user's candidates (so the weight depends on neither the score's nor the encoder's
scale). diversity 0 is pure relevance. A list that cannot be filled to n is shorter; excluded
items never pad it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import polars as pl

from recsys.errors import ConfigError, DataError
from recsys.vectors import ItemVectors

__all__ = ["ListRules", "apply_rules"]


@dataclass(frozen=True)
class ListRules:
    exclude_items: tuple[str, ...] = ()
    exclude_categories: tuple[str, ...] = ()
    max_per_category: int = 0  # 0 = no cap
    diversity: float = 0.0  # MMR weight in [0, 1]

    def __post_init__(self) -> None:
        if self.max_per_category < 0:
            raise ConfigError(
                f"rules: max_per_category must be >= 0 (0 = no cap), got {self.max_per_category}"
            )
        if not 0.0 <= self.diversity <= 1.0:
            raise ConfigError(f"rules: diversity must be in [0, 1], got {self.diversity}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ListRules:
        """From a manifest / JSON dict (lists become tuples); unknown keys are a ConfigError."""
        known = {"exclude_items", "exclude_categories", "max_per_category", "diversity"}
        extra = sorted(set(d) - known)
        if extra:
            raise ConfigError(f"rules: unknown key(s) {extra}; known: {sorted(known)}")
        return cls(
            exclude_items=tuple(str(x) for x in d.get("exclude_items", ())),
            exclude_categories=tuple(str(x) for x in d.get("exclude_categories", ())),
            max_per_category=int(d.get("max_per_category", 0)),
            diversity=float(d.get("diversity", 0.0)),
        )

    @property
    def active(self) -> bool:
        return bool(
            self.exclude_items or self.exclude_categories or self.max_per_category or self.diversity
        )

    def check(
        self, items: Iterable[str], categories: Iterable[str], *, where: str = "rules"
    ) -> None:
        """Raise ConfigError naming every excluded item or category the catalogue lacks."""
        known_items, known_cats = set(items), set(categories)
        bad_items = sorted(set(self.exclude_items) - known_items)
        bad_cats = sorted(set(self.exclude_categories) - known_cats)
        problems = []
        if bad_items:
            problems.append(f"unknown item(s) in exclude_items: {bad_items[:10]}")
        if bad_cats:
            problems.append(
                f"unknown categor(y/ies) in exclude_categories: {bad_cats[:10]}; "
                f"known: {sorted(known_cats)[:20]}"
            )
        if problems:
            raise ConfigError(f"{where}: " + "; ".join(problems))

    def with_request(
        self,
        *,
        exclude_items: Iterable[str] = (),
        exclude_categories: Iterable[str] = (),
        max_per_category: int | None = None,
        diversity: float | None = None,
    ) -> ListRules:
        """These rules plus a request's: exclusions add up, cap and diversity override."""
        return replace(
            self,
            exclude_items=tuple(dict.fromkeys([*self.exclude_items, *exclude_items])),
            exclude_categories=tuple(
                dict.fromkeys([*self.exclude_categories, *exclude_categories])
            ),
            max_per_category=self.max_per_category
            if max_per_category is None
            else max_per_category,
            diversity=self.diversity if diversity is None else diversity,
        )


def apply_rules(
    scored: pl.DataFrame,
    n: int,
    rules: ListRules,
    *,
    categories: pl.DataFrame | None = None,
    vectors: ItemVectors | None = None,
    tiebreak: str | None = None,
) -> pl.DataFrame:
    """Each user's top n of `scored` (user_id, item_id, score) under `rules`.

    Equal scores are ordered by the `tiebreak` column (ascending, e.g. the retrieval rank),
    then by item id.
    categories: item_id, category (needed for category rules; items without one are never
    capped). vectors: for diversity (items without a vector count as dissimilar to all).
    Returns user_id, item_id, score, rank (1-based), users sorted, best first.
    """
    if n < 1:
        raise ConfigError(f"rules: n must be >= 1, got {n}")
    for c in ("user_id", "item_id", "score"):
        if c not in scored.columns:
            raise DataError(f"rules: scored is missing column {c!r}")
    if (rules.exclude_categories or rules.max_per_category) and categories is None:
        raise ConfigError("rules: category rules need the catalogue's categories")
    if rules.diversity and vectors is None:
        raise ConfigError("rules: diversity needs item vectors")
    df = scored.select(
        pl.col("user_id").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        pl.col("score").cast(pl.Float64),
        (pl.col(tiebreak) if tiebreak else pl.lit(0)).alias("__tie"),
    )
    if rules.exclude_items:
        df = df.filter(
            ~pl.col("item_id").is_in(pl.Series(rules.exclude_items, dtype=pl.String).implode())
        )
    if categories is not None:
        cat = categories.select(
            pl.col("item_id").cast(pl.String), pl.col("category").cast(pl.String)
        )
        df = df.join(cat.unique("item_id"), on="item_id", how="left")
    else:
        df = df.with_columns(pl.lit(None, dtype=pl.String).alias("category"))
    if rules.exclude_categories:
        df = df.filter(
            pl.col("category").is_null()
            | ~pl.col("category").is_in(
                pl.Series(rules.exclude_categories, dtype=pl.String).implode()
            )
        )
    df = df.sort(["user_id", "score", "__tie", "item_id"], descending=[False, True, False, False])
    if not rules.diversity:
        if rules.max_per_category:
            df = df.filter(
                pl.col("category").is_null()
                | (pl.int_range(pl.len()).over("user_id", "category") < rules.max_per_category)
            )
        out = df.filter(pl.int_range(pl.len()).over("user_id") < n)
    else:
        assert vectors is not None
        out = _mmr(df, n, rules, vectors)
    return out.select(
        "user_id",
        "item_id",
        "score",
        (pl.int_range(pl.len()).over("user_id") + 1).cast(pl.Int32).alias("rank"),
    )


def _mmr(df: pl.DataFrame, n: int, rules: ListRules, vectors: ItemVectors) -> pl.DataFrame:
    """Greedy MMR per user over candidates sorted best first."""
    lam, cap = rules.diversity, rules.max_per_category
    rows, found = vectors.lookup(df["item_id"])
    mat = vectors.matrix
    users = df["user_id"].to_numpy()
    scores = df["score"].to_numpy()
    cats = df["category"].fill_null("").to_numpy()
    bounds = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True])
    keep: list[np.ndarray] = []
    for lo, hi in itertools.pairwise(bounds):
        m = hi - lo
        s = scores[lo:hi]
        span = s.max() - s.min()
        rel = (s - s.min()) / span if span > 0 else np.ones(m)
        v = np.zeros((m, mat.shape[1]), np.float32)
        ok = found[lo:hi]
        v[ok] = mat[rows[lo:hi][ok]]
        sim = v @ v.T  # (m, m) cosines; 0 for items without a vector
        if m > 1:  # scaled to [0, 1] over the user's candidate pairs, as relevance is: an
            # encoder whose cosines all lie in [0.8, 1] still gets a penalty that matters
            off = sim[~np.eye(int(m), dtype=bool)]
            lo_s, hi_s = float(off.min()), float(off.max())
            sim = (sim - lo_s) / (hi_s - lo_s) if hi_s > lo_s else np.zeros_like(sim)
        best_sim = np.full(m, -np.inf)  # highest similarity to a chosen item (none yet)
        free = np.ones(m, bool)
        per_cat: dict[str, int] = {}
        chosen: list[int] = []
        c = cats[lo:hi]
        while len(chosen) < n and free.any():
            penalty = np.where(np.isneginf(best_sim), 0.0, best_sim)
            gain = np.where(free, (1 - lam) * rel - lam * penalty, -np.inf)
            j = int(np.argmax(gain))  # ties: the earlier (better scored) item
            free[j] = False
            if cap and c[j] and per_cat.get(c[j], 0) >= cap:
                continue
            per_cat[c[j]] = per_cat.get(c[j], 0) + 1
            chosen.append(j)
            best_sim = np.maximum(best_sim, sim[j])
        keep.append(lo + np.asarray(chosen, dtype=np.int64))
    idx = np.concatenate(keep) if keep else np.zeros(0, np.int64)
    return df[idx]
