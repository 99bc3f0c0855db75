"""The ranking API against real uvicorn servers on 127.0.0.1.

Fast tests use a server with no bundle (validation, limits, errors, admin off, metrics) and pure
units (metrics text, settings). Slow tests use the bundle of the session's nightly
(tests/conftest.py) and check: the API's scores equal the batch scores,
the numpy fast path equals `bundle.featurize` on many random requests, fuzzed requests never
give a 5xx, reloads under load lose no request, a corrupt bundle keeps the old one serving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from servers import TOKEN, bundle_copy, live_server, wait_until

from recsys.errors import ConfigError, DataError
from serving.embedding import NewItems
from serving.featurize import ANONYMOUS
from serving.metrics import Metrics, histogram_quantile, parse_histogram
from serving.ranking import ServingModel
from serving.schemas import RankRequest, RankResponse, RecommendationsResponse
from serving.settings import Settings
from serving.sync import NoteWatcher, read_note, write_note

FUZZ = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _error_body(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    assert isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in r.text
    return body


# --------------------------------------------------------------------------- units (fast)


def test_metrics_text_and_quantiles():
    m = Metrics(buckets=(0.001, 0.01, 0.1))
    for s in (0.0005, 0.0005, 0.005, 0.05):
        m.observe("/v1/rank", "POST", 200, s)
    m.observe("/v1/rank", "POST", 422, 0.0001)
    m.model_loaded('v"1')
    m.reload(ok=True)
    m.reload(ok=False)
    m.unhandled_error()
    text = m.render()
    # prometheus_client's text: labels in name order, values as floats
    assert 'recsys_http_requests_total{method="POST",route="/v1/rank",status="200"} 4.0' in text
    assert 'recsys_http_requests_total{method="POST",route="/v1/rank",status="422"} 1.0' in text
    assert 'recsys_model_info{model_version="v\\"1"} 1.0' in text
    assert 'recsys_model_reloads_total{result="ok"} 1' in text
    assert 'recsys_model_reloads_total{result="error"} 1' in text
    assert "recsys_unhandled_errors_total 1" in text
    assert "recsys_model_loaded 1" in text
    buckets = parse_histogram(text, "recsys_http_request_duration_seconds", {"route": "/v1/rank"})
    assert buckets == [(0.001, 3), (0.01, 4), (0.1, 5), (math.inf, 5)]
    # 5 observations: the median (rank 2.5) lies in the first bucket, p90 (rank 4.5) in the 3rd
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.001 * 2.5 / 3)
    assert histogram_quantile(buckets, 0.9) == pytest.approx(0.01 + 0.09 * 0.5)
    assert math.isnan(histogram_quantile([], 0.5))


_WORKER = """
import sys
from serving.metrics import Metrics
m = Metrics()
n = int(sys.argv[1])
for _ in range(n):
    m.observe("/v1/rank", "POST", 200, 0.002)
m.model_loaded("v1")
m.events(accepted=n, duplicates=1, rejected=0)
m.live_items(n)
if sys.argv[2] == "render":
    print(m.render())
"""


def test_metrics_of_several_worker_processes_are_summed(tmp_path):
    """Two worker processes with PROMETHEUS_MULTIPROC_DIR (as `recsys serve --workers N` sets
    it): a scrape of either shows the requests and events of both."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    run = [sys.executable, "-c", _WORKER]
    subprocess.run([*run, "3", "-"], env=env, check=True, timeout=120)
    out = subprocess.run([*run, "4", "render"], env=env, check=True, timeout=120,
                         capture_output=True, text=True).stdout  # fmt: skip
    assert 'recsys_http_requests_total{method="POST",route="/v1/rank",status="200"} 7.0' in out
    buckets = parse_histogram(out, "recsys_http_request_duration_seconds", {"route": "/v1/rank"})
    assert buckets[-1] == (math.inf, 7) and dict(buckets)[0.002] == 7
    assert 'recsys_events_total{result="accepted"} 7.0' in out
    assert 'recsys_events_total{result="duplicate"} 2.0' in out
    assert 'recsys_model_info{model_version="v1"} 1.0' in out
    assert "recsys_model_loaded 1.0" in out and "recsys_live_items 4.0" in out


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RECSYS_BUNDLE", str(tmp_path))
    monkeypatch.setenv("RECSYS_ADMIN_TOKEN", "secret-token")
    monkeypatch.setenv("RECSYS_MAX_BODY_BYTES", "2048")
    s = Settings()
    assert s.bundle == tmp_path and s.source == str(tmp_path) and s.max_body_bytes == 2048
    assert s.admin_token is not None and s.admin_token.get_secret_value() == "secret-token"
    assert "secret-token" not in repr(s)
    monkeypatch.setenv("RECSYS_MODEL_URI", "models:/recsys@champion")
    with pytest.raises(ValidationError, match="not both"):
        Settings()
    monkeypatch.delenv("RECSYS_MODEL_URI")
    monkeypatch.setenv("RECSYS_ADMIN_TOKEN", "short")
    with pytest.raises(ValidationError, match="at least 8 characters"):
        Settings()
    monkeypatch.setenv("RECSYS_ADMIN_TOKEN", "secret-token")
    monkeypatch.setenv("RECSYS_MAX_BODY_BYTES", "10")
    with pytest.raises(ValidationError, match="max_body_bytes"):
        Settings()


def test_reload_notes_between_workers(tmp_path):
    path = tmp_path / "reload.json"
    watcher = NoteWatcher(path)
    assert read_note(path) is None and watcher.poll() is None
    first = write_note(path, "/bundles/a")
    assert watcher.poll() == first and watcher.poll() is None  # unchanged file: not re-read
    second = write_note(path, "models:/recsys@champion")
    assert second.id != first.id and watcher.poll() == second
    path.write_text("{not json")
    assert read_note(path) is None and watcher.poll() is None
    assert not list(tmp_path.glob(".*tmp"))  # written beside, then renamed into place


def test_workers_each_get_a_socket_on_one_port(tmp_path):
    from serving.server import serve
    from serving.workers import reuseport_socket, run_workers

    a = reuseport_socket("127.0.0.1", 0)
    port = a.getsockname()[1]
    b = reuseport_socket("127.0.0.1", port)  # a second socket on the same port: allowed
    a.listen()
    b.listen()
    a.close()
    b.close()
    with pytest.raises(ValueError, match="fixed port"):
        run_workers(2, "127.0.0.1", 0)
    with pytest.raises(ConfigError, match="one worker only"):
        serve(bundle=str(tmp_path), port=0, workers=2)
    with pytest.raises(ConfigError, match="exactly one of"):
        serve(bundle=str(tmp_path), model_uri="models:/x@champion")


# --------------------------------------------------------------------------- no bundle (fast)


def test_health_and_readiness_without_bundle(empty_server, client):
    assert client.get(f"{empty_server.url}/healthz").json() == {"status": "ok"}
    r = client.get(f"{empty_server.url}/readyz")
    assert r.status_code == 503
    assert r.json()["status"] == "no bundle" and "RECSYS_BUNDLE" in r.json()["detail"]
    r = client.post(f"{empty_server.url}/v1/rank", json={"candidates": ["a"]})
    assert r.status_code == 503 and "not ready" in _error_body(r)["error"]
    r = client.get(f"{empty_server.url}/v1/recommendations/u1")
    assert r.status_code == 503


