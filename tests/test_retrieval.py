"""Retrieval sources, their union, the fitted cadence, business rules and list metrics, on small
logs where the right answer is known."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from recsys.data.schema import TS
from recsys.errors import ConfigError
from recsys.listmetrics import (
    compare_lists,
    intra_list_similarity,
    list_metrics,
    per_user,
    recall_ceiling,
)
from recsys.retrieval import (
    RetrievalContext,
    decayed_popularity,
    fit_cadence,
    live_items,
    make_sources,
    retrieve,
)
from recsys.rules import ListRules, apply_rules
from recsys.vectors import ItemVectors

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _log(rows: list[tuple[str, str, float]]) -> pl.DataFrame:
    """(user, item, hours after T0) -> user_id, item_id, ts."""
    return pl.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "ts": [T0 + timedelta(hours=r[2]) for r in rows],
        },
        schema={"user_id": pl.String, "item_id": pl.String, "ts": TS},
    )


def _items(ids: list[str], cats: list[str] | None = None) -> pl.DataFrame:
    return pl.DataFrame(
        {"item_id": ids, "category": cats or ["c"] * len(ids)},
        schema={"item_id": pl.String, "category": pl.String},
    )


def _news(days: int = 20, per_day: int = 30, users: int = 60, seed: int = 0) -> pl.DataFrame:
    """A fast catalogue: each day's items are consumed that day and the next only."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(days):
        for u in range(users):
            for _ in range(2):
                age = rng.integers(0, 2)
                item = f"d{max(d - age, 0)}_{rng.integers(per_day)}"
                rows.append((f"u{u}", item, d * 24 + rng.uniform(0, 24)))
    return _log(rows)


