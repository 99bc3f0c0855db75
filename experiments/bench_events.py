"""Events benchmark: real traffic replayed through the real API, ingestion speed, and /v1/rank
latency while events stream in.

    .venv/bin/python -m experiments.bench_events --data /tmp/bl/data/ebnerd \
        --split-at 2023-05-25T07:00:00 [--out /tmp/bench-events] [--impressions N]

`--data` is an imported data set with impressions (`recsys import --format mind
../shared/data/ebnerd-demo --out DIR`). Steps, each printing a table:

1. Bundle: the data before `--split-at` only (items seen before it; `recsys nightly` on it, its own
   split inside), so the bundle knows nothing of the traffic after the split.
2. Replay: `recsys serve --bundle B --event-log LOG` in a subprocess. For every impression after
   the split, in time order: `item` events for articles the server has not seen, `POST /v1/rank`
   (`at` = its time, its user, its shown list as candidates; history first listed after the
   split goes in before as click events),
   then its `impression` event and a `click` event per clicked item. AUC / MRR / nDCG@10 from the
   API's own scores, beside the same bundle's online ranker on the offline point-in-time features
   (a) of the imported data set and (b) of the data set the event log imports to (`recsys import
   --format events LOG --base WEEK1`: a click there also extends the history, as in the API),
   with paired differences and standard errors over impressions, and two baselines (smoothed CTR,
   clicks in the last 24 hours as of each impression).
   2a. The same replay against `--redis-workers` workers (default 2) sharing a private
   redis-server, a new connection per request (events land on one worker, ranks on another):
   its AUC and scores beside the one-worker replay's.
   2b. The same impressions against `recsys serve --bundle B --no-events`, with and without
   `at` (no events: the candidates' texts where the bundle lacks them), beside the bundle's
   batch ranker on features as of its cut-off: a server that cannot keep features fresh must
   serve the batch ranker, whatever the request says.
   2c. A silent event feed: the same requests (with `at`) against the default server (events
   on, its own empty log) that is sent no event: once the live state has heard nothing for
   longer than its limit it must rank as 2b does (`api_silent` beside `api_off_at`).
3. Ingestion: batches of 100 events (impressions of 10 items and clicks on them) by POST
   /v1/events from one client process, then four, and by `EventStore.ingest` in this process
   (no HTTP): events per second and the server time per batch.
4. Latency: /v1/rank with 100 candidates (Server-Timing, server time) while a thread posts
   1,000 events/s, beside the same without ingestion.
Peak resident memory of the server (VmHWM) and of this process is printed at the end.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import polars as pl

from experiments.bench_quality import _table
from recsys.data.dataset import Dataset, read_dataset, write_dataset
from recsys.metrics import evaluation_table, paired_difference

HOST = "127.0.0.1"


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def week_before(data: Dataset, cut: datetime) -> Dataset:
    """The data set as it was at `cut`: events before it, the items they name (or published)."""
    imp = data.impressions.filter(pl.col("ts") < cut)
    inter = data.interactions.filter(pl.col("ts").is_null() | (pl.col("ts") < cut))
    seen = pl.concat([imp["item_id"], inter["item_id"]]).unique().implode()
    items = data.items.filter(pl.col("item_id").is_in(seen) | (pl.col("published_at") < cut))
    return Dataset(items, inter, imp)


class Server:
    """`recsys serve` in a subprocess on a free port, with an event log (`log_dir`) or with
    events off (None: `--no-events`)."""

    def __init__(self, bundle: Path, log_dir: Path | None) -> None:
        sock = socket.socket()
        sock.bind((HOST, 0))
        self.port = sock.getsockname()[1]
        sock.close()
        env = {**os.environ, "RECSYS_ACCESS_LOG": "false", "RECSYS_LOG_LEVEL": "warning"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "recsys.cli", "serve", "--bundle", str(bundle),
             *(["--event-log", str(log_dir)] if log_dir else ["--no-events"]),
             "--port", str(self.port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.url = f"http://{HOST}:{self.port}"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise RuntimeError(f"server exited: {err[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not get ready in 10 minutes")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def _server_ms(r: httpx.Response) -> float:
    timing = r.headers.get("server-timing", "")
    return float(timing.split("dur=")[1]) if "dur=" in timing else float("nan")


def replay(
    url: str, data: Dataset, cut: datetime, known_items: set[str], limit: int | None,
    fresh_connections: bool = False,
) -> tuple[pl.DataFrame, dict[str, Any]]:  # fmt: skip
    """Step 2 against the server at `url`; returns (impression_id, item_id, clicked, api score)
    and timing. fresh_connections: a new connection per request, so that a server with several
    workers takes each call on whichever worker accepts it (events on one, ranks on another)."""
    after = _after(data, cut, limit)
    items = data.items.select("item_id", "title", "description", "category", "subcategory")
    text = {r["item_id"]: r for r in items.to_dicts()}
    # History first listed after the cut-off (EB-NeRD: clicks from before the log, dated just
    # before the user's first impression): sent as click events, so the API and both offline
    # data sets hold it at the same moment.
    late = data.interactions.filter(pl.col("ts") >= cut).sort("ts")
    late_by_user: dict[str, list[tuple[datetime, str]]] = {}
    for u, i, t in late.select("user_id", "item_id", "ts").iter_rows():
        late_by_user.setdefault(u, []).append((t, i))
    seen = set(known_items)
    scores: list[float] = []
    rank_ms: list[float] = []
    n_events = 0
    t0 = time.perf_counter()
    keep = 0 if fresh_connections else 20  # httpx's default keeps 20
    with httpx.Client(timeout=120, limits=httpx.Limits(max_keepalive_connections=keep)) as c:
        for (imp,), rows in after.group_by("impression_id", maintain_order=True):
            user, ts = rows["user_id"][0], rows["ts"][0]
            shown = rows["item_id"].to_list()
            history = late_by_user.pop(user, [])
            fresh = [i for i in dict.fromkeys([*(i for _, i in history), *shown]) if i not in seen]
            if fresh:
                ev = [
                    {"event_id": f"item-{i}", "type": "item", "ts": _iso(ts),
                     **{k: v for k, v in text[i].items() if v is not None}}
                    for i in fresh
                ]  # fmt: skip
                r = c.post(f"{url}/v1/events", json={"events": ev})
                r.raise_for_status()
                seen.update(fresh)
                n_events += len(ev)
            if history:
                ev = [{"event_id": f"hist-{user}-{n}", "type": "click", "ts": _iso(t),
                       "user_id": user, "item_id": i}
                      for n, (t, i) in enumerate(history)]  # fmt: skip
                for b in range(0, len(ev), 1000):
                    r = c.post(f"{url}/v1/events", json={"events": ev[b : b + 1000]})
                    r.raise_for_status()
                n_events += len(ev)
            body = {"user_id": user, "candidates": shown, "at": _iso(ts)}
            r = c.post(f"{url}/v1/rank", json=body)
            r.raise_for_status()
            rank_ms.append(_server_ms(r))
            got = {i["item_id"]: i["score"] for i in r.json()["items"]}
            scores += [got[i] for i in shown]
            ev = [{"event_id": f"imp-{imp}", "type": "impression", "ts": _iso(ts),
                   "user_id": user, "request_id": str(imp), "items": shown}]  # fmt: skip
            ev += [{"event_id": f"click-{imp}-{i}", "type": "click", "ts": _iso(ts),
                    "user_id": user, "item_id": i, "request_id": str(imp)}
                   for i in rows.filter(pl.col("clicked"))["item_id"].to_list()]  # fmt: skip
            r = c.post(f"{url}/v1/events", json={"events": ev})
            r.raise_for_status()
            n_events += len(ev)
    seconds = time.perf_counter() - t0
    out = after.select("impression_id", "user_id", "item_id", "clicked", "ts").with_columns(
        pl.Series("api", scores)
    )
    ms = np.array(rank_ms)
    timing = {"impressions": out["impression_id"].n_unique(), "events": n_events,
              "seconds": seconds, "rank_p50_ms": float(np.nanpercentile(ms, 50)),
              "rank_p99_ms": float(np.nanpercentile(ms, 99))}  # fmt: skip
    return out, timing


def replay_with_redis(
    bundle: Path, data: Dataset, cut: datetime, known_items: set[str], limit: int | None,
    workers: int,
) -> pl.DataFrame:  # fmt: skip
    """Step 2c: the replay against `workers` workers sharing their live state through a private
    redis-server, a new connection per request; returns `replay`'s rows and scores."""
    from experiments.loadgen import HOST as LG_HOST
    from experiments.loadgen import RedisProcess
    from experiments.loadgen import Server as LgServer

    redis = RedisProcess().start()
    try:
        server = LgServer(bundle, workers=workers, events="redis", redis_url=redis.url)
        try:
            rows, _ = replay(f"http://{LG_HOST}:{server.port}", data, cut, known_items, limit,
                             fresh_connections=True)  # fmt: skip
        finally:
            server.stop()
    finally:
        redis.stop()
    return rows


