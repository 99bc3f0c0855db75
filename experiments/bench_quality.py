"""Ranking quality of the nightly pipeline on real and generated data, per named config.

    .venv/bin/python -m experiments.bench_quality                       # every data set, config
    .venv/bin/python -m experiments.bench_quality --datasets ebnerd --configs default,baseline

Data sets (real data is read from ../shared/data here only, never in tests):
    ebnerd     ../shared/data/ebnerd-demo (real Danish news impressions; week 2 is the test split,
               --split-at 2023-05-25T07:00:00)
    demo       the embedded default data (`recsys generate`, seed 0; last 20% of time as test)
    movielens  ../shared/data/movielens-overviews (ratings >= 4, sampled impressions, last 20%)
    mind-static        EB-NeRD's week 1 alone, in MIND's layout: every user's history is the same
               on all their rows and predates the log, as in MIND (imported "before the log");
               its last day is the test split (--split-at 2023-05-24T07:00:00), as MIND-small's
               dev day follows its six training days
    mind-static-small  the same, one user in 16 (about 1,300 training impressions: a small log)
Configs: default (the project's defaults: LoRA), baseline (frozen encoder), full-finetune,
no-semantic (experiments/*.toml).

Each (data set, config) runs `recsys nightly` in a fresh process (tracking off), so the peak
memory of one run is its own. Printed per data set: the evaluation table of each config (AUC and
the paired difference to the best simple baseline with its standard error over impressions),
then wall seconds per stage, the driver's peak RSS and the fine-tune worker's peak RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import zlib
from datetime import datetime
from pathlib import Path
from typing import Any

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPLITS = {
    "ebnerd": "2023-05-25T07:00:00",
    "demo": None,
    "movielens": None,
    "mind-static": "2023-05-24T07:00:00",
    "mind-static-small": "2023-05-24T07:00:00",
}
EBNERD_WEEK2 = datetime(2023, 5, 25, 7)
CONFIGS = ("default", "baseline", "full-finetune", "no-semantic")


def prepare(name: str, shared: Path, root: Path) -> Path:
    """The dataset directory of `name` under `root` (imported or generated once)."""
    from recsys.data import write_dataset

    out = root / "data" / name
    if (out / "manifest.json").is_file():
        return out
    if name == "demo":
        from recsys.generate import GeneratorConfig, generate

        data, _ = generate(GeneratorConfig(seed=0))
        write_dataset(out, data, source={"generator": "default", "seed": 0})
        return out
    from recsys.importers import import_source

    if name.startswith("mind-static"):
        one_in = 16 if "small" in name else 1
        src = mind_static(shared / "ebnerd-demo", root / "mind" / name, one_in)
        write_dataset(out, import_source("mind", src).validated, source={"format": "mind"})
        return out
    fmt, folder = {"ebnerd": ("mind", "ebnerd-demo"), "movielens": ("movielens",
                   "movielens-overviews")}[name]  # fmt: skip
    src = shared / folder
    if not src.is_dir():
        raise SystemExit(f"{src}: not found; pass --shared pointing at the shared data folder")
    write_dataset(out, import_source(fmt, src).validated, source={"format": fmt})
    return out


def mind_static(src: Path, out: Path, one_in: int) -> Path:
    """EB-NeRD's week-1 rows (users whose crc32 is a multiple of `one_in`) as a MIND folder:
    within a week EB-NeRD repeats each user's history verbatim, so the histories predate the
    log as MIND's do."""
    if not src.is_dir():
        raise SystemExit(f"{src}: not found; pass --shared pointing at the shared data folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / "news.tsv").write_bytes((src / "news.tsv").read_bytes())
    with (src / "behaviors.tsv").open() as f, (out / "behaviors.tsv").open("w") as g:
        for line in f:
            fields = line.split("\t")
            when = datetime.strptime(fields[2], "%m/%d/%Y %I:%M:%S %p")
            if when < EBNERD_WEEK2 and zlib.crc32(fields[1].encode()) % one_in == 0:
                g.write(line)
    return out


def run_one(data_dir: Path, config: str, out: Path, split_at: str | None) -> dict[str, Any]:
    """One nightly run in this process; returns its figures (called in a child process)."""
    from experiments.config import load_config
    from pipelines.nightly import run_nightly

    cfg = load_config(None if config == "default" else config)
    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, enabled=False))
    result = run_nightly(data_dir, out, config=cfg, split_at=split_at, log=lambda s: None)
    return {
        "config": config,
        "evaluation": result.evaluation,
        "versus": result.versus,
        "freshness": result.freshness,
        "full_vs_behavioural": result.full_vs_behavioural,
        "shipped": result.shipped_ranker.get("name", ""),
        "online": result.online,
        "finetune": {k: v for k, v in result.finetune.items() if k != "losses"},
        "stages": {s.name: round(s.seconds, 1) for s in result.stages},
        "seconds": round(result.seconds, 1),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(x, widths, strict=True)) + " |"
              for x in cells]  # fmt: skip
    return "\n".join(lines)


