"""The `recsys` command: demo, generate, import, finetune, embed, nightly, evaluate, serve, compare.

Heavy modules (Ray jobs, MLflow, the web server) are imported inside each command, so
`recsys --help` is fast and the core stays free of them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence

from recsys import logs
from recsys.cli.report import print_summary, print_table
from recsys.errors import RecsysError

EXIT_USAGE = 2


def _progress(line: str) -> None:
    """A job's progress line ("[stage] running ..."): shown unless --quiet."""
    if logs.progress():
        print(line, flush=True)


def _cmd_generate(args: argparse.Namespace) -> int:
    from recsys.data import write_dataset
    from recsys.generate import GeneratorConfig, generate

    cfg = GeneratorConfig(
        n_items=args.items, n_users=args.users, n_shown=args.shown, seed=args.seed
    )
    t0 = time.perf_counter()
    data, _ = generate(cfg)
    manifest = write_dataset(args.out, data, source={"generator": cfg.__dict__})
    rows = [{"table": t, "rows": n} for t, n in manifest["counts"].items()]
    print_table(rows, f"Generated {args.out} in {time.perf_counter() - t0:.1f}s")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from recsys.data import write_dataset
    from recsys.importers import import_source

    t0 = time.perf_counter()
    result = import_source(args.format, args.src, min_rating=args.min_rating, base=args.base)
    v = result.validated
    write_dataset(args.out, v, source={"format": args.format, "path": str(args.src)})
    rows = [{"table": t, **c} for t, c in v.counts().items()]
    print_table(rows, f"Imported {args.src} ({args.format}) in {time.perf_counter() - t0:.1f}s")
    if v.rejects.height:
        reasons = v.reasons().to_dicts()
        print_table(reasons, f"Rejects ({v.rejects.height}, in {args.out}/rejects.parquet)")
    for key, value in result.stats.items():
        print(f"{key}: {value}")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from experiments.config import load_config
    from pipelines.finetune import run_finetune
    from recsys.data import read_dataset

    cfg = load_config(args.config)
    data = read_dataset(args.data)
    report = run_finetune(
        data, args.out, cfg.finetune, base_model=args.base_model, ray_address=args.ray_address,
        log=_progress,
    )  # fmt: skip
    rows = [{"epoch": i + 1, "loss": float(loss)} for i, loss in enumerate(report.losses)]
    print_table(rows, f"Fine-tuned encoder written to {report.encoder_dir}")
    print_table(
        [
            {
                "method": cfg.finetune.method,
                "trainable_params": report.trainable_params,
                "total_params": report.total_params,
                "seconds": float(report.seconds),
                "device": report.device,
                **{k: float(v) for k, v in report.val_metrics.items()},
            }
        ]
    )
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from experiments.config import load_config
    from pipelines.embed import run_embed
    from recsys.data import read_dataset

    cfg = load_config(args.config)
    data = read_dataset(args.data)
    report = run_embed(
        data.items,
        args.encoder,
        args.out,
        config=cfg.encoder,
        ray_address=args.ray_address,
        num_actors=args.actors,
    )
    print_table(
        [
            {
                "embedded": report.embedded,
                "distinct_texts": report.distinct_texts,
                "reused": report.reused,
                "dropped": report.dropped,
                "fallback_texts": report.fallback_texts,
                "seconds": float(report.seconds),
                "device": report.device,
            }
        ],
        f"Item vectors written to {args.out} (encoder {report.encoder_id[:12]})",
    )
    return 0