def replay_without_events(
    server: Server, data: Dataset, cut: datetime, known_items: set[str], limit: int | None,
    with_at: bool,
) -> pl.DataFrame:  # fmt: skip
    """Step 2b: the same impressions against a server with events off, as a storefront without
    an event feed asks: its user, its shown list as candidates, the text of every candidate the
    bundle does not know, and `at` = its time or nothing. Returns the API's scores in the
    order of `replay`'s rows."""
    after = _after(data, cut, limit)
    items = data.items.select("item_id", "title", "description", "category", "subcategory")
    text = {r["item_id"]: {k: v for k, v in r.items() if v is not None} for r in items.to_dicts()}
    scores: list[float] = []
    with httpx.Client(timeout=120) as c:
        for _, rows in after.group_by("impression_id", maintain_order=True):
            shown = rows["item_id"].to_list()
            new = [text[i] for i in shown if i not in known_items]
            body: dict[str, Any] = {
                "user_id": rows["user_id"][0],
                "candidates": shown,
                "items": new,
            }
            if with_at:
                body["at"] = _iso(rows["ts"][0])
            r = c.post(f"{server.url}/v1/rank", json=body)
            r.raise_for_status()
            got = {i["item_id"]: i["score"] for i in r.json()["items"]}
            scores += [got[i] for i in shown]
    return after.select("impression_id", "user_id", "item_id", "clicked", "ts").with_columns(
        pl.Series("api", scores)
    )


