"""Behavioural features: known answers, point-in-time correctness, train/serve agreement."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features import (
    FeatureConfig,
    FeatureSnapshot,
    build_snapshot,
    feature_names,
    point_in_time_features,
    snapshot_features,
    snapshot_features_numpy,
)
from features.derive import user_feature_names
from recsys.data.dataset import Dataset
from recsys.data.schema import IMPRESSIONS, INTERACTIONS, ITEMS, conform
from recsys.errors import ConfigError, DataError
from recsys.generate import GeneratorConfig, generate

T0 = datetime(2026, 1, 1, tzinfo=UTC)
CFG = FeatureConfig()
NAMES = feature_names(CFG)
K = CFG.ctr_prior * CFG.prior_weight  # prior clicks: 0.05 * 20 = 1


def h(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def tiny() -> Dataset:
    """Three items, a short log. Item A: shown at 1h (clicked), 20h, 30h, 31h (clicked)."""
    items = pl.DataFrame(
        {
            "item_id": ["A", "B", "C"],
            "title": ["a", "b", "c"],
            "category": ["news", "sport", None],
            "subcategory": ["x", None, None],
            "published_at": [T0, None, None],
        }
    )
    impressions = pl.DataFrame(
        {
            "impression_id": ["m1", "m1", "m2", "m3", "m4", "m4"],
            "user_id": ["u1", "u1", "u2", "u1", "u1", "u1"],
            "ts": [h(1), h(1), h(20), h(30), h(31), h(31)],
            "item_id": ["A", "B", "A", "A", "A", "B"],
            "clicked": [True, False, False, False, True, False],
            "position": [0, 1, 0, 0, 0, 1],
        }
    )
    interactions = pl.DataFrame(
        {
            "user_id": ["u1", "u1", "u3", "u1", "u1"],
            "item_id": ["B", "A", "A", "C", "A"],
            "ts": [None, h(1), h(25), h(5), h(31)],
            "weight": [1.0] * 5,
        }
    )
    return Dataset(
        conform(ITEMS, items),
        conform(INTERACTIONS, interactions),
        conform(IMPRESSIONS, impressions),
    )


def requests(rows: list[tuple[str, str, datetime]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(len(rows))],
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "ts": [r[2] for r in rows],
        },
        schema={
            "request_id": pl.String,
            "user_id": pl.String,
            "item_id": pl.String,
            "ts": pl.Datetime("us", "UTC"),
        },
    )


def row(df: pl.DataFrame, i: int) -> dict[str, float | None]:
    return df.select(NAMES).row(i, named=True)


@cache
def small() -> Dataset:
    data, _ = generate(GeneratorConfig(n_items=200, n_users=100, n_shown=2000, days=4))
    return data


def impression_requests(data: Dataset) -> pl.DataFrame:
    return data.impressions.select(
        pl.col("impression_id").alias("request_id"), "user_id", "ts", "item_id"
    )


def matrix(df: pl.DataFrame) -> np.ndarray:
    return df.select(NAMES).to_numpy()


def assert_same(a: np.ndarray, b: np.ndarray, tol: float = 1e-9) -> None:
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(np.nan_to_num(a), np.nan_to_num(b), rtol=tol, atol=tol)


# --- config ---------------------------------------------------------------------------------


def test_config_accepts_durations_and_all() -> None:
    cfg = FeatureConfig(windows=["30m", "1d12h", "1mo", "all"])  # type: ignore[arg-type]
    assert cfg.windows == ("30m", "1d12h", "1mo", "all")
    assert FeatureConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"windows": ("1h", "7 days")}, r"windows has '7 days'.*polars duration"),
        ({"windows": ("0h",)}, "windows has '0h'"),
        ({"windows": "24h"}, "windows must be a list"),
        ({"windows": ("1h", "1h")}, "duplicates"),
        ({"ctr_prior": 1.5}, r"ctr_prior must be a number in \[0, 1\]"),
        ({"prior_weight": 0.0}, "prior_weight must be a number > 0"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        FeatureConfig(**kwargs)  # type: ignore[arg-type]


def test_config_from_dict_names_unknown_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['window'\]; allowed keys"):
        FeatureConfig.from_dict({"window": ["1h"]})


def test_feature_names_stable_order() -> None:
    names = feature_names(FeatureConfig(windows=("1h", "all")))
    assert names[:8] == [
        "item_shows_1h", "item_clicks_1h", "item_ctr_1h", "item_interactions_1h",
        "item_shows_all", "item_clicks_all", "item_ctr_all", "item_interactions_all",
    ]  # fmt: skip
    assert names[8:] == [
        "item_age_hours", "item_hours_since_click", "item_click_share_1h", *user_feature_names()
    ]  # fmt: skip
    assert len(NAMES) == len(set(NAMES)) == 33
    assert "item_click_share_1h" not in feature_names(FeatureConfig(windows=("1h",)))


# --- known answers ----------------------------------------------------------------------------


def test_known_answers_on_tiny_log() -> None:
    out = point_in_time_features(
        requests([("u1", "A", h(31)), ("u1", "B", h(31)), ("u1", "C", h(31))]), tiny(), CFG
    )
    a = row(out, 0)
    # A before 31h: shown at 1h (clicked), 20h, 30h; the show and click at exactly 31h excluded.
    assert (a["item_shows_all"], a["item_clicks_all"]) == (3, 1)
    assert a["item_ctr_all"] == pytest.approx((1 + K) / (3 + 20))
    assert (a["item_shows_7d"], a["item_clicks_7d"]) == (3, 1)
    assert (a["item_shows_24h"], a["item_clicks_24h"]) == (2, 0)  # [7h, 31h): 20h, 30h
    assert (a["item_shows_1h"], a["item_clicks_1h"]) == (1, 0)  # [30h, 31h): start included
    assert a["item_ctr_1h"] == pytest.approx(K / 21)
    # interactions with A: u1 at 1h, u3 at 25h (u1 at 31h excluded)
    assert [a[f"item_interactions_{w}"] for w in ("1h", "24h", "7d", "all")] == [0, 1, 2, 2]
    assert a["item_age_hours"] == pytest.approx(31.0)
    assert a["item_hours_since_click"] == pytest.approx(30.0)
    assert a["item_click_share_1h"] == 0.0  # its one click (at 1h) is not in [30h, 31h)
    # u1 before 31h: shown A, B at 1h and A at 30h, clicked once; history B (no ts), A, C.
    assert (a["user_shows"], a["user_clicks"], a["user_history"]) == (3, 1, 3)
    assert a["user_ctr"] == pytest.approx((1 + K) / 23)
    assert (a["user_category_shows"], a["user_category_clicks"]) == (2, 1)  # "news": A twice
    assert a["user_category_ctr"] == pytest.approx((1 + K) / 22)
    assert a["user_category_share"] == pytest.approx(1 / 3)
    assert a["user_subcategory_share"] == pytest.approx(1 / 3)
    assert (a["user_item_shows"], a["user_item_history"]) == (2, 1)

    b = row(out, 1)
    assert b["item_age_hours"] == pytest.approx(30.0)  # no published_at: first seen at 1h
    assert b["item_hours_since_click"] is None  # never clicked
    assert (b["user_category_shows"], b["user_category_share"]) == (1, pytest.approx(1 / 3))
    assert b["user_subcategory_shows"] is None  # B has no subcategory
    assert b["user_item_history"] == 1  # the history row with no time

    c = row(out, 2)
    assert c["item_age_hours"] == pytest.approx(26.0)  # first seen: interaction at 5h
    assert c["item_click_share_1h"] == 0.0  # never clicked: 0 of 0
    early = row(point_in_time_features(requests([("u1", "A", h(2))]), tiny(), CFG), 0)
    assert early["item_click_share_1h"] == 1.0  # A's one click (at 1h) is in [1h, 2h)
    assert c["item_ctr_all"] == pytest.approx(CFG.ctr_prior)
    assert c["user_category_share"] is None and c["user_category_ctr"] is None


def test_same_timestamp_events_are_not_before() -> None:
    """At 1h, the impression m1 itself (and the click it records) must not count."""
    a = row(point_in_time_features(requests([("u1", "A", h(1))]), tiny(), CFG), 0)
    assert (a["item_shows_all"], a["item_clicks_all"], a["item_interactions_all"]) == (0, 0, 0)
    assert a["item_hours_since_click"] is None
    assert (a["user_shows"], a["user_history"]) == (0, 1)  # only the history with no ts
    assert a["user_category_share"] == 0.0


def test_unknown_user_and_item_get_neutral_values() -> None:
    data = tiny()
    reqs = requests([("nobody", "A", h(40)), ("u1", "nothing", h(40))])
    snap = build_snapshot(data, h(40), CFG)
    for out in (point_in_time_features(reqs, data, CFG), snapshot_features(snap, reqs)):
        user = row(out, 0)
        assert (user["user_shows"], user["user_clicks"], user["user_history"]) == (0, 0, 0)
        assert user["user_ctr"] == pytest.approx(CFG.ctr_prior)
        assert user["user_category_share"] == 0.0 and user["user_item_shows"] == 0
        assert user["user_category_ctr"] == pytest.approx(CFG.ctr_prior)
        item = row(out, 1)
        assert item["item_shows_all"] == 0 and item["item_ctr_all"] == pytest.approx(0.05)
        assert item["item_age_hours"] is None and item["user_category_share"] is None
    fast = snapshot_features_numpy(snap, "nobody", ["A", "nothing"])
    assert_same(
        fast,
        matrix(
            snapshot_features(
                snap, requests([("nobody", "A", h(40)), ("nobody", "nothing", h(40))])
            )
        ),
    )


def test_request_ts_time_zone_and_extra_columns() -> None:
    reqs = requests([("u1", "A", h(31))]).with_columns(pl.lit(7).alias("group"))
    local = reqs.with_columns(pl.col("ts").dt.convert_time_zone("Asia/Tokyo"))
    a = point_in_time_features(reqs, tiny(), CFG)
    b = point_in_time_features(local, tiny(), CFG)
    assert a.columns[:5] == ["request_id", "user_id", "item_id", "ts", "group"]
    assert_same(matrix(a), matrix(b))


ONE = [("u1", "A", h(1))]
UTC_TS = pl.Datetime("us", "UTC")


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (requests(ONE).drop("ts"), r"lack column\(s\) \['ts'\]"),
        (requests(ONE).with_columns(pl.lit(None, UTC_TS).alias("ts")), "1 null value"),
        (
            requests(ONE).with_columns(pl.lit(1.0).alias("user_ctr")),
            r"have column\(s\) \['user_ctr'\]",
        ),
        (requests(ONE).with_columns(pl.lit("x").alias("ts")), "must be a datetime"),
    ],
)
def test_bad_requests_are_explained(frame: pl.DataFrame, match: str) -> None:
    with pytest.raises(DataError, match=match):
        point_in_time_features(frame, tiny(), CFG)


# --- point in time --------------------------------------------------------------------------


def test_events_at_or_after_a_request_do_not_move_it() -> None:
    data = small()
    reqs = impression_requests(data)
    before = point_in_time_features(reqs, data, CFG)
    cut = data.impressions["ts"].sort()[data.impressions.height // 2]
    # Perturb everything at or after `cut`: flip clicks, add history and a brand-new item's shows.
    late = pl.col("ts") >= cut
    impressions = data.impressions.with_columns(
        pl.when(late).then(~pl.col("clicked")).otherwise(pl.col("clicked")).alias("clicked")
    )
    extra = reqs.filter(late).select("user_id", "item_id", "ts", pl.lit(1.0).alias("weight"))
    changed = Dataset(data.items, pl.concat([data.interactions, extra]), impressions)
    after = point_in_time_features(reqs, changed, CFG)
    keep = (reqs["ts"] <= cut).to_numpy()
    assert keep.sum() > 100 and (~keep).sum() > 100
    assert_same(matrix(before)[keep], matrix(after)[keep], tol=0)
    assert not np.allclose(
        np.nan_to_num(matrix(before)[~keep]), np.nan_to_num(matrix(after)[~keep])
    )


def test_an_event_before_a_request_moves_it() -> None:
    data = tiny()
    reqs = requests([("u1", "A", h(31))])
    base = row(point_in_time_features(reqs, data, CFG), 0)
    # u2's show of A at 20h becomes a click.
    imp = data.impressions.with_columns(
        (pl.col("clicked") | (pl.col("impression_id") == "m2")).alias("clicked")
    )
    moved = row(point_in_time_features(reqs, Dataset(data.items, data.interactions, imp), CFG), 0)
    assert moved["item_clicks_all"] == base["item_clicks_all"] + 1  # type: ignore[operator]
    assert moved["item_clicks_24h"] == 1
    assert moved["item_hours_since_click"] == pytest.approx(11.0)
    assert moved["user_clicks"] == base["user_clicks"]  # u2's click is not u1's


def test_no_impressions_dataset() -> None:
    data = tiny()
    data = Dataset(data.items, data.interactions, data.impressions.clear())
    reqs = requests([("u1", "A", h(31)), ("u3", "C", h(40))])
    out = point_in_time_features(reqs, data, CFG)
    a = row(out, 0)
    assert a["item_shows_all"] == 0 and a["item_ctr_all"] == pytest.approx(0.05)
    assert a["item_interactions_all"] == 2 and a["user_history"] == 3
    assert a["item_hours_since_click"] is None and a["user_category_share"] == pytest.approx(1 / 3)
    snap = build_snapshot(data, h(31), CFG)
    same_time = reqs.head(1)
    assert_same(matrix(out.head(1)), matrix(snapshot_features(snap, same_time)))
    assert_same(matrix(out.head(1)), snapshot_features_numpy(snap, "u1", ["A"]))


def test_empty_dataset_and_empty_requests() -> None:
    data = tiny()
    empty = Dataset(data.items.clear(), data.interactions.clear(), data.impressions.clear())
    out = point_in_time_features(requests([("u1", "A", h(1))]), empty, CFG)
    assert row(out, 0)["item_ctr_all"] == pytest.approx(0.05)
    none = point_in_time_features(requests([]), data, CFG)
    assert none.height == 0 and none.columns[-len(NAMES) :] == NAMES
    fast = snapshot_features_numpy(build_snapshot(empty, h(1), CFG), "u1", [])
    assert fast.shape == (0, len(NAMES))


# --- train / serve agreement ----------------------------------------------------------------


def grid(data: Dataset, at: datetime) -> pl.DataFrame:
    users = [*data.impressions["user_id"].unique().sort().head(30).to_list(), "stranger"]
    items = [*data.items["item_id"].head(60).to_list(), "no-such-item"]
    return pl.DataFrame(
        {
            "request_id": [f"{u}@{at}" for u in users for _ in items],
            "user_id": [u for u in users for _ in items],
            "item_id": items * len(users),
        }
    ).with_columns(pl.lit(at, dtype=pl.Datetime("us", "UTC")).alias("ts"))


def test_point_in_time_equals_snapshot_and_fast_path(tmp_path: Path) -> None:
    data = small()
    at = data.impressions["ts"].sort()[1200]  # an impression time: simultaneous events exist
    reqs = grid(data, at)
    train = matrix(point_in_time_features(reqs, data, CFG))
    snap = build_snapshot(data, at, CFG)
    serve = matrix(snapshot_features(snap, reqs))
    assert_same(train, serve)
    assert (train[:, NAMES.index("item_shows_all")] > 0).sum() > 100  # not all zeros
    fast = np.vstack(
        [
            snapshot_features_numpy(
                snap, u, reqs.filter(pl.col("user_id") == u)["item_id"].to_list()
            )
            for u in reqs["user_id"].unique(maintain_order=True).to_list()
        ]
    )
    assert_same(fast, serve)

    snap.save(tmp_path / "snap")
    loaded = FeatureSnapshot.load(tmp_path / "snap")
    assert loaded.as_of == at and loaded.config == CFG
    assert_same(matrix(snapshot_features(loaded, reqs)), serve, tol=0)


def test_extra_history_equals_history_in_the_data() -> None:
    """Serving with a request history == training with that history in the data (user part)."""
    data = small()
    at = data.impressions["ts"].sort()[1500]
    reqs = grid(data, at)
    history = pl.DataFrame(
        {
            "user_id": ["stranger"] * 4 + [reqs["user_id"][0]] * 2,
            "item_id": [*data.items["item_id"].slice(3, 3).to_list(), "no-such-item"] * 1
            + data.items["item_id"].slice(10, 2).to_list(),
        }
    )
    with_history = Dataset(
        data.items,
        pl.concat(
            [
                data.interactions,
                history.with_columns(
                    pl.lit(None, pl.Datetime("us", "UTC")).alias("ts"), pl.lit(1.0).alias("weight")
                ),
            ]
        ),
        data.impressions,
    )
    user_cols = user_feature_names()
    train = point_in_time_features(reqs, with_history, CFG).select(user_cols).to_numpy()
    snap = build_snapshot(data, at, CFG)
    serve = snapshot_features(snap, reqs, extra_history=history).select(user_cols).to_numpy()
    assert_same(train, serve)
    stranger = reqs.filter(pl.col("user_id") == "stranger")
    fast = snapshot_features_numpy(
        snap,
        "stranger",
        stranger["item_id"].to_list(),
        extra_history=history["item_id"][:4].to_list(),
    )
    expect = snapshot_features(snap, stranger, extra_history=history.head(4))
    assert_same(fast, matrix(expect))
    assert (expect["user_history"] == 4).all()


def test_sections_a_request_gives_equal_the_offline_path_for_items_the_snapshot_lacks() -> None:
    """An item first seen after the cut-off: the offline path reads its sections from the
    items table, a snapshot built without it has none; given as the request's category and
    subcategory columns (an API request's item texts), the user's category features match."""
    data = small()
    at = data.impressions["ts"].sort()[1500]
    seen = pl.concat([data.impressions.filter(pl.col("ts") < at)["item_id"],
                      data.interactions.filter(pl.col("ts") < at)["item_id"]])  # fmt: skip
    later = data.items.filter(~pl.col("item_id").is_in(seen.implode())).head(20)
    assert later.height == 20 and later["category"].null_count() == 0
    users = data.impressions["user_id"].unique().sort().head(10).to_list()
    reqs = pl.DataFrame(
        {"request_id": [u for u in users for _ in range(later.height)],
         "user_id": [u for u in users for _ in range(later.height)],
         "item_id": later["item_id"].to_list() * len(users)}
    ).with_columns(pl.lit(at, dtype=pl.Datetime("us", "UTC")).alias("ts"))  # fmt: skip
    sections = later.select("item_id", "category", "subcategory")
    offline = matrix(point_in_time_features(reqs, data, CFG))
    without = Dataset(data.items.join(sections, on="item_id", how="anti"), data.interactions,
                      data.impressions)  # fmt: skip
    snap = build_snapshot(without, at, CFG)
    user_cols = [NAMES.index(c) for c in user_feature_names() if "category" in c]
    blind = matrix(snapshot_features(snap, reqs))
    assert np.isnan(blind[:, user_cols]).all()  # no sections: no category features
    told = reqs.join(sections, on="item_id", how="left", maintain_order="left")
    served = matrix(snapshot_features(snap, told))
    assert_same(served[:, user_cols], offline[:, user_cols])
    assert not np.isnan(served[:, user_cols]).all()
    given = {r["item_id"]: r for r in sections.to_dicts()}
    fast = np.vstack([snapshot_features_numpy(snap, u, later["item_id"].to_list(), given=given)
                      for u in users])  # fmt: skip
    assert_same(fast, served)
    # as extra history, a given section counts for the user's category history
    extra = told.head(2).select("user_id", "item_id", "category", "subcategory")
    with_extra = matrix(snapshot_features(snap, told.head(20), extra_history=extra))
    fast_extra = snapshot_features_numpy(
        snap, users[0], later["item_id"].to_list(), extra_history=extra["item_id"].to_list(),
        given=given,
    )  # fmt: skip
    assert_same(fast_extra, with_extra)


def test_now_moves_only_the_ages() -> None:
    data = small()
    at = data.impressions["ts"].sort()[1000]
    snap = build_snapshot(data, at, CFG)
    reqs = grid(data, at).filter(pl.col("user_id") == "stranger")
    base = matrix(snapshot_features(snap, reqs))
    later = matrix(snapshot_features(snap, reqs, now=at + timedelta(hours=6)))
    time_cols = [NAMES.index("item_age_hours"), NAMES.index("item_hours_since_click")]
    other = [i for i in range(len(NAMES)) if i not in time_cols]
    assert_same(later[:, other], base[:, other], tol=0)
    assert_same(later[:, time_cols], base[:, time_cols] + 6.0)
    fast = snapshot_features_numpy(
        snap, "stranger", reqs["item_id"].to_list(), now=at + timedelta(hours=6)
    )
    assert_same(fast, later)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.permutations(range(120)))
def test_features_do_not_depend_on_request_order(order: list[int]) -> None:
    data = small()
    reqs = impression_requests(data).gather_every(16).head(120)
    base = matrix(point_in_time_features(reqs, data, CFG))
    shuffled = matrix(point_in_time_features(reqs[order], data, CFG))
    assert_same(shuffled, base[order], tol=0)


# --- snapshot files -------------------------------------------------------------------------


def test_snapshot_load_explains_problems(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"snapshot.json: file missing; not a feature snapshot"):
        FeatureSnapshot.load(tmp_path)
    snap = build_snapshot(tiny(), h(40), CFG)
    snap.save(tmp_path / "s")
    snap.tables["users"].head(1).write_parquet(tmp_path / "s" / "users.parquet")
    with pytest.raises(DataError, match=r"users.parquet: contents differ from the digest"):
        FeatureSnapshot.load(tmp_path / "s")


def test_snapshot_counts_only_events_before_as_of() -> None:
    snap = build_snapshot(tiny(), h(31), CFG)
    items = snap.tables["items"].filter(pl.col("item_id") == "A").row(0, named=True)
    assert (items["shows_all"], items["clicks_all"], items["interactions_all"]) == (3, 1, 2)
    users = snap.tables["users"].sort("user_id")
    assert users["user_id"].to_list() == ["u1", "u2", "u3"]
    assert users.filter(pl.col("user_id") == "u1")["history"].item() == 3


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 30))
def test_numpy_derivation_equals_the_polars_one(seed: int, n: int) -> None:
    """derive_numpy (the serving twin) and derive_features give the same numbers and the same
    nulls on random raw columns (counts with gaps, missing times and groups)."""
    from features.derive import derive_features, derive_numpy
    from features.events import AT

    rng = np.random.default_rng(seed)
    config = FeatureConfig(windows=("1h", "24h", "all"), ctr_prior=0.03, prior_weight=7.0)
    at = 1_700_000_000_000_000 + int(rng.integers(0, 10**12))
    arrays: dict[str, np.ndarray] = {AT: np.full(n, float(at))}
    for name in [f"items.{c}_{w}" for w in config.windows for c in ("shows", "clicks",
                 "interactions")] + [f"{t}.{c}" for t in ("users", "user_category",
                 "user_subcategory") for c in ("shows", "clicks", "history")] + [
                 "user_item.shows", "user_item.history"]:  # fmt: skip
        values = rng.integers(0, 50, n).astype(np.float64)
        values[rng.random(n) < 0.2] = np.nan
        arrays[name] = values
    for name in ("items.published_at", "items.last_click_at", "items.first_seen_at"):
        t = (at - rng.integers(1, 10**11, n)).astype(np.float64)
        t[rng.random(n) < 0.4] = np.nan
        arrays[name] = t
    for g in ("category", "subcategory"):
        arrays[f"items.{g}"] = rng.random(n) < 0.7
    cols: dict[str, pl.Series] = {}
    for name, values in arrays.items():
        if name in ("items.category", "items.subcategory"):
            cols[name] = pl.Series(name, ["c" if v else None for v in values], dtype=pl.String)
        elif name == AT or name.endswith("_at"):
            us = pl.Series(name, values).fill_nan(None).cast(pl.Int64)
            cols[name] = us.cast(pl.Datetime("us", "UTC"))
        else:
            cols[name] = pl.Series(name, values).fill_nan(None)
    want = derive_features(pl.DataFrame(list(cols.values())), config)
    want_np = want.select(pl.all().fill_null(np.nan)).to_numpy()
    got = derive_numpy(arrays, config)
    assert got.shape == want_np.shape == (n, len(feature_names(config)))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want_np))
    np.testing.assert_array_equal(np.nan_to_num(got), np.nan_to_num(want_np))
