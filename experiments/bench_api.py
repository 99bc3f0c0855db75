"""Load benchmark of the ranking API: `recsys serve` in a subprocess, driven from other processes.

    .venv/bin/python -m experiments.bench_api --bundle /tmp/serve-demo/run/bundles/current \
        [--seconds 10] [--worker-counts 1,2] [--events off,idle,flowing] \
        [--save experiments/results/bench_api.json] [--compare PATH | --no-compare]

Build the bundle first with `recsys demo --out /tmp/serve-demo` (the bundle folder is
RUN/bundles/current). The server listens on 127.0.0.1 only; the load generator is a separate
process (experiments/loadgen.py). Every request is POST /v1/rank for a known user from the bundle
with `--candidates` (100) random catalogue items and k = 20.

The table: one row per server (1 and 2 workers) and events mode: `off` (`--no-events`, the batch
ranker), `idle` (events on, the online ranker on the live state, no events coming) and `flowing`
(events on while a feeder process POSTs /v1/events at `--event-rate` 1,000 events/s in batches of
100). Events with 1 worker keep the live state in process (an event log in a private folder);
with 2 workers they go through a private `redis-server` (127.0.0.1, free port, `--save ""
--appendonly no`) as `recsys serve --redis` does. Per row, after `--warmup` seconds of load,
three closed-loop steps of `--seconds` each (each connection sends its next request when the
last is answered):

    req/s@16         requests answered per second with 16 connections (the throughput)
    srv p50/p99@16   the server time (Server-Timing `app;dur`: from the request's arrival to the
                     response start, so queueing inside the worker included) at 16 connections
    cli/srv @4       client and server p50/p99 with 4 connections
    srv @1           server p50/p99 with 1 connection: the service time of one request alone
    cpu ms/req       CPU of the server's processes per request at 16 connections (with events
                     flowing, the events' share included), cores: the cores they used
    errors           answers other than 200 and connection failures, over the three steps
    ev/s             events per second the feeder got accepted (flowing rows)

Then the ingestion table: client processes (`--ingest-clients`) POST /v1/events in batches of
1,000 new events, `--ingest-events` in all, as fast as answered, to one in-process worker and to
1 and 2 workers sharing Redis: events/s accepted and the server time per batch.

Results are stored as JSON (`--save`, default experiments/results/bench_api.json: the machine,
the load average, the commit, the bundle's model version and every row). Before writing it, the
run is compared with the previous results (`--compare PATH`, default the file it will replace):
a third table gives now / previous per row and figure, so a regression shows the day it lands
(throughput below 1 or latency and CPU above 1 are worse). Compare runs of one machine, and mind
the load average printed beside each row: the machine may be shared.

The older sweep is still there: `--rates 250,500,1000,1500` offers those rates (open loop:
requests scheduled 1/rate apart, timed from their scheduled start) and then `max`, on
`--workers` workers with `--connections` connections, events off.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from experiments.loadgen import (
    HOST,
    EventFeeder,
    RedisProcess,
    Server,
    catalogue,
    http_get,
    make_events,
    pct,
    request_bodies,
    run_step,
)
from serving.metrics import histogram_quantile, parse_histogram

DEFAULT_SAVE = Path(__file__).parent / "results" / "bench_api.json"
RATIO_KEYS = ("req/s@16", "cli p99@4", "srv p99@4", "srv p99@1", "cpu ms/req")


# --------------------------------------------------------------------------- the table


def measure_row(server: Server, bodies: list[bytes], args: argparse.Namespace,
                feeder: EventFeeder | None) -> dict[str, Any]:  # fmt: skip
    """The three closed-loop steps of one row (see the module docstring)."""
    if args.warmup > 0:
        run_step(server.port, bodies, None, args.warmup, 16)
    cpu0 = server.cpu()
    c16 = run_step(server.port, bodies, None, args.seconds, 16)
    cpu = server.cpu() - cpu0
    c4 = run_step(server.port, bodies, None, args.seconds, 4)
    c1 = run_step(server.port, bodies, None, args.seconds, 1)
    fed = feeder.stop() if feeder is not None else None
    n = max(c16["completed"], 1)
    return {
        "req/s@16": c16["completed"] / c16["elapsed"],
        "srv p50@16": pct(c16["server_ms"], 50),
        "srv p99@16": pct(c16["server_ms"], 99),
        "cli p50@4": pct(c4["client_ms"], 50),
        "cli p99@4": pct(c4["client_ms"], 99),
        "srv p50@4": pct(c4["server_ms"], 50),
        "srv p99@4": pct(c4["server_ms"], 99),
        "srv p50@1": pct(c1["server_ms"], 50),
        "srv p99@1": pct(c1["server_ms"], 99),
        "cpu ms/req": cpu * 1e3 / n,
        "cores": cpu / c16["elapsed"],
        "errors": c16["errors"] + c4["errors"] + c1["errors"],
        "ev/s": fed["accepted"] / fed["seconds"] if fed else 0.0,
        "ev errors": sum(v for k, v in fed["statuses"].items() if k != 200) if fed else 0,
        "load1": os.getloadavg()[0],
    }


def rank_table(args: argparse.Namespace, redis_url: str | None) -> list[dict[str, Any]]:
    bodies = request_bodies(args.bundle, 500, args.candidates)
    users, items = catalogue(args.bundle)
    rows = []
    for workers in args.worker_counts:
        for mode in args.events:
            events = "off" if mode == "off" else ("log" if workers == 1 else "redis")
            if events == "redis" and redis_url is None:
                continue
            t0 = time.perf_counter()
            server = Server(args.bundle, workers=workers, events=events, redis_url=redis_url)
            start_s = time.perf_counter() - t0
            feeder = None
            try:
                if mode == "flowing":
                    feeder = EventFeeder(server.port, users, items, args.event_rate,
                                         tag=f"flow{workers}-{server.port}").start()  # fmt: skip
                row = {"workers": workers, "events": mode,
                       **measure_row(server, bodies, args, feeder)}  # fmt: skip
                feeder = None
            finally:
                if feeder is not None:
                    feeder.stop()
                server.stop()
            rows.append(row)
            print(f"[{workers} worker(s), events {mode}: server ready in {start_s:.0f}s] "
                  + json.dumps(_rounded(row)), flush=True)  # fmt: skip
    return rows


# --------------------------------------------------------------------------- ingestion


def _ingest_client(port: int, bodies: list[bytes], ready: Any, go: Any, q: Any) -> None:
    """One ingesting process: post its prepared batches once `go` is set."""
    with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=120) as c:
        c.get("/healthz")
        ready.put(1)
        go.wait()
        out = []
        for body in bodies:
            r = c.post("/v1/events", content=body, headers={"content-type": "application/json"})
            timing = r.headers.get("server-timing", "")
            ms = float(timing.split("dur=")[1]) if "dur=" in timing else float("nan")
            out.append((r.status_code, r.json().get("accepted", 0) if r.status_code == 200 else 0,
                        ms))  # fmt: skip
    q.put(out)


def ingest(port: int, users: list[str], items: list[str], n_events: int, clients: int,
           tag: str) -> dict[str, Any]:  # fmt: skip
    """POST `n_events` new events in batches of 1,000 from `clients` processes at once."""
    import multiprocessing as mp

    batches = [
        json.dumps({"events": make_events(users, items, tag, i, 1000)}).encode()
        for i in range(0, n_events, 1000)
    ]
    ctx = mp.get_context("spawn")
    ready, q, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_ingest_client, args=(port, batches[i::clients], ready, go, q))
             for i in range(clients)]  # fmt: skip
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    t0 = time.perf_counter()
    go.set()
    got = [x for _ in procs for x in q.get(timeout=900)]
    seconds = time.perf_counter() - t0
    for p in procs:
        p.join()
    accepted = sum(a for _, a, _ in got)
    ms = [m for s, _, m in got if s == 200]
    return {"events": len(batches) * 1000, "accepted": accepted, "seconds": seconds,
            "events/s": accepted / seconds, "srv p50 ms/batch": pct(ms, 50),
            "srv p99 ms/batch": pct(ms, 99),
            "errors": sum(1 for s, _, _ in got if s != 200),
            "load1": os.getloadavg()[0]}  # fmt: skip


def ingest_table(args: argparse.Namespace, redis_url: str | None) -> list[dict[str, Any]]:
    users, items = catalogue(args.bundle)
    setups = [("1 worker, in process", 1, "log")]
    if redis_url is not None:
        setups += [("1 worker, Redis", 1, "redis"), ("2 workers, Redis", 2, "redis")]
    rows = []
    for name, workers, events in setups:
        server = Server(args.bundle, workers=workers, events=events, redis_url=redis_url)
        try:
            got = ingest(server.port, users, items, args.ingest_events, args.ingest_clients,
                         f"ing{workers}{events}-{server.port}")  # fmt: skip
        finally:
            server.stop()
        row = {"setup": name, "clients": args.ingest_clients, **got}
        rows.append(row)
        print("[ingest] " + json.dumps(_rounded(row)), flush=True)
    return rows


# --------------------------------------------------------------------------- output


def _rounded(row: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    if not rows:
        print("(no rows)")
        return
    cols = list(rows[0])
    cells = [[f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def ratios(now: dict[str, Any], previous: dict[str, Any]) -> list[dict[str, Any]]:
    """now / previous for each row found in both (matched by workers and events, or by
    setup) and each figure of RATIO_KEYS and events/s."""
    out = []
    prev_rank = {(r["workers"], r["events"]): r for r in previous.get("rank", [])}
    for r in now.get("rank", []):
        p = prev_rank.get((r["workers"], r["events"]))
        if p is not None:
            out.append({"row": f"{r['workers']}w events {r['events']}",
                        **{k: _ratio(r.get(k), p.get(k)) for k in RATIO_KEYS}})  # fmt: skip
    prev_ing = {r["setup"]: r for r in previous.get("ingest", [])}
    for r in now.get("ingest", []):
        p = prev_ing.get(r["setup"])
        if p is not None:
            out.append(
                {
                    "row": f"ingest, {r['setup']}",
                    "events/s": _ratio(r.get("events/s"), p.get("events/s")),
                }
            )
    return out


def _ratio(a: Any, b: Any) -> str:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or not b or a != a:
        return "n/a"
    return f"{a / b:.2f}"


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, check=True)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save(path: Path, results: dict[str, Any]) -> None:
    """Write `results` atomically (beside, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, allow_nan=True) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------- the sweep


