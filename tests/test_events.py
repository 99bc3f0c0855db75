"""Events into the API (real uvicorn servers on 127.0.0.1): validation per event, idempotency,
the durable event log, replay on restart, and online features equal to the offline path."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import polars as pl
import pytest
from servers import TOKEN, LiveServer, live_server

from recsys.bundle import Bundle
from recsys.data.dataset import Dataset, read_dataset, write_dataset
from recsys.eventlog import EventLog
from serving.app import create_app
from serving.ranking import ServingModel
from serving.schemas import EVENT
from serving.settings import Settings

# ------------------------------------------------------------------ the event log (fast)


def test_event_log_appends_reads_and_rotates(tmp_path: Path) -> None:
    log = EventLog(tmp_path, segment_bytes=200)
    batches = [[{"event_id": f"e{b}-{i}", "n": i} for i in range(3)] for b in range(4)]
    for b in batches:
        log.append(b)
    assert len(log.segments()) > 1  # rotated past 200 bytes
    assert list(log.read()) == [e for b in batches for e in b]
    again = EventLog(tmp_path, segment_bytes=200)
    assert again.count == 12 and again.recovered_bytes == 0
    again.append([{"event_id": "last"}])
    assert [e["event_id"] for e in EventLog(tmp_path).read()][-2:] == ["e3-2", "last"]


def test_event_log_cuts_a_torn_tail(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    log.append([{"event_id": "a"}, {"event_id": "b"}])
    segment = log.segments()[-1]
    with segment.open("ab") as f:
        f.write(b'{"event_id": "half-writ')  # a crash inside a write
    assert [e["event_id"] for e in log.read()] == ["a", "b"]  # never read, even before recovery
    reopened = EventLog(tmp_path)
    assert reopened.recovered_bytes == len(b'{"event_id": "half-writ')
    reopened.append([{"event_id": "c"}])
    assert [e["event_id"] for e in EventLog(tmp_path).read()] == ["a", "b", "c"]


def test_event_times_are_utc_for_every_event_type() -> None:
    """The one validator of every event type reads its fields without touching the ones a type
    lacks (a click has no published_at; reading it through getattr cost 14% of ingestion)."""
    common = {"event_id": "e", "ts": "2026-12-01T08:00:00+02:00"}
    item = EVENT.validate_python({**common, "type": "item", "item_id": "i", "title": "t",
                                  "published_at": "2026-11-30T23:30:00"})  # fmt: skip
    click = EVENT.validate_python({**common, "type": "click", "user_id": "u", "item_id": "i"})
    shown = EVENT.validate_python({**common, "event_id": "s", "type": "impression",
                                   "user_id": "u", "request_id": "r", "items": ["i"],
                                   "ts": "2026-12-01T06:00:00"})  # fmt: skip
    six = datetime(2026, 12, 1, 6, tzinfo=UTC)
    assert item.ts == click.ts == shown.ts == six
    assert all(e.ts.tzinfo is UTC for e in (item, click, shown))
    assert item.published_at == datetime(2026, 11, 30, 23, 30, tzinfo=UTC)  # type: ignore[union-attr]
    assert "published_at" not in click.model_dump()
    assert click.model_dump(mode="json")["ts"] == "2026-12-01T06:00:00Z"


def test_events_are_off_without_an_event_log(empty_server: Any, client: httpx.Client) -> None:
    r = client.post(f"{empty_server.url}/v1/events", json={"events": []})
    assert r.status_code == 409 and "RECSYS_EVENT_LOG" in r.json()["error"]


# ------------------------------------------------------------------ the API (slow)


def _events_server(bundle: Path, log_dir: Path, **extra: Any) -> Iterator[Any]:
    model = ServingModel.from_bundle(Bundle.load(bundle), preload_encoder=True)  # its own state
    settings = Settings(bundle=bundle, event_log=log_dir, **extra)  # type: ignore[call-arg]
    yield from live_server(create_app(settings, model=model))


@pytest.fixture
def events_server(bundle_dir: Path, tmp_path: Path) -> Iterator[Any]:
    yield from _events_server(bundle_dir, tmp_path / "events")


def _iso(t: Any) -> str:
    return t.isoformat().replace("+00:00", "Z")


@pytest.mark.slow
def test_each_event_is_checked_alone(events_server: Any, client: httpx.Client) -> None:
    url = f"{events_server.url}/v1/events"
    cut = events_server.state.model.bundle.snapshot.as_of
    ok = {"event_id": "i1", "type": "item", "ts": _iso(cut), "item_id": "new-1", "title": "Hi"}
    events = [
        ok,
        {"event_id": "x", "type": "purchase", "ts": _iso(cut)},
        {"event_id": "c1", "type": "click", "ts": "yesterday", "user_id": "u", "item_id": "a"},
        {"event_id": "m1", "type": "impression", "ts": _iso(cut), "user_id": "u",
         "request_id": "r", "items": ["a", "a"]},
        {"event_id": "i1", "type": "item", "ts": _iso(cut), "item_id": "new-1", "title": "Hi"},
        "not an object",
    ]  # fmt: skip
    r = client.post(url, json={"events": events})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["accepted"] == 1 and body["duplicates"] == 1
    assert [x["index"] for x in body["rejected"]] == [1, 2, 3, 5]
    reasons = [x["reason"] for x in body["rejected"]]
    assert "purchase" in reasons[0] and "ts" in reasons[1] and "distinct" in reasons[2]
    again = client.post(url, json={"events": [ok]}).json()
    assert again == {"accepted": 0, "duplicates": 1, "rejected": []}
    for bad, status in (
        ("[1, 2]", 422), ('{"events": 3}', 422), ("{nope", 422),
        (json.dumps({"events": [ok] * 1001}), 422),
    ):  # fmt: skip
        r = client.post(url, content=bad, headers={"content-type": "application/json"})
        assert r.status_code == status, (bad[:20], r.text)
        assert "error" in r.json()
    early = client.post(
        f"{events_server.url}/v1/rank",
        json={"user_id": "u", "candidates": ["a"], "at": _iso(cut - timedelta(seconds=1))},
    )
    assert early.status_code == 422 and "cut-off" in early.json()["error"]
    assert "new-1" in events_server.state.model.live.items.ids  # embedded, in the live catalogue
    # readiness is judged at the latest moment asked (now before any request, months after
    # this bundle's cut-off: stale); a request a minute after the cut-off finds it fresh
    body = {"user_id": "u", "candidates": ["a"], "at": _iso(cut + timedelta(minutes=1))}
    assert client.post(f"{events_server.url}/v1/rank", json=body).status_code == 200
    ready = client.get(f"{events_server.url}/readyz").json()
    online = events_server.state.model.bundle.manifest["online"]["ranker"]["name"]
    assert ready["ranker"] == online and ready["freshness"].startswith("online: the live state")


def test_the_bundle_sizes_the_silence_limit_from_its_log(nightly: Any) -> None:
    """The nightly writes the limit of its log (twice the longest quiet spell of its last week
    before the cut-off) into the bundle; a server takes it unless told otherwise."""
    from features.events import live_lag_seconds
    from recsys.data.schema import TS

    bundle = Bundle.load(nightly.result.bundle_dir)
    data = read_dataset(nightly.data_dir)
    times = pl.concat([data.impressions["ts"].cast(TS), data.interactions["ts"].cast(TS)])
    expected = live_lag_seconds(times, bundle.snapshot.as_of)
    assert expected is not None and bundle.manifest["online"]["max_event_lag_s"] == expected
    served = ServingModel.from_bundle(bundle, preload_encoder=False)
    assert served.live.max_lag_us == round(expected * 1e6)
    told = ServingModel.from_bundle(bundle, preload_encoder=False, max_event_lag_s=90.0)
    assert told.live.max_lag_us == 90_000_000


@pytest.mark.slow
def test_a_silent_event_feed_ranks_as_the_batch_path_until_events_flow_again(
    bundle_dir: Path, tmp_path: Path, client: httpx.Client
) -> None:
    """Known answers, limit 1 h: no event since the cut-off, a request 30 min after it gets the
    online ranker's answer, one 2 h after it the batch ranker's (what --no-events serves), and
    /readyz and /metrics say stale since cut-off + 1 h; an impression event just before that
    moment makes it fresh again by itself (the online answer with that event counted)."""
    from features.live import epoch_us
    from serving.schemas import RankRequest

    lag = 3600.0
    model = ServingModel.from_bundle(Bundle.load(bundle_dir), preload_encoder=False,
                                     max_event_lag_s=lag)  # fmt: skip
    settings = Settings(bundle=bundle_dir, event_log=tmp_path / "events",
                        max_event_lag_seconds=lag)  # type: ignore[call-arg]  # fmt: skip
    srv = LiveServer(create_app(settings, model=model)).start()
    try:
        cut = model.bundle.snapshot.as_of
        user, items = sorted(model.histories.ptr)[0], list(model.bundle.vectors.ids[:8])
        req = RankRequest(user_id=user, candidates=items)

        def rank(at: datetime) -> list[dict[str, Any]]:
            body = {"user_id": user, "candidates": items, "at": _iso(at)}
            r = client.post(f"{srv.url}/v1/rank", json=body)
            assert r.status_code == 200, r.text
            return list(r.json()["items"])

        def ready() -> dict[str, Any]:
            return dict(client.get(f"{srv.url}/readyz").json())

        def metric(name: str) -> float:
            text = client.get(f"{srv.url}/metrics").text
            return float(next(ln.split()[-1] for ln in text.splitlines()
                              if ln.startswith(name + " ")))  # fmt: skip

        batch = model.rank(req, None, None)["items"]
        soon, late = cut + timedelta(minutes=30), cut + timedelta(hours=2)
        online = model.rank(req, None, epoch_us(soon))["items"]
        assert online != batch  # the paths differ here, so an answer says which one ranked
        assert rank(soon) == online
        r = ready()
        assert r["stale"] is False and datetime.fromisoformat(r["last_event"]) == cut
        assert r["max_event_lag_s"] == lag and r["freshness"].startswith("online")

        assert rank(late) == batch  # silent for 2 h: the batch path
        r = ready()
        assert r["stale"] is True and r["ranker"] == model.bundle.manifest["ranker"]["name"]
        assert datetime.fromisoformat(r["stale_since"]) == cut + timedelta(hours=1)
        assert "stale" in r["freshness"] and r["freshness"].startswith("batch")
        assert metric("recsys_live_stale") == 1.0 and metric("recsys_rank_stale_total") == 1.0
        assert metric("recsys_live_last_event_timestamp_seconds") == cut.timestamp()

        shown = late - timedelta(minutes=1)
        event = {"event_id": "imp-1", "type": "impression", "ts": _iso(shown), "user_id": user,
                 "request_id": "r1", "items": items[:3]}  # fmt: skip
        assert client.post(f"{srv.url}/v1/events", json={"events": [event]}).json()["accepted"]
        fresh = model.rank(req, None, epoch_us(late))["items"]
        assert rank(late) == fresh and fresh != batch
        r = ready()
        assert r["stale"] is False and "stale_since" not in r
        assert datetime.fromisoformat(r["last_event"]) == shown
        assert metric("recsys_live_stale") == 0.0 and metric("recsys_rank_stale_total") == 1.0
    finally:
        srv.stop()


def _replay_plan(data: Dataset, as_of: Any, n: int) -> pl.DataFrame:
    """The last n impressions before the bundle's cut-off (the end of its data), moved to just
    after it with their spacing kept, under new impression ids: the traffic of the next hours."""
    before = data.impressions.filter(pl.col("ts") < as_of).sort("ts", "impression_id", "position")
    last = before["impression_id"].unique(maintain_order=True).tail(n)
    plan = before.filter(pl.col("impression_id").is_in(last.implode()))
    shift = as_of - plan["ts"].min() + timedelta(minutes=1)
    return plan.with_columns(
        pl.col("ts") + shift,
        ("next-" + pl.col("impression_id").cast(pl.String)).alias("impression_id"),
    )


@pytest.mark.slow
def test_replay_through_the_api_equals_the_offline_online_features(
    nightly: Any, bundle_dir: Path, tmp_path: Path, client: httpx.Client
) -> None:
    """Impressions after the cut-off replayed in time order: rank (at = its time, its shown list
    and a new item's text as an item event), then its impression and clicks. The API's scores
    equal the ranker on the offline point-in-time features of a dataset holding the same events
    (online freshness); a restarted server replays the log and ranks the same."""
    from pipelines.prepare import read_tables
    from recsys.featurize import matrix, point_in_time_frame

    data = read_tables(Path(nightly.result.run_dir) / "validate")
    log_dir = tmp_path / "events"
    servers = _events_server(bundle_dir, log_dir)
    server = next(servers)
    model: ServingModel = server.state.model
    as_of = model.bundle.snapshot.as_of
    plan = _replay_plan(data, as_of, 40)
    first_ts = plan["ts"].min()
    new_item = {"event_id": "item-new", "type": "item", "ts": _iso(first_ts), "item_id": "fresh-1",
                "title": data.items["title"][0], "category": data.items["category"][0]}  # fmt: skip
    r = client.post(f"{server.url}/v1/events", json={"events": [new_item]})
    assert r.json()["accepted"] == 1

    served, requests, clicks, shown = [], [], [], []
    for n, ((imp,), rows) in enumerate(plan.group_by("impression_id", maintain_order=True)):
        user, ts = rows["user_id"][0], rows["ts"][0]
        items = rows["item_id"].to_list()
        cands = [*items, "fresh-1"] if n % 3 == 0 else items
        r = client.post(f"{server.url}/v1/rank",
                        json={"user_id": user, "candidates": cands, "at": _iso(ts)})  # fmt: skip
        assert r.status_code == 200, r.text
        scores = {i["item_id"]: i["score"] for i in r.json()["items"]}
        served += [scores[c] for c in cands]
        requests += [{"request_id": str(imp), "user_id": user, "ts": ts, "item_id": c}
                     for c in cands]  # fmt: skip
        events = [{"event_id": f"imp-{imp}", "type": "impression", "ts": _iso(ts),
                   "user_id": user, "request_id": str(imp), "items": items}]  # fmt: skip
        for item in rows.filter(pl.col("clicked"))["item_id"].to_list():
            click_ts = ts + timedelta(seconds=20)
            events.append({"event_id": f"click-{imp}-{item}", "type": "click",
                           "ts": _iso(click_ts), "user_id": user, "item_id": item,
                           "request_id": str(imp)})  # fmt: skip
            clicks.append({"user_id": user, "item_id": item, "ts": click_ts, "weight": 1.0})
        shown.append(rows)
        r = client.post(f"{server.url}/v1/events", json={"events": events})
        assert r.json()["accepted"] == len(events), r.text

    # Offline: the bundle's data plus the event log, imported as the nightly would import it
    # (`recsys import --format events LOG --base DATA`): what the API served is what it trains on.
    write_dataset(tmp_path / "base", data)
    cli = [sys.executable, "-m", "recsys.cli", "import", "--format", "events", str(log_dir),
           "--base", str(tmp_path / "base"), "--out", str(tmp_path / "next")]  # fmt: skip
    subprocess.run(cli, check=True, capture_output=True, text=True)
    full = read_dataset(tmp_path / "next")
    assert json.loads((tmp_path / "next" / "manifest.json").read_text())["rejects"] == 0
    assert full.impressions.height == data.impressions.height + plan.height
    assert full.interactions.height == data.interactions.height + len(clicks)
    assert full.impressions["clicked"].sum() == data.impressions["clicked"].sum() + len(clicks)
    vectors = model.bundle.vectors
    live = model.live.items
    from recsys.vectors import ItemVectors

    ids = [*vectors.ids, *live.ids]
    index = {i: k for k, i in enumerate(ids)}
    all_vectors = ItemVectors(ids, np.vstack([vectors.matrix, live.matrix]), index)
    if vectors.frozen is not None:  # a tuned encoder: the frozen view too, row for row
        assert vectors.frozen.ids == vectors.ids and live.frozen is not None
        frozen = np.vstack([vectors.frozen.matrix, live.frozen])
        all_vectors = all_vectors.with_frozen(ItemVectors(ids, frozen, index))
    req = pl.DataFrame(requests, schema_overrides={"ts": pl.Datetime("us", "UTC")})
    head = model.featurizer.head(0)  # the ranker requests with `at` get: the bundle's online one
    assert head is model.featurizer.online and head.spec.refresh == "online"
    moments = [model.featurizer.moment(int(t)) for t in req["ts"].dt.epoch("us").to_list()]
    assert moments == req["ts"].dt.epoch("us").to_list()
    at = req.with_columns(pl.Series("ts", moments).cast(pl.Datetime("us", "UTC")))
    x = matrix(point_in_time_frame(head.spec, at, full, all_vectors), head.columns)
    want = head.ranker.predict(x)
    np.testing.assert_allclose(np.array(served), want, rtol=0, atol=1e-5)
    live_state = model.live.features()
    assert len(live_state.impressions) == 40 and len(live_state._clicked) == len(clicks) > 0
    assert len(set(np.round(served, 9))) > 10  # the scores are not one constant

    # In process, the same rows' features (behavioural 1e-9, cosines float32 rounding).
    got = np.vstack([
        model.featurizer.features(u, list(g["item_id"]), at_us=int(g["ts"].dt.epoch("us")[0]))
        for (_, u), g in req.group_by("request_id", "user_id", maintain_order=True)
    ])  # fmt: skip
    exact = [j for j, c in enumerate(head.columns) if not c.startswith("sem_")]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(x))
    np.testing.assert_allclose(
        np.nan_to_num(got[:, exact]), np.nan_to_num(x[:, exact]), rtol=0, atol=1e-9
    )

    # A restart replays the log: the same scores for the last request.
    last = requests[-len(cands) :]
    body = {"user_id": last[0]["user_id"], "candidates": [r["item_id"] for r in last],
            "at": _iso(last[0]["ts"] + timedelta(hours=1))}  # fmt: skip
    before_restart = client.post(f"{server.url}/v1/rank", json=body).json()
    next(servers, None)  # stops the first server
    again = _events_server(bundle_dir, log_dir)
    restarted = next(again)
    try:
        after_restart = client.post(f"{restarted.url}/v1/rank", json=body).json()
        assert after_restart["items"] == before_restart["items"]
        logged = 1 + sum(1 + int(r["clicked"].sum()) for r in shown)
        assert restarted.state.events.log.count == logged
    finally:
        again.close()


@pytest.mark.slow
def test_events_during_a_reload_reach_the_model_that_serves(
    bundle_dir: Path, tmp_path: Path
) -> None:
    """A batch that read the old model before a reload swapped in the new one is applied to
    the new one (the model is read again under the writers' lock), so no event is lost."""
    from serving.events import EventStore

    old = ServingModel.from_bundle(Bundle.load(bundle_dir), preload_encoder=False)
    new = ServingModel.from_bundle(Bundle.load(bundle_dir), preload_encoder=False)
    store = EventStore(tmp_path / "events")
    reads = iter([old, new])  # before the lock: old; under it: new (swapped meanwhile)
    cut = old.bundle.snapshot.as_of
    event = {"event_id": "e1", "type": "impression", "ts": _iso(cut), "user_id": "u",
             "request_id": "r1", "items": ["x"]}  # fmt: skip
    assert store.ingest(lambda: next(reads), [event])["accepted"] == 1
    with new.live.lock, old.live.lock:
        assert (
            "r1" in new.live.features().impressions and "r1" not in old.live.features().impressions
        )


@pytest.mark.slow
def test_an_admin_reload_keeps_the_live_state(
    bundle_dir: Path, second_bundle: Path, tmp_path: Path, client: httpx.Client
) -> None:
    """A reload on a server with events: the new bundle gets every event of the log (counts,
    histories, live items), so a request ranks the same before and after; events after the
    reload reach the new model."""
    for srv in _events_server(bundle_dir, tmp_path / "events", admin_token=TOKEN):
        model = srv.state.model
        cut = model.bundle.snapshot.as_of
        user, items = sorted(model.histories.ptr)[0], list(model.bundle.vectors.ids[:8])
        events = [
            {"event_id": "item-1", "type": "item", "ts": _iso(cut), "item_id": "live-1",
             "title": "a red apple story", "category": model.catalogue.item_category[items[0]]},
            {"event_id": "imp-1", "type": "impression", "ts": _iso(cut), "user_id": user,
             "request_id": "r1", "items": [*items, "live-1"]},
            {"event_id": "click-1", "type": "click", "ts": _iso(cut + timedelta(seconds=5)),
             "user_id": user, "item_id": "live-1", "request_id": "r1"},
        ]  # fmt: skip
        assert client.post(f"{srv.url}/v1/events", json={"events": events}).json()["accepted"] == 3
        body = {"user_id": user, "candidates": [*items, "live-1"],
                "at": _iso(cut + timedelta(minutes=5))}  # fmt: skip
        before = client.post(f"{srv.url}/v1/rank", json=body).json()
        r = client.post(f"{srv.url}/v1/admin/reload", json={"bundle": str(second_bundle)},
                        headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        assert r.status_code == 200 and r.json()["model_version"] == "second-v2", r.text
        new = srv.state.model
        assert new is not model and "live-1" in new.live.items.ids
        after = client.post(f"{srv.url}/v1/rank", json=body).json()
        assert after["model_version"] == "second-v2" and not after["unknown_items"]
        assert after["items"] == before["items"]  # the same bundle content, the same events
        late = {"event_id": "click-2", "type": "click", "ts": _iso(cut + timedelta(minutes=1)),
                "user_id": user, "item_id": items[1], "request_id": "r1"}  # fmt: skip
        assert client.post(f"{srv.url}/v1/events", json={"events": [late]}).json()["accepted"]
        with new.live.lock:
            assert (
                "r1" in new.live.features().impressions and len(new.live.features()._clicked) == 2
            )
        assert srv.state.events.log.count == 4


@pytest.mark.slow
def test_events_answer_503_when_the_log_cannot_be_written(
    bundle_dir: Path, tmp_path: Path, client: httpx.Client
) -> None:
    """The log's next segment is /dev/full (every write fails with ENOSPC, as on a full disk):
    a 503 that says nothing was accepted, the state unchanged, ranking still served."""
    log_dir = tmp_path / "events"
    log_dir.mkdir()
    (log_dir / "events-000000000000.jsonl").symlink_to("/dev/full")
    for srv in _events_server(bundle_dir, log_dir):
        model = srv.state.model
        cut = model.bundle.snapshot.as_of
        event = {"event_id": "imp-1", "type": "impression", "ts": _iso(cut), "user_id": "u",
                 "request_id": "r1", "items": list(model.bundle.vectors.ids[:3])}  # fmt: skip
        r = client.post(f"{srv.url}/v1/events", json={"events": [event]})
        assert r.status_code == 503, r.text
        assert "could not write the event log" in r.json()["error"]
        assert "nothing accepted" in r.json()["error"] and "Traceback" not in r.text
        with model.live.lock:
            assert "r1" not in model.live.features().impressions
        r = client.post(f"{srv.url}/v1/rank", json={"candidates": event["items"], "at": _iso(cut)})
        assert r.status_code == 200, r.text