def _films(users: int = 80, items: int = 40, n: int = 3000, seed: int = 0) -> pl.DataFrame:
    """A slow catalogue: the same items are consumed over years, by a fixed popularity."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, items + 1)
    p /= p.sum()
    rows = [
        (f"u{rng.integers(users)}", f"m{rng.choice(items, p=p)}", rng.uniform(0, 3 * 365 * 24))
        for _ in range(n)
    ]
    return _log(rows)


def test_cadence_is_fitted_to_the_catalogue():
    news = _news()
    as_of = T0 + timedelta(days=20)
    fast = fit_cadence(news, as_of)
    assert fast.half_life_days <= 3 and fast.live_window_days <= 3
    live = live_items(as_of, fast.live_window_days, history=news)
    assert live is not None and live.len() < news["item_id"].n_unique()
    assert all(i.startswith(("d17_", "d18_", "d19_")) for i in live)

    films = _films()
    slow = fit_cadence(films, T0 + timedelta(days=3 * 365))
    assert slow.live_window_days >= 30 and slow.half_life_days >= 90  # months, not days
    # an infinite window (a catalogue whose whole log is live) means every item
    assert live_items(T0 + timedelta(days=3 * 365), math.inf, history=films) is None
    # a window with nothing in it gives every item too, not an empty catalogue
    assert live_items(T0 + timedelta(days=5000), 1.0, history=films) is None
    assert fit_cadence(films.head(10), T0).live_window_days == math.inf  # too little data


def test_decayed_popularity_prefers_recent_consumption():
    log = _log([("a", "old", 0), ("b", "old", 1), ("c", "new", 240)])
    at = T0 + timedelta(days=11)
    counts = decayed_popularity(log, at, math.inf)
    assert counts["item_id"].to_list() == ["old", "new"] and counts["score"].to_list() == [2, 1]
    decayed = decayed_popularity(log, at, 1.0)
    assert decayed["item_id"].to_list() == ["new", "old"]
    assert decayed["score"][0] == pytest.approx(2 ** -(24 / 24), rel=1e-9)


def _ctx(history: pl.DataFrame, items: pl.DataFrame, **kw) -> RetrievalContext:
    return RetrievalContext(history, items, T0 + timedelta(days=4 * 365), **kw)


def test_sources_never_return_seen_or_ineligible_items_and_find_the_known_answer():
    # u1 and u2 share taste (a, b); u2 also took c, so item-kNN offers c to u1
    shared = [("u1", "a", 1), ("u1", "b", 2), ("u2", "a", 3), ("u2", "b", 4), ("u2", "c", 5)]
    other = [("u3", "x", 6), ("u3", "y", 7), ("u4", "y", 8), ("u4", "x", 9), ("u4", "z", 9)]
    hist = _log([*shared, *other])
    ids = ["a", "b", "c", "x", "y", "z", "new"]
    cats = ["s", "s", "s", "t", "t", "t", "s"]
    items = _items(ids, cats).with_columns(
        pl.Series("published_at", [T0] * 6 + [T0 + timedelta(days=29)], dtype=TS)
    )
    vecs = np.eye(len(ids), dtype=np.float32)
    vecs[[1, 2], 0] = 1.0  # b and c lie near a
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    vectors = ItemVectors.from_arrays(ids, vecs)
    ctx = _ctx(hist, items, vectors=vectors, eligible=pl.Series(["a", "b", "c", "x", "y", "new"]))
    users = pl.Series(["u1", "u3", "cold"])
    seen = hist.select("user_id", "item_id")
    for source in make_sources(["semantic", "cooccurrence", "popular", "category", "fresh"]):
        got = source.retrieve(ctx, users, 3)
        assert got.join(seen, on=["user_id", "item_id"], how="semi").height == 0, source.name
        assert set(got["item_id"]) <= {"a", "b", "c", "x", "y", "new"}, source.name  # z not live
        assert got.group_by("user_id").len()["len"].max() <= 3, source.name
        assert got.columns == ["user_id", "item_id", "score"], source.name
    knn = make_sources(["cooccurrence"])[0].retrieve(ctx, users, 3)
    assert knn.filter(pl.col("user_id") == "u1")["item_id"].to_list() == ["c"]
    sem = make_sources(["semantic"])[0].retrieve(ctx, users, 1)
    assert sem.filter(pl.col("user_id") == "u1")["item_id"].to_list() == ["c"]
    fresh = make_sources(["fresh"])[0].retrieve(ctx, users, 1)
    assert fresh.filter(pl.col("user_id") == "cold")["item_id"].to_list() == ["new"]
    cat = make_sources(["category"])[0].retrieve(ctx, users, 5)
    assert set(cat.filter(pl.col("user_id") == "u3")["item_id"]) <= {"x", "y", "z"}
    with pytest.raises(ConfigError, match="unknown source"):
        make_sources(["semantic", "telepathy"])


def test_union_deduplicates_names_every_source_and_covers_each_one():
    hist = _films(n=1500)
    items = _items(hist["item_id"].unique().sort().to_list())
    ctx = _ctx(hist, items)
    users = hist["user_id"].unique().sort()
    quotas = {"cooccurrence": 5, "popular": 5, "fresh": 2}
    union, runs = retrieve(ctx, users, quotas)
    assert union.columns == ["user_id", "item_id", "source", "retrieval_rank"]
    assert union.select("user_id", "item_id").is_duplicated().sum() == 0
    for run in runs:
        found = run.candidates.join(union, on=["user_id", "item_id"], how="left")
        assert found["source"].null_count() == 0
        assert all(run.name in s.split("+") for s in found["source"])
    assert any("+" in s for s in union["source"])  # some pairs came from two sources
    assert union.group_by("user_id").len()["len"].max() <= sum(quotas.values())
    again, _ = retrieve(ctx, users, quotas)
    assert again.equals(union)  # deterministic
    # a user no source but popular can serve gets the whole budget from deeper in popular
    with_stranger, _ = retrieve(ctx, pl.Series(["u1", "stranger"]), quotas)
    mine = with_stranger.filter(pl.col("user_id") == "stranger")
    assert mine.height == sum(quotas.values())
    assert set(mine["source"]) <= {"popular", "fresh", "popular+fresh"}
    assert retrieve(ctx, users, quotas, fill=None)[0].height <= union.height
    with pytest.raises(ConfigError, match="quota"):
        retrieve(ctx, users, {"popular": -1})


def test_rules_exclude_cap_and_diversify():
    scored = pl.DataFrame(
        {
            "user_id": ["u"] * 6 + ["v"],
            "item_id": ["a", "b", "c", "d", "e", "f", "a"],
            "score": [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 1.0],
        }
    )
    cats = _items(["a", "b", "c", "d", "e", "f"], ["x", "x", "x", "y", "y", "z"])
    plain = apply_rules(scored, 3, ListRules(), categories=cats)
    assert plain.filter(pl.col("user_id") == "u")["item_id"].to_list() == ["a", "b", "c"]
    assert plain["rank"].to_list() == [1, 2, 3, 1]
    ruled = apply_rules(
        scored, 4, ListRules(exclude_items=("b",), exclude_categories=("z",), max_per_category=1),
        categories=cats,
    )  # fmt: skip
    # one per category, b and z excluded: a (x), d (y), and nothing else may fill the list
    assert ruled.filter(pl.col("user_id") == "u")["item_id"].to_list() == ["a", "d"]
    # diversity: a, b, c are near copies; with MMR the second pick leaves their cluster
    vecs = np.array([[1, 0], [1, 0.01], [1, 0.02], [0, 1], [0.1, 1], [0.7, 0.7]], np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    vectors = ItemVectors.from_arrays(["a", "b", "c", "d", "e", "f"], vecs)
    zero = apply_rules(scored, 3, ListRules(diversity=0.0), vectors=vectors)
    assert zero.equals(plain)
    mmr = apply_rules(scored, 3, ListRules(diversity=0.7), vectors=vectors)
    picked = mmr.filter(pl.col("user_id") == "u")["item_id"].to_list()
    assert picked[0] == "a" and picked[1] == "d"
    lists = mmr.select("user_id", "item_id", "rank")
    assert intra_list_similarity(lists, vectors, 3) < intra_list_similarity(plain, vectors, 3)
    with pytest.raises(ConfigError, match="unknown categor"):
        ListRules(exclude_categories=("nope",)).check(["a"], ["x", "y"])
    with pytest.raises(ConfigError, match="unknown item"):
        ListRules(exclude_items=("nope",)).check(["a"], ["x"])
    with pytest.raises(ConfigError, match="diversity"):
        ListRules(diversity=1.5)
    with pytest.raises(ConfigError, match="categories"):
        apply_rules(scored, 3, ListRules(max_per_category=1))


def test_list_metrics_known_values_and_paired_differences():
    truth = pl.DataFrame({"user_id": ["u", "u", "v", "w"], "item_id": ["a", "b", "c", "d"]})
    lists = pl.DataFrame(
        {"user_id": ["u", "u", "v", "v"], "item_id": ["x", "a", "c", "y"], "rank": [1, 2, 1, 2]}
    )
    pu = per_user(lists, truth, 2)
    assert pu["hits"].to_list() == [1, 1, 0] and pu["n"].to_list() == [2, 1, 1]
    idcg_u = 1 + 1 / math.log2(3)
    assert pu["ndcg"].to_list() == pytest.approx([(1 / math.log2(3)) / idcg_u, 1.0, 0.0])
    pop = pl.DataFrame({"item_id": ["a", "c", "x", "y"], "users": [9, 1, 9, 0]})
    m = list_metrics(lists, truth, 2, catalogue_size=8, popularity=pop, n_users=9)
    assert m["recall@2"] == pytest.approx(2 / 4) and m["coverage"] == pytest.approx(4 / 8)
    assert m["novelty"] == pytest.approx(
        np.mean([-math.log2(10 / 10), -math.log2(10 / 10), -math.log2(2 / 10), -math.log2(1 / 10)])
    )
    worse = lists.filter(pl.col("item_id") != "c")
    rows = {r["list"]: r for r in compare_lists({"m": lists, "b": worse}, truth, 2, versus="b",
                                                catalogue_size=8)}  # fmt: skip
    assert rows["b"]["recall_diff"] == 0.0 and rows["m"]["recall_diff"] == pytest.approx(1 / 4)
    assert rows["m"]["recall_diff_se"] > 0 and rows["m"]["ndcg_diff"] == pytest.approx(1 / 3)
    with pytest.raises(ConfigError, match="versus"):
        compare_lists({"m": lists}, truth, 2, versus="nope", catalogue_size=8)


def test_recall_ceiling_bounds_every_list_made_without_the_cold_users_history():
    # u (known) has 3 test positives, k = 2 caps it at 2; cold users v, w, z share item c,
    # so the one list for all strangers finds c for three of them and one more item at best
    truth = pl.DataFrame(
        {
            "user_id": ["u", "u", "u", "v", "v", "w", "z"],
            "item_id": ["a", "b", "e", "c", "d", "c", "c"],
        }
    )
    c = recall_ceiling(truth, pl.Series(["u", "q"]), 2)
    assert c["recall"] == pytest.approx((2 + 3 + 1) / 7)
    assert c["cold_share"] == pytest.approx(4 / 7) and c["k"] == 2
    assert recall_ceiling(truth, pl.Series(["u", "v", "w", "z"]), 2)["recall"] == pytest.approx(
        6 / 7
    )
    for lists in (  # any lists, personal for u and one for all strangers, stay below it
        pl.DataFrame({"user_id": ["u", "u"], "item_id": ["a", "b"], "rank": [1, 2]}),
        pl.DataFrame({"user_id": ["v", "v", "w", "w", "z", "z"], "item_id": ["c", "d"] * 3,
                      "rank": [1, 2] * 3}),
    ):  # fmt: skip
        assert list_metrics(lists, truth, 2, catalogue_size=5)["recall@2"] <= c["recall"]
    with pytest.raises(ConfigError, match="k must be"):
        recall_ceiling(truth, pl.Series(["u"]), 0)


def test_build_lists_ranks_known_users_and_gives_strangers_the_popular_order():
    from recsys.lists import build_lists

    hist = _films(n=1500)
    items = _items(hist["item_id"].unique().sort().to_list())
    ctx = _ctx(hist, items)
    calls = []

    def score(pairs: pl.DataFrame) -> np.ndarray:  # a scorer that prefers item ids backwards
        calls.append(pairs["user_id"].unique().to_list())
        return -pairs["item_id"].str.slice(1).cast(pl.Int64).to_numpy().astype(float)

    users = ["u1", "u2", "stranger"]
    quotas = {"cooccurrence": 10, "popular": 10}
    res = build_lists(score, ctx, users, quotas, n=5, rules=ListRules(exclude_items=("m0",)))
    assert "stranger" not in {u for c in calls for u in c}  # the ranker never sees strangers
    mine = res.lists.filter(pl.col("user_id") == "u1")
    assert mine["rank"].to_list() == [1, 2, 3, 4, 5]
    assert mine["score"].to_list() == sorted(mine["score"].to_list(), reverse=True)
    stranger = res.lists.filter(pl.col("user_id") == "stranger")["item_id"].to_list()
    assert stranger == [i for i in ctx.popularity["item_id"].to_list() if i != "m0"][:5]
    assert "m0" not in res.lists["item_id"].to_list()
    seen = hist.select("user_id", "item_id")
    assert res.lists.join(seen, on=["user_id", "item_id"], how="semi").height == 0
    # quotas that leave too few candidates: the lists are short, counted, never padded
    few = build_lists(score, ctx, users, {"popular": 3}, n=5)
    sizes = dict(few.lists.group_by("user_id").len().iter_rows())
    assert few.short == 2 and sizes == {"u1": 3, "u2": 3, "stranger": 5}


def test_semantic_source_from_an_hnsw_index_agrees_with_the_exact_one():
    rng = np.random.default_rng(0)
    n, d = 3000, 32
    centres = rng.normal(size=(30, d))
    mat = (centres[rng.integers(30, size=n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)
    ids = [f"i{j}" for j in range(n)]
    vectors = ItemVectors.from_arrays(ids, mat)
    hist = _log(
        [(f"u{u}", ids[int(rng.integers(n))], float(h)) for u in range(40) for h in range(3)]
    )
    items = _items(ids)
    users = hist["user_id"].unique().sort()
    exact = make_sources(["semantic"])[0].retrieve(_ctx(hist, items, vectors=vectors), users, 20)
    ctx = _ctx(hist, items, vectors=vectors, ann_min_items=100)
    ann = make_sources(["semantic"])[0].retrieve(ctx, users, 20)
    assert ann.join(hist, on=["user_id", "item_id"], how="semi").height == 0
    assert ann.group_by("user_id").len()["len"].min() == 20
    overlap = ann.join(exact, on=["user_id", "item_id"], how="semi").height / exact.height
    assert overlap > 0.9
    again = make_sources(["semantic"])[0].retrieve(
        _ctx(hist, items, vectors=vectors, ann_min_items=100), users, 20
    )
    assert again.equals(ann)  # a rebuilt index gives the same lists


def test_lists_in_blocks_equal_lists_in_one_go():
    from recsys.lists import build_lists

    hist = _films(n=1500)
    items = _items(hist["item_id"].unique().sort().to_list())
    users = [*hist["user_id"].unique().sort().to_list(), "stranger"]
    quotas = {"cooccurrence": 6, "popular": 6, "fresh": 2}

    def score(pairs: pl.DataFrame) -> np.ndarray:
        return pairs["item_id"].str.slice(1).cast(pl.Int64).to_numpy().astype(float) % 7

    one = build_lists(score, _ctx(hist, items), users, quotas, n=5)
    blocks = build_lists(score, _ctx(hist, items), users, quotas, n=5, block=7, chunk=3)
    assert blocks.lists.equals(one.lists) and blocks.short == one.short
    assert blocks.candidates.sort("user_id", "item_id").equals(
        one.candidates.sort("user_id", "item_id")
    )
    lean = build_lists(score, _ctx(hist, items), users, quotas, n=5, keep_candidates=False)
    assert lean.lists.equals(one.lists) and lean.candidates.height == 0


def test_prior_blend_moves_lists_from_the_ranker_to_popularity_and_scores_each_pair_once():
    from recsys.lists import ScoreCache, build_lists, with_prior

    hist = _films(n=1500)
    items = _items(hist["item_id"].unique().sort().to_list())
    ctx = _ctx(hist, items)
    calls: list[int] = []

    def score(pairs: pl.DataFrame) -> np.ndarray:  # prefers item ids backwards
        calls.append(pairs.height)
        return -pairs["item_id"].str.slice(1).cast(pl.Int64).to_numpy().astype(float)

    users, quotas = ["u1", "u2"], {"cooccurrence": 10, "popular": 10}
    cached = ScoreCache(score)
    lists = {
        w: build_lists(with_prior(cached, ctx.popularity, w), ctx, users, quotas, n=5).lists
        for w in (0.0, 0.5, 1.0)
    }
    pop_rank = {i: r for r, i in enumerate(ctx.popularity["item_id"].to_list())}
    for user in users:
        mean = {
            w: np.mean([pop_rank[i] for i in df.filter(pl.col("user_id") == user)["item_id"]])
            for w, df in lists.items()
        }
        assert mean[0.0] >= mean[0.5] >= mean[1.0]  # more weight: more popular items
        assert mean[0.0] > mean[1.0]
        top = lists[1.0].filter(pl.col("user_id") == user)["item_id"].to_list()
        assert top == sorted(top, key=pop_rank.__getitem__)  # w 1: popularity's order
    # weights 0.5 and 0 re-score the same candidates from the cache; weight 1 never asks
    assert len(calls) == 1
    direct = build_lists(score, ctx, users, quotas, n=5).lists
    assert direct.equals(lists[0.0])  # cached scores are the scorer's own
    assert with_prior(score, ctx.popularity, 0.0) is score
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        with_prior(score, ctx.popularity, 1.5)


def test_block_users_follow_the_chunk_rows_knob():
    """A block of users brings about chunk_rows candidate rows (quotas summed per user)."""
    from recsys.lists import block_users

    quotas = {"semantic": 40, "popular": 60}
    assert block_users(None, quotas) == 10_000
    assert block_users(1_000_000, quotas) == 10_000
    assert block_users(200_000, quotas) == 2_000
    assert block_users(50, quotas) == 100  # never below 100 users
    assert block_users(1_000, {}) == 1_000


def test_candidates_kept_among_pairs_give_the_same_recall():
    """The list evaluation keeps only the candidates users consumed next: each source's recall
    and the union's are the same as with every candidate kept."""
    from recsys.candidates import candidate_recall
    from recsys.lists import build_lists

    hist = _films(n=1500)
    items = _items(hist["item_id"].unique().sort().to_list())
    users = hist["user_id"].unique().sort().to_list()
    quotas = {"cooccurrence": 6, "popular": 6, "fresh": 2}

    def score(pairs: pl.DataFrame) -> np.ndarray:
        return pairs["item_id"].str.slice(1).cast(pl.Int64).to_numpy().astype(float) % 7

    every = build_lists(score, _ctx(hist, items), users, quotas, n=5)
    truth = every.candidates.select("user_id", "item_id").gather_every(3)  # some found
    truth = pl.concat([truth, pl.DataFrame({"user_id": ["stranger"], "item_id": ["m1"]})])
    kept = build_lists(score, _ctx(hist, items), users, quotas, n=5, block=7,
                       keep_candidates=truth)  # fmt: skip
    assert kept.lists.equals(every.lists)
    assert 0 < kept.candidates.height < every.candidates.height
    for mine, theirs in zip(kept.runs, every.runs, strict=True):
        assert candidate_recall(mine.candidates, truth) == candidate_recall(
            theirs.candidates, truth
        )
    assert candidate_recall(kept.candidates, truth) == candidate_recall(every.candidates, truth)