def _cmd_nightly(args: argparse.Namespace) -> int:
    from pipelines.nightly import run_nightly

    result = run_nightly(
        args.data,
        args.out,
        config_path=args.config,
        split_at=args.split_at,
        ray_address=args.ray_address,
        tracking_uri=args.tracking_uri,
        log=_progress,
    )
    print_summary(result, show_users=args.show_users)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import run_demo
    from recsys.generate import GeneratorConfig

    generator = GeneratorConfig(
        n_items=args.items, n_users=args.users, n_shown=args.shown, seed=args.seed
    )
    result = run_demo(
        args.out,
        generator,
        config_path=args.config,
        ray_address=args.ray_address,
        tracking_uri=args.tracking_uri,
        log=_progress,
    )
    print_summary(result, show_users=args.show_users)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from datetime import datetime

    from pipelines.evaluate import evaluate_bundle
    from recsys.bundle import Bundle
    from recsys.evaluation import freshness_note

    tables, lists = evaluate_bundle(args.data, args.bundle, split_at=args.split_at)
    bundle = Bundle.load(args.bundle)
    cutoff = datetime.fromisoformat(args.split_at or bundle.manifest["split"]["test_at"])
    for mode, table in tables.items():
        note = freshness_note(mode, bundle.spec, cutoff)
        print_table(table, f"Evaluation of {args.bundle} on {args.data} ({mode})\n{note}")
    if lists.get("sources"):
        print_table(lists["sources"], "Candidate retrieval by source")
    if lists.get("table"):
        print_table(
            lists["table"],
            f"Ranked lists (diffs paired over users, versus {lists['versus']})\n{lists['note']}",
        )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from serving.server import serve

    serve(
        bundle=args.bundle,
        model_uri=args.model_uri,
        host=args.host,
        port=args.port,
        workers=args.workers,
        tracking_uri=args.tracking_uri,
        event_log=args.event_log,
        access_log=args.access_log or None,
        events=not args.no_events,
        redis=args.redis,
    )
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from experiments.compare import compare_runs, side_by_side

    rows = compare_runs(tracking_uri=args.tracking_uri, experiment=args.experiment)
    print_table(
        side_by_side(rows),
        "Latest nightly run per experiment config (MLflow), side by side: test.* is the full "
        "ranker's (batch features), test_online.* with live features; shipped: each mode's "
        "ranker; wall_s/cpu_s: the run's stages",
    )
    return 0


def _add_ray(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ray-address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster address (e.g. ray://head:10001); default: start a local Ray",
    )


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=None,
        help="experiment config TOML (e.g. experiments/lora.toml); default: the built-in defaults",
    )


def _add_sizes(p: argparse.ArgumentParser) -> None:
    """The generator's sizes (its defaults: the embedded demo data)."""
    from recsys.generate import GeneratorConfig

    defaults = GeneratorConfig()
    p.add_argument("--items", type=int, default=defaults.n_items, help="catalogue size")
    p.add_argument("--users", type=int, default=defaults.n_users)
    p.add_argument("--shown", type=int, default=defaults.n_shown, help="impression rows")


