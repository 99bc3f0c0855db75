"""Load benchmark of the ranking API: `recsys serve` in a subprocess, driven from another process.

    .venv/bin/python -m experiments.bench_api --bundle /tmp/serve-demo/run/bundles/current \
        [--seconds 30] [--rates 250,500,1000,1500] [--workers 2] [--candidates 100]

Build the bundle first with `recsys demo --out /tmp/serve-demo` (the bundle folder is
RUN/bundles/current, here /tmp/serve-demo/run/bundles/current). The server listens on 127.0.0.1
only. Each step offers POST /v1/rank at a fixed rate (open loop: requests are scheduled 1/rate
apart and timed from their scheduled start, so a server that falls behind shows it in the
latency) over `--connections` keep-alive connections; a last step (`max`) sends as fast as the
connections allow (closed loop). Every request is a known user from the bundle with
`--candidates` random catalogue items and k = 20.

The load generator is a separate process speaking minimal HTTP/1.1 over asyncio streams (cheap on
the CPU, since client and server share the machine). Per step it prints: the achieved req/s; the
client-side p50/p95/p99; the server-side p50/p95/p99 from the `Server-Timing: app;dur=` header
of each response (time inside the app, request to response start); the same from the /metrics
histogram (interpolated in buckets; only with one worker, as each worker keeps its own); the
errors (non-200 or connection failures); the CPU milliseconds per request of the server (all its
processes) and of the load generator; and the cores the server used on average. On a shared
machine the last three say how much of a latency figure is the machine.

Targets (2 cores): server-side p99 <= 5 ms and >= 1,000 req/s with zero errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from serving.metrics import histogram_quantile, parse_histogram

HOST = "127.0.0.1"


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


def _raw(port: int, path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nhost: {HOST}:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _drive(
    port: int, bodies: list[bytes], rate: float | None, seconds: float, connections: int
) -> dict[str, Any]:
    """Offer requests at `rate` per second (None: as fast as possible) for `seconds`."""
    raws = [_raw(port, "/v1/rank", b) for b in bodies]
    queue: asyncio.Queue[float | None] = asyncio.Queue()
    client_ms: list[float] = []
    server_ms: list[float] = []
    errors = 0
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    t_end = t_start + seconds

    async def worker(i: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(HOST, port)
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
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(HOST, port)
                    continue
                done = time.perf_counter()
                if status != 200:
                    errors += 1
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
    return {
        "client_cpu": time.process_time() - cpu_start,
        "completed": len(client_ms),
        "elapsed": elapsed,
        "client_ms": client_ms,
        "server_ms": server_ms,
        "errors": errors,
    }


def _client_process(conn: Any, port: int, bodies: list[bytes], rate: float | None,
                    seconds: float, connections: int) -> None:  # fmt: skip
    conn.send(asyncio.run(_drive(port, bodies, rate, seconds, connections)))
    conn.close()


def run_step(port: int, bodies: list[bytes], rate: float | None, seconds: float,
             connections: int) -> dict[str, Any]:  # fmt: skip
    """One load step in a separate (spawned) process; returns its raw measurements."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_client_process, args=(child, port, bodies, rate, seconds, connections)
    )
    proc.start()
    result = parent.recv()
    proc.join()
    return result  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- the server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _tree_cpu(pid: int) -> float:
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


def _get(port: int, path: str) -> tuple[int, str]:
    import httpx

    r = httpx.get(f"http://{HOST}:{port}{path}", timeout=10)
    return r.status_code, r.text


