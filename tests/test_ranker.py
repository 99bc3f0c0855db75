"""LightGBM lambdarank ranker: known-answer training, persistence, explanations, early stopping,
config validation, and on generator data: semantic + behavioural beats either alone."""

from __future__ import annotations

import json
import math
import re
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.baselines import ColumnScorer, LGBMScorer, RandomScorer, add_scores
from recsys.errors import ConfigError, DataError
from recsys.generate import GeneratorConfig, generate
from recsys.metrics import evaluation_table, impression_metrics
from recsys.ranker import Ranker, RankerConfig, eval_logger, train_ranker
from recsys.semantic import SEMANTIC_FEATURES, semantic_features
from recsys.vectors import ItemVectors

# one thread: OpenMP threads spin badly when the (shared) CPU is busy
# (small_log_groups 0: these tests are about one LightGBM fit, not the small-log choice below)
FAST = RankerConfig(
    n_estimators=60, early_stopping_rounds=10, min_data_in_leaf=10, num_threads=1,
    small_log_groups=0,
)  # fmt: skip
XFEATS = ["f_signal", "f_weak", "f_noise"]


def synthetic_ranking(n_groups: int, seed: int, size: int = 10) -> pl.DataFrame:
    """Groups of `size` rows; the click goes to the row with the largest 2*signal + weak + noise."""
    rng = np.random.default_rng(seed)
    n = n_groups * size
    x = rng.normal(size=(n, 3))
    utility = (2.0 * x[:, 0] + x[:, 1] + 0.5 * rng.normal(size=n)).reshape(n_groups, size)
    clicked = (utility == utility.max(axis=1, keepdims=True)).ravel()
    return pl.DataFrame(
        {
            "impression_id": np.repeat([f"g{g:04d}" for g in range(n_groups)], size),
            "clicked": clicked,
            "f_signal": x[:, 0],
            "f_weak": x[:, 1],
            "f_noise": x[:, 2],
        }
    )


@pytest.fixture(scope="module")
def trained() -> Ranker:
    return train_ranker(
        synthetic_ranking(300, 0),
        synthetic_ranking(100, 1),
        XFEATS,
        FAST,
        group_col="impression_id",
    )


# --- known-answer synthetic problem ---------------------------------------------------------


def test_learns_the_known_signal(trained: Ranker) -> None:
    test = synthetic_ranking(200, 2)
    scored = test.with_columns(
        score=pl.Series(trained.predict(test)), rand=pl.Series(RandomScorer(0).score(test))
    )
    model = impression_metrics(scored, "score")
    rand = impression_metrics(scored, "rand")
    assert model["ndcg@10"] > 0.8 > rand["ndcg@10"] + 0.2
    imp = trained.feature_importance("gain")
    assert imp["feature"].to_list() == ["f_signal", "f_weak", "f_noise"]
    assert trained.feature_importance("split")["importance"].sum() > 0
    assert 1 <= trained.best_iteration <= FAST.n_estimators
    assert len(trained.history["valid"]["ndcg@10"]) == trained.info["iterations_run"]


def test_rows_are_grouped_and_clickless_groups_dropped() -> None:
    train = synthetic_ranking(200, 3)
    no_clicks = synthetic_ranking(5, 4).with_columns(
        clicked=pl.lit(False), impression_id=pl.col("impression_id") + "x"
    )
    # interleave: rows of a group need not be contiguous on input
    shuffled = pl.concat([train, no_clicks]).sample(fraction=1.0, shuffle=True, seed=0)
    ranker = train_ranker(shuffled, synthetic_ranking(50, 5), XFEATS, FAST)
    assert ranker.info["train_groups"] == 200
    assert ranker.info["train_groups_dropped"] == 5
    assert ranker.info["train_rows"] == 2000


def test_save_load_round_trip_gives_identical_predictions(trained: Ranker, tmp_path: Path) -> None:
    test = synthetic_ranking(20, 6)
    trained.save(tmp_path / "ranker")
    files = sorted(p.name for p in (tmp_path / "ranker").iterdir())
    assert files == ["model.txt", "ranker.json"]  # text model + json, no pickle
    meta = json.loads((tmp_path / "ranker" / "ranker.json").read_text())
    assert meta["feature_names"] == XFEATS
    loaded = Ranker.load(tmp_path / "ranker")
    np.testing.assert_array_equal(loaded.predict(test), trained.predict(test))
    assert loaded.feature_names == XFEATS and loaded.best_iteration == trained.best_iteration
    assert loaded.history == trained.history
    with pytest.raises(DataError, match=r"must hold model\.txt and ranker\.json"):
        Ranker.load(tmp_path / "elsewhere")


