"""Prometheus metrics of the API (prometheus_client), aggregated over every worker process.

    recsys_http_requests_total{route, method, status}      counter
    recsys_http_request_duration_seconds{route}            histogram (time inside the app)
    recsys_model_info{model_version}                       gauge, 1 for a version serving
    recsys_model_loaded                                    gauge, 1 once a bundle serves (every
                                                           worker: the minimum over them)
    recsys_model_reloads_total{result="ok"|"error"}        counter
    recsys_unhandled_errors_total                          counter (bugs answered with a 503)
    recsys_events_total{result="accepted"|"duplicate"|"rejected"}   counter (POST /v1/events)
    recsys_live_items                                      gauge, items that came as events

With several workers (`recsys serve --workers N`) the server points PROMETHEUS_MULTIPROC_DIR at
an empty folder of its own before the workers start: each worker's prometheus_client writes its
values to memory-mapped files there, and a scrape of any worker sums the counters and histograms
of all of them (gauges: see each one's mode). Without it (one process) the values live in memory.

A request costs one counter and one histogram update on children cached per label set (no label
lookup on the hot path).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

disable_created_metrics()  # no `_created` series: what a scrape shows is what this module lists

BUCKETS = (
    0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess() -> bool:
    """Whether this process writes its metrics to the shared folder (set before start)."""
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics:
    """The API's metrics; safe to update from several threads. Each instance has its own
    registry (tests run several apps in one process); render() reads the shared folder
    instead when the process runs as one of several workers."""

    def __init__(self, buckets: tuple[float, ...] = BUCKETS) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter("recsys_http_requests",
                                 "HTTP requests by route, method and status.",
                                 ["route", "method", "status"], registry=r)  # fmt: skip
        self._latency = Histogram("recsys_http_request_duration_seconds",
                                  "Time inside the app per request.", ["route"],
                                  buckets=buckets, registry=r)  # fmt: skip
        self._info = Gauge("recsys_model_info", "The model version being served (value 1).",
                           ["model_version"], registry=r, multiprocess_mode="livemax")  # fmt: skip
        self._loaded = Gauge("recsys_model_loaded", "1 once a model bundle is serving, else 0.",
                             registry=r, multiprocess_mode="livemin")  # fmt: skip
        self._reloads = Counter("recsys_model_reloads", "Admin reloads by result.", ["result"],
                                registry=r)  # fmt: skip
        self._unhandled = Counter("recsys_unhandled_errors",
                                  "Requests failed by an unexpected error.",
                                  registry=r)  # fmt: skip
        self._events = Counter("recsys_events", "Events by result (POST /v1/events).",
                               ["result"], registry=r)  # fmt: skip
        self._live_items = Gauge("recsys_live_items", "Items that came as events (live catalogue).",
                                 registry=r, multiprocess_mode="livemax")  # fmt: skip
        self._stale = Gauge("recsys_live_stale",
                            "1 while the live state has heard no impression or click for longer "
                            "than its limit before the latest moment asked (/v1/rank ranks as "
                            "the batch path), else 0.", registry=r,
                            multiprocess_mode="livemax")  # fmt: skip
        self._last_event = Gauge("recsys_live_last_event_timestamp_seconds",
                                 "The newest impression or click the live state holds (Unix "
                                 "time; the cut-off before any).", registry=r,
                                 multiprocess_mode="livemax")  # fmt: skip
        self._stale_ranks = Counter("recsys_rank_stale",
                                    "/v1/rank requests ranked as the batch path because the "
                                    "live state was stale.", registry=r)  # fmt: skip
        for result in ("ok", "error"):
            self._reloads.labels(result)
        for result in ("accepted", "duplicate", "rejected"):
            self._events.labels(result)
        self._loaded.set(0)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._lock = threading.Lock()
        self._version: str | None = None

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """One finished request: its route template, method, status code and time in the app."""
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self._requests.labels(route, method, str(status)),
                self._latency.labels(route),
            )
        children[0].inc()
        children[1].observe(seconds)

    def model_loaded(self, version: str) -> None:
        with self._lock:
            if self._version is not None and self._version != version:
                self._info.labels(self._version).set(0)  # 0, not removed: workers share files
            self._version = version
            self._info.labels(version).set(1)
            self._loaded.set(1)

    def reload(self, ok: bool) -> None:
        self._reloads.labels("ok" if ok else "error").inc()

    def unhandled_error(self) -> None:
        self._unhandled.inc()

    def events(self, accepted: int, duplicates: int, rejected: int) -> None:
        """One POST /v1/events batch's outcome."""
        for result, n in (("accepted", accepted), ("duplicate", duplicates),
                          ("rejected", rejected)):  # fmt: skip
            if n:
                self._events.labels(result).inc(n)

    def live_items(self, n: int) -> None:
        self._live_items.set(n)

    def live_freshness(self, stale: bool, last_event: float) -> None:
        """The live state's freshness (LiveState.freshness): stale or not, its newest event."""
        self._stale.set(1 if stale else 0)
        self._last_event.set(last_event)

    def stale_rank(self) -> None:
        """One /v1/rank ranked as the batch path because the live state was stale."""
        self._stale_ranks.inc()

    def render(self) -> str:
        """The exposition text (0.0.4; ends with a newline): every worker's, summed, when
        several share the multiprocess folder, else this process's."""
        if multiprocess():
            from prometheus_client.multiprocess import MultiProcessCollector

            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry).decode()
        return generate_latest(self.registry).decode()


def parse_histogram(text: str, name: str, labels: dict[str, str]) -> list[tuple[float, int]]:
    """(upper bound, cumulative count) pairs of one histogram in exposition `text`, in order;
    +Inf as float('inf'). For the benchmark and tests."""
    want = [f'{k}="{_label(v)}"' for k, v in labels.items()]
    out = []
    for line in text.splitlines():
        if not line.startswith(f"{name}_bucket{{"):
            continue
        inside, _, value = line.rpartition("} ")
        if not all(w in inside for w in want):
            continue
        le = inside.split('le="', 1)[1].split('"', 1)[0]
        out.append((float("inf") if le == "+Inf" else float(le), int(float(value))))
    out.sort(key=lambda b: b[0])
    return out


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def histogram_quantile(buckets: list[tuple[float, int]], q: float) -> float:
    """The q-quantile from cumulative buckets, interpolated linearly inside the bucket
    (Prometheus' histogram_quantile); NaN when empty."""
    if not buckets or buckets[-1][1] == 0:
        return float("nan")
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_c = 0.0, 0
    for le, c in buckets:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le
