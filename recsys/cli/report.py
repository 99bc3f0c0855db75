"""What the `recsys` command prints: aligned tables, the summary a nightly run ends with."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import polars as pl

from recsys.evaluation import BATCH, finetune_note
from recsys.featurize import ONLINE

if TYPE_CHECKING:
    from pipelines.nightly import NightlyResult


def print_table(rows: Sequence[Mapping[str, Any]], title: str | None = None) -> None:
    """Print dict rows as a table (rich; floats with 4 decimals, numbers right-aligned), the
    title above it as plain lines. Off a terminal (a pipe, a log file) the table is as wide
    as its content, never cut to a console width, without colour: one row per line, cells
    apart by spaces, so `grep` and `split()` read it."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    if title:
        print(f"\n{title}")
    if not rows:
        print("(no rows)")
        return
    cols = list(dict.fromkeys(c for r in rows for c in r))

    def fmt(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for c in cols:
        numeric = all(isinstance(r.get(c), int | float) for r in rows if r.get(c) is not None)
        table.add_column(c, justify="right" if numeric else "left", no_wrap=True)
    for r in rows:
        table.add_row(*(Text(fmt(r.get(c, ""))) for c in cols))  # Text: no markup in values
    console = Console(file=sys.stdout, soft_wrap=True)
    if not console.is_terminal:
        console = Console(file=sys.stdout, width=100_000, color_system=None, soft_wrap=True)
    console.print(table)


def print_summary(result: NightlyResult, *, show_users: int = 3) -> None:
    """The short table of results each run ends with."""
    print_table(
        [
            {"stage": s.name, "status": "reused" if s.skipped else "ran", "seconds": s.seconds}
            for s in result.stages
        ],
        f"Nightly run {result.run_dir} ({result.config.name}) in {result.seconds:.1f}s",
    )
    order = ["model", "auc", "auc_diff", "auc_diff_se", "mrr", "ndcg@5", "ndcg@10", "n_impressions"]
    modes = [
        (BATCH, result.evaluation, result.versus, result.freshness, result.full_vs_behavioural,
         result.shipped_ranker),
    ]  # fmt: skip
    if result.online:
        o = result.online
        modes.append((ONLINE, o["test"], o["versus"], o["freshness"], o["full_vs_behavioural"],
                      o["shipped_ranker"]))  # fmt: skip
    for mode, table, versus, freshness, fb, shipped in modes:
        rows = [{k: r[k] for k in order if k in r} for r in table]
        rows = [
            {("auc - " + versus if k == "auc_diff" and versus else k): v for k, v in r.items()}
            for r in rows
        ]
        print_table(
            rows,
            f"Evaluation on the test split, {mode} features (per impression, averaged; "
            f"auc_diff_se: standard error of the paired difference)\n{freshness}",
        )
        if fb:
            print(
                f"{mode}: lgbm_full - lgbm_behavioural: AUC {fb['auc_diff']:+.4f} "
                f"(paired standard error {fb['auc_diff_se']:.4f})"
            )
        if shipped:
            print(f"{mode}: shipped ranker {shipped['name']} ({shipped['reason']})")
    print(finetune_note(result.finetune, result.config.finetune.method))
    lists = result.lists
    if lists.get("sources"):
        print_table(
            lists["sources"],
            "Candidate retrieval by source (recall of the test positives; the union is what "
            "the ranker sees)",
        )
    if lists.get("table"):
        n = result.config.pipeline.top_n
        cols = ["list", f"recall@{n}", "recall_diff", "recall_diff_se", f"ndcg@{n}", "ndcg_diff",
                "ndcg_diff_se", "coverage", "novelty", "intra_list_sim", "users"]  # fmt: skip
        print_table(
            [{k: r[k] for k in cols if k in r} for r in lists["table"]],
            f"Ranked lists (top {n}; diffs: paired over users, versus {lists.get('versus')}; "
            f"lgbm_lists: the ranker blended with popularity at weight "
            f"{lists.get('prior_weight', 0.0):g})\n"
            f"{lists.get('note', '')}",
        )
        if lists.get("table_known"):
            print_table(
                [{k: r[k] for k in cols if k in r} for r in lists["table_known"]],
                "The same over the users known at the cut-off (the others get popular lists)",
            )
        if lists.get("short_lists"):
            print(f"{lists['short_lists']} users got fewer than {n} items")
    if result.registry:
        print(f"\nRegistry: {result.registry.get('reason')}")
    recs = pl.read_parquet(result.recommendations)
    titles = pl.read_parquet(result.run_dir / "validate" / "items.parquet").select(
        "item_id", "title"
    )
    users = recs["user_id"].unique(maintain_order=True).head(show_users).to_list()
    for u in users:
        top = recs.filter(pl.col("user_id") == u).head(5).join(titles, on="item_id", how="left")
        print_table(
            [
                {"rank": r["rank"], "item_id": r["item_id"], "score": r["score"],
                 "title": (r["title"] or "")[:60]}
                for r in top.sort("rank").to_dicts()
            ],
            f"Top 5 for {u}",
        )  # fmt: skip
    print(f"\nRanked lists: {result.recommendations}  bundle: {result.bundle_dir}")
    if result.mlflow_run_id:
        print(
            f"MLflow run {result.mlflow_run_id}: "
            f"mlflow ui --backend-store-uri {result.tracking_uri}"
        )
    print(json.dumps({"seconds": round(result.seconds, 1)}))