def test_contributions_sum_to_prediction(trained: Ranker) -> None:
    test = synthetic_ranking(10, 7)
    contrib = trained.contributions(test)
    assert contrib.shape == (test.height, len(XFEATS) + 1)
    np.testing.assert_allclose(contrib.sum(axis=1), trained.predict(test), rtol=1e-6, atol=1e-9)


def test_predict_takes_frames_in_any_column_order_or_arrays(trained: Ranker) -> None:
    test = synthetic_ranking(5, 8)
    by_frame = trained.predict(test.select(reversed(test.columns)))
    np.testing.assert_array_equal(by_frame, trained.predict(test.select(XFEATS).to_numpy()))
    with pytest.raises(DataError, match=r"missing feature column\(s\) \['f_weak'\]"):
        trained.predict(test.drop("f_weak"))
    with pytest.raises(DataError, match=r"shape \(n, 3\)"):
        trained.predict(np.zeros((2, 2)))


def test_early_stopping_stops_on_noise() -> None:
    noise = synthetic_ranking(200, 9).with_columns(
        f_signal=pl.lit(0.0), f_weak=pl.lit(0.0)
    )  # clicks unrelated to the remaining (noise) feature
    config = RankerConfig(
        n_estimators=400, early_stopping_rounds=5, learning_rate=0.3, num_threads=1,
        small_log_groups=0,
    )  # fmt: skip
    seen: list[tuple[int, dict[str, float]]] = []
    ranker = train_ranker(
        noise,
        synthetic_ranking(100, 10),
        XFEATS,
        config,
        callbacks=[eval_logger(lambda step, m: seen.append((step, m)))],
    )
    run = ranker.info["iterations_run"]
    assert run < 400 and ranker.best_iteration == run - 5
    assert [s for s, _ in seen] == list(range(1, run + 1))
    assert set(seen[0][1]) == {"valid_ndcg@10"}
    assert ranker.booster.num_trees() == ranker.best_iteration  # trees past the best are cut