@pytest.mark.parametrize(
    ("body", "status", "loc", "message"),
    [
        ({}, 422, "body.candidates", "field required"),
        ({"candidates": []}, 422, "body.candidates", "at least 1 item"),
        ({"candidates": ["a", "b", "a"]}, 422, "body", "candidates must be distinct.*'a'"),
        ({"candidates": [str(i) for i in range(1001)]}, 422, "body.candidates",
         "at most 1000 items"),
        ({"candidates": ["a"], "k": 0}, 422, "body.k", "greater than or equal to 1"),
        ({"candidates": ["a"], "k": 1001}, 422, "body.k", "less than or equal to 1000"),
        ({"candidates": ["a"], "k": "5"}, 422, "body.k", "valid integer"),
        ({"candidates": ["a"], "k": 2.5}, 422, "body.k", "valid integer"),
        ({"candidates": "a"}, 422, "body.candidates", "valid list"),
        ({"candidates": [1, 2]}, 422, r"body.candidates\[0\]", "valid string"),
        ({"candidates": [""]}, 422, r"body.candidates\[0\]", "at least 1 character"),
        ({"candidates": ["a"], "explain": "yes"}, 422, "body.explain", "valid boolean"),
        ({"candidates": ["a"], "user": "u1"}, 422, "body.user", "unknown field"),
        ({"candidates": ["a"], "items": [{"item_id": "a"}]}, 422, r"body.items\[0\].title",
         "field required"),
        ({"candidates": ["a"], "items": [{"item_id": "a", "title": "t", "x": 1}]}, 422,
         r"body.items\[0\].x", "unknown field"),
        ([1, 2], 422, "body", "valid dictionary"),
    ],
)  # fmt: skip
def test_invalid_requests_say_what_to_fix(empty_server, client, body, status, loc, message):
    r = client.post(f"{empty_server.url}/v1/rank", json=body)
    assert r.status_code == status, r.text
    err = _error_body(r)
    assert err["error"].startswith("invalid request: ")
    assert any(
        __import__("re").fullmatch(loc, d["loc"]) and __import__("re").search(message, d["msg"])
        for d in err["detail"]
    ), err