def silent_feed(
    bundle: Path, data: Dataset, cut: datetime, known_items: set[str], limit: int | None,
    out: Path, batch: pl.DataFrame,
) -> None:  # fmt: skip
    """Step 2c: the default server (events on, its own empty log), sent no event, asked with
    `at`; its AUC beside `batch`'s api_off_at (the --no-events server with `at`) and, where
    `batch` has it, api_events (the replay with events)."""
    print("\n## A silent event feed: the default server (events on), no event sent, `at` on "
          "every request")  # fmt: skip
    log_dir = out / "events-silent"
    shutil.rmtree(log_dir, ignore_errors=True)
    server = Server(bundle, log_dir)
    try:
        silent = replay_without_events(server, data, cut, known_items, limit, True)
        ready = httpx.get(f"{server.url}/readyz", timeout=30).json()
    finally:
        server.stop()
    print(f"/readyz after the replay: stale {ready.get('stale')}, last event "
          f"{ready.get('last_event')}, stale since {ready.get('stale_since')}, limit "
          f"{ready.get('max_event_lag_s')} s")  # fmt: skip
    others = [c for c in ("api_off_at", "api_events") if c in batch.columns]
    quiet = batch.select("impression_id", "user_id", "item_id", "clicked", *others).with_columns(
        silent["api"].alias("api_silent")
    )
    _report(quiet, ["api_silent", *others], "api_off_at", out / "replay_scores_silent.parquet",
            [("api_silent", "api_off_at")])  # fmt: skip