def _rank_buckets(port: int) -> list[tuple[float, int]]:
    _, text = http_get(port, "/metrics")
    return parse_histogram(text, "recsys_http_request_duration_seconds", {"route": "/v1/rank"})


def _step_quantiles(before: list[tuple[float, int]], after: list[tuple[float, int]]) -> str:
    """p50/p95/p99 (ms) of the requests between two scrapes of one process's histogram."""
    if not after:
        return "n/a"
    prev = dict(before)
    step = [(le, c - prev.get(le, 0)) for le, c in after]
    return "/".join(f"{histogram_quantile(step, q) * 1e3:.2f}" for q in (0.5, 0.95, 0.99))


def sweep(args: argparse.Namespace) -> None:
    """The open-loop sweep over `--rates`, then `max` (closed loop), events off."""
    bodies = request_bodies(args.bundle, 500, args.candidates)
    t0 = time.perf_counter()
    server = Server(args.bundle, workers=args.workers, port=args.port)
    print(f"server ready in {time.perf_counter() - t0:.1f}s on {HOST}:{server.port} "
          f"({args.workers} workers)")  # fmt: skip
    port, rows = server.port, []
    try:
        if args.warmup > 0:
            run_step(port, bodies, None, args.warmup, args.connections)
        steps: list[float | None] = [float(r) for r in args.rates.split(",") if r.strip()]
        if not args.no_max:
            steps.append(None)
        for rate in steps:
            # the histogram is per process: with several workers a scrape sees one of them
            before = _rank_buckets(port) if args.workers == 1 else []
            cpu0 = server.cpu()
            res = run_step(port, bodies, rate, args.seconds, args.connections)
            server_cpu = server.cpu() - cpu0
            hist = _step_quantiles(before, _rank_buckets(port)) if args.workers == 1 else "n/a"
            row = {
                "offered": "max" if rate is None else f"{rate:.0f}",
                "req/s": res["completed"] / res["elapsed"],
                "p50": pct(res["client_ms"], 50),
                "p95": pct(res["client_ms"], 95),
                "p99": pct(res["client_ms"], 99),
                "srv p50": pct(res["server_ms"], 50),
                "srv p95": pct(res["server_ms"], 95),
                "srv p99": pct(res["server_ms"], 99),
                "hist p50/95/99": hist,
                "errors": res["errors"],
                "srv cpu/req": server_cpu * 1e3 / max(res["completed"], 1),
                "cli cpu/req": res["client_cpu"] * 1e3 / max(res["completed"], 1),
                "srv cores": server_cpu / res["elapsed"],
                "load1": os.getloadavg()[0],
            }
            rows.append(row)
            print(json.dumps(_rounded(row)), flush=True)
    finally:
        server.stop()
    print_table(
        f"POST /v1/rank, {args.candidates} candidates, {args.workers} workers, "
        f"{args.connections} connections, {args.seconds:.0f}s per step; latency in ms "
        "(client: from scheduled send; srv: Server-Timing app time)",
        rows,
    )


