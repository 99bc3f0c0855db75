"""What the API benchmarks share: a load generator in its own process, the server and a private
redis-server as subprocesses, and a feeder that posts events at a steady rate.

    run_step(port, bodies, rate, seconds, connections, path="/v1/rank") -> raw measurements
    Server(bundle, workers=..., events="off" | "log" | "redis", redis_url=..., env=...)
    RedisProcess(workdir).start() / .stop()        redis-server on 127.0.0.1, no persistence
    EventFeeder(port, users, items, rate, tag).start() / .stop() -> its counts and events
    request_bodies(bundle, n, candidates, k) -> JSON bodies of POST /v1/rank

The load generator speaks minimal HTTP/1.1 over asyncio streams (cheap on the CPU, since client
and server share the machine), in a spawned process: open loop (requests scheduled 1/rate apart
and timed from their scheduled start, so a server that falls behind shows it in the latency) or
closed loop (`rate` None: each connection sends its next request when the last is answered).
The server time of each answer is its `Server-Timing: app;dur=` header (serving/middleware.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

HOST = "127.0.0.1"
CONNECT_ERRORS = (OSError, asyncio.IncompleteReadError, ValueError, IndexError)


# --------------------------------------------------------------------------- the load generator


async def _request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes
) -> tuple[int, float]:
    """Send one prepared request; return (status, server-timing ms or NaN)."""
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, server_ms = 0, float("nan")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"server-timing":
            server_ms = float(value.split(b"dur=")[1].split(b";")[0])
    if length:
        await reader.readexactly(length)
    return status, server_ms


def raw_request(port: int, path: str, body: bytes | None = None, headers: str = "") -> bytes:
    """A prepared HTTP/1.1 request: POST with `body`, GET without."""
    if body is None:
        return f"GET {path} HTTP/1.1\r\nhost: {HOST}:{port}\r\n{headers}\r\n".encode()
    return (
        f"POST {path} HTTP/1.1\r\nhost: {HOST}:{port}\r\ncontent-type: application/json\r\n"
        f"{headers}content-length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _open(port: int, t_end: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection, retried every 10 ms while the server refuses (a restarting worker)."""
    while True:
        try:
            return await asyncio.open_connection(HOST, port)
        except OSError:
            if time.perf_counter() >= t_end:
                raise
            await asyncio.sleep(0.01)


async def drive(
    port: int, raws: list[bytes], rate: float | None, seconds: float, connections: int
) -> dict[str, Any]:
    """Offer `raws` (in turn) at `rate` per second (None: as fast as possible) for `seconds`
    over `connections` keep-alive connections. A connection error counts as status 0 (and the
    connection is opened again)."""
    queue: asyncio.Queue[float | None] = asyncio.Queue()
    client_ms: list[float] = []
    server_ms: list[float] = []
    statuses: Counter[int] = Counter()
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    t_end = t_start + seconds

    async def worker(i: int) -> None:
        reader, writer = await _open(port, t_end)
        k = i
        try:
            while True:
                if rate is None:
                    if time.perf_counter() >= t_end:
                        return
                    scheduled = time.perf_counter()
                else:
                    item = await queue.get()
                    if item is None:
                        return
                    scheduled = item
                k += connections
                try:
                    status, sms = await _request(reader, writer, raws[k % len(raws)])
                except CONNECT_ERRORS:
                    statuses[0] += 1
                    writer.close()
                    try:
                        reader, writer = await _open(port, t_end + 5)
                    except OSError:
                        return
                    continue
                done = time.perf_counter()
                statuses[status] += 1
                if status == 200:
                    client_ms.append((done - scheduled) * 1e3)
                    server_ms.append(sms)
        finally:
            writer.close()

    async def scheduler() -> None:
        assert rate is not None
        n = 0
        while True:
            due = t_start + n / rate
            if due >= t_end:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            queue.put_nowait(due)
            n += 1
        for _ in range(connections):
            queue.put_nowait(None)

    tasks = [asyncio.create_task(worker(i)) for i in range(connections)]
    if rate is not None:
        tasks.append(asyncio.create_task(scheduler()))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t_start
    errors = sum(n for s, n in statuses.items() if s != 200)
    return {
        "client_cpu": time.process_time() - cpu_start,
        "completed": len(client_ms),
        "elapsed": elapsed,
        "client_ms": client_ms,
        "server_ms": server_ms,
        "errors": errors,
        "statuses": dict(statuses),
    }


def _client_process(conn: Any, port: int, raws: list[bytes], rate: float | None,
                    seconds: float, connections: int) -> None:  # fmt: skip
    conn.send(asyncio.run(drive(port, raws, rate, seconds, connections)))
    conn.close()


