"""The registered champion as an MLflow pyfunc model (serving/pyfunc.py): loaded through the
registry alias it ranks as the HTTP API does, `recsys serve --model-uri` serves the same
version, and `mlflow models serve` answers /invocations."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from servers import live_server

from serving.app import create_app
from serving.settings import Settings

CHAMPION = "models:/recsys@champion"


@pytest.fixture(scope="module")
def champion(nightly: Any) -> Iterator[Any]:
    """The session nightly's champion, loaded as MLflow users load it."""
    import mlflow

    mlflow.set_tracking_uri(nightly.tracking_uri)
    try:
        yield mlflow.pyfunc.load_model(CHAMPION)
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]


def _requests(model: Any) -> list[dict[str, Any]]:
    """Known users, a history alone, a user with a history, an unknown candidate."""
    bundle = model.bundle
    users = sorted(model.histories.ptr)[:4]
    items = bundle.vectors.ids
    return [
        *(
            {"user_id": u, "candidates": items[10 * j : 10 * j + 25]}
            for j, u in enumerate(users[:3])
        ),
        {"history": items[40:43], "candidates": items[:20]},
        {"user_id": users[3], "history": items[50:52], "candidates": items[60:80]},
        {"user_id": "someone-new", "candidates": [*items[:5], "not-in-the-bundle"]},
    ]


def _frame(requests: list[dict[str, Any]], at: str | None = None) -> pd.DataFrame:
    rows = [
        {"user_id": r.get("user_id"), "item_id": c, "history": r.get("history", []),
         **({"at": at} if at else {})}
        for r in requests
        for c in r["candidates"]
    ]  # fmt: skip
    return pd.DataFrame(rows)


def _api_scores(url: str, requests: list[dict[str, Any]], at: str | None = None) -> list[float]:
    scores: list[float] = []
    for body in requests:
        r = httpx.post(f"{url}/v1/rank", json={**body, **({"at": at} if at else {})}, timeout=60)
        assert r.status_code == 200, r.text
        got = {i["item_id"]: i["score"] for i in r.json()["items"]}
        scores += [got[c] for c in body["candidates"]]
    return scores


@pytest.mark.slow
def test_pyfunc_through_the_alias_ranks_as_the_api(nightly, champion, serving_model, tmp_path):
    """predict() on the champion equals POST /v1/rank to 1e-6, request by request: against a
    server without events (freshness batch) and one with events as of `at` (online); both
    servers load the same registered version (`--model-uri models:/recsys@champion`)."""
    requests = _requests(serving_model)
    frame = _frame(requests)
    batch = champion.predict(frame)
    assert list(batch.index) == list(frame.index) and batch["score"].notna().all()
    assert set(batch["model_version"]) == {serving_model.model_version}
    uri = nightly.tracking_uri
    off = Settings(model_uri=CHAMPION, tracking_uri=uri, preload_encoder=False)  # type: ignore[call-arg]
    for srv in live_server(create_app(off)):
        assert srv.state.model.model_version == serving_model.model_version
        want = _api_scores(srv.url, requests)
    assert batch["score"].tolist() == pytest.approx(want, abs=1e-6)
    # strategies as the API names them; ranks within each request
    assert batch.groupby("user_id", dropna=False)["rank"].min().eq(1).all()
    assert batch["strategy"].iloc[-1] == "profile"  # a new user id: the ranker, zero counts

    # half an hour after the cut-off, within the bundle's limit of silence: the online ranker
    # (later, a server that heard no event ranks as the batch path, and so does predict)
    at = (serving_model.bundle.snapshot.as_of + timedelta(minutes=30)).isoformat()
    assert serving_model.live.max_lag_us > 30 * 60 * 1_000_000
    online = champion.predict(_frame(requests, at), params={"freshness": "online"})
    on = Settings(model_uri=CHAMPION, tracking_uri=uri, preload_encoder=False,  # type: ignore[call-arg]
                  event_log=tmp_path / "events")  # fmt: skip
    for srv in live_server(create_app(on)):
        want_online = _api_scores(srv.url, requests, at)
    assert online["score"].tolist() == pytest.approx(want_online, abs=1e-6)
    assert online["score"].tolist() != pytest.approx(batch["score"].tolist(), abs=1e-6)


@pytest.mark.slow
def test_pyfunc_refuses_bad_input_with_the_reason(champion, serving_model):
    from mlflow.exceptions import MlflowException

    user = sorted(serving_model.histories.ptr)[0]
    items = serving_model.bundle.vectors.ids[:2]
    cases = [
        (pd.DataFrame({"user_id": [user, user], "item_id": items, "history": [[items[0]], []]}),
         "different histories"),
        (pd.DataFrame({"user_id": [user], "item_id": items[:1], "at": ["2020-01-01T00:00:00Z"]}),
         "before the bundle's cut-off"),
        (pd.DataFrame({"user_id": [user, user], "item_id": [items[0], items[0]]}),
         "candidates must be distinct"),
        (pd.DataFrame({"user_id": [user], "item_id": items[:1], "at": ["2026-02-01T00:00:00"]}),
         "timezone"),
        (pd.DataFrame({"user_id": [user]}), "missing inputs.*item_id"),
    ]  # fmt: skip
    for frame, why in cases:
        with pytest.raises(MlflowException, match=why):
            champion.predict(frame)
    with pytest.raises(MlflowException, match="freshness 'live'"):
        champion.predict(pd.DataFrame({"item_id": items}), params={"freshness": "live"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(nightly, champion, serving_model, tmp_path):
    """`mlflow models serve -m models:/recsys@champion --env-manager local` (the venv's own
    uvicorn on PATH) answers /invocations with predict()'s scores, and a bad request with a
    400 naming the reason."""
    port = _free_port()
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": nightly.tracking_uri, "PATH": path}
    log = (tmp_path / "serve.log").open("w")
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", CHAMPION,
           "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow models serve not ready within 180 s"
            try:
                if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        frame = _frame(_requests(serving_model)[:2])
        body = {"dataframe_split": frame.to_dict(orient="split")}
        r = httpx.post(f"{url}/invocations", json=body, timeout=60)
        assert r.status_code == 200, r.text
        got = [p["score"] for p in r.json()["predictions"]]
        assert got == pytest.approx(champion.predict(frame)["score"].tolist(), abs=1e-6)
        bad = {"dataframe_records": [{"user_id": "u", "item_id": "x", "at": "2020-01-01T00:00Z"}]}
        r = httpx.post(f"{url}/invocations", json=bad, timeout=60)
        assert r.status_code == 400 and "before the bundle's cut-off" in r.text, r.text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
