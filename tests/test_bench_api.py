"""The API benchmarks' own logic: the comparison with a stored run and the events they send."""

from __future__ import annotations

import json
from pathlib import Path

from experiments.bench_api import ratios, save
from experiments.loadgen import make_events
from serving.schemas import EVENT


def test_ratios_compare_rows_found_in_both_runs_figure_by_figure(tmp_path: Path) -> None:
    now = {
        "rank": [
            {"workers": 1, "events": "off", "req/s@16": 600.0, "cli p99@4": 5.0,
             "srv p99@4": 4.0, "srv p99@1": 2.0, "cpu ms/req": 1.5},
            {"workers": 2, "events": "flowing", "req/s@16": 900.0, "cli p99@4": 8.0,
             "srv p99@4": 6.0, "srv p99@1": 3.0, "cpu ms/req": 2.0},
        ],
        "ingest": [{"setup": "1 worker, in process", "events/s": 9000.0}],
    }  # fmt: skip
    previous = {
        "rank": [
            {"workers": 1, "events": "off", "req/s@16": 400.0, "cli p99@4": 10.0,
             "srv p99@4": 0.0, "srv p99@1": 2.0, "cpu ms/req": 3.0},
        ],
        "ingest": [{"setup": "1 worker, in process", "events/s": 6000.0}],
    }  # fmt: skip
    path = tmp_path / "results" / "previous.json"
    save(path, previous)  # the stored run, read back as the benchmark reads it
    got = ratios(now, json.loads(path.read_text()))
    assert got == [
        {"row": "1w events off", "req/s@16": "1.50", "cli p99@4": "0.50", "srv p99@4": "n/a",
         "srv p99@1": "1.00", "cpu ms/req": "0.50"},
        {"row": "ingest, 1 worker, in process", "events/s": "1.50"},
    ]  # fmt: skip
    assert not list(path.parent.glob("*.tmp"))  # written beside, then renamed


def test_benchmark_events_are_valid_and_distinct() -> None:
    users, items = ["u1", "u2", "u3"], [f"i{k}" for k in range(20)]
    events = make_events(users, items, "t", 0, 50) + make_events(users, items, "t", 50, 50)
    assert len({e["event_id"] for e in events}) == 100
    parsed = [EVENT.validate_python(e) for e in events]
    assert sum(e.type == "impression" for e in parsed) == 20
    clicks = [e for e in parsed if e.type == "click"]
    shown = {e.request_id: set(e.items) for e in parsed if e.type == "impression"}
    assert all(c.item_id in shown[c.request_id] for c in clicks)  # clicks on shown items