def offline_batch_scores(
    bundle_dir: Path, data: Dataset, rows: pl.DataFrame, known_items: set[str]
) -> np.ndarray:
    """The bundle's batch ranker on the nightly's batch test path: every row's features as of
    the bundle's cut-off by the offline point-in-time code (`point_in_time_frame`), one
    request per impression, items it does not know embedded by its encoder as the API embeds
    a request's item texts (serving.embedding.Embedder)."""
    import dataclasses

    from recsys.bundle import Bundle
    from recsys.evaluation import requests
    from recsys.featurize import ONLINE, matrix, point_in_time_frame
    from serving.embedding import Embedder
    from serving.schemas import ItemText

    bundle = Bundle.load(bundle_dir)
    vectors = None
    new_ids = sorted(set(rows["item_id"].to_list()) - known_items)
    if bundle.spec.use_semantic:
        vectors = bundle.vectors
        if new_ids:
            texts = data.items.filter(pl.col("item_id").is_in(new_ids)).sort("item_id")
            todo = [ItemText(**{k: v for k, v in r.items() if v is not None})
                    for r in texts.select("item_id", "title", "description", "category",
                                          "subcategory").to_dicts()]  # fmt: skip
            new = Embedder(bundle, semantic=True).embed_texts(todo)
            vectors = vectors.extended(new.ids, new.matrix, new.frozen)
    as_of = pl.lit(bundle.snapshot.as_of).cast(pl.Datetime("us", "UTC"))
    req = requests(rows).with_columns(as_of.alias("ts"))  # the cut-off: moved already
    spec = dataclasses.replace(bundle.spec, refresh=ONLINE)
    frame = point_in_time_frame(spec, req, data, vectors)
    return np.asarray(bundle.ranker.predict(matrix(frame, bundle.spec.columns)))


def _after(data: Dataset, cut: datetime, limit: int | None) -> pl.DataFrame:
    """The impressions after `cut` in replay order (the first `limit` impressions)."""
    after = data.impressions.filter(pl.col("ts") >= cut).sort("ts", "impression_id", "position")
    if limit:
        keep = after["impression_id"].unique(maintain_order=True).head(limit).implode()
        after = after.filter(pl.col("impression_id").is_in(keep))
    return after


def offline_scores(bundle_dir: Path, data: Dataset, rows: pl.DataFrame) -> pl.DataFrame:
    """The bundle's online ranker and two baselines on point-in-time features of `data`."""
    from recsys.bundle import Bundle
    from recsys.featurize import matrix, point_in_time_frame

    bundle = Bundle.load(bundle_dir)
    spec = bundle.online_spec or bundle.spec
    ranker = bundle.online_ranker or bundle.ranker
    req = rows.select(pl.col("impression_id").alias("request_id"), "user_id", "ts", "item_id")
    frame = point_in_time_frame(spec, req, data, bundle.vectors if spec.use_semantic else None)
    return pl.DataFrame(
        {
            "score": ranker.predict(matrix(frame, spec.columns)),
            "smoothed_ctr": frame["item_ctr_all"].cast(pl.Float64).fill_null(0.0).to_numpy(),
            "recent_clicks": frame["item_clicks_24h"].cast(pl.Float64).fill_null(0.0).to_numpy(),
        }
    )


def _ingest_batches(
    users: list[str], items: list[str], start: datetime, tag: str, n: int
) -> list[list[dict[str, Any]]]:
    """n batches of 100 events: an impression of 10 items, then clicks on 9 of them, x10."""
    out = []
    for b in range(n):
        batch: list[dict[str, Any]] = []
        for j in range(100):
            k = (b * 100 + j) % len(users)
            ts = _iso(start + timedelta(seconds=b + j / 100))
            rid = f"{tag}-r{b}-{j - j % 10}"
            if j % 10 == 0:
                shown = list(dict.fromkeys(items[k : k + 10]))
                batch.append({"event_id": f"{tag}-{b}-{j}", "type": "impression", "ts": ts,
                              "user_id": users[k], "request_id": rid, "items": shown})  # fmt: skip
            else:
                batch.append({"event_id": f"{tag}-{b}-{j}", "type": "click", "ts": ts,
                              "user_id": users[k - j % 10], "item_id": items[k],
                              "request_id": rid})  # fmt: skip
        out.append(batch)
    return out