def test_malformed_json_and_body_limit(empty_server, client):
    url = f"{empty_server.url}/v1/rank"
    r = client.post(url, content=b'{"candidates": [', headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert "malformed JSON" in _error_body(r)["error"]
    big = json.dumps({"candidates": [f"item-{i:06d}" for i in range(1000)]}).encode()
    assert len(big) > 10_000  # the empty server's limit
    r = client.post(url, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "RECSYS_MAX_BODY_BYTES" in _error_body(r)["error"]

    def chunks():  # no content-length: the limit still holds while streaming
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    r = client.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.get(f"{empty_server.url}/v2/nothing")
    assert r.status_code == 404 and "/docs" in _error_body(r)["error"]
    r = client.delete(url)
    assert r.status_code == 405


def test_admin_is_off_without_token(empty_server, client):
    r = client.post(f"{empty_server.url}/v1/admin/reload", json={}, headers=AUTH)
    assert r.status_code == 404
    assert "RECSYS_ADMIN_TOKEN" in _error_body(r)["error"]


def test_openapi_documents_the_api(empty_server, client):
    spec = client.get(f"{empty_server.url}/openapi.json").json()
    assert {"/v1/rank", "/v1/recommendations/{user_id}", "/healthz", "/readyz", "/metrics",
            "/v1/admin/reload"} <= set(spec["paths"])  # fmt: skip
    rank = spec["components"]["schemas"]["RankRequest"]
    assert rank["additionalProperties"] is False
    assert rank["properties"]["candidates"]["maxItems"] == 1000
    assert client.get(f"{empty_server.url}/docs").status_code == 200


def test_metrics_count_requests_by_route(empty_server, client):
    client.get(f"{empty_server.url}/healthz")
    client.post(f"{empty_server.url}/v1/rank", json={"candidates": []})
    client.get(f"{empty_server.url}/v1/recommendations/someone")
    text = client.get(f"{empty_server.url}/metrics").text
    assert 'method="GET",route="/healthz",status="200"' in text
    assert 'method="POST",route="/v1/rank",status="422"' in text
    assert 'method="GET",route="/v1/recommendations/{user_id}",status="503"' in text
    assert 'recsys_http_request_duration_seconds_count{route="/healthz"}' in text
    assert "recsys_model_loaded 0" in text


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@FUZZ
@given(body=json_values)
def test_fuzzed_bodies_never_5xx_without_bundle(empty_server, body):
    """Arbitrary JSON: never a 5xx other than 503 (no bundle), always a JSON error."""
    r = httpx.post(f"{empty_server.url}/v1/rank", json=body, timeout=30)
    assert r.status_code in (422, 503), r.text
    _error_body(r)


@pytest.fixture(scope="module")
def admin_server():
    """No bundle, admin on: reload bodies can be fuzzed without loading anything real."""
    from serving.app import create_app

    yield from live_server(create_app(Settings(admin_token=TOKEN)))  # type: ignore[call-arg]


@FUZZ
@given(body=json_values | st.fixed_dictionaries({}, optional={
    "bundle": st.text(max_size=20) | st.integers(), "model_uri": st.text(max_size=20),
    "extra": st.booleans()}))  # fmt: skip
@example(body={"bundle": "\x00"})  # once a 503 (ValueError from the OS path calls)
def test_fuzzed_reload_bodies_never_5xx(admin_server, body):
    r = httpx.post(f"{admin_server.url}/v1/admin/reload", json=body, headers=AUTH, timeout=60)
    assert r.status_code in (409, 422), r.text
    _error_body(r)
    r = httpx.post(f"{admin_server.url}/v1/admin/reload", json=body, timeout=60)
    assert r.status_code == 401


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
    path=st.sampled_from(["/healthz", "/readyz", "/metrics", "/v1/rank", "/docs",
                          "/openapi.json", "/v1/recommendations/u1", "/v1/admin/reload",
                          "/v1", "/"]),
    query=st.dictionaries(st.sampled_from(["k", "x", "user_id"]), st.text(max_size=5)),
    content=st.binary(max_size=64),
)  # fmt: skip
def test_fuzzed_routes_never_5xx(empty_server, method, path, query, content):
    """Any method on any route with junk query and body: a 4xx or the 503 of no bundle."""
    r = httpx.request(method, f"{empty_server.url}{path}", params=query, content=content,
                      timeout=30)  # fmt: skip
    assert r.status_code < 500 or r.status_code == 503, (r.status_code, r.text)
    if r.status_code >= 400 and method != "HEAD":
        assert "Traceback" not in r.text
        assert "error" in r.json() or "status" in r.json()


# --------------------------------------------------------------------------- with a bundle


@pytest.mark.slow
def test_api_scores_equal_batch_scores(server, nightly, serving_model, client):
    """Each user's nightly list re-ranked by the API: the scores the batch path (`Bundle.score`,
    which the nightly lists use) gives the same candidates, in any order (1e-6). Within-request
    columns make a score depend on its co-candidates, so the comparison is on one candidate set.
    """
    recs = pl.read_parquet(nightly.result.recommendations).sort("user_id", "rank")
    users = recs["user_id"].unique().sort().to_list()
    rng = random.Random(0)
    for user in rng.sample(users, min(25, len(users))):
        cands = recs.filter(pl.col("user_id") == user)["item_id"].to_list()
        rng.shuffle(cands)
        r = client.post(f"{server.url}/v1/rank", json={"user_id": user, "candidates": cands})
        assert r.status_code == 200, r.text
        body = RankResponse.model_validate(r.json())
        assert body.strategy == "profile" and body.model_version == server.state.model.model_version
        got = {i.item_id: i.score for i in body.items}
        batch = serving_model.bundle.score(pl.DataFrame({"user_id": [user] * len(cands),
                                                         "item_id": cands}))  # fmt: skip
        want = dict(zip(cands, batch.tolist(), strict=True))
        assert got.keys() == want.keys()
        for item, score in want.items():
            assert abs(got[item] - score) <= 1e-6, (user, item, got[item], score)
        assert [i.rank for i in body.items] == list(range(1, len(cands) + 1))
        assert [i.score for i in body.items] == sorted(got.values(), reverse=True)


@pytest.mark.slow
def test_api_scores_equal_bundle_score_for_history_and_cold_users(server, serving_model, client):
    b = serving_model.bundle
    items = b.vectors.ids
    user = sorted(serving_model.histories.ptr)[3]
    cands, hist = items[:40], items[50:55]
    for body, frame_user, extra in (
        ({"user_id": user, "history": hist}, user, hist),
        ({"user_id": "never-seen", "history": hist}, ANONYMOUS, hist),
        ({"history": hist}, ANONYMOUS, hist),
    ):
        r = client.post(f"{server.url}/v1/rank", json={**body, "candidates": cands})
        assert r.status_code == 200, r.text
        got = {i["item_id"]: i["score"] for i in r.json()["items"]}
        req = pl.DataFrame({"user_id": [frame_user] * len(cands), "item_id": cands})
        eh = pl.DataFrame({"user_id": [frame_user] * len(extra), "item_id": extra})
        want = b.score(req, extra_history=eh)
        np.testing.assert_allclose([got[c] for c in cands], want, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_without_events_at_never_picks_the_online_ranker(server, serving_model, client):
    """A server without events counts nothing after the cut-off: a request with `at` gets the
    batch ranker on features as of the cut-off, the same answer as without `at` (the online
    ranker on counts frozen at the cut-off ranked worse than random on EB-NeRD); /readyz says
    which ranker and freshness serve."""
    from datetime import timedelta

    b = serving_model.bundle
    user = sorted(serving_model.histories.ptr)[3]
    body = {"user_id": user, "candidates": b.vectors.ids[:40]}
    plain = client.post(f"{server.url}/v1/rank", json=body).json()
    for days in (0, 1, 30):
        at = (b.snapshot.as_of + timedelta(days=days)).isoformat()
        r = client.post(f"{server.url}/v1/rank", json={**body, "at": at})
        assert r.status_code == 200 and r.json()["items"] == plain["items"], (days, r.text)
    req = pl.DataFrame({"user_id": [user] * 40, "item_id": body["candidates"]})
    want = dict(zip(body["candidates"], b.score(req), strict=True))  # the batch ranker
    got = {i["item_id"]: i["score"] for i in plain["items"]}
    assert got == pytest.approx(want, abs=1e-6)
    ready = client.get(f"{server.url}/readyz").json()
    assert ready["ranker"] == b.manifest["ranker"]["name"]
    assert ready["freshness"].startswith("batch: as of the cut-off")


@pytest.mark.slow
def test_strategies_known_user_history_and_cold_start(server, serving_model, client):
    b = serving_model.bundle
    user = sorted(serving_model.histories.ptr)[0]
    cands = b.vectors.ids[100:130]
    url = f"{server.url}/v1/rank"
    known = client.post(url, json={"user_id": user, "candidates": cands}).json()
    both = client.post(url, json={"user_id": user, "history": cands[:3], "candidates": cands})
    hist = client.post(url, json={"history": cands[:3], "candidates": cands}).json()
    new_user = client.post(url, json={"user_id": "nobody", "candidates": cands}).json()
    cold = client.post(url, json={"candidates": cands, "k": 10}).json()
    assert known["strategy"] == "profile"
    assert both.json()["strategy"] == "profile+history"
    assert hist["strategy"] == "history"
    # a user id the bundle never saw: the batch ranker on a first-time user's features, as
    # the nightly's evaluation scores such a user
    assert new_user["strategy"] == "profile"
    x = serving_model.featurizer.reference("nobody", cands, [], None)
    want = dict(zip(cands, serving_model.bundle.ranker.predict(x).tolist(), strict=True))
    assert [i["score"] for i in new_user["items"]] == pytest.approx(
        [want[i["item_id"]] for i in new_user["items"]], abs=1e-9
    )
    assert cold["strategy"] == "popularity"
    assert [i["score"] for i in known["items"]] != [i["score"] for i in both.json()["items"]]
    # cold start: the bundle's popularity prior, in its order (ties: request order)
    pop = dict(zip(b.popular["item_id"].to_list(), b.popular["score"].to_list(), strict=True))
    want = sorted(cands, key=lambda c: (-pop.get(c, 0.0), cands.index(c)))[:10]
    assert [i["item_id"] for i in cold["items"]] == want
    assert [i["score"] for i in cold["items"]] == [pop.get(c, 0.0) for c in want]


@pytest.mark.slow
def test_a_history_the_profile_holds_counts_once(server, serving_model, client):
    """MIND's storefront sends a user's whole history with every request: the items the
    stored profile holds already are not counted again."""
    h = serving_model.histories
    user = sorted(h.ptr)[0]
    lo, hi = h.ptr[user]
    held = h.item_ids[lo:hi].tolist()
    ids = serving_model.bundle.vectors.ids
    other = [i for i in ids if i not in held][:2]
    cands = ids[100:130]
    url = f"{server.url}/v1/rank"

    def scores(**body: Any) -> list[float]:
        r = client.post(url, json={"user_id": user, "candidates": cands, **body})
        assert r.status_code == 200, r.text
        return [i["score"] for i in r.json()["items"]]

    assert held and scores(history=held) == scores()
    assert scores(history=[*held, *other]) == scores(history=other) != scores()


@pytest.mark.slow
def test_unknown_items_with_and_without_text(server, nightly, serving_model, client):
    b = serving_model.bundle
    items = pl.read_parquet(Path(nightly.result.run_dir) / "validate" / "items.parquet")
    twin_of = items.row(7, named=True)
    user = sorted(serving_model.histories.ptr)[1]
    cands = [*b.vectors.ids[:20], "new-twin", "new-mystery"]
    text = {
        "item_id": "new-twin",
        "title": twin_of["title"],
        "description": twin_of["description"],
        "category": twin_of["category"],
    }
    r = client.post(
        f"{server.url}/v1/rank",
        json={"user_id": user, "candidates": cands, "items": [text], "explain": True},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["unknown_items"] == ["new-mystery"]
    scores = {i["item_id"]: i["score"] for i in body["items"]}
    assert set(scores) == set(cands) and all(math.isfinite(s) for s in scores.values())
    # the embedded twin is semantically where its original is: its semantic features match
    new = serving_model.embedder.embed([_item(text)], {"new-twin"})
    assert new is not None and new.ids == ["new-twin"]
    x = serving_model.featurizer.features(
        user, [twin_of["item_id"], "new-twin", "new-mystery"], (), new
    )
    sem = [serving_model.columns.index(c) for c in ("sem_cos_mean", "sem_cos_max")]
    np.testing.assert_allclose(x[1, sem], x[0, sem], atol=0.05)
    assert np.isnan(x[2, sem]).all()  # no text: no vector, the unseen-item prior
    # and the API used the embedding: the twin's explanation shows finite semantic values
    twin = next(i for i in body["items"] if i["item_id"] == "new-twin")
    assert len(twin["explanation"]) == 5
    # the text's category counts as the twin's section: the user's category features are its
    # original's, and the API's scores are the ranker's on exactly those features
    given = {"new-twin": {"category": twin_of["category"], "subcategory": None}}
    x = serving_model.featurizer.features(user, cands, (), new, given=given)
    cat = [serving_model.columns.index(c) for c in serving_model.columns
           if c in ("user_category_ctr", "user_category_share")]  # fmt: skip
    original = serving_model.featurizer.features(user, [*cands[:20], twin_of["item_id"]])
    assert cat and np.array_equal(x[20, cat], original[20, cat])
    want = serving_model.bundle.ranker.predict(x)
    assert [scores[c] for c in cands] == pytest.approx(want.tolist(), abs=1e-9)


def _item(d: dict[str, Any]) -> Any:
    from serving.schemas import ItemText

    return ItemText.model_validate(d)


@pytest.mark.slow
def test_explanations_are_the_top_contributions(server, serving_model, client):
    user = sorted(serving_model.histories.ptr)[2]
    cands = serving_model.bundle.vectors.ids[:15]
    r = client.post(
        f"{server.url}/v1/rank",
        json={"user_id": user, "candidates": cands, "k": 4, "explain": True},
    )
    items = r.json()["items"]
    assert len(items) == 4
    # the features of the top 4 within the request that ranked them (the 15 candidates)
    full = serving_model.featurizer.features(user, cands)
    x = full[[cands.index(i["item_id"]) for i in items]]
    contrib = serving_model.bundle.ranker.contributions(x)
    for row, item in enumerate(items):
        ex = item["explanation"]
        assert len(ex) == 5
        mags = [abs(e["contribution"]) for e in ex]
        assert mags == sorted(mags, reverse=True)
        assert mags[-1] >= np.sort(np.abs(contrib[row, :-1]))[-5] - 1e-12
        for e in ex:
            j = serving_model.columns.index(e["feature"])
            assert e["contribution"] == pytest.approx(contrib[row, j], abs=1e-12)
            assert (e["value"] is None and np.isnan(x[row, j])) or e["value"] == x[row, j]
        assert contrib[row].sum() == pytest.approx(item["score"], abs=1e-9)


@pytest.mark.slow
def test_recommendations_nightly_list_and_fallback(server, nightly, serving_model, client):
    recs = pl.read_parquet(nightly.result.recommendations)
    user = recs["user_id"][0]
    mine = recs.filter(pl.col("user_id") == user).sort("rank")
    r = client.get(f"{server.url}/v1/recommendations/{user}", params={"k": 5})
    body = RecommendationsResponse.model_validate(r.json())
    assert not body.fallback and body.generated_at is not None
    assert [i.item_id for i in body.items] == mine["item_id"].head(5).to_list()
    assert [i.score for i in body.items] == mine["score"].head(5).to_list()
    r = client.get(f"{server.url}/v1/recommendations/stranger", params={"k": 7})
    body = RecommendationsResponse.model_validate(r.json())
    assert body.fallback and [i.item_id for i in body.items] == serving_model.popular_ids[:7]
    for k in (0, 1001, "x"):
        r = client.get(f"{server.url}/v1/recommendations/{user}", params={"k": k})
        assert r.status_code == 422 and _error_body(r)["detail"][0]["loc"] == "query.k"


@pytest.mark.slow
def test_rules_in_rank_and_recommendations(server, nightly, serving_model, client):
    """Exclusions, a category cap and diversity apply to /v1/rank and /v1/recommendations; an
    unknown item or category is a 422 that names it; a list the rules leave short stays short."""
    cat = serving_model.catalogue.item_category
    recs = pl.read_parquet(nightly.result.recommendations)
    user = recs["user_id"][0]
    cands = [i for i in serving_model.popular_ids if i in cat][:60]
    base = client.post(f"{server.url}/v1/rank", json={"user_id": user, "candidates": cands})
    ranked = [i["item_id"] for i in base.json()["items"]]
    top_cat = cat[ranked[0]]
    body = {"user_id": user, "candidates": cands, "k": 20, "exclude_items": ranked[:2],
            "exclude_categories": [top_cat], "max_per_category": 2}  # fmt: skip
    r = client.post(f"{server.url}/v1/rank", json=body)
    assert r.status_code == 200, r.text
    got = [i.item_id for i in RankResponse.model_validate(r.json()).items]
    allowed = [i for i in ranked if i not in ranked[:2] and cat[i] != top_cat]
    per_cat: dict[str, int] = {}
    want = []
    for i in allowed:  # the cap, applied greedily in score order
        if per_cat.get(cat[i], 0) < 2:
            per_cat[cat[i]] = per_cat.get(cat[i], 0) + 1
            want.append(i)
    assert got == want[:20]
    # diversity 0 is pure relevance; a high weight lowers the list's mean similarity
    plain = client.post(f"{server.url}/v1/rank", json={**body, "diversity": 0.0, "k": 10,
                                                        "max_per_category": 0})  # fmt: skip
    assert [i["item_id"] for i in plain.json()["items"]] == [
        i for i in ranked if i in set(allowed)
    ][:10]
    div = client.post(f"{server.url}/v1/rank", json={**body, "diversity": 0.9, "k": 10,
                                                      "max_per_category": 0})  # fmt: skip

    def mean_sim(ids: list[str]) -> float:
        rows, _ = serving_model.vectors.lookup(ids)
        v = serving_model.vectors.matrix[rows]
        s = v @ v.T
        return float((s.sum() - np.trace(s)) / (len(ids) * (len(ids) - 1)))

    d_ids = [i["item_id"] for i in div.json()["items"]]
    assert len(d_ids) == 10 and set(d_ids) <= set(allowed)
    assert mean_sim(d_ids) < mean_sim([i["item_id"] for i in plain.json()["items"]])
    for bad, where in (({"exclude_items": ["no-such-item"]}, "no-such-item"),
                       ({"exclude_categories": ["no-such-cat"]}, "no-such-cat")):  # fmt: skip
        r = client.post(f"{server.url}/v1/rank", json={**body, **bad})
        assert r.status_code == 422 and where in _error_body(r)["error"]
    # recommendations: the nightly list minus exclusions, shorter, never padded
    mine = recs.filter(pl.col("user_id") == user).sort("rank")["item_id"].to_list()
    r = client.get(f"{server.url}/v1/recommendations/{user}",
                   params={"k": 50, "exclude_items": mine[:3]})  # fmt: skip
    assert [i["item_id"] for i in r.json()["items"]] == mine[3:50]
    r = client.get(f"{server.url}/v1/recommendations/stranger",
                   params={"k": 10, "max_per_category": 1})  # fmt: skip
    got = [i["item_id"] for i in r.json()["items"]]
    assert r.json()["fallback"] and len({cat.get(i, i) for i in got}) == len(got)
    r = client.get(f"{server.url}/v1/recommendations/{user}",
                   params={"exclude_categories": "no-such-cat"})  # fmt: skip
    assert r.status_code == 422 and "no-such-cat" in _error_body(r)["error"]


@pytest.mark.slow
@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fast_path_equals_bundle_featurize(serving_model, data):
    """Random requests: the serving feature matrix equals the shared polars path to 1e-9."""
    m = serving_model
    ids = m.bundle.vectors.ids
    users = sorted(m.histories.ptr)
    pool = st.sampled_from(ids) | st.sampled_from(["ghost-1", "ghost-2", "new-a", "new-b"])
    user = data.draw(st.none() | st.sampled_from(users) | st.just("unknown-user"))
    cands = data.draw(st.lists(pool, min_size=1, max_size=60, unique=True))
    history = data.draw(st.lists(pool, max_size=8))
    new = None
    if data.draw(st.booleans()):
        rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
        fz = m.vectors.frozen  # a tuned bundle: new items come with both encoders' vectors
        new = NewItems(["new-a", "new-b"], _unit(rng, 2, m.vectors.dim),
                       None if fz is None else _unit(rng, 2, fz.dim))  # fmt: skip
    # sections a request's item texts give: the bundle's own, one it never saw, or none
    cats = sorted(m.catalogue.item_category.values())[:3]
    section = st.none() | st.sampled_from([*cats, "a-section-never-seen"])
    given = {i: {"category": data.draw(section), "subcategory": data.draw(section)}
             for i in ["ghost-1", "new-a", "new-b", ids[0]]}  # fmt: skip
    fast = m.featurizer.features(user, cands, history, new, given=given)
    ref = m.featurizer.reference(user, cands, history, new, given=given)
    assert fast.shape == ref.shape == (len(cands), len(m.columns))
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(ref))
    np.testing.assert_allclose(np.nan_to_num(fast), np.nan_to_num(ref), rtol=0, atol=1e-9)


def test_bundle_featurize_keys_within_request_columns_by_request_id(serving_model) -> None:
    """Rows with a request_id are one request each (an impression, as a storefront asks the
    API), not one per user: the within-request columns equal each request featurized alone."""
    b = serving_model.bundle
    user = sorted(serving_model.histories.ptr)[0]
    ids = list(b.vectors.ids)
    first, second = ids[:5], ids[3:9]
    req = pl.DataFrame({"user_id": [user] * 11, "item_id": first + second,
                        "request_id": ["r1"] * 5 + ["r2"] * 6})  # fmt: skip
    both = b.featurize(req)
    alone = pl.concat(
        [
            b.featurize(req.filter(pl.col("request_id") == r).drop("request_id"))
            for r in ["r1", "r2"]
        ]
    )
    assert both.columns == alone.columns
    # The cosines are float32 matrix products over 11 rows vs 5 and 6: BLAS blocks them by
    # shape (and by the CPU's kernel), so they may differ in the last bits (seen: 0.33552545 vs
    # 0.33552539 without AVX-512). Everything else is the same computation: bit for bit.
    floats = [c for c, t in both.schema.items() if t in (pl.Float32, pl.Float64)]
    assert both.drop(floats).equals(alone.drop(floats))
    for c in floats:
        np.testing.assert_allclose(both[c].to_numpy(), alone[c].to_numpy(), rtol=1e-5,
                                   atol=1e-6, equal_nan=True, err_msg=c)  # fmt: skip
    per_user = b.featurize(req.drop("request_id"))  # one request of 11 rows
    rank_cols = [c for c in both.columns if c.endswith("_rank")]
    assert rank_cols and not per_user.select(rank_cols).equals(both.select(rank_cols))


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    mat = rng.standard_normal((n, d)).astype(np.float32)
    return mat / np.linalg.norm(mat, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def frozen_model(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ServingModel:
    """The serving bundle made to read the frozen encoder's cosines too (as the nightly's is
    when fine-tuning ships a tuned encoder): a second vector set, in another row order, and a
    batch ranker trained on the wider columns."""
    from recsys.bundle import Bundle
    from recsys.encoder.vectors import vectors_frame
    from recsys.ranker import RankerConfig, train_ranker

    dest = bundle_copy(bundle_dir, tmp_path_factory.mktemp("frozen") / "bundle", "frozen-v1")
    b = Bundle.load(dest)
    rng = np.random.default_rng(5)
    order = rng.permutation(len(b.vectors.ids))
    ids = [b.vectors.ids[i] for i in order]
    # another encoder's view: close to the tuned vectors, not equal
    mat = b.vectors.matrix[order] + 0.5 * _unit(rng, len(ids), b.vectors.dim)
    mat /= np.linalg.norm(mat, axis=1, keepdims=True)
    vectors_frame(ids, mat, ["h"] * len(ids), "frozen-test").write_parquet(
        dest / "item_vectors_frozen.parquet"
    )
    b = Bundle.load(dest)  # the companion is read (no flag needed yet)
    spec = dataclasses.replace(b.spec, frozen_semantic=True)
    users = sorted(b.history["user_id"].unique().to_list())[:60]
    pairs = pl.DataFrame(
        {"user_id": [u for u in users for _ in range(12)],
         "item_id": [ids[int(i)] for i in rng.integers(0, len(ids), 12 * len(users))]}
    ).unique(maintain_order=True)  # fmt: skip
    frame = b.featurize(pairs, spec=spec).with_columns(
        pl.Series("clicked", rng.random(pairs.height) < 0.3)
    )
    ranker = train_ranker(frame, frame, spec.columns, RankerConfig(n_estimators=20),
                          group_col="user_id")  # fmt: skip
    shutil.rmtree(dest / "ranker")
    ranker.save(dest / "ranker")
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest.update(frozen_semantic=True, feature_names=spec.columns)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return ServingModel.from_bundle(Bundle.load(dest), preload_encoder=False)  # self-checks


def test_frozen_cosines_are_served_as_bundle_featurize_computes_them(frozen_model) -> None:
    m = frozen_model
    assert m.featurizer.batch.spec.frozen_semantic and m.vectors.frozen is not None
    cols = m.columns
    assert {"sem_cos_mean_frozen", "sem_cos_max_frozen_rank"} <= set(cols)
    rng = np.random.default_rng(11)
    ids = m.vectors.ids
    users = sorted(m.histories.ptr)
    new = NewItems(["new-a", "new-b"], _unit(rng, 2, m.vectors.dim),
                   _unit(rng, 2, m.vectors.frozen.dim))  # fmt: skip
    for n in range(12):
        user = users[n] if n % 3 else None
        cands = [ids[int(i)] for i in rng.choice(len(ids), 25, replace=False)] + ["new-a"]
        history = ["new-b", ids[n]] if n % 2 else []
        got = m.featurizer.features(user, cands, history, new if n % 4 else None)
        ref = m.featurizer.reference(user, cands, history, new if n % 4 else None)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
        np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(ref), rtol=0, atol=1e-9)
    # the two views differ: the frozen columns are not a copy of the tuned ones
    x = m.featurizer.features(users[1], ids[:40])
    tuned, frozen = cols.index("sem_cos_max"), cols.index("sem_cos_max_frozen")
    assert np.isfinite(x[:, frozen]).all() and not np.allclose(x[:, tuned], x[:, frozen])
    # live items (events) need both views; without the frozen one it is refused
    with pytest.raises(DataError, match="frozen"):
        m.live.add_vectors(NewItems(["ev-1"], _unit(rng, 1, m.vectors.dim)))


def test_a_bundle_whose_ranker_reads_frozen_cosines_needs_their_vectors(
    frozen_model, tmp_path: Path
) -> None:
    from recsys.bundle import Bundle

    dest = shutil.copytree(frozen_model.bundle.path, tmp_path / "b")
    (dest / "item_vectors_frozen.parquet").unlink()
    with pytest.raises(DataError, match=r"item_vectors_frozen\.parquet: missing"):
        Bundle.load(dest)


candidate_ids = st.text(min_size=1, max_size=12) | st.sampled_from(["x1", "x2", "x3"])
rank_bodies = st.fixed_dictionaries(
    {"candidates": st.lists(candidate_ids, min_size=0, max_size=30)},
    optional={
        "user_id": st.none() | st.text(max_size=10) | st.integers(),
        "history": st.lists(candidate_ids, max_size=5) | st.text(max_size=3),
        "k": st.none() | st.integers(-5, 1200) | st.floats(allow_nan=False),
        "explain": st.booleans() | st.integers(0, 2),
        "items": st.lists(
            st.fixed_dictionaries(
                {"item_id": candidate_ids, "title": st.text(max_size=20)},
                optional={"description": st.none() | st.text(max_size=20)},
            ),
            max_size=2,
        ),
        "bogus": st.integers(),
    },
)


@pytest.mark.slow
@pytest.mark.parametrize("k", ["Infinity", "NaN", "-Infinity", "1e999"])
def test_non_finite_k_is_a_4xx(server, serving_model, k):
    item = serving_model.bundle.vectors.ids[0]
    r = httpx.post(
        f"{server.url}/v1/rank",
        content=f'{{"candidates": ["{item}"], "k": {k}}}',
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert 400 <= r.status_code < 500, r.text
    assert "k" in json.dumps(_error_body(r))


@pytest.mark.slow
@FUZZ
@given(body=rank_bodies, known=st.lists(st.integers(0, 299), max_size=10))
def test_fuzzed_rank_requests_never_5xx(server, serving_model, body, known):
    """Near-valid requests (mixing known item ids in): a 200 with a consistent ranking, or a
    4xx with a JSON message; never a 5xx."""
    ids = serving_model.bundle.vectors.ids
    if isinstance(body.get("candidates"), list):
        body["candidates"] = body["candidates"] + [ids[i % len(ids)] for i in known]
    # json.dumps writes inf as `Infinity` (httpx's json= refuses it): the server must answer 4xx
    r = httpx.post(
        f"{server.url}/v1/rank",
        content=json.dumps(body),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        _error_body(r)
        return
    out = RankResponse.model_validate(r.json())
    cands = body["candidates"]
    k = body.get("k") or len(cands)
    assert len(out.items) == min(k, len(cands))
    assert [i.rank for i in out.items] == list(range(1, len(out.items) + 1))
    scores = [i.score for i in out.items]
    assert scores == sorted(scores, reverse=True)
    assert {i.item_id for i in out.items} <= set(cands)
    with_text = {i["item_id"] for i in body.get("items", [])}
    assert set(out.unknown_items) == {
        c for c in cands if c not in serving_model.catalogue.known_items and c not in with_text
    }


@pytest.mark.slow
@FUZZ
@given(user=st.text(min_size=1, max_size=40), k=st.integers(-3, 1500) | st.text(max_size=4))
def test_fuzzed_recommendation_requests_never_5xx(server, user, k):
    path = urllib.parse.quote(user, safe="")
    r = httpx.get(f"{server.url}/v1/recommendations/{path}", params={"k": k}, timeout=30)
    assert r.status_code < 500, r.text


@pytest.mark.slow
def test_reload_under_load_loses_no_request(server, second_bundle, bundle_dir, serving_model):
    """Clients hammer /v1/rank while the bundle is swapped twice: every answer is a 200, and
    answers from both versions arrive while traffic flows on either side of each swap."""
    user = sorted(serving_model.histories.ptr)[0]
    body = {"user_id": user, "candidates": serving_model.bundle.vectors.ids[:100]}
    statuses: list[int] = []
    versions: list[str] = []  # in order of arrival
    stop = threading.Event()
    first = serving_model.model_version

    def hammer() -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                r = c.post(f"{server.url}/v1/rank", json=body)
                statuses.append(r.status_code)
                if r.status_code == 200:
                    versions.append(r.json()["model_version"])

    def answers_from(version: str, after: int, n: int = 10) -> Callable[[], bool]:
        return lambda: versions[after:].count(version) >= n or bool(set(statuses) - {200})

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(answers_from(first, 0), "answers before the reload")
        r = httpx.post(f"{server.url}/v1/admin/reload", json={"bundle": str(second_bundle)},
                       headers=AUTH, timeout=300)  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == "second-v2"
        assert r.json()["previous_model_version"] == first
        wait_until(answers_from("second-v2", 0), "answers from the new bundle")
        assert httpx.get(f"{server.url}/readyz").json()["model_version"] == "second-v2"
    finally:
        # swap back (empty body would reload the second bundle: give the first explicitly)
        swapped = len(versions)
        r2 = httpx.post(f"{server.url}/v1/admin/reload", json={"bundle": str(bundle_dir)},
                        headers=AUTH, timeout=300)  # fmt: skip
        try:
            wait_until(answers_from(first, swapped), "answers after swapping back")
        finally:
            stop.set()
            for t in threads:
                t.join()
    assert r2.status_code == 200, r2.text
    assert set(statuses) == {200}, set(statuses)
    assert len(statuses) == len(versions) >= 30
    text = httpx.get(f"{server.url}/metrics").text
    assert 'recsys_model_reloads_total{result="ok"}' in text
    assert f'recsys_model_info{{model_version="{first}"}} 1' in text


@pytest.mark.slow
def test_other_workers_follow_a_reload(serving_model, bundle_dir, second_bundle, tmp_path):
    """Two apps sharing a reload file (as `serve --workers 2` sets up): a reload answered by
    one is followed by the other; a note naming a broken bundle leaves both serving."""
    from serving.app import create_app

    settings = Settings(  # type: ignore[call-arg]
        bundle=bundle_dir, admin_token=TOKEN, reload_file=tmp_path / "reload.json",
        reload_poll_seconds=0.1, preload_encoder=False,
    )  # fmt: skip
    a_app = create_app(settings, model=serving_model)
    b_app = create_app(settings, model=serving_model)
    for a in live_server(a_app):
        for b in live_server(b_app):
            r = httpx.post(f"{a.url}/v1/admin/reload", json={"bundle": str(second_bundle)},
                           headers=AUTH, timeout=300)  # fmt: skip
            assert r.status_code == 200 and r.json()["workers_follow"] is True, r.text
            wait_until(
                lambda u=b.url: httpx.get(f"{u}/readyz").json()["model_version"] == "second-v2",
                "reload followed by the other worker",
            )
            assert 'recsys_model_reloads_total{result="ok"} 1' in httpx.get(f"{b.url}/metrics").text
            write_note(tmp_path / "reload.json", str(tmp_path / "no-bundle-here"))
            wait_until(
                lambda u=b.url: 'result="error"} 1' in httpx.get(f"{u}/metrics").text,
                "try of the bad note",
            )
            for srv in (a, b):
                assert httpx.get(f"{srv.url}/readyz").json()["model_version"] == "second-v2"


@pytest.mark.slow
def test_corrupt_bundle_keeps_the_old_one(server, corrupt_bundle, tmp_path, client):
    before = client.get(f"{server.url}/readyz").json()["model_version"]
    url = f"{server.url}/v1/admin/reload"
    for source, words in (
        ({"bundle": str(corrupt_bundle)}, "broken bundle|ranker"),
        ({"bundle": str(tmp_path / "nowhere")}, "not a model bundle"),
        ({"model_uri": "models:/no-such-model@champion"}, "could not download"),
    ):
        r = client.post(url, json=source, headers=AUTH)
        assert r.status_code == 422, r.text
        err = _error_body(r)["error"]
        assert err.startswith("reload failed, still serving") and before in err
        assert __import__("re").search(words, err), err
    assert client.get(f"{server.url}/readyz").json()["model_version"] == before
    r = client.post(f"{server.url}/v1/rank", json={"candidates": ["a", "b"], "history": ["c"]})
    assert r.status_code == 200 and r.json()["model_version"] == before
    assert client.post(url, json={}).status_code == 401
    r = client.post(url, json={}, headers={"Authorization": "Bearer wrong-token"})
    assert r.status_code == 401 and "Bearer" in r.headers["www-authenticate"]
    r = client.post(url, json={"bundle": "a", "model_uri": "b"}, headers=AUTH)
    assert r.status_code == 422 and "not both" in _error_body(r)["error"]
    text = client.get(f"{server.url}/metrics").text
    assert 'recsys_model_reloads_total{result="error"}' in text


@pytest.mark.slow
def test_unexpected_error_is_a_503_with_request_id_without_trace(
    server, monkeypatch, client, caplog
):
    def boom(*a: Any, **k: Any) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(server.state.model, "rank", boom)
    r = client.post(f"{server.url}/v1/rank", json={"candidates": ["a"], "history": ["b"]},
                    headers={"X-Request-ID": "req-42"})  # fmt: skip
    assert r.status_code == 503 and r.headers["x-request-id"] == "req-42"
    err = _error_body(r)["error"]
    assert "RuntimeError" in err and "req-42" in err and "secret internals" not in err
    assert any("req-42" in rec.getMessage() for rec in caplog.records)  # the log line has it
    assert "recsys_unhandled_errors_total 1" in client.get(f"{server.url}/metrics").text
    ok = client.get(f"{server.url}/healthz")  # a fresh id on every response
    assert len(ok.headers["x-request-id"]) == 32 and ok.headers["x-request-id"] != "req-42"


@pytest.mark.slow
def test_health_answers_while_a_rank_request_is_busy(server, monkeypatch, client):
    """Ranking runs off the event loop: a rank request stuck in its computation does not hold
    up /healthz (on the loop, the health request would wait for it)."""
    import threading

    busy, release = threading.Event(), threading.Event()
    real = server.state.model.rank

    def slow_rank(*a: Any, **k: Any) -> Any:
        busy.set()
        release.wait(30)
        return real(*a, **k)

    monkeypatch.setattr(server.state.model, "rank", slow_rank)
    a, b = (str(i) for i in server.state.model.popular_ids[:2])
    body = {"candidates": [a], "history": [b]}
    result: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: result.update(r=httpx.post(f"{server.url}/v1/rank", json=body, timeout=60))
    )
    t.start()
    try:
        assert busy.wait(30), "the rank request never started"
        health = client.get(f"{server.url}/healthz", timeout=10)
        assert health.status_code == 200 and not release.is_set()
    finally:
        release.set()
        t.join(60)
    assert result["r"].status_code == 200, result["r"].text


@pytest.mark.slow
def test_app_loads_configured_bundle_at_start(bundle_dir, tmp_path, client):
    from serving.app import create_app

    good = Settings(bundle=bundle_dir, preload_encoder=False)  # type: ignore[call-arg]
    for srv in live_server(create_app(good)):
        r = client.get(f"{srv.url}/readyz")
        assert r.status_code == 200 and r.json()["status"] == "ready"
    bad = Settings(bundle=tmp_path / "missing")  # type: ignore[call-arg]
    for srv in live_server(create_app(bad)):
        r = client.get(f"{srv.url}/readyz")
        assert r.status_code == 503 and "not a model bundle" in r.json()["detail"]


@contextlib.contextmanager
def serve_command(args: list[str], log: Path) -> Iterator[str]:
    """`recsys serve ARGS` in a subprocess on a free port, its output to `log`: the URL once
    /readyz answers 200 on 10 connections in a row (every worker up); stopped after."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RECSYS_ADMIN_TOKEN": TOKEN, "RECSYS_PRELOAD_ENCODER": "false"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "recsys.cli", "serve", "--port", str(port), *args],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return all(httpx.get(f"{url}/readyz").status_code == 200 for _ in range(10))
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, f"server ready ({log})", timeout=120)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.slow
def test_recsys_serve_command(bundle_dir, second_bundle, tmp_path):
    """`recsys serve --workers 2` in a subprocess: ready, answers, an admin reload reaches every
    worker, stops; a bad bundle is a one-line error (exit 2)."""

    def versions(n: int = 30) -> set[str]:  # a new connection each: several workers answer
        return {httpx.get(f"{url}/readyz").json()["model_version"] for _ in range(n)}

    log = tmp_path / "serve.log"
    with serve_command(["--bundle", str(bundle_dir), "--workers", "2"], log) as url:
        r = httpx.post(f"{url}/v1/rank", json={"candidates": ["x"]})
        assert r.status_code == 200
        r = httpx.post(f"{url}/v1/admin/reload", json={"bundle": str(second_bundle)},
                       headers=AUTH, timeout=300)  # fmt: skip
        assert r.status_code == 200, r.text
        wait_until(lambda: versions() == {"second-v2"}, "reload followed by every worker")
    assert "events off (2 workers keep no shared live state)" in log.read_text()
    cmd = [sys.executable, "-m", "recsys.cli", "serve", "--bundle", str(tmp_path / "nope")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "not a model bundle" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_recsys_serve_with_redis_runs_several_workers_with_events(
    bundle_dir, serving_model, tmp_path, redis_server
):
    """`recsys serve --workers 2 --redis URL`: events reach whichever worker a connection
    lands on, and every worker then counts them and ranks alike; a repeat sent again is a
    duplicate wherever it lands; /metrics of any worker sums the events of both."""
    from datetime import timedelta

    cut = serving_model.bundle.snapshot.as_of
    user, items = sorted(serving_model.histories.ptr)[0], list(serving_model.bundle.vectors.ids[:6])
    iso = lambda t: t.isoformat().replace("+00:00", "Z")  # noqa: E731
    events = [
        {
            "event_id": f"imp-{n}",
            "type": "impression",
            "ts": iso(cut),
            "user_id": user,
            "request_id": f"r{n}",
            "items": items,
        }
        for n in range(3)
    ]
    events += [
        {
            "event_id": f"click-{n}",
            "type": "click",
            "ts": iso(cut),
            "user_id": user,
            "request_id": f"r{n}",
            "item_id": items[n],
        }
        for n in range(3)
    ]
    body = {"user_id": user, "candidates": items, "at": iso(cut + timedelta(minutes=30))}
    log = tmp_path / "serve.log"
    args = ["--bundle", str(bundle_dir), "--workers", "2", "--event-log", str(tmp_path / "ev"),
            "--redis", redis_server.url]  # fmt: skip
    with serve_command(args, log) as url:
        r = httpx.post(f"{url}/v1/events", json={"events": events})
        assert r.json() == {"accepted": 6, "duplicates": 0, "rejected": []}, r.text

        def every_worker_counted() -> bool:  # a new connection each: both workers answer
            lines = {httpx.get(f"{url}/readyz").json()["live"] for _ in range(20)}
            return all(", 6 events applied" in line for line in lines)

        wait_until(every_worker_counted, "the events on every worker")
        ranked = {json.dumps(httpx.post(f"{url}/v1/rank", json=body).json()["items"])
                  for _ in range(20)}  # fmt: skip
        assert len(ranked) == 1
        again = httpx.post(f"{url}/v1/events", json={"events": events}).json()
        assert again == {"accepted": 0, "duplicates": 6, "rejected": []}
        for _ in range(5):
            text = httpx.get(f"{url}/metrics").text
            assert 'recsys_events_total{result="accepted"} 6.0' in text
            assert 'recsys_events_total{result="duplicate"} 6.0' in text
    assert "live state shared in Redis at redis://127.0.0.1" in log.read_text()


@pytest.mark.slow
def test_recsys_serve_is_the_live_engine_by_default(nightly, tmp_path):
    """`recsys serve --bundle RUN/bundles/current`: events on, their log in RUN/events, the
    online ranker on the live state; `--no-events`: the batch ranker, /v1/events a 409."""
    from conftest import copy_run

    run = copy_run(nightly, tmp_path / "run")
    bundle = run / "bundles" / "current"
    manifest = json.loads((bundle / "manifest.json").read_text())
    with serve_command(["--bundle", str(bundle)], tmp_path / "live.log") as url:
        # months after the bundle's cut-off with no event yet, the live state is stale: the
        # batch ranker ranks, and /readyz says so; an event now makes it live
        ready = httpx.get(f"{url}/readyz").json()
        assert ready["stale"] is True and ready["ranker"] == manifest["ranker"]["name"]
        now = datetime.now(UTC).isoformat()
        event = {"event_id": "e1", "type": "impression", "ts": now, "user_id": "u",
                 "request_id": "r1", "items": ["x"]}  # fmt: skip
        r = httpx.post(f"{url}/v1/events", json={"events": [event]})
        assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
        ready = httpx.get(f"{url}/readyz").json()
        assert ready["stale"] is False
        assert ready["ranker"] == manifest["online"]["ranker"]["name"]
        assert ready["freshness"].startswith("online")
    assert f"events on, log {run / 'events'}" in (tmp_path / "live.log").read_text()
    assert (run / "events").is_dir()
    with serve_command(["--bundle", str(bundle), "--no-events"], tmp_path / "off.log") as url:
        ready = httpx.get(f"{url}/readyz").json()
        assert ready["ranker"] == manifest["ranker"]["name"]
        assert ready["freshness"].startswith("batch")
        assert httpx.post(f"{url}/v1/events", json={"events": []}).status_code == 409
    assert "events off (--no-events)" in (tmp_path / "off.log").read_text()


@pytest.mark.slow
def test_model_uri_from_the_registry(bundle_dir, second_bundle, serving_model, tmp_path):
    """Bundles registered in MLflow (sqlite store): models:/NAME@champion loads the version the
    alias names (not merely some bundle), and the server started from it ranks as the bundle
    does; models:/NAME/N loads version N."""
    import mlflow

    from serving.app import create_app
    from serving.source import load_model, resolve_source

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)  # no global tracking URI: serving must pass it on
    exp = client.create_experiment("serving-test", artifact_location=str(tmp_path / "art"))
    client.create_registered_model("serving-test")
    for bundle in (bundle_dir, second_bundle):  # versions 1 and 2
        run = client.create_run(exp)
        client.log_artifacts(run.info.run_id, str(bundle), artifact_path="bundle")
        client.set_terminated(run.info.run_id)
        mv = client.create_model_version(
            "serving-test", source=f"{run.info.artifact_uri}/bundle", run_id=run.info.run_id
        )
    client.set_registered_model_alias("serving-test", "champion", mv.version)  # version 2
    path = resolve_source("models:/serving-test@champion", uri)
    assert json.loads((path / "manifest.json").read_text())["model_version"] == "second-v2"
    assert resolve_source("models:/serving-test/2", uri) == path  # the same version: no download
    first = load_model(resolve_source("models:/serving-test/1", uri).as_posix(),
                       Settings(preload_encoder=False))  # type: ignore[call-arg]  # fmt: skip
    assert first.model_version == serving_model.model_version
    settings = Settings(model_uri="models:/serving-test@champion", tracking_uri=uri,  # type: ignore[call-arg]
                        preload_encoder=False)  # fmt: skip
    user = sorted(serving_model.histories.ptr)[0]
    body = {"user_id": user, "candidates": serving_model.bundle.vectors.ids[:30]}
    want = serving_model.rank(RankRequest.model_validate(body))
    for srv in live_server(create_app(settings)):
        r = httpx.post(f"{srv.url}/v1/rank", json=body)
        assert r.status_code == 200 and r.json()["model_version"] == "second-v2", r.text
        got = {i["item_id"]: i["score"] for i in r.json()["items"]}
        assert got == pytest.approx({i["item_id"]: i["score"] for i in want["items"]}, abs=1e-9)
    with pytest.raises(DataError, match="could not download"):
        resolve_source("models:/serving-test@nope", uri)
    shutil.rmtree(path)


@pytest.mark.slow
def test_training_rows_equal_what_serving_computes_at_the_same_moment(nightly, serving_model):
    """A training row (the point-in-time path) at the bundle's cut-off has the ranker columns
    the API computes from the bundle: behavioural, semantic and within-request."""
    from pipelines.prepare import read_tables
    from recsys.featurize import matrix, point_in_time_frame

    m = serving_model
    data = read_tables(Path(nightly.result.run_dir) / "validate")
    as_of = m.bundle.snapshot.as_of
    assert m.spec.stable and m.spec.columns != m.spec.base_columns  # ranks/z-scores are in use
    users = sorted(m.histories.ptr)[:12]
    cands = m.bundle.vectors.ids[:40]
    req = pl.DataFrame(
        {
            "request_id": [u for u in users for _ in cands],
            "user_id": [u for u in users for _ in cands],
            "ts": [as_of] * (len(users) * len(cands)),
            "item_id": cands * len(users),
        },
        schema_overrides={"ts": pl.Datetime("us", "UTC")},
    )
    online = dataclasses.replace(m.spec, refresh="online")
    train = matrix(point_in_time_frame(online, req, data, m.bundle.vectors), m.columns)
    serve = np.vstack([m.featurizer.features(u, cands) for u in users])
    np.testing.assert_array_equal(np.isnan(train), np.isnan(serve))
    # Behavioural columns to 1e-9; the cosines are float32, and the batch path multiplies many
    # users' windows in one product, so they (and their z-scores) agree to float32 rounding.
    exact = [j for j, c in enumerate(m.columns) if not c.startswith("sem_")]
    cos = [j for j, c in enumerate(m.columns) if c.startswith("sem_")]
    a, b = np.nan_to_num(train), np.nan_to_num(serve)
    np.testing.assert_allclose(a[:, exact], b[:, exact], rtol=0, atol=1e-9)
    np.testing.assert_allclose(a[:, cos], b[:, cos], rtol=0, atol=2e-6)
    assert (np.nan_to_num(serve[:, m.columns.index("sem_cos_mean_rank")]) > 0).any()
