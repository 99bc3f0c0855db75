"""Benchmark the dataset importers on real public data (and, optionally, MIND-sized data).

    .venv/bin/python -m experiments.bench_import [--data PATH] [--mind PATH] [--synthetic-mind N]

Imports `movielens` (PATH/movielens-overviews) and `hm` (PATH/hm), a MIND folder if given with
--mind, and with --synthetic-mind a generated MIND-shaped folder of N behaviors rows (the real
layout at MIND-large's scale: ~37 shown items and ~33 history ids per row, users repeating on
several rows). Each dataset is written to a temporary directory with `write_dataset`, as the CLI
does. Prints one row per format: items, interactions, impressions, rejects, wall seconds (import,
write, total) and CPU seconds over all threads. Target: movielens and hm <= 10 s each on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from recsys.data import write_dataset
from recsys.importers import import_source

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def synthetic_mind(out: Path, n_rows: int, *, n_news: int = 100_000, seed: int = 0) -> Path:
    """Write a MIND-shaped folder (news.tsv, behaviors.tsv) with `n_rows` behaviors rows.

    Vectorised (numpy + polars list ops); no Python loop over rows.
    """
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    ids = pl.Series("id", np.arange(n_news)).cast(pl.String)
    news = pl.DataFrame(
        {
            "news_id": "N" + ids,
            "category": "news",
            "subcategory": "world",
            "title": "Title of story " + ids,
            "abstract": "An abstract about story " + ids + " with a few more words in it.",
            "url": "https://assets.msn.com/" + ids,
            "title_entities": "[]",
            "abstract_entities": "[]",
        }
    )
    news.write_csv(out / "news.tsv", separator="\t", include_header=False, quote_style="never")

    n_users = max(1, n_rows // 4)  # each user appears on ~4 rows with the same history
    user = rng.integers(0, n_users, n_rows)
    hist_len = (user % 60).astype(np.int64)  # ~30 ids, constant per user
    shown_len = rng.integers(5, 70, n_rows)
    hist_ids = rng.integers(0, n_news, int(hist_len.sum()))
    shown_ids = rng.integers(0, n_news, int(shown_len.sum()))
    clicked = rng.random(shown_ids.size) < 0.05

    def lists(values: pl.Series, lengths: np.ndarray) -> pl.Series:
        offsets = np.repeat(np.arange(lengths.size), lengths)
        return (
            pl.DataFrame({"row": offsets, "v": values})
            .group_by("row", maintain_order=True)
            .agg(pl.col("v").str.join(" "))
            .join(pl.DataFrame({"row": np.arange(lengths.size)}), on="row", how="right")
            .sort("row")["v"]
            .fill_null("")
        )

    history = lists("N" + pl.Series(hist_ids).cast(pl.String), hist_len)
    # A user's history must repeat verbatim: take the history of the user's first row.
    first = pl.DataFrame({"user": user, "history": history}).with_columns(
        pl.col("history").first().over("user")
    )["history"]
    tokens = (
        "N"
        + pl.Series(shown_ids).cast(pl.String)
        + "-"
        + pl.Series(clicked).cast(pl.Int8).cast(pl.String)
    )
    start = pl.from_epoch(pl.Series(1_573_257_600 + rng.integers(0, 7 * 86400, n_rows)))
    behaviors = pl.DataFrame(
        {
            "impression_id": pl.Series(np.arange(1, n_rows + 1)).cast(pl.String),
            "user_id": "U" + pl.Series(user).cast(pl.String),
            "time": start.dt.strftime("%-m/%-d/%Y %-I:%M:%S %p"),
            "history": first,
            "impressions": lists(tokens, shown_len),
        }
    )
    behaviors.write_csv(
        out / "behaviors.tsv", separator="\t", include_header=False, quote_style="never"
    )
    return out


def bench(fmt: str, src: Path, out: Path) -> dict[str, object]:
    c0, t0 = time.process_time(), time.perf_counter()
    result = import_source(fmt, src)
    t1 = time.perf_counter()
    manifest = write_dataset(out, result.validated, source={"format": fmt, "path": str(src)})
    t2 = time.perf_counter()
    counts = manifest["counts"]
    return {
        "format": fmt,
        "items": counts["items"],
        "interactions": counts["interactions"],
        "impressions": counts["impressions"],
        "rejects": manifest["rejects"],
        "import_s": round(t1 - t0, 2),
        "write_s": round(t2 - t1, 2),
        "seconds": round(t2 - t0, 2),
        # CPU seconds of all threads: steadier than wall time on a machine shared with others.
        "cpu_s": round(time.process_time() - c0, 2),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of public data sets")
    p.add_argument("--mind", type=Path, default=None, help="a MIND folder (news/behaviors.tsv)")
    p.add_argument(
        "--synthetic-mind",
        type=int,
        default=0,
        metavar="N",
        help="also import a generated MIND-shaped folder of N behaviors rows",
    )
    args = p.parse_args(argv)

    runs: list[tuple[str, Path]] = [
        ("movielens", args.data / "movielens-overviews"),
        ("hm", args.data / "hm"),
    ]
    if args.mind:
        runs.append(("mind", args.mind))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_import_") as tmp:
        if args.synthetic_mind:
            t0 = time.perf_counter()
            src = synthetic_mind(Path(tmp) / "mind-synthetic", args.synthetic_mind)
            mib = sum(f.stat().st_size for f in src.iterdir()) / 2**20
            print(
                f"generated {args.synthetic_mind:,} behaviors rows ({mib:.0f} MiB) "
                f"in {time.perf_counter() - t0:.1f} s"
            )
            runs.append(("mind", src))
        for fmt, src in runs:
            rows.append(bench(fmt, src, Path(tmp) / f"out-{fmt}"))
    print(f"cpus={os.cpu_count()} polars_threads={pl.thread_pool_size()}")
    with pl.Config(
        tbl_hide_dataframe_shape=True,
        tbl_hide_column_data_types=True,
        tbl_cols=-1,
        tbl_width_chars=200,
    ):
        print(pl.DataFrame(rows))


if __name__ == "__main__":
    main()
