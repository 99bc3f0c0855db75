"""The live state shared through Redis (serving/shared_events.py), against a real redis-server of
each test's own: atomic de-duplication across workers, several writers of one event log, two
workers that take events and rank alike, Redis outages and restarts."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from servers import live_server, wait_until

from features.live import epoch_us
from recsys.bundle import Bundle
from recsys.eventlog import EventLog
from serving.app import create_app
from serving.ranking import ServingModel
from serving.settings import Settings
from serving.shared_events import RedisEvents

# ------------------------------------------------------------------ fast: no bundle


def test_publish_counts_each_id_once_across_concurrent_workers(redis_server: Any) -> None:
    """Four clients (four workers) publish overlapping batches at once: every id is new to
    exactly one of them, and the stream holds each event once."""
    ids = [f"e{i}" for i in range(400)]
    fresh: list[list[str]] = [[] for _ in range(4)]

    def worker(n: int) -> None:
        events = RedisEvents(redis_server.url)
        order = ids[n * 50 :] + ids[: n * 50]  # all ids, each client from its own start
        for start in range(0, len(order), 40):
            batch = [{"event_id": i, "type": "click"} for i in order[start : start + 40]]
            out = events.publish(batch, None, seeding=True)
            assert out is not None
            fresh[n] += [batch[k]["event_id"] for k in out[0]]
        events.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(i for f in fresh for i in f) == sorted(ids)
    entries = RedisEvents(redis_server.url).read("0-0", count=10_000)
    assert sorted(e["event_id"] for _, b in entries for e in b) == sorted(ids)


def test_publish_returns_the_entries_after_the_callers_and_refuses_an_unseeded_redis(
    redis_server: Any,
) -> None:
    events = RedisEvents(redis_server.url)
    assert events.publish([{"event_id": "a"}], "0-0") is None  # no epoch: seed first
    events.mark_seeded()
    fresh, entries = events.publish([{"event_id": "a"}, {"event_id": "b"}], "0-0") or ([], [])
    assert fresh == [0, 1] and [e["event_id"] for e in entries[0][1]] == ["a", "b"]
    fresh, later = events.publish([{"event_id": "b"}, {"event_id": "c"}], entries[0][0]) or ([], [])
    assert fresh == [1] and [[e["event_id"] for e in b] for _, b in later] == [["c"]]


def test_an_unreachable_redis_is_a_clear_error(tmp_path: Path) -> None:
    from servers import RedisServer

    from serving.shared_events import LiveStateUnavailable

    down = RedisServer(tmp_path)  # a free port, nothing started on it
    with pytest.raises(
        LiveStateUnavailable, match=r"Redis at redis://127\.0\.0\.1:\d+/0.*unreachable"
    ):
        RedisEvents(down.url).publish([{"event_id": "a"}], None)


def test_a_shared_event_log_takes_several_writers(tmp_path: Path) -> None:
    """Two writers (two workers) on one folder: segments roll over whoever fills them, and a
    torn line one left by crashing is cut before the other writes after it."""
    a = EventLog(tmp_path, segment_bytes=300, shared=True)
    b = EventLog(tmp_path, segment_bytes=300, shared=True)
    want = []
    for n in range(12):
        batch = [{"event_id": f"e{n}-{i}"} for i in range(3)]
        (a if n % 2 else b).append(batch)
        want += batch
    assert len(a.segments()) > 2
    assert list(EventLog(tmp_path, writer=False).read()) == want
    with a.segments()[-1].open("ab") as f:
        f.write(b'{"event_id": "torn')  # a writer died inside its write
    b.append([{"event_id": "after"}])
    assert [e["event_id"] for e in EventLog(tmp_path, writer=False).read()][-2:] == [
        want[-1]["event_id"], "after",
    ]  # fmt: skip
    numbers = [int(p.name[7:-6]) for p in a.segments()]
    assert numbers == sorted(set(numbers))  # every segment named by its first event


# ------------------------------------------------------------------ the API (slow)


def _iso(t: Any) -> str:
    return t.isoformat().replace("+00:00", "Z")


def _worker(bundle: Path, log_dir: Path, redis_url: str | None) -> Iterator[Any]:
    """A server with its own model and live state: a worker of `recsys serve --redis`."""
    model = ServingModel.from_bundle(Bundle.load(bundle), preload_encoder=True)
    settings = Settings(bundle=bundle, event_log=log_dir, redis_url=redis_url)  # type: ignore[call-arg]
    yield from live_server(create_app(settings, model=model))


def _traffic(model: ServingModel, tag: str = "") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Events after the cut-off (a new item, impressions, clicks on the shown and the new
    item) and a request that reads them."""
    cut = model.bundle.snapshot.as_of
    user = sorted(model.histories.ptr)[0]
    items = list(model.bundle.vectors.ids[:8])
    cat = model.catalogue.item_category[items[0]]
    events: list[dict[str, Any]] = [
        {"event_id": f"{tag}item-1", "type": "item", "ts": _iso(cut), "item_id": f"{tag}live-1",
         "title": "a red apple story", "category": cat},
    ]  # fmt: skip
    for n in range(4):
        t = cut + timedelta(minutes=n)
        events += [
            {"event_id": f"{tag}imp-{n}", "type": "impression", "ts": _iso(t),
             "user_id": f"{user}" if n % 2 else f"{tag}new-user", "request_id": f"{tag}r{n}",
             "items": [*items[n : n + 4], f"{tag}live-1"]},
            {"event_id": f"{tag}click-{n}", "type": "click", "ts": _iso(t + timedelta(seconds=9)),
             "user_id": f"{user}" if n % 2 else f"{tag}new-user", "request_id": f"{tag}r{n}",
             "item_id": f"{tag}live-1" if n % 2 else items[n]},
        ]  # fmt: skip
    body = {"user_id": user, "candidates": [*items, f"{tag}live-1"],
            "at": _iso(cut + timedelta(minutes=30))}  # fmt: skip
    return events, body