def test_bad_config_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"num_leaves must be an integer >= 2 and <= 131072"):
        RankerConfig(num_leaves=1)
    with pytest.raises(ConfigError, match=r"learning_rate must be a number in \(0, 1\]"):
        RankerConfig(learning_rate=0.0)
    with pytest.raises(ConfigError, match=r"n_estimators must be an integer >= 1, got 2\.5"):
        RankerConfig(n_estimators=2.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['leaves'\]; allowed keys: \["):
        RankerConfig.from_dict({"leaves": 3})
    assert RankerConfig.from_dict({"num_leaves": 7}).num_leaves == 7


def test_bad_training_data_says_what_to_do() -> None:
    data = synthetic_ranking(20, 11)
    with pytest.raises(DataError, match="no group in valid has a positive 'clicked'"):
        train_ranker(data, data.with_columns(clicked=pl.lit(False)), XFEATS, FAST)
    with pytest.raises(DataError, match="feature 'kind' has dtype String; encode it as numbers"):
        train_ranker(data.with_columns(kind=pl.lit("a")), data, ["kind"], FAST)
    with pytest.raises(ConfigError, match="features is empty"):
        train_ranker(data, data, [], FAST)


# --- generator data: text + behaviour -------------------------------------------------------

BEHAVIOURAL = ["item_shows_before", "item_clicks_before", "item_ctr_before", "item_age_hours"]


def bow_vectors(items: pl.DataFrame, dim: int = 256) -> ItemVectors:
    """Deterministic bag-of-words embedding: tf-idf of words, signed-hashed into `dim` buckets."""
    docs = [
        re.findall(r"[a-z]{3,}", f"{t} {d or ''}".lower())
        for t, d in zip(items["title"], items["description"], strict=True)
    ]
    df = Counter(w for doc in docs for w in set(doc))
    idf = {w: math.log(len(docs) / c) for w, c in df.items()}
    mat = np.zeros((len(docs), dim))
    for i, doc in enumerate(docs):
        for w, tf in Counter(doc).items():
            h = zlib.crc32(w.encode())
            mat[i, h % dim] += (1.0 if (h >> 16) & 1 else -1.0) * tf * idf[w]
    mat[np.linalg.norm(mat, axis=1) == 0, 0] = 1.0
    return ItemVectors.from_arrays(items["item_id"].to_list(), mat)


def behavioural_columns(impressions: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    """Item shows, clicks and smoothed CTR from impressions strictly before each row's ts; age."""
    per = (
        impressions.group_by("item_id", "ts")
        .agg(pl.len().alias("shows"), pl.col("clicked").sum().alias("clicks"))
        .sort("item_id", "ts")
        .with_columns(
            (pl.col("shows").cum_sum().over("item_id") - pl.col("shows")).alias(
                "item_shows_before"
            ),
            (pl.col("clicks").cum_sum().over("item_id") - pl.col("clicks")).alias(
                "item_clicks_before"
            ),
        )
    )
    return (
        impressions.join(per, on=["item_id", "ts"], how="left", maintain_order="left")
        .join(
            items.select("item_id", "published_at"), on="item_id", how="left", maintain_order="left"
        )
        .with_columns(
            ((pl.col("item_clicks_before") + 1.0) / (pl.col("item_shows_before") + 10.0)).alias(
                "item_ctr_before"
            ),
            ((pl.col("ts") - pl.col("published_at")).dt.total_seconds() / 3600.0).alias(
                "item_age_hours"
            ),
        )
        .drop("shows", "clicks", "published_at")
    )


def generator_frames(config: GeneratorConfig) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Train / valid / test impressions (60/20/20 by time) with semantic and behavioural columns."""
    data, _ = generate(config)
    vectors = bow_vectors(data.items)
    rows = behavioural_columns(data.impressions, data.items)
    rows = semantic_features(
        rows, data.interactions.select("user_id", "item_id", "ts"), vectors
    ).sort("ts", "impression_id", "position")
    cut1, cut2 = rows["ts"].quantile(0.6), rows["ts"].quantile(0.8)
    return (
        rows.filter(pl.col("ts") < cut1),
        rows.filter((pl.col("ts") >= cut1) & (pl.col("ts") < cut2)),
        rows.filter(pl.col("ts") >= cut2),
    )


def test_trains_on_generator_data_and_beats_random() -> None:
    train, valid, test = generator_frames(
        GeneratorConfig(n_items=800, n_users=400, n_shown=12_000, seed=3)
    )
    ranker = train_ranker(train, valid, SEMANTIC_FEATURES + BEHAVIOURAL, FAST)
    scored = add_scores(test, [LGBMScorer("lgbm", ranker), RandomScorer(0)])
    table = evaluation_table(scored, ["lgbm", "random"])
    lgbm, rand = table.rows(named=True)
    assert lgbm["auc"] > rand["auc"] + 0.1
    assert lgbm["ndcg@10"] > rand["ndcg@10"] + 0.05


def test_semantic_plus_behavioural_beats_either_alone() -> None:
    """The generator's known answer: clicks depend on topic (text only) and quality/freshness
    (behaviour), so the combined ranker wins on test nDCG@10 (margins ~0.05 on seeds 0-4;
    about 2 s with one thread, so not slow-marked)."""
    train, valid, test = generator_frames(GeneratorConfig(seed=0))
    config = RankerConfig(n_estimators=300, early_stopping_rounds=30, num_threads=1)
    both = train_ranker(train, valid, SEMANTIC_FEATURES + BEHAVIOURAL, config)
    behaviour = train_ranker(train, valid, BEHAVIOURAL, config)
    scored = add_scores(
        test,
        [
            LGBMScorer("lgbm_semantic_behavioural", both),
            LGBMScorer("lgbm_behavioural", behaviour),
            ColumnScorer("semantic_only", "sem_cos_mean"),
            RandomScorer(0),
        ],
    )
    names = ["lgbm_semantic_behavioural", "lgbm_behavioural", "semantic_only", "random"]
    table = evaluation_table(scored, names)
    ndcg = dict(zip(table["model"], table["ndcg@10"], strict=True))
    assert ndcg["lgbm_semantic_behavioural"] > ndcg["lgbm_behavioural"] + 0.02
    assert ndcg["lgbm_semantic_behavioural"] > ndcg["semantic_only"] + 0.02
    assert min(ndcg["lgbm_behavioural"], ndcg["semantic_only"]) > ndcg["random"]
    top = both.feature_importance()["feature"].head(3).to_list()
    assert any(f.startswith("sem_") for f in top) and any(f in BEHAVIOURAL for f in top)


def test_rows_reach_lightgbm_in_a_seeded_random_order_within_each_impression() -> None:
    """LightGBM breaks score ties by row order; impressions synthesised from interactions put
    the positive first (and logs put clicks near the top), so in input order a model that
    scores a group alike is credited with ranking the click first. The rows of each group are
    shuffled, the same way for the same seed."""
    from recsys.ranker import _grouped

    n = 200
    df = pl.DataFrame(
        {
            "impression_id": np.repeat(np.arange(n), 8),
            "clicked": np.tile([True] + [False] * 7, n),
            "f": np.tile(np.arange(8.0), n),
        }
    )
    a, b, c = (_grouped(df, ["f"], "impression_id", "clicked", "t", seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a.x, b.x)  # deterministic
    assert not np.array_equal(a.x, c.x)  # another seed, another order
    assert (a.sizes == 8).all() and a.y.sum() == n
    first = a.y.reshape(n, 8)[:, 0]
    assert 0 < first.mean() < 0.3  # the click is no longer always first (1/8 expected)
    # each group keeps its own rows
    np.testing.assert_array_equal(
        np.sort(a.x.reshape(n, 8), axis=1), np.tile(np.arange(8.0), (n, 1))
    )
    pos = a.x[a.y == 1, 0]
    assert (pos == 0.0).all()  # the clicked row's features travel with its label


def _noisy_small_log(n_groups: int, seed: int) -> pl.DataFrame:
    """One informative feature (the click goes to the largest signal + heavy noise) beside ten
    pure-noise columns: a small log where big trees fit the noise."""
    rng = np.random.default_rng(seed)
    n = n_groups * 10
    x = rng.normal(size=(n, 11))
    utility = (x[:, 0] + 2.0 * rng.normal(size=n)).reshape(n_groups, 10)
    clicked = (utility == utility.max(axis=1, keepdims=True)).ravel()
    cols = {f"f{j}": x[:, j] for j in range(11)}
    return pl.DataFrame(
        {"impression_id": np.repeat([f"g{g:05d}" for g in range(n_groups)], 10),
         "clicked": clicked, **cols}
    )  # fmt: skip


def test_small_logs_choose_the_model_on_validation(tmp_path: Path) -> None:
    """Below small_log_groups training impressions the configured tree size, the smaller
    SMALL_LOG_TREES and the best single input column are each judged by validation AUC; the best
    wins (recorded in info). Here big trees fit the noise and even stumps trail the one real
    input: the ranker falls back to that column and ranks new data exactly as it does."""
    from recsys.ranker import SMALL_LOG_TREES, ColumnRanker, refit_ranker

    feats = [f"f{j}" for j in range(11)]
    train, valid, test = (_noisy_small_log(n, s) for n, s in ((300, 0), (300, 1), (2000, 2)))
    config = RankerConfig(num_threads=1)
    chosen = train_ranker(train, valid, feats, config)
    scores = chosen.info["chosen_on_valid_auc"]
    assert len(scores) == 2 + len(SMALL_LOG_TREES)
    assert list(scores)[-1] == "the column f0 alone"
    assert scores["the column f0 alone"] == max(scores.values())
    assert isinstance(chosen, ColumnRanker)

    fixed = train_ranker(train, valid, feats, RankerConfig(num_threads=1, small_log_groups=0))
    assert "chosen_on_valid_auc" not in fixed.info
    assert fixed.info["config"]["num_leaves"] == 31

    scored = test.with_columns(
        chosen=pl.Series(chosen.predict(test)), fixed=pl.Series(fixed.predict(test))
    )
    auc = {
        r["model"]: r["auc"] for r in evaluation_table(scored, ["chosen", "fixed", "f0"]).to_dicts()
    }
    assert auc["chosen"] == auc["f0"] > auc["fixed"], auc

    # saved, reloaded, refit and explained like a tree ranker
    chosen.save(tmp_path / "r")
    back = Ranker.load(tmp_path / "r")
    assert np.array_equal(back.predict(test), chosen.predict(test))
    assert refit_ranker(pl.concat([train, valid]), back, config) is back
    contrib = back.contributions(test.head(5))
    assert np.allclose(contrib.sum(axis=1), back.predict(test.head(5)))
    assert back.feature_importance()["feature"][0] == "f0"
    missing = test.head(3).with_columns(f0=pl.lit(None, dtype=pl.Float64))
    assert (back.predict(missing) < back.predict(train).min()).all()  # below all it saw


def test_small_logs_refit_keeps_the_tree_size_chosen() -> None:
    """When a smaller tree size validates best, refit trains that size on train + valid. (On
    150 impressions of the known-signal problem, 31-leaf trees stop after 3 trees at validation
    AUC 0.930, 3-leaf trees reach 0.956.)"""
    from recsys.ranker import refit_ranker

    train, valid = synthetic_ranking(150, 5), synthetic_ranking(150, 6)
    chosen = train_ranker(train, valid, XFEATS, RankerConfig(num_threads=1))
    scores = chosen.info["chosen_on_valid_auc"]
    assert scores[chosen.describe()] == max(scores.values())
    assert chosen.info["config"]["num_leaves"] == 3
    refit = refit_ranker(pl.concat([train, valid]), chosen, RankerConfig(num_threads=1))
    assert max(t["num_leaves"] for t in refit.booster.dump_model()["tree_info"]) <= 3
    assert refit.best_iteration == chosen.best_iteration
