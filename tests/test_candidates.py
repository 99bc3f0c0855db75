"""Candidate retrieval: topic-matched items first, exclusions and eligibility respected, recall."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recsys.candidates import candidate_recall, retrieve_candidates
from recsys.errors import ConfigError, DataError
from recsys.semantic import user_profile_vectors
from recsys.vectors import ItemVectors

TOPICS = 4
PER_TOPIC = 6


@pytest.fixture
def vectors() -> ItemVectors:
    """Items t{topic}_{k}: a topic axis plus a little noise, so topics are clusters."""
    rng = np.random.default_rng(0)
    ids, rows = [], []
    for t in range(TOPICS):
        for k in range(PER_TOPIC):
            ids.append(f"t{t}_{k}")
            rows.append(np.eye(TOPICS)[t] + 0.1 * rng.normal(size=TOPICS))
    return ItemVectors.from_arrays(ids, np.array(rows))


def test_user_with_topic_history_gets_that_topic_first(vectors: ItemVectors) -> None:
    history = pl.DataFrame(
        {"user_id": ["a", "a", "b", "b"], "item_id": ["t2_0", "t2_1", "t0_0", "t0_3"]}
    )
    users, mat = user_profile_vectors(history, vectors)
    cands = retrieve_candidates(users, mat, vectors, k_semantic=PER_TOPIC - 2, exclude=history)
    for user, topic in (("a", "t2_"), ("b", "t0_")):
        mine = cands.filter(pl.col("user_id") == user)
        assert mine.height == PER_TOPIC - 2
        assert all(i.startswith(topic) for i in mine["item_id"])  # the rest of the topic
        assert (mine["source"] == "semantic").all()
        scores = mine["sem_score"].to_numpy()
        assert (np.diff(scores) <= 0).all()  # best first
    cands = retrieve_candidates(users, mat, vectors, k_semantic=10, exclude=history)
    a = cands.filter(pl.col("user_id") == "a")["item_id"].to_list()
    assert all(i.startswith("t2_") for i in a[:4]) and not a[5].startswith("t2_")


def test_exclusions_and_eligibility_respected(vectors: ItemVectors) -> None:
    users, mat = ["a", "b"], vectors.matrix[[vectors.index["t1_0"], vectors.index["t3_1"]]]
    exclude = pl.DataFrame(
        {
            "user_id": ["a", "a", "b", "b", "zz"],
            "item_id": ["t1_0", "t1_1", "t3_0", "pop_no_vec", "t1_2"],
        }
    )
    eligible = {i for i in vectors.ids if not i.endswith("_5")} | {"pop_no_vec"}
    popular = ["t0_0", "pop_no_vec", "t1_1", "t0_5", "t3_1"]
    cands = retrieve_candidates(
        users,
        mat,
        vectors,
        k_semantic=3,  # a: t1_2..t1_4 exactly; b: t3_1 first (its own vector)
        popular=popular,
        k_popular=3,
        exclude=exclude,
        eligible=eligible,
        cold_users=["cold"],
    )
    pairs = set(zip(cands["user_id"], cands["item_id"], strict=True))
    excluded = set(zip(exclude["user_id"], exclude["item_id"], strict=True))
    assert not pairs & excluded
    assert not any(i.endswith("_5") for i in cands["item_id"])  # not eligible
    assert cands.group_by("user_id", "item_id").len()["len"].max() == 1  # no duplicates
    # popular: best 3 eligible, not excluded, in popularity order after the semantic ones
    pop_a = cands.filter((pl.col("user_id") == "a") & (pl.col("source") != "semantic"))
    assert pop_a["item_id"].to_list() == ["t0_0", "pop_no_vec", "t3_1"]
    pop_b = cands.filter((pl.col("user_id") == "b") & (pl.col("source") != "semantic"))
    assert set(pop_b["item_id"]) == {"t0_0", "t1_1", "t3_1"}
    assert pop_b.filter(pl.col("item_id") == "t3_1")["source"].item() == "both"
    cold = cands.filter(pl.col("user_id") == "cold")
    assert cold["item_id"].to_list() == ["t0_0", "pop_no_vec", "t1_1"]
    assert (cold["source"] == "popular").all() and cold["sem_score"].is_nan().all()
    assert cands["user_id"].unique(maintain_order=True).to_list() == ["a", "b", "cold"]
    assert cands.schema == pl.Schema(
        {"user_id": pl.String, "item_id": pl.String, "source": pl.String, "sem_score": pl.Float32}
    )


def test_semantic_scores_are_exact_cosines_and_chunking_is_invisible(
    vectors: ItemVectors, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(1)
    mat = rng.normal(size=(7, TOPICS)).astype(np.float32)
    mat /= np.linalg.norm(mat, axis=1, keepdims=True)
    users = [f"u{i}" for i in range(7)]
    full = retrieve_candidates(users, mat, vectors, k_semantic=5)
    monkeypatch.setattr("recsys.candidates._CHUNK_SCORES", 2 * len(vectors))  # 2 users per chunk
    chunked = retrieve_candidates(users, mat, vectors, k_semantic=5)
    assert chunked.select("user_id", "item_id").equals(full.select("user_id", "item_id"))
    np.testing.assert_allclose(chunked["sem_score"], full["sem_score"], rtol=1e-6)
    expected = mat @ vectors.matrix.T
    for u in range(7):
        top = np.sort(expected[u])[::-1][:5]
        got = full.filter(pl.col("user_id") == users[u])["sem_score"].to_numpy()
        np.testing.assert_allclose(got, top, rtol=1e-5)


def test_bad_arguments(vectors: ItemVectors) -> None:
    with pytest.raises(ConfigError, match="k_semantic must be >= 0"):
        retrieve_candidates(["a"], vectors.matrix[:1], vectors, k_semantic=-1)
    with pytest.raises(DataError, match="user vectors have dim 2 but item vectors 4"):
        retrieve_candidates(["a"], np.ones((1, 2)), vectors)
    with pytest.raises(DataError, match=r"must be \(2, dim\)"):
        retrieve_candidates(["a", "b"], vectors.matrix[:1], vectors)


def test_candidate_recall() -> None:
    cands = pl.DataFrame(
        {"user_id": ["a", "a", "a", "b", "b"], "item_id": ["x", "y", "z", "x", "w"]}
    )
    truth = pl.DataFrame(
        {"user_id": ["a", "a", "b", "c"], "item_id": ["y", "q", "w", "x"]}
    )  # c has no candidates: a miss
    assert candidate_recall(cands, truth) == pytest.approx(2 / 4)
    assert candidate_recall(cands, truth, k=1) == pytest.approx(0 / 4)
    assert candidate_recall(cands, truth, k=2) == pytest.approx(2 / 4)
    assert np.isnan(candidate_recall(cands, truth.head(0)))
    with pytest.raises(ConfigError, match="k must be >= 1"):
        candidate_recall(cands, truth, k=0)
