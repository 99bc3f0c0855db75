"""Prometheus metrics of one server process, rendered as the text exposition format (0.0.4).

    recsys_http_requests_total{route, method, status}      counter
    recsys_http_request_duration_seconds{route}            histogram (time inside the app)
    recsys_model_info{model_version}                       gauge, 1 for the version serving
    recsys_model_loaded                                    gauge, 1 once a bundle serves
    recsys_model_reloads_total{result="ok"|"error"}        counter
    recsys_unhandled_errors_total                          counter (bugs answered with a 500)

Each worker process keeps its own numbers (with --workers N, a scrape sees one of them).
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

BUCKETS = (
    0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


_HIST = "recsys_http_request_duration_seconds"


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last: above the largest bucket
        self.total = 0.0
        self.n = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.total += seconds
        self.n += 1


class Metrics:
    """Counters and histograms of one process; safe to update from several threads."""

    def __init__(self, buckets: tuple[float, ...] = BUCKETS) -> None:
        self._lock = threading.Lock()
        self._buckets = buckets
        self._requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self._latency: dict[str, _Histogram] = {}
        self._reloads: dict[str, int] = {"ok": 0, "error": 0}
        self._unhandled = 0
        self._version: str | None = None

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """One finished request: its route template, method, status code and time in the app."""
        with self._lock:
            self._requests[(route, method, str(status))] += 1
            hist = self._latency.get(route)
            if hist is None:
                hist = self._latency[route] = _Histogram(self._buckets)
            hist.observe(seconds)

    def model_loaded(self, version: str) -> None:
        with self._lock:
            self._version = version

    def reload(self, ok: bool) -> None:
        with self._lock:
            self._reloads["ok" if ok else "error"] += 1

    def unhandled_error(self) -> None:
        with self._lock:
            self._unhandled += 1

    def render(self) -> str:
        """The exposition text (ends with a newline)."""
        with self._lock:
            lines = [
                "# HELP recsys_http_requests_total HTTP requests by route, method and status.",
                "# TYPE recsys_http_requests_total counter",
            ]
            for (route, method, status), n in sorted(self._requests.items()):
                lines.append(
                    f'recsys_http_requests_total{{route="{_label(route)}",method="{method}",'
                    f'status="{status}"}} {n}'
                )
            lines += [
                "# HELP recsys_http_request_duration_seconds Time inside the app per request.",
                "# TYPE recsys_http_request_duration_seconds histogram",
            ]
            for route, h in sorted(self._latency.items()):
                r = _label(route)
                cum = 0
                for le, c in zip(self._buckets, h.counts, strict=False):
                    cum += c
                    lines.append(f'{_HIST}_bucket{{route="{r}",le="{le}"}} {cum}')
                lines.append(
                    f'recsys_http_request_duration_seconds_bucket{{route="{r}",le="+Inf"}} {h.n}'
                )
                lines.append(f'recsys_http_request_duration_seconds_sum{{route="{r}"}} {h.total!r}')
                lines.append(f'recsys_http_request_duration_seconds_count{{route="{r}"}} {h.n}')
            lines += [
                "# HELP recsys_model_info The model version being served (value 1).",
                "# TYPE recsys_model_info gauge",
            ]
            if self._version is not None:
                lines.append(f'recsys_model_info{{model_version="{_label(self._version)}"}} 1')
            lines += [
                "# HELP recsys_model_loaded 1 once a model bundle is serving, else 0.",
                "# TYPE recsys_model_loaded gauge",
                f"recsys_model_loaded {int(self._version is not None)}",
                "# HELP recsys_model_reloads_total Admin reloads by result.",
                "# TYPE recsys_model_reloads_total counter",
            ]
            for result, n in self._reloads.items():
                lines.append(f'recsys_model_reloads_total{{result="{result}"}} {n}')
            lines += [
                "# HELP recsys_unhandled_errors_total Requests failed by an unexpected error.",
                "# TYPE recsys_unhandled_errors_total counter",
                f"recsys_unhandled_errors_total {self._unhandled}",
            ]
        return "\n".join(lines) + "\n"


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
    return out


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