def _add_tracking(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///<out>/mlflow.db",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys",
        description=(
            "Semantic recommendation engine: a LoRA-tuned text encoder, behavioural features and "
            "a LightGBM LambdaRank ranker, run as Ray jobs, tracked in MLflow, served over HTTP."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="generate the embedded default data and run the nightly pipeline on it",
        description="Generate the synthetic catalogue and click log (if not there yet), run the "
        "nightly pipeline on it and print the evaluation table and a few users' ranked lists.",
    )
    p.add_argument("--out", default="demo", help="output folder (default: ./demo)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    _add_sizes(p)
    p.add_argument("--show-users", type=int, default=3, help="ranked lists to print")
    _add_config(p)
    _add_ray(p)
    _add_tracking(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "generate",
        help="write the synthetic dataset (embedded default data) to a folder",
        description="Write a seeded synthetic dataset directory whose right ranking depends on "
        "both item text and behaviour.",
    )
    p.add_argument("--out", required=True, help="dataset directory to write")
    _add_sizes(p)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "import",
        help="import MIND, MovieLens, H&M, canonical Parquet or the API's event log into a "
        "dataset directory",
        description="Convert a source layout into a validated dataset directory. Rows that break "
        "a contract go to rejects.parquet with the reason.",
    )
    p.add_argument(
        "--format",
        required=True,
        choices=["mind", "movielens", "hm", "parquet", "events"],
        help="layout",
    )
    p.add_argument("src", help="source folder")
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument(
        "--min-rating", type=float, default=4.0, help="movielens: positive rating threshold"
    )
    p.add_argument(
        "--base",
        default=None,
        help="events: the dataset directory the event log extends (its catalogue and log)",
    )
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser(
        "finetune",
        help="fine-tune the text encoder on click labels (Ray Train; LoRA by default)",
        description="Fine-tune the packaged MiniLM encoder on the dataset's click labels.",
    )
    p.add_argument("--data", required=True, help="dataset directory")
    p.add_argument("--out", required=True, help="encoder directory to write")
    p.add_argument("--base-model", default=None, help="local Hugging Face model folder")
    _add_config(p)
    _add_ray(p)
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser(
        "embed",
        help="embed the catalogue (Ray Data; incremental: unchanged items keep their vectors)",
        description="Embed every item's text into item_vectors.parquet; only new or changed "
        "items are embedded when the file already exists.",
    )
    p.add_argument("--data", required=True, help="dataset directory")
    p.add_argument("--encoder", default=None, help="encoder directory (default: packaged MiniLM)")
    p.add_argument("--out", required=True, help="item_vectors.parquet to write or update")
    p.add_argument("--actors", type=int, default=None, help="embedding actors")
    _add_config(p)
    _add_ray(p)
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser(
        "nightly",
        help="the nightly pipeline: validate, split, fine-tune, embed, features, rank, evaluate",
        description="Run every stage (skipping those whose inputs and config are unchanged), "
        "write the model bundle and recommendations.parquet, track the run in MLflow.",
    )
    p.add_argument("--data", required=True, help="dataset directory")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument(
        "--split-at",
        default=None,
        help="ISO time; everything at or after it is test (default: the last 20%% of the log)",
    )
    p.add_argument("--show-users", type=int, default=3, help="ranked lists to print")
    _add_config(p)
    _add_ray(p)
    _add_tracking(p)
    p.set_defaults(func=_cmd_nightly)

    p = sub.add_parser(
        "evaluate",
        help="print the evaluation table of a model bundle on a dataset",
        description="Score the test split of a dataset with a bundle and print AUC, MRR, nDCG.",
    )
    p.add_argument("--data", required=True, help="dataset directory")
    p.add_argument("--bundle", required=True, help="model bundle folder")
    p.add_argument("--split-at", default=None, help="ISO time; default: the bundle's split")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "serve",
        help="serve a model bundle over HTTP (ranking API)",
        description="Start the ranking API (OpenAPI docs at /docs).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", help="model bundle folder")
    src.add_argument("--model-uri", help="MLflow model URI, e.g. models:/recsys@champion")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1)
    ev = p.add_mutually_exclusive_group()
    ev.add_argument(
        "--event-log",
        default=None,
        help="event log folder of POST /v1/events (features as of now, one worker); default: "
        "RUN/events beside the bundle's run folder",
    )
    ev.add_argument(
        "--no-events",
        action="store_true",
        help="no events: the batch ranker on features as of the cut-off (the default with "
        "several workers)",
    )
    p.add_argument(
        "--redis",
        default=None,
        metavar="URL",
        help="share the live state (counts, histories, live items, event ids) in Redis, e.g. "
        "redis://127.0.0.1:6379/0, so several workers take events (also RECSYS_REDIS_URL)",
    )
    p.add_argument(
        "--access-log",
        action="store_true",
        help="a line per request on the terminal (default off; also RECSYS_ACCESS_LOG=true)",
    )
    _add_tracking(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "compare",
        help="compare the latest MLflow runs of the named experiment configs",
        description="Print one row per experiment config (baseline, lora, ...) from MLflow.",
    )
    p.add_argument("--experiment", default="recsys-nightly", help="MLflow experiment name")
    _add_tracking(p)
    p.set_defaults(func=_cmd_compare)
    for command in sub.choices.values():
        _add_verbosity(command)
    return parser


def _add_verbosity(p: argparse.ArgumentParser) -> None:
    """--verbose/--quiet (default: $RECSYS_LOG_LEVEL, else INFO): how much reaches the
    terminal, configured once for the process and the jobs it starts (recsys/logs.py)."""
    group = p.add_argument_group("output").add_mutually_exclusive_group()
    group.add_argument(
        "-v", "--verbose", action="store_true",
        help="debug logs, and Ray's and MLflow's own logs and progress bars on the terminal",
    )  # fmt: skip
    group.add_argument(
        "-q", "--quiet", action="store_true",
        help="warnings, errors and the results only (no progress lines)",
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        logs.configure(logs.level_from(verbose=args.verbose, quiet=args.quiet))
    except ValueError as e:
        print(f"recsys {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return func(args)
    except RecsysError as e:
        print(f"recsys {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