# --------------------------------------------------------------------------- main


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", type=Path, default=Path("/tmp/serve-demo/run/bundles/current"))
    p.add_argument("--seconds", type=float, default=10.0, help="per load step")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up load per server")
    p.add_argument("--worker-counts", type=_ints, default=[1, 2], help="the table's servers")
    p.add_argument("--events", default="off,idle,flowing",
                   help="the table's events modes (off, idle, flowing)")  # fmt: skip
    p.add_argument("--event-rate", type=float, default=1000.0, help="events/s while flowing")
    p.add_argument("--ingest-events", type=int, default=40_000,
                   help="events per ingestion row (0: no ingestion table)")  # fmt: skip
    p.add_argument("--ingest-clients", type=int, default=2)
    p.add_argument(
        "--no-redis",
        action="store_true",
        help="skip what needs redis-server (2 workers with events, Redis ingestion)",
    )
    p.add_argument("--save", type=Path, default=DEFAULT_SAVE, help="results JSON")
    p.add_argument("--compare", type=Path, default=None,
                   help="previous results JSON (default: the --save file, if there)")  # fmt: skip
    p.add_argument("--no-compare", action="store_true")
    # the sweep (the older mode)
    p.add_argument("--rates", default=None,
                   help="run the sweep instead: req/s per step, then `max`")  # fmt: skip
    p.add_argument("--no-max", action="store_true", help="sweep: skip the closed-loop max step")
    p.add_argument("--connections", type=int, default=32, help="sweep: connections")
    p.add_argument("--workers", type=int, default=2, help="sweep: server worker processes")
    p.add_argument("--port", type=int, default=0, help="sweep: 0 = a free port")
    args = p.parse_args(argv)
    if not (args.bundle / "manifest.json").is_file():
        raise SystemExit(
            f"{args.bundle}: not a model bundle; build one with "
            "`recsys demo --out /tmp/serve-demo` (bundle: /tmp/serve-demo/run/bundles/current)"
        )
    args.events = [e.strip() for e in args.events.split(",") if e.strip()]
    bad = set(args.events) - {"off", "idle", "flowing"}
    if bad:
        raise SystemExit(f"--events: unknown mode(s) {sorted(bad)}; use off, idle, flowing")
    load0 = os.getloadavg()
    print(
        f"cpus: {os.cpu_count()}  load average before start: "
        f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}  (a shared machine adds to the figures)"
    )
    if args.rates is not None:
        sweep(args)
        return 0

    previous_path = None if args.no_compare else (args.compare or args.save)
    previous = None
    if previous_path is not None and previous_path.is_file():
        previous = json.loads(previous_path.read_text())
    redis = None if args.no_redis else RedisProcess().start()
    try:
        url = redis.url if redis else None
        rank = rank_table(args, url)
        ing = ingest_table(args, url) if args.ingest_events > 0 else []
    finally:
        if redis is not None:
            redis.stop()
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    results = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "model_version": manifest.get("model_version"),
        "cpus": os.cpu_count(),
        "load_before": load0[0],
        "load_after": os.getloadavg()[0],
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rank": rank,
        "ingest": ing,
    }
    print_table(
        f"POST /v1/rank, {args.candidates} candidates, k=20, {args.seconds:.0f}s per step "
        "(closed loop); latency in ms (cli: client; srv: Server-Timing, queueing in the worker "
        "included); @N: N connections",
        [_rounded(r) for r in rank],
    )
    if ing:
        print_table(
            f"POST /v1/events, batches of 1,000 new events, {args.ingest_events:,} per row, "
            f"{args.ingest_clients} client processes",
            [_rounded(r) for r in ing],
        )
    if previous is not None:
        print_table(
            f"now / previous ({previous_path}, {previous.get('when')}, commit "
            f"{previous.get('commit')}, load {previous.get('load_before', float('nan')):.2f}): "
            "req/s and events/s above 1 are better, latency and CPU below 1",
            ratios(results, previous),
        )
    save(args.save, results)
    print(f"\nresults: {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
