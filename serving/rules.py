"""Business rules on served lists: the bundle's (manifest `lists.rules`) plus a request's.

    request_rules(bundle_rules, catalogue, exclude_items=..., ...) -> ListRules
    top_under_rules(candidates, scores, rules, texts, k, catalogue, vectors) -> positions

The rules are `recsys.rules`, the ones the nightly lists are made under (`apply_rules`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from recsys.rules import ListRules, apply_rules
from recsys.vectors import ItemVectors
from serving.lookups import Catalogue
from serving.schemas import ItemText


def request_rules(
    rules: ListRules,
    catalogue: Catalogue,
    *,
    exclude_items: Sequence[str] = (),
    exclude_categories: Sequence[str] = (),
    max_per_category: int | None = None,
    diversity: float | None = None,
    extra_items: Sequence[str] = (),
    extra_categories: Sequence[str] = (),
) -> ListRules:
    """The bundle's `rules` plus a request's; ConfigError (a 422) names an excluded item or
    category that neither the bundle (`catalogue`) nor the request (`extra_*`) knows."""
    out = rules.with_request(
        exclude_items=exclude_items, exclude_categories=exclude_categories,
        max_per_category=max_per_category, diversity=diversity,
    )  # fmt: skip
    if exclude_items or exclude_categories:
        known_items, extra = catalogue.known_items, set(extra_items)
        bad = [i for i in exclude_items if i not in known_items and i not in extra]
        cats = catalogue.categories | set(extra_categories)
        bad_cats = [c for c in exclude_categories if c not in cats]
        if bad or bad_cats:
            ListRules(tuple(bad), tuple(bad_cats)).check(
                (), sorted(catalogue.categories), where="invalid request"
            )
    return out


def top_under_rules(
    cands: Sequence[str],
    scores: np.ndarray,
    rules: ListRules,
    texts: Sequence[ItemText],
    k: int,
    catalogue: Catalogue,
    vectors: ItemVectors,
) -> np.ndarray:
    """Positions in `cands` of the top k under `rules` (the nightly lists' `apply_rules`);
    categories from the `catalogue`, else from the request's item `texts`."""
    cat_of = {**catalogue.item_category, **{i.item_id: i.category for i in texts if i.category}}
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
    out = apply_rules(frame, k, rules, categories=cats, vectors=vectors, tiebreak="pos")
    return out.join(frame.select("item_id", "pos"), on="item_id", maintain_order="left")[
        "pos"
    ].to_numpy()
