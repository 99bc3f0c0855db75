"""Soak benchmark of the ranking API: reloads, a saturated worker and a Redis outage under load.

    .venv/bin/python -m experiments.bench_soak --bundle /tmp/serve-demo/run/bundles/current \
        [--seconds 60] [--parts reload,health,redis]

Three parts, each against its own `recsys serve` subprocess on 127.0.0.1 (experiments/loadgen.py
starts it, the load generator and the event feeder run in other processes):

reload   POST /v1/admin/reload every `--reload-every` (2) seconds for `--seconds` while
         `--rate` (500) /v1/rank requests per second flow (open loop, 100 candidates), on
         `--reload-workers` (2) workers (the others follow the one the reload reached) with
         events off, or on (`--reload-events log` with one worker, `redis` with any: each
         reload replays the events into the new model). Counts failed requests: answers other
         than 200 and connection errors (target 0), and the server's memory before and after
         (a model a reload replaced must be freed).
health   GET /healthz (`--health-rate` per second, open loop) while 1,000-candidate `explain`
         requests keep one worker saturated (`--explain-connections` closed-loop connections):
         the health probe's p50/p99. Target: p99 <= 50 ms.
redis    two workers sharing a private redis-server (no persistence) take /v1/rank at
         `--redis-rate` req/s and events at `--event-rate` events/s; redis-server is killed a
         third of the way in and started again (empty) on the same port at two thirds. Counts
         5xx answers of /v1/rank (target 0); event batches refused with 503 are sent again with
         the same ids, as the API asks. Then checks that no event was counted twice: Redis'
         id set and stream hold each event id once, and both workers' /v1/rank scores (at one
         moment after the last event) equal those of a one-worker server without Redis fed the
         same events once each.

`--seconds 10` gives a quick run. The machine's load average is printed beside each result: on a
shared machine it explains latency.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from experiments.loadgen import (
    HOST,
    EventFeeder,
    RedisProcess,
    Server,
    Step,
    catalogue,
    pct,
    raw_request,
    request_bodies,
)

TOKEN = "bench-soak-token"


def _load() -> float:
    return os.getloadavg()[0]


def _summary(res: dict[str, Any]) -> dict[str, Any]:
    return {
        "requests": res["completed"],
        "req/s": round(res["completed"] / res["elapsed"], 1),
        "statuses": res["statuses"],
        "client p50 ms": round(pct(res["client_ms"], 50), 2),
        "client p99 ms": round(pct(res["client_ms"], 99), 2),
        "server p99 ms": round(pct(res["server_ms"], 99), 2),
    }


# --------------------------------------------------------------------------- reload


def soak_reload(args: argparse.Namespace) -> dict[str, Any]:
    bodies = request_bodies(args.bundle, 500, 100)
    redis = RedisProcess().start() if args.reload_events == "redis" else None
    server = Server(args.bundle, workers=args.reload_workers, events=args.reload_events,
                    redis_url=redis.url if redis else None,
                    env={"RECSYS_ADMIN_TOKEN": TOKEN})  # fmt: skip
    rss0 = server.rss_mb()
    reloads: list[tuple[int, float]] = []
    stop = threading.Event()

    def reloader() -> None:
        with httpx.Client(base_url=f"http://{HOST}:{server.port}", timeout=120) as c:
            next_at = time.monotonic() + args.reload_every
            while not stop.wait(max(0.0, next_at - time.monotonic())):
                t = time.perf_counter()
                try:
                    auth = {"authorization": f"Bearer {TOKEN}"}
                    status = c.post("/v1/admin/reload", json={}, headers=auth).status_code
                except httpx.HTTPError:
                    status = 0
                reloads.append((status, time.perf_counter() - t))
                next_at += args.reload_every

    try:
        raws = [raw_request(server.port, "/v1/rank", b) for b in bodies]
        step = Step(server.port, raws, args.rate, args.seconds, 16)
        thread = threading.Thread(target=reloader)
        thread.start()
        res = step.result()
        stop.set()
        thread.join()
        rss1 = server.rss_mb()
    finally:
        server.stop()
        if redis is not None:
            redis.stop()
    return {
        "part": "reload",
        "workers": args.reload_workers,
        "events": args.reload_events,
        "rss MB before/after": f"{rss0:.0f}/{rss1:.0f}",
        "reloads": len(reloads),
        "reload statuses": {str(s): sum(1 for x, _ in reloads if x == s) for s, _ in reloads},
        "reload s p50/max": f"{pct([d for _, d in reloads], 50):.2f}/"
        f"{max((d for _, d in reloads), default=float('nan')):.2f}",
        **_summary(res),
        "failed": res["errors"],
        "load1": _load(),
    }


# --------------------------------------------------------------------------- health


def soak_health(args: argparse.Namespace) -> dict[str, Any]:
    explain = request_bodies(args.bundle, 50, 1000, explain=True)
    server = Server(args.bundle)
    try:
        raws = [raw_request(server.port, "/v1/rank", b) for b in explain]
        load = Step(server.port, raws, None, args.seconds + 2, args.explain_connections)
        time.sleep(1.0)  # the explain load is running before the probe starts
        probe = Step(server.port, [raw_request(server.port, "/healthz")], args.health_rate,
                     args.seconds, 1).result()  # fmt: skip
        res = load.result()
    finally:
        server.stop()
    return {
        "part": "health",
        "explain req/s": round(res["completed"] / res["elapsed"], 1),
        "explain client p50 ms": round(pct(res["client_ms"], 50), 1),
        "healthz probes": probe["completed"],
        "healthz p50 ms": round(pct(probe["client_ms"], 50), 2),
        "healthz p99 ms": round(pct(probe["client_ms"], 99), 2),
        "healthz max ms": round(max(probe["client_ms"], default=float("nan")), 2),
        "errors": res["errors"] + probe["errors"],
        "load1": _load(),
    }


# --------------------------------------------------------------------------- redis


def _probes(events: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """`n` /v1/rank bodies for users of `events`, candidates the items they were shown, at one
    moment after every event."""
    last = max(datetime.fromisoformat(e["ts"]) for e in events)
    at = (last + timedelta(seconds=1)).isoformat()
    shown = [e for e in events if e["type"] == "impression"]
    items = list(dict.fromkeys(i for e in shown for i in e["items"]))[:100]
    step = max(1, len(shown) // n)
    return [{"user_id": e["user_id"], "candidates": items, "k": len(items), "at": at}
            for e in shown[::step][:n]]  # fmt: skip


def _scores(port: int, body: dict[str, Any], fresh: bool) -> list[tuple[str, float]]:
    """The ranked (item, score) list; fresh=True: on a new connection (workers spread them)."""
    with httpx.Client(timeout=60) as c:
        r = c.post(f"http://{HOST}:{port}/v1/rank", json=body,
                   headers={"connection": "close"} if fresh else {})  # fmt: skip
        r.raise_for_status()
        return [(i["item_id"], i["score"]) for i in r.json()["items"]]


def _differ(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> float:
    if [i for i, _ in a] != [i for i, _ in b]:
        return float("inf")
    return max((abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True)), default=0.0)


def _redis_counts(redis: RedisProcess, prefix: str) -> dict[str, int]:
    """The id set's size, and the events in the stream and their distinct ids."""
    client = redis.client()
    try:
        tag = "{" + prefix + "}"
        ids = int(client.scard(f"{tag}:ids"))
        seen: list[str] = []
        for _, fields in client.xrange(f"{tag}:stream", "-", "+"):
            seen += [e["event_id"] for e in json.loads(fields[b"b"])]
    finally:
        client.close()
    return {"redis ids": ids, "stream events": len(seen), "stream distinct": len(set(seen))}


