from datetime import UTC, datetime

import polars as pl

from recsys.data import validate
from recsys.sampling import impressions_from_interactions


def _t(day):
    return datetime(2024, 1, day, tzinfo=UTC)


def test_each_timed_positive_becomes_a_list_with_sampled_negatives():
    items = pl.DataFrame(
        {
            "item_id": [f"i{n}" for n in range(30)],
            "title": [f"t{n}" for n in range(30)],
            # i20..i29 are published only on day 20
            "published_at": [_t(1)] * 20 + [_t(20)] * 10,
        }
    )
    inter = pl.DataFrame(
        {
            "user_id": ["u1", "u1", "u2"],
            "item_id": ["i1", "i2", "i3"],
            "ts": [_t(5), None, _t(6)],
            "weight": [1.0, 1.0, 1.0],
        }
    )
    imp = impressions_from_interactions(inter, items, negatives=5, seed=1)
    v = validate(items, inter, imp)
    assert v.rejects.height == 0
    assert imp["impression_id"].n_unique() == 2  # the untimed history row makes none
    clicked = imp.filter(pl.col("clicked"))
    assert sorted(clicked["item_id"].to_list()) == ["i1", "i3"]
    assert (clicked["position"] == 0).all()
    # negatives were published before the positive's time (none of i20..i29 on day 5/6)
    negs = imp.filter(~pl.col("clicked"))
    assert not negs["item_id"].is_in([f"i{n}" for n in range(20, 30)]).any()
    assert negs.height >= 8  # 2 x 5 minus rare collisions with the positive
    again = impressions_from_interactions(inter, items, negatives=5, seed=1)
    assert imp.equals(again)


def test_max_impressions_caps_the_sample():
    items = pl.DataFrame({"item_id": ["a", "b", "c"], "title": ["a", "b", "c"]})
    inter = pl.DataFrame(
        {"user_id": ["u"] * 10, "item_id": ["a"] * 10, "ts": [_t(d) for d in range(1, 11)]}
    ).with_columns(pl.lit(1.0).alias("weight"))
    imp = impressions_from_interactions(inter, items, negatives=2, max_impressions=4)
    assert imp["impression_id"].n_unique() == 4