def _features(server: Any, body: dict[str, Any]) -> np.ndarray:
    """The online ranker's feature rows of `body`'s candidates, as `server` computes them."""
    from datetime import datetime

    model = server.state.model
    at = epoch_us(datetime.fromisoformat(body["at"].replace("Z", "+00:00")))
    return np.asarray(model.featurizer.features(body["user_id"], body["candidates"], at_us=at))


def _applied(server: Any) -> int:
    return len(server.state.events.seen)


@pytest.mark.slow
def test_events_sent_to_one_worker_are_read_back_from_another(
    bundle_dir: Path, tmp_path: Path, redis_server: Any, client: httpx.Client
) -> None:
    """Events to worker A; worker B (its own process state, the same Redis and log folder)
    computes the same features and ranks the same; a worker with the state in process, given
    the same events, computes them too (the live features it shares are the ones
    tests/test_events.py checks against the offline path); a repeat of the events sent to B
    is counted once."""
    log = tmp_path / "events"
    a_srv, b_srv = (_worker(bundle_dir, log, redis_server.url) for _ in range(2))
    alone_srv = _worker(bundle_dir, tmp_path / "alone", None)
    a, b, alone = next(a_srv), next(b_srv), next(alone_srv)
    try:
        events, body = _traffic(a.state.model)
        r = client.post(f"{a.url}/v1/events", json={"events": events})
        assert r.json() == {"accepted": len(events), "duplicates": 0, "rejected": []}, r.text
        assert client.post(f"{alone.url}/v1/events", json={"events": events}).json()["accepted"]
        wait_until(lambda: _applied(b) == len(events), "events on worker B")
        fa, fb, fo = _features(a, body), _features(b, body), _features(alone, body)
        np.testing.assert_array_equal(fa, fb)
        np.testing.assert_array_equal(fa, fo)
        assert "live-1" in b.state.model.live.items.ids  # embedded by B's own encoder
        ranked = [client.post(f"{s.url}/v1/rank", json=body).json() for s in (a, b, alone)]
        assert ranked[0]["items"] == ranked[1]["items"] == ranked[2]["items"]
        assert not ranked[1]["unknown_items"]

        again = client.post(f"{b.url}/v1/events", json={"events": events[:3]}).json()
        assert again == {"accepted": 0, "duplicates": 3, "rejected": []}
        one = [{**events[1], "event_id": "imp-once", "request_id": "once"}]
        results = []  # the same new id to both workers at once: one accepts it

        def send(url: str) -> None:
            results.append(httpx.post(f"{url}/v1/events", json={"events": one}).json())

        threads = [threading.Thread(target=send, args=(s.url,)) for s in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(r["accepted"] for r in results) == [0, 1], results
        for s in (a, b):
            wait_until(lambda s=s: _applied(s) == len(events) + 1, "the new event everywhere")
            with s.state.model.live.lock:
                assert len(s.state.model.live.features().impressions) == 5
        ready = client.get(f"{b.url}/readyz").json()
        assert ready["live"].startswith("shared: Redis at redis://127.0.0.1"), ready
    finally:
        for g in (a_srv, b_srv, alone_srv):
            g.close()


@pytest.mark.slow
def test_an_unreachable_redis_stops_events_not_ranking(
    bundle_dir: Path, tmp_path: Path, redis_server: Any, client: httpx.Client
) -> None:
    """Redis down: events answer 503 saying so, /v1/rank ranks from the last state, /readyz
    says it is stale. Redis back without its data: the workers seed it again from the log
    (the refused batch is logged, so it is counted then), and nothing is counted twice."""
    log = tmp_path / "events"
    a_srv, b_srv = (_worker(bundle_dir, log, redis_server.url) for _ in range(2))
    a, b = next(a_srv), next(b_srv)
    try:
        events, body = _traffic(a.state.model)
        first, rest = events[:5], events[5:]
        assert client.post(f"{a.url}/v1/events", json={"events": first}).json()["accepted"] == 5
        wait_until(lambda: _applied(b) == 5, "the first events on B")
        before = client.post(f"{b.url}/v1/rank", json=body).json()

        redis_server.stop()
        r = client.post(f"{a.url}/v1/events", json={"events": rest})
        assert r.status_code == 503, r.text
        msg = r.json()["error"]
        assert "Redis at redis://127.0.0.1" in msg and "unreachable" in msg and "retry" in msg
        for s in (a, b):
            ranked = client.post(f"{s.url}/v1/rank", json=body)
            assert ranked.status_code == 200 and ranked.json()["items"] == before["items"]
        wait_until(lambda: client.get(f"{b.url}/readyz").json().get("live", "")
                   .startswith("stale: Redis at"), "B saying its state is stale")  # fmt: skip
        ready = client.get(f"{a.url}/readyz")
        assert ready.status_code == 200 and "unreachable since" in ready.json()["live"]

        redis_server.start()  # empty: the workers seed it from the log
        for s in (a, b):
            wait_until(
                lambda s=s: client.get(f"{s.url}/readyz").json()["live"].startswith("shared"),
                "the state in step again",
            )
        # the refused batch was logged: seeding the new Redis from the log counted it, once
        for s in (a, b):
            wait_until(lambda s=s: _applied(s) == len(events), "every logged event, once")
        r = client.post(f"{a.url}/v1/events", json={"events": events})  # the client retries all
        assert r.json() == {"accepted": 0, "duplicates": len(events), "rejected": []}, r.text
        with a.state.model.live.lock:
            assert len(a.state.model.live.features().impressions) == 4
        np.testing.assert_array_equal(_features(a, body), _features(b, body))
        stream = redis_server.client().xrange("{recsys}:stream")
        ids = [e for _, f in stream for e in json.loads(f[b"b"])]
        assert sorted(e["event_id"] for e in ids) == sorted(e["event_id"] for e in events)
    finally:
        for g in (a_srv, b_srv):
            g.close()


@pytest.mark.slow
def test_a_restart_replays_the_log_into_redis_without_double_counting(
    bundle_dir: Path, tmp_path: Path, redis_server: Any, client: httpx.Client
) -> None:
    """A worker's events; the worker stops. A new worker on the same Redis (which has them)
    and one on a new, empty Redis (seeded from the log) hold each event once and rank as
    the first did. The log holding an event twice (two workers logged it) changes nothing."""
    from servers import RedisServer

    log = tmp_path / "events"
    first = _worker(bundle_dir, log, redis_server.url)
    a = next(first)
    events, body = _traffic(a.state.model)
    r = client.post(f"{a.url}/v1/events", json={"events": events})
    assert r.json()["accepted"] == len(events), r.text
    want = client.post(f"{a.url}/v1/rank", json=body).json()
    features = _features(a, body)
    first.close()
    EventLog(log, shared=True).append(events[:2])  # a second worker logged two of them too

    fresh = RedisServer(tmp_path / "redis2").start()
    try:
        for url in (redis_server.url, fresh.url):
            again = _worker(bundle_dir, log, url)
            b = next(again)
            try:
                assert _applied(b) == len(events)
                assert client.post(f"{b.url}/v1/rank", json=body).json()["items"] == want["items"]
                np.testing.assert_array_equal(_features(b, body), features)
                with b.state.model.live.lock:
                    assert len(b.state.model.live.features().impressions) == 4
            finally:
                again.close()
        stream = fresh.client().xrange("{recsys}:stream")
        assert sum(len(json.loads(f[b"b"])) for _, f in stream) == len(events)
    finally:
        fresh.stop()