def soak_redis(args: argparse.Namespace) -> dict[str, Any]:
    users, items = catalogue(args.bundle)
    bodies = request_bodies(args.bundle, 500, 100)
    redis = RedisProcess().start()
    server = Server(args.bundle, workers=2, events="redis", redis_url=redis.url)
    try:
        raws = [raw_request(server.port, "/v1/rank", b) for b in bodies]
        feeder = EventFeeder(server.port, users, items, args.event_rate, tag="soak").start()
        step = Step(server.port, raws, args.redis_rate, args.seconds, 16)
        t0 = time.monotonic()
        time.sleep(args.seconds / 3)
        redis.stop()
        down_at = time.monotonic() - t0
        time.sleep(args.seconds / 3)
        redis.start()
        up_at = time.monotonic() - t0
        res = step.result()
        fed = feeder.stop()
        sent = fed["sent"]
        unique = len({e["event_id"] for e in sent})
        counts = _redis_counts(redis, f"bench{server.port}")
        # the reference: one worker without Redis, each event once
        ref = Server(args.bundle, events="log")
        try:
            with httpx.Client(timeout=120) as c:
                for i in range(0, len(sent), 1000):
                    r = c.post(f"http://{HOST}:{ref.port}/v1/events",
                               json={"events": sent[i : i + 1000]})  # fmt: skip
                    r.raise_for_status()
            probes = _probes(sent, args.probes)
            want = [_scores(ref.port, b, fresh=False) for b in probes]
        finally:
            ref.stop()
        # the workers follow the stream within milliseconds: poll until equal, with a deadline
        deadline = time.monotonic() + 30
        while True:
            diffs = [_differ(_scores(server.port, b, fresh=True), w)
                     for b, w in zip(probes * 3, want * 3, strict=True)]  # fmt: skip
            worst = max(diffs, default=0.0)
            if worst <= 1e-9 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        server.stop()
        redis.stop()
    five = sum(n for s, n in res["statuses"].items() if int(s) >= 500)
    return {
        "part": "redis",
        "redis down/up at s": f"{down_at:.1f}/{up_at:.1f}",
        **_summary(res),
        "rank 5xx": five,
        "rank connection errors": res["statuses"].get(0, 0),
        "event batches": fed["statuses"],
        "events sent": len(sent),
        "answers accepted/duplicates": f"{fed['accepted']}/{fed['duplicates']}",
        "events unique": unique,
        "events unsent": fed["unsent"],
        **counts,
        "probes x3": len(diffs),
        "max score diff vs reference": worst,
        "counted twice": counts["stream events"] != counts["stream distinct"]
        or counts["redis ids"] != unique
        or worst > 1e-9,
        "load1": _load(),
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", type=Path, default=Path("/tmp/serve-demo/run/bundles/current"))
    p.add_argument("--seconds", type=float, default=60.0, help="length of each part")
    p.add_argument("--parts", default="reload,health,redis")
    p.add_argument("--rate", type=float, default=500.0, help="reload: /v1/rank req/s")
    p.add_argument("--reload-every", type=float, default=2.0, help="reload: seconds")
    p.add_argument("--reload-workers", type=int, default=2)
    p.add_argument(
        "--reload-events",
        choices=("off", "log", "redis"),
        default="off",
        help="reload: events off, in process (one worker) or through Redis",
    )
    p.add_argument("--health-rate", type=float, default=50.0, help="health: probes per second")
    p.add_argument("--explain-connections", type=int, default=4)
    p.add_argument("--redis-rate", type=float, default=300.0, help="redis: /v1/rank req/s")
    p.add_argument("--event-rate", type=float, default=1000.0, help="redis: events/s")
    p.add_argument("--probes", type=int, default=10, help="redis: score comparisons (x3)")
    p.add_argument("--save", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if not (args.bundle / "manifest.json").is_file():
        raise SystemExit(f"{args.bundle}: not a model bundle; build one with `recsys demo`")
    parts = {"reload": soak_reload, "health": soak_health, "redis": soak_redis}
    chosen = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = set(chosen) - set(parts)
    if bad:
        raise SystemExit(f"--parts: unknown {sorted(bad)}; use {', '.join(parts)}")
    print(f"cpus: {os.cpu_count()}  load average before start: {_load():.2f}")
    results = []
    for name in chosen:
        out = parts[name](args)
        results.append(out)
        print(json.dumps(out), flush=True)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        doc = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "results": results}
        tmp = args.save.with_name(args.save.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
