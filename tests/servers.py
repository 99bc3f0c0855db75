"""Helpers of the API tests: real uvicorn servers on 127.0.0.1 in background threads, and bundle
copies that tell reloads apart (the fixtures that use them are in conftest.py)."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

TOKEN = "test-admin-token"


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


def bundle_copy(src: Path, dest: Path, model_version: str) -> Path:
    """A copy of a bundle whose manifest says `model_version` (to tell reloads apart)."""
    import json

    shutil.copytree(src, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["model_version"] = model_version
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Wait for `condition()` to hold (checked every 10 ms); an AssertionError naming `what`
    once `timeout` seconds pass without it."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout:g} s"
        time.sleep(0.01)


class RedisServer:
    """A real `redis-server` on 127.0.0.1:<free port>, no persistence (`--save ""
    --appendonly no`), never the system's service. stop() and start() again on the same port
    stand for an outage and a restart that lost the data."""

    def __init__(self, workdir: Path) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: Any = None

    def start(self, timeout: float = 30.0) -> RedisServer:
        import subprocess

        import redis

        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed: `make setup` installs it (apt-get)"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    pass
                if self._proc.poll() is not None:
                    err = self._proc.stderr.read().decode(errors="replace")
                    raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {err}")
                assert time.monotonic() < deadline, f"redis-server not up within {timeout:g} s"
                time.sleep(0.01)
        finally:
            client.close()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(timeout=30)
        self._proc = None

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url)
