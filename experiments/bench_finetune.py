"""Does fine-tuning on interactions help the semantic score? Frozen vs LoRA vs full, MovieLens.

    .venv/bin/python -m experiments.bench_finetune              # ~10 min on 2 CPU cores
    .venv/bin/python -m experiments.bench_finetune --steps 40   # a quick look

Protocol (time split): each user's last `--test-per-user` positives (ratings >= 4, by time) are
the test; everything before is training data. Fine-tuning sees only the training interactions
(no impressions in MovieLens: the positive is a later interaction, negatives are sampled items),
via the same `train_encoder` loop as the pipeline, without Ray. Ranking uses the semantic score
alone: a user's vector is the normalised mean of their last `--eval-history` training positives'
item vectors; every item of the catalogue is scored by cosine, the user's training positives
excluded; nDCG@10 and Recall@50 (recall normalised by min(50, #test)) over all test users
(`recsys.metrics.ranking_metrics_at_k`). Item vectors for ranking come from each encoder in the
same numeric form (`--eval-quantize`, int8 by default).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def load_movielens(path: Path) -> Any:
    """The MovieLens dataset (recsys.importers, ratings >= 4 as positives)."""
    from recsys.data import Dataset
    from recsys.importers import import_source

    if not path.is_dir():
        raise SystemExit(f"{path}: not found; pass --data pointing at the shared data folder")
    return Dataset.from_validated(import_source("movielens", path).validated)


def time_split(data: Any, test_per_user: int) -> tuple[Any, pl.DataFrame]:
    """(training dataset, test positives): each user's last `test_per_user` positives are the
    test, for users with more than twice that many positives (others stay in training)."""
    from recsys.data import Dataset

    inter = data.interactions.with_columns(
        pl.col("ts").rank("ordinal", descending=True).over("user_id").alias("recent"),
        pl.len().over("user_id").alias("n"),
    )
    is_test = (pl.col("recent") <= test_per_user) & (pl.col("n") > 2 * test_per_user)
    train = inter.filter(~is_test).drop("recent", "n")
    test = inter.filter(is_test).select("user_id", "item_id")
    return Dataset(data.items, train, data.impressions), test


def rank_semantic(
    vectors: np.ndarray,
    item_ids: list[str],
    train: pl.DataFrame,
    users: list[str],
    history: int,
    k: int,
) -> pl.DataFrame:
    """Top-k items per user by cosine to the mean of their last `history` training positives."""
    row = {item: i for i, item in enumerate(item_ids)}
    seen = train.filter(pl.col("user_id").is_in(users)).sort("user_id", "ts")
    by_user = seen.group_by("user_id", maintain_order=True).agg(pl.col("item_id"))
    hist_of = dict(zip(by_user["user_id"].to_list(), by_user["item_id"].to_list(), strict=True))
    out_users, out_items, out_ranks = [], [], []
    for start in range(0, len(users), 256):
        chunk = users[start : start + 256]
        profile = np.stack(
            [vectors[[row[i] for i in hist_of[u][-history:]]].mean(0) for u in chunk]
        )
        profile /= np.linalg.norm(profile, axis=1, keepdims=True)
        scores = profile @ vectors.T  # (users, items)
        for j, u in enumerate(chunk):
            scores[j, [row[i] for i in hist_of[u]]] = -np.inf
        top = np.argsort(-scores, axis=1)[:, :k]
        for j, u in enumerate(chunk):
            out_users += [u] * k
            out_items += [item_ids[i] for i in top[j]]
            out_ranks += list(range(1, k + 1))
    return pl.DataFrame({"user_id": out_users, "item_id": out_items, "rank": out_ranks})


def main(argv: list[str] | None = None) -> None:
    from recsys.encoder import FinetuneConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder")
    ap.add_argument("--test-per-user", type=int, default=5)
    ap.add_argument("--eval-history", type=int, default=10)
    ap.add_argument("--eval-quantize", default="int8", help="int8 or none: ranking vectors' form")
    ap.add_argument("--methods", default="none,lora,full")
    d = FinetuneConfig()
    ap.add_argument("--steps", type=int, default=80, help="optimiser steps per fine-tuning")
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--history-len", type=int, default=d.history_len)
    ap.add_argument("--negatives", type=int, default=d.negatives)
    ap.add_argument("--max-length", type=int, default=d.max_length)
    ap.add_argument(
        "--lora-layers",
        type=int,
        default=d.lora_layers or 0,
        help="LoRA in the last N layers (0 = all)",
    )
    ap.add_argument("--history-grad", action=argparse.BooleanOptionalAction, default=d.history_grad)
    ap.add_argument(
        "--in-batch", action=argparse.BooleanOptionalAction, default=d.in_batch_negatives
    )
    ap.add_argument("--lr-lora", type=float, default=5e-4)
    ap.add_argument("--lr-full", type=float, default=5e-5)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)

    import torch

    from recsys.encoder import TextEncoder, item_texts, train_encoder
    from recsys.encoder.model import default_model_path, to_precision
    from recsys.metrics import ranking_metrics_at_k

    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    data = load_movielens(args.data / "movielens-overviews")
    train_data, test = time_split(data, args.test_per_user)
    users = sorted(test["user_id"].unique().to_list())
    item_ids = data.items["item_id"].to_list()
    texts, _ = item_texts(data.items)
    print(
        f"MovieLens: {len(item_ids)} items, {train_data.interactions.height} training positives, "
        f"{test.height} test positives of {len(users)} users; device: "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'} ({platform.machine()}, "
        f"{args.threads} threads)"
    )
    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        cfg = FinetuneConfig(
            method=method,
            max_steps=args.steps,
            batch_size=args.batch_size,
            history_len=args.history_len,
            negatives=args.negatives,
            max_length=args.max_length,
            lora_layers=args.lora_layers or None,
            history_grad=args.history_grad,
            in_batch_negatives=args.in_batch,
            lr=args.lr_full if method == "full" else args.lr_lora,
            val_fraction=0.0,
        )
        result = train_encoder(cfg, train_data)
        train_s = result.seconds
        t0 = time.perf_counter()
        trained = result.model
        if method == "lora":  # fold the adapter into the weights, as TextEncoder.load does
            trained = trained.merge_and_unload()  # type: ignore[operator]
        precision = "int8" if args.eval_quantize == "int8" else "fp32"
        model = to_precision(trained, precision, torch.device("cpu"))
        enc = TextEncoder(model, result.encoder.tokenizer, encoder_id="bench", max_length=64)
        vectors = enc.embed(texts)
        ranked = rank_semantic(
            vectors, item_ids, train_data.interactions, users, args.eval_history, 50
        )
        m = ranking_metrics_at_k(ranked, test, ks=(10, 50))
        rows.append(
            {
                "method": method,
                "ndcg@10": m["ndcg@10"],
                "recall@50": m["recall@50"],
                "trainable": result.trainable_params,
                "share": result.trainable_params / result.total_params,
                "train_s": train_s,
                "eval_s": time.perf_counter() - t0,
                "loss": (
                    f"{np.mean(result.losses[:10]):.2f}->{np.mean(result.losses[-10:]):.2f}"
                    if result.losses
                    else "-"
                ),
            }
        )
        print(f"  {method}: done in {train_s + rows[-1]['eval_s']:.0f}s", flush=True)
    print(
        f"\nsteps {args.steps}, batch {args.batch_size}, history {args.history_len}, negatives "
        f"{args.negatives}, max_length {args.max_length}, history_grad {args.history_grad}, "
        f"lora_layers {args.lora_layers or 'all'}, in-batch negatives {args.in_batch}; base "
        f"{default_model_path().parent.name}; load average {os.getloadavg()[0]:.1f}\n"
    )
    header = (
        f"{'method':<6} {'nDCG@10':>8} {'Recall@50':>10} {'trainable':>10} {'share':>7} "
        f"{'train s':>8} {'eval s':>7} {'loss':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['method']:<6} {r['ndcg@10']:>8.4f} {r['recall@50']:>10.4f} {r['trainable']:>10,} "
            f"{r['share']:>7.2%} {r['train_s']:>8.1f} {r['eval_s']:>7.1f} {r['loss']:>12}"
        )
    print(f"\ntotal {time.perf_counter() - t_all:.0f}s")


if __name__ == "__main__":
    main()