def _client(url: str, batches: list[list[dict[str, Any]]], ready: Any, go: Any, q: Any) -> None:
    """One load-generating process: post its batches once `go` is set; report server times."""
    with httpx.Client(timeout=60) as c:
        c.get(f"{url}/healthz")
        ready.put(1)
        go.wait()
        ms = []
        for ev in batches:
            r = c.post(f"{url}/v1/events", json={"events": ev})
            assert r.json()["accepted"] == len(ev), r.text
            ms.append(_server_ms(r))
    q.put(ms)


def ingest_rates(server: Server, data: Dataset, start: datetime) -> list[dict[str, Any]]:
    """Step 3 over HTTP: 1 and 4 client processes (threads would measure the client's own
    interpreter lock), 40,000 events each time; events/s seen by the clients, and the server
    time per batch."""
    import multiprocessing as mp

    rows = data.impressions.head(60_000)
    users, items = rows["user_id"].to_list(), rows["item_id"].to_list()
    ctx = mp.get_context("spawn")
    results = []
    for clients in (1, 4):
        batches = _ingest_batches(users, items, start + timedelta(days=clients), f"h{clients}", 400)
        ready, q, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=_client, args=(server.url, batches[i::clients], ready, go, q))
                 for i in range(clients)]  # fmt: skip
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=120)
        t0 = time.perf_counter()
        go.set()
        ms = np.array([m for _ in procs for m in q.get(timeout=600)])
        s = time.perf_counter() - t0
        for p in procs:
            p.join()
        results.append({"path": f"HTTP, {clients} client process(es)", "events": 40_000,
                        "seconds": s, "events_per_s": 40_000 / s,
                        "server_ms_p50": float(np.percentile(ms, 50)),
                        "server_ms_p99": float(np.percentile(ms, 99))})  # fmt: skip
    return results


def ingest_in_process(
    bundle_dir: Path, data: Dataset, start: datetime, tmp: Path
) -> dict[str, Any]:
    from recsys.bundle import Bundle
    from serving.events import EventStore
    from serving.ranking import ServingModel

    model = ServingModel.from_bundle(Bundle.load(bundle_dir), preload_encoder=False)
    store = EventStore(tmp / "events-in-process")
    rows = data.impressions.head(60_000)
    batches = _ingest_batches(rows["user_id"].to_list(), rows["item_id"].to_list(), start,
                              "p", 400)  # fmt: skip
    ms = []
    t0 = time.perf_counter()
    for ev in batches:
        t = time.perf_counter()
        store.ingest(lambda: model, ev)
        ms.append((time.perf_counter() - t) * 1000)
    s = time.perf_counter() - t0
    return {"path": "EventStore.ingest (no HTTP)", "events": 40_000, "seconds": s,
            "events_per_s": 40_000 / s, "server_ms_p50": float(np.percentile(ms, 50)),
            "server_ms_p99": float(np.percentile(ms, 99))}  # fmt: skip


