"""Quality and cost of the ranked lists (`recommendations.parquet`) on real data.

    .venv/bin/python -m experiments.bench_lists --work /tmp/bl               # every data set
    .venv/bin/python -m experiments.bench_lists --datasets movielens,ebnerd --work /tmp/bl

Data sets (read from ../shared/data here only, never in tests):
    movielens  ratings >= 4; the last 20% of time is the test split; lists judged on all of it
    ebnerd     real news; week 2 is the test split; lists as of the cut-off judged on the next day
    hm         H&M, one week: the cost of lists for every customer (105k items, 69k customers)

For each data set, `recsys nightly` runs once (or resumes in --work; tracking off) in a child
process. Then, in a fresh child process each (so peak memory is its own):
    eval  the list evaluation of the run (the lists as of the test cut-off through the shipped
          ranker, beside the popular, recent-popular and item-kNN lists; per-source recall and
          latency per user), then the same with MMR diversity weights (nDCG, intra-list cosine)
    lists the nightly's lists for every active user through the final bundle: seconds, users,
          rows and the peak RSS of that process alone
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from experiments.bench_quality import DEFAULT_DATA, _table
from experiments.bench_quality import prepare as prepare_quality

SPLITS = {"ebnerd": "2023-05-25T07:00:00", "movielens": None, "hm": None}
DIVERSITY = (0.0, 0.1, 0.3, 0.5)


def prepare(name: str, shared: Path, root: Path) -> Path:
    if name != "hm":
        return prepare_quality(name, shared, root)
    from recsys.data import write_dataset
    from recsys.importers import import_source

    out = root / "data" / name
    if not (out / "manifest.json").is_file():
        write_dataset(out, import_source("hm", shared / "hm").validated, source={"format": "hm"})
    return out


def _peak_mb() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run_nightly_child(data_dir: Path, out: Path, config: str, split: str | None) -> dict[str, Any]:
    from experiments.config import load_config
    from pipelines.nightly import run_nightly

    cfg = load_config(None if config == "default" else config)
    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, enabled=False))
    t = time.perf_counter()
    res = run_nightly(data_dir, out, config=cfg, split_at=split, log=lambda s: None)
    return {
        "seconds": round(time.perf_counter() - t, 1),
        "stages": {s.name: round(s.seconds, 1) for s in res.stages},
        "peak_mb": _peak_mb(),
    }


def _run_parts(run: Path) -> tuple[Any, Any, Any]:
    from pipelines.prepare import read_tables
    from recsys.bundle import Bundle
    from recsys.data import Dataset

    bundle = Bundle.load(run / "bundle" / "bundle")
    data = read_tables(run / "validate")
    val = json.loads((run / "validate" / "_stage.json").read_text())["summary"]
    if val.get("synthesized_impressions"):
        data = Dataset(data.items, data.interactions, data.impressions.clear())
    return bundle, data, val


def eval_child(run: Path, config: str) -> dict[str, Any]:
    """The list evaluation at the test cut-off, then a diversity sweep."""
    from datetime import datetime

    from experiments.config import load_config
    from pipelines.nightly import list_settings
    from recsys.lists import bundle_prior_weight, list_evaluation

    bundle, data, _ = _run_parts(run)
    cfg = load_config(None if config == "default" else config)
    split = json.loads((run / "split" / "_stage.json").read_text())["summary"]
    test_at = datetime.fromisoformat(split["test_at"])
    sweep = []
    base = None
    for div in DIVERSITY:
        c = dataclasses.replace(cfg, rules=dataclasses.replace(cfg.rules, diversity=div))
        t = time.perf_counter()
        out = list_evaluation(data, test_at, bundle.ranker, bundle.spec, list_settings(c),
                              bundle.vectors,
                              lambda s: None, prior_weight=bundle_prior_weight(bundle))  # fmt: skip
        secs = time.perf_counter() - t
        if base is None:
            base = out
        row = next(r for r in out["table"] if r["list"] == "lgbm_lists")
        sweep.append({"diversity": div, **{k: row[k] for k in row if k != "list"},
                      "seconds": round(secs, 1)})  # fmt: skip
    assert base is not None
    return {"eval": base, "diversity": sweep, "peak_mb": _peak_mb()}


def lists_child(run: Path, config: str) -> dict[str, Any]:
    """The nightly lists for every active user through the final bundle, timed."""
    from experiments.config import load_config
    from pipelines.nightly import list_settings
    from recsys.lists import list_context, ranked_lists

    cfg = load_config(None if config == "default" else config)
    bundle, data, _ = _run_parts(run)
    t = time.perf_counter()
    as_of = bundle.snapshot.as_of
    settings = list_settings(cfg)
    ctx = list_context(data, as_of, settings, bundle.vectors)
    recs, short = ranked_lists(bundle, data, ctx, settings)
    return {
        "seconds": round(time.perf_counter() - t, 1),
        "users": recs["user_id"].n_unique(),
        "rows": recs.height,
        "short_lists": short,
        "catalogue": data.items.height,
        "peak_mb": _peak_mb(),
        "cadence": ctx.cadence.describe(),
    }


def _child(args: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "experiments.bench_lists", "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(line[-1][len("RESULT ") :])


def report(
    name: str, nightly: dict[str, Any], ev: dict[str, Any] | None, li: dict[str, Any]
) -> None:
    print(f"\n## {name}")
    print(
        f"nightly: {nightly['seconds']} s, peak {nightly['peak_mb']} MB; stages {nightly['stages']}"
    )
    if ev is not None:
        e = ev["eval"]
        print(f"\n{e['note']}\n")
        print(_table(e["sources"], ["source", "k", "recall", "ms_per_user"]))
        n = next(k for k in e["table"][0] if k.startswith("recall@"))
        nd = n.replace("recall", "ndcg")
        print()
        cols = ["list", n, "recall_diff", "recall_diff_se", nd, "ndcg_diff", "ndcg_diff_se",
                "coverage", "novelty", "intra_list_sim"]  # fmt: skip
        print(_table(e["table"], cols))
        print(f"\ndiffs paired over {e['truth_users']} users, versus {e['versus']}")
        print("\nMMR diversity (lgbm_lists):\n")
        print(_table(ev["diversity"], ["diversity", n, nd, "intra_list_sim", "coverage",
                                       "novelty", "seconds"]))  # fmt: skip
        print(f"\nevaluation process peak {ev['peak_mb']} MB")
    print(
        f"\nlists for every active user: {li['users']} users x top-N, {li['rows']} rows, "
        f"{li['seconds']} s, peak {li['peak_mb']} MB ({li['short_lists']} short); "
        f"{li['catalogue']} items; {li['cadence']}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datasets", default="movielens,ebnerd,hm")
    p.add_argument("--config", default="default", help="nightly config (hm: baseline is cheaper)")
    p.add_argument("--shared", type=Path, default=DEFAULT_DATA)
    p.add_argument("--work", type=Path, default=None, help="keep runs here (default: temporary)")
    p.add_argument("--skip-eval", default="", help="data sets to time lists only for (e.g. hm)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "nightly":
            res = run_nightly_child(Path(rest[0]), Path(rest[1]), rest[2],
                                    None if rest[3] == "-" else rest[3])  # fmt: skip
        elif kind == "eval":
            res = eval_child(Path(rest[0]), rest[1])
        else:
            res = lists_child(Path(rest[0]), rest[1])
        print("RESULT " + json.dumps(res, default=str))
        return 0
    root = args.work or Path(tempfile.mkdtemp(prefix="bench-lists-"))
    skip = set(filter(None, args.skip_eval.split(",")))
    for name in args.datasets.split(","):
        data_dir = prepare(name, args.shared, root)
        run = root / "runs" / name / args.config
        nightly = _child(["nightly", str(data_dir), str(run), args.config, SPLITS[name] or "-"])
        print(f"[bench] {name}: nightly {nightly['seconds']} s", file=sys.stderr)
        ev = None if name in skip else _child(["eval", str(run), args.config])
        li = _child(["lists", str(run), args.config])
        report(name, nightly, ev, li)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