class Step:
    """One load step running in a separate (spawned) process; `result()` waits for it."""

    def __init__(self, port: int, raws: list[bytes], rate: float | None, seconds: float,
                 connections: int) -> None:  # fmt: skip
        ctx = mp.get_context("spawn")
        self._parent, child = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=_client_process, args=(child, port, raws, rate, seconds, connections)
        )
        self._proc.start()

    def result(self) -> dict[str, Any]:
        out = self._parent.recv()
        self._proc.join()
        return out  # type: ignore[no-any-return]


def run_step(port: int, bodies: list[bytes], rate: float | None, seconds: float,
             connections: int, path: str = "/v1/rank") -> dict[str, Any]:  # fmt: skip
    """One load step of POST `path` with `bodies` (GET for a body None) in a separate process;
    returns its raw measurements."""
    raws = [raw_request(port, path, b) for b in bodies]
    return Step(port, raws, rate, seconds, connections).result()


def pct(values: list[float], q: float) -> float:
    arr = np.asarray([v for v in values if v == v])
    return float(np.percentile(arr, q)) if arr.size else float("nan")


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process `pid` and its children."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    return total


def http_get(port: int, path: str, timeout: float = 10) -> tuple[int, str]:
    import httpx

    r = httpx.get(f"http://{HOST}:{port}{path}", timeout=timeout)
    return r.status_code, r.text


class Server:
    """`recsys serve` in a subprocess on 127.0.0.1:`port` (0: a free one).

    events: "off" (`--no-events`: the batch ranker), "log" (one worker, the live state in
    process, an event log in a private folder) or "redis" (the live state shared through
    `redis_url`; any number of workers). `env`: extra environment (e.g. RECSYS_ADMIN_TOKEN)."""

    def __init__(self, bundle: Path, *, workers: int = 1, events: str = "off",
                 redis_url: str | None = None, port: int = 0, env: dict[str, str] | None = None,
                 timeout: float = 300) -> None:  # fmt: skip
        if events not in ("off", "log", "redis"):
            raise ValueError(f"events must be off, log or redis, got {events!r}")
        if events == "redis" and not redis_url:
            raise ValueError("events='redis' needs a redis_url")
        self.port = port or free_port()
        self.workers = workers
        self.events = events
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-api-"))
        exe = shutil.which("recsys", path=str(Path(sys.executable).parent))
        cmd = [exe] if exe else [sys.executable, "-m", "recsys.cli"]
        cmd += ["serve", "--bundle", str(bundle), "--host", HOST, "--port", str(self.port),
                "--workers", str(workers)]  # fmt: skip
        if events == "off":
            cmd.append("--no-events")
        else:
            cmd += ["--event-log", str(self.tmp / "events")]
        if events == "redis":
            cmd += ["--redis", str(redis_url)]
        full_env = {**os.environ, "RECSYS_ACCESS_LOG": "false", "RECSYS_LOG_LEVEL": "warning",
                    "RECSYS_REDIS_PREFIX": f"bench{self.port}", **(env or {})}  # fmt: skip
        full_env.pop("RECSYS_REDIS_URL", None)
        self.log_path = self.tmp / "server.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        ready = 0
        while ready < 5 * self.workers:  # several workers: until answers keep coming back ready
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with code {self.proc.returncode}: "
                                 f"{self.log_path.read_text()[-2000:]}")  # fmt: skip
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"the server was not ready within {timeout:.0f}s")
            try:
                ready = ready + 1 if http_get(self.port, "/readyz")[0] == 200 else 0
            except Exception:
                ready = 0
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return tree_cpu(self.proc.pid)

    def rss_mb(self) -> float:
        """Resident memory of the server's processes, MB."""
        import psutil

        total = 0
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += p.memory_info().rss
        return total / 2**20

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class RedisProcess:
    """A private `redis-server` on 127.0.0.1:<free port> without persistence (`--save ""
    --appendonly no`), as the tests start one; stop() then start() on the same port is an
    outage and a restart that lost the data."""

    def __init__(self, workdir: Path | None = None) -> None:
        self.port = free_port()
        self._own_dir = workdir is None  # a folder of ours: removed on stop
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="bench-redis-"))
        self.url = f"redis://{HOST}:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> RedisProcess:
        import redis

        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server is not installed (`make setup` installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [exe, "--bind", HOST, "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(host=HOST, port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    pass
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"redis-server did not start on port {self.port}")
                time.sleep(0.01)
        finally:
            client.close()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()  # an outage, not a shutdown: no goodbye to the clients
            self._proc.wait(timeout=30)
        self._proc = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url)


# --------------------------------------------------------------------------- requests, events


