"""Time the behavioural features: training rows, snapshot build, one serving call.

    .venv/bin/python experiments/bench_features.py                      # generator defaults
    .venv/bin/python experiments/bench_features.py --source hm          # ../shared/data/hm
    .venv/bin/python experiments/bench_features.py --source movielens --data PATH

Training requests are every impression row (or, for data without impressions, every
interaction row with a time); the serving call ranks `--candidates` items for one user.
Prints one line per step with the best of `--repeat` timings.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl

from features import (
    FeatureConfig,
    build_snapshot,
    point_in_time_features,
    snapshot_features,
    snapshot_features_numpy,
)
from recsys.data.dataset import Dataset
from recsys.generate import GeneratorConfig, generate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SOURCE_DIRS = {"hm": "hm", "movielens": "movielens-overviews"}


def best_of(repeat: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """(fastest wall time in seconds, last result) of `repeat` calls after one warm-up."""
    result = fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def load(source: str, data_dir: Path | None) -> Dataset:
    if source == "generated":
        return generate(GeneratorConfig())[0]
    from recsys.importers import import_source

    src = data_dir or SHARED / SOURCE_DIRS[source]
    return Dataset.from_validated(import_source(source, src).validated)


def training_requests(data: Dataset) -> pl.DataFrame:
    if data.impressions.height:
        rows = data.impressions.select(
            pl.col("impression_id").alias("request_id"), "user_id", "ts", "item_id"
        )
    else:
        rows = (
            data.interactions.filter(pl.col("ts").is_not_null())
            .with_row_index("request_id")
            .select(pl.col("request_id").cast(pl.String), "user_id", "ts", "item_id")
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", choices=["generated", *SOURCE_DIRS], default="generated")
    p.add_argument(
        "--data", type=Path, default=None, help="source folder (default ../shared/data/...)"
    )
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)

    config = FeatureConfig()
    data = load(args.source, args.data)
    reqs = training_requests(data)
    print(f"data: {data.counts()}; training requests: {reqs.height}")

    secs, out = best_of(args.repeat, lambda: point_in_time_features(reqs, data, config))
    print(
        f"point_in_time_features: {secs:.3f} s for {out.height} rows "
        f"({out.height / secs:,.0f} rows/s)"
    )

    as_of = reqs["ts"].max()
    assert isinstance(as_of, datetime)
    secs, snap = best_of(args.repeat, lambda: build_snapshot(data, as_of, config))
    sizes = {k: v.height for k, v in snap.tables.items()}
    print(f"build_snapshot: {secs:.3f} s; table rows {sizes}")
    start = time.perf_counter()
    type(snap)(snap.as_of, snap.config, snap.tables).index()
    print(f"snapshot.index() (once per snapshot): {time.perf_counter() - start:.3f} s")

    user = reqs["user_id"][0]
    items = data.items["item_id"].head(args.candidates).to_list()
    one = pl.DataFrame({"user_id": [user] * len(items), "item_id": items})
    n = 200
    secs, _ = best_of(args.repeat, lambda: [snapshot_features(snap, one) for _ in range(n)])
    print(f"snapshot_features, {len(items)} candidates: {secs / n * 1e3:.3f} ms per call")
    n = 2000
    secs, _ = best_of(
        args.repeat, lambda: [snapshot_features_numpy(snap, user, items) for _ in range(n)]
    )
    print(f"snapshot_features_numpy, {len(items)} candidates: {secs / n * 1e3:.3f} ms per call")


if __name__ == "__main__":
    main()