def report(name: str, runs: list[dict[str, Any]]) -> None:
    print(f"\n## {name}")
    if runs:
        print(f"{runs[0]['freshness']}; differences are paired, vs {runs[0]['versus']}")
    for run in runs:
        print(f"\n### config {run['config']}")
        print(_table(run["evaluation"], ["model", "auc", "auc_diff", "auc_diff_se", "ndcg@10"]))
        fb = run["full_vs_behavioural"]
        print(f"\nlgbm_full - lgbm_behavioural: {fb['auc_diff']:+.4f} +- {fb['auc_diff_se']:.4f}")
        print(verdict("batch", run["evaluation"], run["shipped"]))
        online = run.get("online") or {}
        if online.get("test"):
            print(f"\nonline ({online.get('freshness', '')}):")
            print(_table(online["test"], ["model", "auc", "auc_diff", "auc_diff_se", "ndcg@10"]))
            print(verdict("online", online["test"], online.get("shipped_ranker", {}).get("name")))
    print("\n### cost")
    stages = list(runs[0]["stages"]) if runs else []
    rows = []
    for run in runs:
        ft = run["finetune"]
        rows.append(
            {"config": run["config"], **run["stages"], "total_s": run["seconds"],
             "driver_peak_mb": run["driver_peak_rss_mb"],
             "finetune_peak_mb": ft.get("peak_rss_mb", "-"),
             "finetune_epoch": ft.get("best_epoch", "-")}
        )  # fmt: skip
    print(_table(rows, ["config", *stages, "total_s", "driver_peak_mb", "finetune_peak_mb",
                        "finetune_epoch"]))  # fmt: skip


def verdict(mode: str, rows: list[dict[str, Any]], shipped: str | None) -> str:
    """One line: each ranker's AUC against the best baseline column (every non-lgbm row)."""
    auc = {r["model"]: r["auc"] for r in rows}
    base = {m: a for m, a in auc.items() if not m.startswith("lgbm_")}
    if not base:
        return f"{mode}: no baseline columns"
    best = max(base, key=lambda m: base[m])
    parts = [f"{m} {a:.4f} ({a - base[best]:+.4f})" for m, a in auc.items()
             if m.startswith("lgbm_")]  # fmt: skip
    return (
        f"{mode}: best baseline {best} {base[best]:.4f}; "
        + ", ".join(parts)
        + (f"; shipped {shipped}" if shipped else "")
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datasets", default="ebnerd,demo,movielens")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--shared", type=Path, default=DEFAULT_DATA)
    p.add_argument("--work", type=Path, default=None, help="keep runs here (default: temporary)")
    p.add_argument("--one", nargs=4, metavar=("DATA", "CONFIG", "OUT", "SPLIT"), help="internal")
    args = p.parse_args(argv)
    if args.one:
        data_dir, config, out, split = args.one
        res = run_one(Path(data_dir), config, Path(out), None if split == "-" else split)
        print("RESULT " + json.dumps(res))
        return 0
    root = args.work or Path(tempfile.mkdtemp(prefix="bench-quality-"))
    for name in args.datasets.split(","):
        data_dir = prepare(name, args.shared, root)
        runs = []
        for config in args.configs.split(","):
            out = root / "runs" / name / config
            cmd = [sys.executable, "-m", "experiments.bench_quality", "--one", str(data_dir),
                   config, str(out), SPLITS[name] or "-"]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"{name}/{config} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            runs.append(json.loads(line[-1][len("RESULT ") :]))
            print(f"[bench] {name}/{config}: {runs[-1]['seconds']} s", file=sys.stderr)
        report(name, runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