def latency(server: Server, data: Dataset, start: datetime, seconds: float) -> list[dict[str, Any]]:
    """Step 4: /v1/rank server time with 100 candidates, idle and while ingesting 1,000/s."""
    users = data.impressions["user_id"].unique().sort().head(2000).to_list()
    items = data.items["item_id"].to_list()
    rng = np.random.default_rng(0)
    out = []
    for ingesting in (False, True):
        stop = threading.Event()
        sent = [0]

        def feed(
            tag: str = f"lat{int(ingesting)}", stop: threading.Event = stop, sent: list[int] = sent
        ) -> None:
            with httpx.Client(timeout=60) as c:
                b = 0
                while not stop.is_set():
                    t = time.perf_counter()
                    ts = _iso(start + timedelta(seconds=b))
                    ev = [{"event_id": f"{tag}-{b}-{j}", "type": "click", "ts": ts,
                           "user_id": users[j], "item_id": items[(b * 100 + j) % len(items)]}
                          for j in range(100)]  # fmt: skip
                    c.post(f"{server.url}/v1/events", json={"events": ev})
                    sent[0] += 100
                    b += 1
                    time.sleep(max(0.0, 0.1 - (time.perf_counter() - t)))

        feeder = threading.Thread(target=feed) if ingesting else None
        if feeder:
            feeder.start()
        ms = []
        t0 = time.perf_counter()
        with httpx.Client(timeout=60) as c:
            while time.perf_counter() - t0 < seconds:
                cands = [items[i] for i in rng.choice(len(items), 100, replace=False)]
                body = {"user_id": users[int(rng.integers(len(users)))], "candidates": cands,
                        "k": 20, "at": _iso(start + timedelta(hours=1))}  # fmt: skip
                ms.append(_server_ms(c.post(f"{server.url}/v1/rank", json=body)))
        elapsed = time.perf_counter() - t0
        stop.set()
        if feeder:
            feeder.join()
        a = np.array(ms)
        out.append({"ingesting": f"{sent[0] / elapsed:.0f} events/s" if ingesting else "none",
                    "requests": len(ms), "p50_ms": float(np.percentile(a, 50)),
                    "p99_ms": float(np.percentile(a, 99))})  # fmt: skip
    return out


