"""The synthetic data: seeded, contract-clean, and a click model whose answer depends on text
and behaviour together."""

import dataclasses

import numpy as np
import polars as pl
import pytest

from recsys.data import validate
from recsys.errors import ConfigError
from recsys.generate import CATEGORIES, NAMES, TOPICS, GeneratorConfig, generate

SMALL = GeneratorConfig(n_items=300, n_users=150, n_shown=3000, seed=3)


@pytest.fixture(scope="module")
def small():
    return generate(SMALL)


def test_same_seed_same_data(small):
    data, _ = small
    again, _ = generate(SMALL)
    for t in ("items", "interactions", "impressions"):
        assert data.table(t).equals(again.table(t))
    other, _ = generate(GeneratorConfig(n_items=300, n_users=150, n_shown=3000, seed=4))
    assert not data.impressions.equals(other.impressions)


def test_sizes_and_contracts(small):
    data, _ = small
    assert data.items.height == 300
    assert data.impressions.height == 3000
    v = validate(data.items, data.interactions, data.impressions)
    assert v.rejects.height == 0
    # shown items were published before they were shown
    j = data.impressions.join(data.items, on="item_id")
    assert (j["published_at"] <= j["ts"]).all()


def test_topic_is_in_the_words_not_the_category(small):
    data, truth = small
    j = data.items.join(truth.item_topic, on="item_id")
    # the category tells nothing about the topic: every category spans many topics
    spans = j.group_by("category").agg(pl.col("topic").n_unique())["topic"]
    assert spans.min() >= len(TOPICS) - 2
    assert set(data.items["category"].unique()) <= set(CATEGORIES)
    # each item's text names its topic, in common words or in the catalogue's names only
    by_name = 0
    for row in j.iter_rows(named=True):
        text = (row["title"] + " " + row["description"]).lower()
        words = any(w in text for w in TOPICS[row["topic"]])
        names = [n for n in NAMES[row["topic"]] if n.lower() in text]
        others = [n for t, ns in NAMES.items() if t != row["topic"] for n in ns
                  if n.lower() in text]  # fmt: skip
        assert words != bool(names) and not others, row
        by_name += bool(names)
    assert 0.4 < by_name / j.height < 0.6  # name_share 0.5


def test_names_change_texts_only() -> None:
    """Named items draw from their own stream: without names the same items, users, clicks."""
    cfg = GeneratorConfig(n_items=300, n_users=150, n_shown=3000, seed=4)
    named, _ = generate(cfg)
    plain, _ = generate(dataclasses.replace(cfg, name_share=0.0))
    assert named.impressions.equals(plain.impressions)
    assert named.interactions.equals(plain.interactions)
    assert named.items.drop("title", "description").equals(plain.items.drop("title", "description"))
    assert not named.items["title"].equals(plain.items["title"])


def test_clicks_follow_topic_affinity_and_quality():
    data, truth = generate(GeneratorConfig(n_items=600, n_users=300, n_shown=20_000, seed=1))
    imp = data.impressions
    p = truth.click_probability(imp, data.items)
    clicked = imp["clicked"].to_numpy()
    # the true probability separates clicks from non-clicks
    assert p[clicked].mean() > 2 * p[~clicked].mean()
    j = imp.join(truth.item_topic, on="item_id").join(
        truth.user_topics, on=["user_id", "topic"], how="left"
    )
    on_topic = j.filter(pl.col("affinity") == 1.0)["clicked"].mean()
    off_topic = j.filter(pl.col("affinity").is_null())["clicked"].mean()
    assert on_topic > 3 * off_topic
    # later positions are clicked less (position bias)
    by_pos = imp.group_by("position").agg(pl.col("clicked").mean()).sort("position")
    assert by_pos["clicked"][0] > by_pos["clicked"][-1]
    assert np.isfinite(p).all()


def test_bad_config_names_the_key():
    with pytest.raises(ConfigError, match="n_items must be >= 1"):
        GeneratorConfig(n_items=0)
    with pytest.raises(ConfigError, match="history_min"):
        GeneratorConfig(history_min=5, history_max=2)
    with pytest.raises(ConfigError, match="name_share must be in"):
        GeneratorConfig(name_share=1.5)
