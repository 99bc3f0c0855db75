"""Fixtures of the serving tests: a small real bundle (the nightly pipeline on generated data,
built once per session) and real uvicorn servers on 127.0.0.1 in background threads.

Imported by tests/test_serving.py (`from tests.conftest_serving import *`-style, by name).
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from serving.app import create_app
from serving.ranking import ServingModel
from serving.settings import Settings

TOKEN = "test-admin-token"
GEN = {"n_items": 300, "n_users": 200, "n_shown": 4000, "seed": 3}


@dataclass
class LiveServer:
    """A uvicorn server on 127.0.0.1:<free port> running `app` in a thread."""

    app: Any
    url: str = ""

    def __post_init__(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._sock = sock
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )

    def start(self, timeout: float = 120.0) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()

    @property
    def state(self) -> Any:
        return self.app.state.serving


def live_server(app: Any) -> Iterator[LiveServer]:
    server = LiveServer(app).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def serving_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The nightly pipeline on small generated data: tracking off, frozen encoder."""
    from experiments.config import config_from_dict
    from pipelines.nightly import run_nightly
    from recsys.data import write_dataset
    from recsys.generate import GeneratorConfig, generate

    root = tmp_path_factory.mktemp("serving")
    data, _ = generate(GeneratorConfig(**GEN))
    write_dataset(root / "data", data)
    config = config_from_dict(
        {
            "finetune": {"method": "none"},
            "pipeline": {"ship": "lgbm_full"},  # both halves on the hot path, whatever noise says
            "tracking": {"enabled": False},
            "ranker": {"n_estimators": 200, "num_threads": 2},
        },
        name="serving-test",
    )
    return run_nightly(root / "data", root / "run", config=config, log=lambda s: None)


@pytest.fixture(scope="session")
def bundle_dir(serving_run: Any) -> Path:
    return Path(serving_run.bundle_dir)


@pytest.fixture(scope="session")
def serving_model(bundle_dir: Path) -> ServingModel:
    from recsys.bundle import Bundle

    return ServingModel.from_bundle(Bundle.load(bundle_dir), preload_encoder=True)


def bundle_copy(src: Path, dest: Path, model_version: str) -> Path:
    """A copy of a bundle whose manifest says `model_version` (to tell reloads apart)."""
    import json

    shutil.copytree(src, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["model_version"] = model_version
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


@pytest.fixture(scope="session")
def second_bundle(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bundle_copy(bundle_dir, tmp_path_factory.mktemp("second") / "bundle", "second-v2")


@pytest.fixture(scope="session")
def corrupt_bundle(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle whose ranker model file is truncated garbage."""
    dest = bundle_copy(bundle_dir, tmp_path_factory.mktemp("corrupt") / "bundle", "corrupt-v3")
    model = dest / "ranker" / "model.txt"
    model.write_text(model.read_text()[:200] + "\nnot a tree\n")
    return dest


@pytest.fixture(scope="session")
def server(
    serving_model: ServingModel, bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """The loaded bundle served with admin on (session-wide: tests that reload swap back).
    Its MLflow store is an empty sqlite file of its own (never ./mlflow.db)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    settings = Settings(bundle=bundle_dir, admin_token=TOKEN, tracking_uri=uri)  # type: ignore[call-arg]
    yield from live_server(create_app(settings, model=serving_model))


@pytest.fixture(scope="module")
def empty_server() -> Iterator[LiveServer]:
    """A server with no bundle configured and admin off (fast: no model)."""
    settings = Settings(max_body_bytes=10_000)  # type: ignore[call-arg]
    yield from live_server(create_app(settings))


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as c:
        yield c