def _report(
    scores: pl.DataFrame, models: list[str], versus: str, path: Path, pairs: list[tuple[str, str]]
) -> None:
    """Write `scores`, print the evaluation table of `models` (differences to `versus`), then
    for each (a, b) of `pairs` the paired AUC difference and the largest score gap."""
    scores.write_parquet(path)
    table = evaluation_table(scores, models, versus=[versus]).to_dicts()
    print(_table(table, ["model", "auc", "auc_diff", "auc_diff_se", "mrr", "ndcg@10",
                         "n_impressions"]))  # fmt: skip
    for a, b in pairs:
        d, se = paired_difference(scores, a, b)
        gap = float((scores[a] - scores[b]).abs().max())  # type: ignore[arg-type]
        print(f"{a} - {b}: AUC {d:+.4f} (paired se {se:.4f}); max |score diff| {gap:.2e}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--split-at", required=True)
    p.add_argument("--out", default="/tmp/bench-events")
    p.add_argument("--impressions", type=int, default=None, help="replay only the first N")
    p.add_argument("--latency-seconds", type=float, default=20.0)
    p.add_argument("--redis-workers", type=int, default=2,
                   help="also replay against this many workers sharing a private redis-server "
                        "(0: skip)")  # fmt: skip
    p.add_argument(
        "--silent-only",
        action="store_true",
        help="only steps 2b (with `at`) and 2c: a silent feed against --no-events",
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    cut = datetime.fromisoformat(args.split_at).replace(tzinfo=UTC)
    data = read_dataset(args.data)
    week1_dir, run_dir = out / "week1", out / "run"
    bundle = run_dir / "bundles" / "current"
    t0 = time.perf_counter()
    if not bundle.exists():
        write_dataset(week1_dir, week_before(data, cut), source={"before": args.split_at})
        subprocess.run([sys.executable, "-m", "recsys.cli", "nightly", "--data", str(week1_dir),
                        "--out", str(run_dir)], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        print(f"bundle on the data before {cut.isoformat()}: {time.perf_counter() - t0:.0f} s")
    week1 = read_dataset(week1_dir)
    log_dir = out / "events"
    shutil.rmtree(log_dir, ignore_errors=True)
    if args.silent_only:
        from recsys.bundle import Bundle

        known = set(Bundle.load(bundle).vectors.ids)
        off = Server(bundle, None)
        try:
            with_at = replay_without_events(off, data, cut, known, args.impressions, True)
        finally:
            off.stop()
        silent_feed(bundle, data, cut, known, args.impressions, out,
                    with_at.rename({"api": "api_off_at"}))  # fmt: skip
        return 0

    server = Server(bundle, log_dir)
    try:
        from recsys.bundle import Bundle

        known = set(Bundle.load(bundle).vectors.ids)
        rows, timing = replay(server.url, data, cut, known, args.impressions)
        print(
            f"\n## Replay through the API ({timing['impressions']} impressions, "
            f"{timing['events']} events, {timing['seconds']:.0f} s; /v1/rank server time "
            f"p50 {timing['rank_p50_ms']:.2f} ms, p99 {timing['rank_p99_ms']:.2f} ms)"
        )
        logged_dir = out / "from-log"
        subprocess.run([sys.executable, "-m", "recsys.cli", "import", "--format", "events",
                        str(log_dir), "--base", str(week1_dir), "--out", str(logged_dir)],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        a = offline_scores(bundle, data, rows)
        b = offline_scores(bundle, read_dataset(logged_dir), rows)
        scores = rows.with_columns(
            a["score"].alias("offline_data"), b["score"].alias("offline_log"),
            a["smoothed_ctr"], a["recent_clicks"],
        )  # fmt: skip
        models = ["api", "offline_log", "offline_data", "smoothed_ctr", "recent_clicks"]
        _report(scores, models, "recent_clicks", out / "replay_scores.parquet",
                [("api", "offline_log"), ("api", "offline_data")])  # fmt: skip

        if args.redis_workers:
            shared = replay_with_redis(bundle, data, cut, known, args.impressions,
                                       args.redis_workers)  # fmt: skip
            print(f"\n## The same replay against {args.redis_workers} workers sharing Redis "
                  "(a new connection per request)")  # fmt: skip
            both = scores.select("impression_id", "user_id", "item_id", "clicked").with_columns(
                scores["api"].alias("api_1_worker"), shared["api"].alias("api_redis")
            )
            pair = [("api_redis", "api_1_worker")]
            _report(both, ["api_redis", "api_1_worker"], "api_1_worker",
                    out / "replay_scores_redis.parquet", pair)  # fmt: skip

        print("\n## Replay through the API with events off (`recsys serve --no-events`)")
        off = Server(bundle, None)
        try:
            with_at = replay_without_events(off, data, cut, known, args.impressions, True)
            without_at = replay_without_events(off, data, cut, known, args.impressions, False)
        finally:
            off.stop()
        batch = scores.select("impression_id", "user_id", "item_id", "clicked").with_columns(
            with_at["api"].alias("api_off_at"), without_at["api"].alias("api_off"),
            pl.Series("offline_batch", offline_batch_scores(bundle, data, rows, known)),
            scores["api"].alias("api_events"), scores["smoothed_ctr"],
        )  # fmt: skip
        models = ["api_off_at", "api_off", "offline_batch", "api_events", "smoothed_ctr"]
        _report(batch, models, "offline_batch", out / "replay_scores_no_events.parquet",
                [("api_off_at", "offline_batch"), ("api_off", "offline_batch")])  # fmt: skip

        silent_feed(bundle, data, cut, known, args.impressions, out, batch)

        print("\n## Ingestion (batches of 100 events)")
        rates = ingest_rates(server, week1, cut + timedelta(days=30))
        rates.append(ingest_in_process(bundle, week1, cut + timedelta(days=60), out))
        print(_table(rates, ["path", "events", "seconds", "events_per_s", "server_ms_p50",
                             "server_ms_p99"]))  # fmt: skip

        print("\n## /v1/rank with 100 candidates (server time)")
        lat = latency(server, week1, cut + timedelta(days=90), args.latency_seconds)
        print(_table(lat, ["ingesting", "requests", "p50_ms", "p99_ms"]))
        print(f"\npeak RSS: server {server.peak_rss_mb():.0f} MB, benchmark process "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")  # fmt: skip
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