def start_server(bundle: Path, port: int, workers: int, timeout: float = 300) -> subprocess.Popen:
    exe = shutil.which("recsys", path=str(Path(sys.executable).parent)) or "recsys"
    env = {**os.environ, "RECSYS_ACCESS_LOG": "false", "RECSYS_LOG_LEVEL": "warning"}
    proc = subprocess.Popen(
        [exe, "serve", "--bundle", str(bundle), "--host", HOST, "--port", str(port),
         "--workers", str(workers), "--no-events"],  # the batch path: no events are sent
        env=env,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    ready = 0
    while ready < 5 * workers:  # several workers: wait until answers keep coming back ready
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            proc.terminate()
            raise SystemExit(f"the server was not ready within {timeout:.0f}s")
        try:
            ready = ready + 1 if _get(port, "/readyz")[0] == 200 else 0
        except Exception:
            ready = 0
        time.sleep(0.1)
    return proc


# --------------------------------------------------------------------------- requests


def request_bodies(bundle: Path, n: int, candidates: int, seed: int = 0) -> list[bytes]:
    """`n` JSON bodies: a user with a stored history and `candidates` random catalogue items."""
    rng = random.Random(seed)
    items = pl.read_parquet(bundle / "item_vectors.parquet", columns=["item_id"])["item_id"]
    users = pl.read_parquet(bundle / "history.parquet", columns=["user_id"])["user_id"].unique()
    item_list, user_list = items.to_list(), users.sort().to_list()
    k = min(candidates, len(item_list))
    return [
        json.dumps(
            {"user_id": rng.choice(user_list), "candidates": rng.sample(item_list, k), "k": 20}
        ).encode()
        for _ in range(n)
    ]


def _pct(values: list[float], q: float) -> float:
    arr = np.asarray([v for v in values if v == v])
    return float(np.percentile(arr, q)) if arr.size else float("nan")


def _rank_buckets(port: int) -> list[tuple[float, int]]:
    _, text = _get(port, "/metrics")
    return parse_histogram(text, "recsys_http_request_duration_seconds", {"route": "/v1/rank"})


def _step_quantiles(before: list[tuple[float, int]], after: list[tuple[float, int]]) -> str:
    """p50/p95/p99 (ms) of the requests between two scrapes of one process's histogram."""
    if not after:
        return "n/a"
    prev = dict(before)
    step = [(le, c - prev.get(le, 0)) for le, c in after]
    return "/".join(f"{histogram_quantile(step, q) * 1e3:.2f}" for q in (0.5, 0.95, 0.99))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", type=Path, default=Path("/tmp/serve-demo/run/bundles/current"))
    p.add_argument("--seconds", type=float, default=30.0, help="per load step")
    p.add_argument("--rates", default="250,500,1000,1500", help="req/s per step; then `max`")
    p.add_argument("--no-max", action="store_true", help="skip the closed-loop max step")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="server worker processes")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up load")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    args = p.parse_args(argv)
    if not (args.bundle / "manifest.json").is_file():
        raise SystemExit(
            f"{args.bundle}: not a model bundle; build one with "
            "`recsys demo --out /tmp/serve-demo` (bundle: /tmp/serve-demo/run/bundles/current)"
        )
    port = args.port or _free_port()
    bodies = request_bodies(args.bundle, 500, args.candidates)
    load1 = os.getloadavg()[0]
    print(f"cpus: {os.cpu_count()}  load average before start: {load1:.2f}  (shared machine)")
    t0 = time.perf_counter()
    server = start_server(args.bundle, port, args.workers)
    print(f"server ready in {time.perf_counter() - t0:.1f}s on {HOST}:{port} "
          f"({args.workers} workers)")  # fmt: skip
    rows = []
    try:
        if args.warmup > 0:
            run_step(port, bodies, None, args.warmup, args.connections)
        steps: list[float | None] = [float(r) for r in args.rates.split(",") if r.strip()]
        if not args.no_max:
            steps.append(None)
        for rate in steps:
            # the histogram is per process: with several workers a scrape sees one of them
            before = _rank_buckets(port) if args.workers == 1 else []
            cpu0 = _tree_cpu(server.pid)
            res = run_step(port, bodies, rate, args.seconds, args.connections)
            server_cpu = _tree_cpu(server.pid) - cpu0
            hist = _step_quantiles(before, _rank_buckets(port)) if args.workers == 1 else "n/a"
            row = {
                "offered": "max" if rate is None else f"{rate:.0f}",
                "req/s": res["completed"] / res["elapsed"],
                "p50": _pct(res["client_ms"], 50),
                "p95": _pct(res["client_ms"], 95),
                "p99": _pct(res["client_ms"], 99),
                "srv p50": _pct(res["server_ms"], 50),
                "srv p95": _pct(res["server_ms"], 95),
                "srv p99": _pct(res["server_ms"], 99),
                "hist p50/95/99": hist,
                "errors": res["errors"],
                "srv cpu/req": server_cpu * 1e3 / max(res["completed"], 1),
                "cli cpu/req": res["client_cpu"] * 1e3 / max(res["completed"], 1),
                "srv cores": server_cpu / res["elapsed"],
                "load1": os.getloadavg()[0],
            }
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                              for k, v in row.items()}))  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
    _print_table(rows, args)
    return 0


def _print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"\nPOST /v1/rank, {args.candidates} candidates, {args.workers} workers, "
        f"{args.connections} connections, {args.seconds:.0f}s per step; latency in ms "
        "(client: from scheduled send; srv: Server-Timing app time)"
    )
    cols = list(rows[0]) if rows else []
    cells = [[f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    sys.exit(main())
