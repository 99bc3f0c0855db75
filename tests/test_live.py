"""Live features: a snapshot plus events counted as they arrive equals the offline point-in-time
path on the dataset that holds the same events (to 1e-9), at impression times and between them."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import polars as pl
import pytest

from features import FeatureConfig, build_snapshot, feature_names, point_in_time_features
from features.live import LiveFeatures, epoch_us
from recsys.data.dataset import Dataset
from recsys.data.schema import conform
from recsys.errors import DataError
from recsys.generate import GeneratorConfig, generate


def _split(data: Dataset, frac: float = 0.5) -> tuple[Dataset, pl.DataFrame, object]:
    ts = data.impressions["ts"].sort()
    cutoff = ts[int(len(ts) * frac)]
    before = Dataset(
        data.items,
        data.interactions.filter(pl.col("ts").is_null() | (pl.col("ts") < cutoff)),
        data.impressions.filter(pl.col("ts") < cutoff),
    )
    return before, data.impressions.filter(pl.col("ts") >= cutoff), cutoff


def _replay(live: LiveFeatures, after: pl.DataFrame) -> pl.DataFrame:
    """Feed `after` as impression and click events; return the clicks as interactions (what the
    events importer adds to the dataset)."""
    clicks = []
    for (imp,), rows in after.sort("ts", "impression_id", "position").group_by(
        "impression_id", maintain_order=True
    ):
        user, t = rows["user_id"][0], rows["ts"][0]
        live.add_impression(str(imp), user, epoch_us(t), rows["item_id"].to_list())
        for item in rows.filter(pl.col("clicked"))["item_id"].to_list():
            click_at = t + timedelta(seconds=30)
            live.add_click(user, item, epoch_us(click_at), str(imp))
            clicks.append({"user_id": user, "item_id": item, "ts": click_at, "weight": 1.0})
    schema = {"user_id": pl.String, "item_id": pl.String, "ts": pl.Datetime("us", "UTC"),
              "weight": pl.Float64}  # fmt: skip
    return conform("interactions", pl.DataFrame(clicks, schema=schema))


@pytest.mark.parametrize("windows", [("1h", "24h", "7d", "all"), ("6h",)])
def test_live_features_equal_point_in_time_features(windows: tuple[str, ...]) -> None:
    data, _ = generate(GeneratorConfig(n_items=150, n_users=60, n_shown=3000, days=6, seed=3))
    config = FeatureConfig(windows=windows)
    before, after, cutoff = _split(data)
    live = LiveFeatures(build_snapshot(before, cutoff, config))
    clicks = _replay(live, after)
    full = Dataset(
        data.items,
        pl.concat([before.interactions, clicks]),
        after.vstack(before.impressions).sort("ts"),
    )

    rng = np.random.default_rng(0)
    imps = after["impression_id"].unique(maintain_order=True).to_list()
    chosen = [imps[i] for i in rng.choice(len(imps), 25, replace=False)]
    users = data.impressions["user_id"].unique().sort().to_list()
    probes = []
    for imp in chosen:  # at an impression's own time, with its shown list
        rows = after.filter(pl.col("impression_id") == imp)
        probes.append((rows["user_id"][0], rows["ts"][0], rows["item_id"].to_list()))
    for _ in range(15):  # between events, a random user, random items (some unknown)
        t = cutoff + timedelta(seconds=float(rng.uniform(0, 4 * 86400)))
        items = [data.items["item_id"][int(i)] for i in rng.choice(150, 8)] + ["no-such-item"]
        probes.append((users[int(rng.integers(len(users)))], t, items))
    probes.append(("new-user", cutoff, data.items["item_id"].head(5).to_list()))

    names = feature_names(config)
    for n, (user, t, items) in enumerate(probes):
        req = pl.DataFrame(
            {"request_id": [str(n)] * len(items), "user_id": [user] * len(items),
             "ts": [t] * len(items), "item_id": items}
        )  # fmt: skip
        ref = point_in_time_features(req, full, config).select(names)
        ref_np = ref.select(pl.all().cast(pl.Float64).fill_null(np.nan)).to_numpy()
        got = live.features(user, items, epoch_us(t))
        assert np.array_equal(np.isnan(got), np.isnan(ref_np)), (n, names)
        np.testing.assert_allclose(got, ref_np, rtol=0, atol=1e-9, equal_nan=True)


def test_extra_history_counts_like_the_snapshot_path() -> None:
    data, _ = generate(GeneratorConfig(n_items=80, n_users=30, n_shown=800, days=3, seed=5))
    before, _after, cutoff = _split(data)
    snap = build_snapshot(before, cutoff)
    live = LiveFeatures(snap)
    user = before.impressions["user_id"][0]
    items = data.items["item_id"].head(6).to_list()
    extra = [items[0], items[0], items[3]]
    with_extra = live.features(user, items, epoch_us(cutoff), extra_history=extra)
    base = live.features(user, items, epoch_us(cutoff))
    names = feature_names(snap.config)
    h = names.index("user_history")
    assert np.all(with_extra[:, h] == base[:, h] + 3)
    uih = names.index("user_item_history")
    assert with_extra[0, uih] == base[0, uih] + 2 and with_extra[3, uih] == base[3, uih] + 1


def test_moments_before_the_cutoff_are_refused_and_old_events_ignored() -> None:
    data, _ = generate(GeneratorConfig(n_items=50, n_users=20, n_shown=400, days=2, seed=1))
    before, _after, cutoff = _split(data)
    live = LiveFeatures(build_snapshot(before, cutoff))
    with pytest.raises(DataError, match="before the bundle's cut-off"):
        live.features(None, ["x"], epoch_us(cutoff) - 1)
    assert not live.add_impression("old", "u", epoch_us(cutoff) - 1, ["x"])
    assert live.add_impression("new", "u", epoch_us(cutoff), ["x"])
    assert not live.add_impression("new", "u", epoch_us(cutoff) + 5, ["x"])  # same request id


def test_events_in_any_order_give_the_same_state() -> None:
    """Late events (impressions and their clicks arriving out of time order, as from several
    producers) give the same features as the same events in order."""
    data, _ = generate(GeneratorConfig(n_items=80, n_users=30, n_shown=1500, days=4, seed=7))
    before, after, cutoff = _split(data)
    snap = build_snapshot(before, cutoff)
    ordered, shuffled = LiveFeatures(snap), LiveFeatures(snap)
    _replay(ordered, after)
    groups = list(after.group_by("impression_id", maintain_order=True))
    for n, k in enumerate(np.random.default_rng(1).permutation(len(groups))):
        rows = groups[int(k)][1]
        if n % 2:  # every other impression: its clicks arrive before it
            clicks = rows.filter(pl.col("clicked"))
            for item in clicks["item_id"].to_list():
                click_at = rows["ts"][0] + timedelta(seconds=30)
                shuffled.add_click(rows["user_id"][0], item, epoch_us(click_at),
                                   str(rows["impression_id"][0]))  # fmt: skip
            shuffled.add_impression(str(rows["impression_id"][0]), rows["user_id"][0],
                                    epoch_us(rows["ts"][0]), rows["item_id"].to_list())  # fmt: skip
        else:
            _replay(shuffled, rows)
    stale = sum(log.valid < len(log.times) for log in shuffled.users.values())
    assert stale > 0  # the late-event path ran: some logs wait to be settled
    users = after["user_id"].unique().sort().to_list()[:10]
    items = data.items["item_id"].head(30).to_list()
    for n, user in enumerate(users):
        t = epoch_us(cutoff) + n * 3_600_000_000
        np.testing.assert_array_equal(
            ordered.features(user, items, t), shuffled.features(user, items, t)
        )


def test_the_silence_limit_is_twice_the_longest_quiet_spell_of_the_last_week() -> None:
    """Known answer: events 10 s apart, then 300 s, then 10 s in the last week; a 5,000 s
    gap eight days back (outside it); the log ends 20 s after its last event."""
    from datetime import UTC, datetime

    from features.events import LIVE_LAG_FLOOR, live_lag_seconds, longest_gap_seconds

    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    times = [t0 - timedelta(days=8), t0 - timedelta(days=8) + timedelta(seconds=5_000)]
    times += [t0 + timedelta(seconds=10 * k) for k in range(50)]  # up to t0 + 490 s
    times += [t0 + timedelta(seconds=790), t0 + timedelta(seconds=800), None]
    series = pl.Series(times, dtype=pl.Datetime("us", "UTC"))
    until = t0 + timedelta(seconds=820)
    assert longest_gap_seconds(series, until) == 300.0
    assert live_lag_seconds(series, until) == 600.0
    # the wait from the last event to `until` counts too
    assert longest_gap_seconds(series, t0 + timedelta(seconds=1_800)) == 1_000.0
    dense = pl.Series([t0 + timedelta(seconds=k) for k in range(5)], dtype=series.dtype)
    assert live_lag_seconds(dense, t0 + timedelta(seconds=5)) == LIVE_LAG_FLOOR
    assert live_lag_seconds(series.head(1), until) is None