def catalogue(bundle: Path) -> tuple[list[str], list[str]]:
    """(users with a stored history, sorted; the catalogue's item ids) of a bundle."""
    items = pl.read_parquet(bundle / "item_vectors.parquet", columns=["item_id"])["item_id"]
    users = pl.read_parquet(bundle / "history.parquet", columns=["user_id"])["user_id"].unique()
    return users.sort().to_list(), items.to_list()


def request_bodies(bundle: Path, n: int, candidates: int, seed: int = 0, k: int = 20,
                   **extra: Any) -> list[bytes]:  # fmt: skip
    """`n` JSON bodies: a user with a stored history and `candidates` random catalogue items;
    `extra` fields are added to each (e.g. explain=True)."""
    rng = random.Random(seed)
    user_list, item_list = catalogue(bundle)
    c = min(candidates, len(item_list))
    return [
        json.dumps(
            {
                "user_id": rng.choice(user_list),
                "candidates": rng.sample(item_list, c),
                "k": k,
                **extra,
            }
        ).encode()
        for _ in range(n)
    ]


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def make_events(users: list[str], items: list[str], tag: str, start: int, n: int,
                seed: int = 0) -> list[dict[str, Any]]:  # fmt: skip
    """`n` events with ids `tag`-`start`.. : an impression of 5 items, then clicks on 4 of them,
    over and over, for random known users, stamped now."""
    rng = random.Random(f"{seed}-{tag}-{start}")
    out: list[dict[str, Any]] = []
    ts = now_iso()
    for j in range(start, start + n):
        if j % 5 == 0:
            user, shown = rng.choice(users), rng.sample(items, 5)
            rid = f"{tag}-r{j}"
            out.append({"event_id": f"{tag}-{j}", "type": "impression", "ts": ts,
                        "user_id": user, "request_id": rid, "items": shown})  # fmt: skip
        else:
            out.append({"event_id": f"{tag}-{j}", "type": "click", "ts": ts, "user_id": user,
                        "item_id": shown[j % 5], "request_id": rid})  # fmt: skip
    return out


def _feed(port: int, users: list[str], items: list[str], rate: float, batch: int, tag: str,
          stop: Any, conn: Any, retry_seconds: float) -> None:  # fmt: skip
    """The feeder process: `rate` events/s in batches of `batch` until `stop` is set; a batch
    answered other than 200 is sent again (same ids) until it is, for up to `retry_seconds`
    after `stop`."""
    import httpx

    statuses: Counter[int] = Counter()
    accepted = duplicates = 0
    sent: list[dict[str, Any]] = []
    server_ms: list[float] = []
    pending: list[list[dict[str, Any]]] = []
    n = 0
    t0 = time.perf_counter()
    deadline = None
    with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=30) as c:
        while True:
            if stop.is_set() and deadline is None:
                deadline = time.perf_counter() + retry_seconds
            if deadline is None:
                pending.append(make_events(users, items, tag, n, batch))
                n += batch
            elif not pending or time.perf_counter() > deadline:
                break
            for ev in list(pending):
                try:
                    r = c.post("/v1/events", json={"events": ev})
                    status = r.status_code
                except httpx.HTTPError:
                    status = 0
                statuses[status] += 1
                if status == 200:
                    body = r.json()
                    accepted += body["accepted"]
                    duplicates += body["duplicates"]
                    timing = r.headers.get("server-timing", "")
                    server_ms.append(float(timing.split("dur=")[1]) if "dur=" in timing else 0)
                    sent.extend(ev)
                    pending.remove(ev)
                else:
                    break  # the server is unwell: the rest waits for the next tick
            if deadline is None:
                due = t0 + n / rate
                time.sleep(max(0.0, due - time.perf_counter()))
            else:
                time.sleep(0.05)
    conn.send({"statuses": dict(statuses), "accepted": accepted, "duplicates": duplicates,
               "sent": sent, "unsent": sum(len(p) for p in pending),
               "seconds": time.perf_counter() - t0, "server_ms": server_ms})  # fmt: skip
    conn.close()


class EventFeeder:
    """POST /v1/events at `rate` events/s (batches of `batch`, unique ids `tag`-N) from a
    separate process, until stop(); stop() returns its counts and the events that got a 200
    (a batch refused with 503 is sent again with the same ids)."""

    def __init__(self, port: int, users: list[str], items: list[str], rate: float = 1000,
                 batch: int = 100, tag: str = "feed",
                 retry_seconds: float = 30) -> None:  # fmt: skip
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self._parent, child = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=_feed,
            args=(port, users, items, rate, batch, tag, self._stop, child, retry_seconds),
        )

    def start(self) -> EventFeeder:
        self._proc.start()
        return self

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        out = self._parent.recv()
        self._proc.join()
        return out  # type: ignore[no-any-return]
