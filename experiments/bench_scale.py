"""The nightly at growing log sizes: wall, rows/s and peak memory per stage.

    .venv/bin/python -m experiments.bench_scale --rows 0.5M,1M,2M,4M,8M --work /tmp/bs
    .venv/bin/python -m experiments.bench_scale --rows 100k,200k --config experiments/lora.toml
    .venv/bin/python -m experiments.bench_scale --rows 1M --ray-address auto   # a running cluster

Each size is a log made by `recsys generate` (items and users grow with the rows: per million
shown rows 20,000 items and 50,000 users, as the 1M log of issue 38), then `recsys nightly` on it
as a subprocess (the default config unless --config). While it runs, a sampler reads every
`--interval` seconds:
- the driver's RSS (the nightly process itself),
- the PSS of every other process of the run: the driver's descendants (a local Ray: GCS, raylet,
  workers) and, with --ray-address, every Ray process on this machine. PSS, not RSS: pages the
  processes share (Ray's object store, the libraries) count once in the sum.
The stage a sample belongs to comes from the nightly's own lines (`[stage] running ...`). Stage
walls are the nightly's (`[stage] done in Xs`). rows/s = shown rows / stage wall; "vs first" is
a stage's rows/s at this size over its rows/s at the first size (1.0: cost grows linearly).

Writes WORK/bench_scale.json and WORK/bench_scale.png (log-log: stage seconds and peak memory
against rows) and prints one table per size and a summary. Data sets are kept in WORK/data-<rows>
and reused; each nightly runs in a fresh WORK/run-<rows>.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

RUNNING = re.compile(r"^\[(\w+)\] running")
DONE = re.compile(r"^\[(\w+)\] done in ([0-9.]+)s")
RAY_PROCESS = re.compile(r"ray::|raylet|gcs_server|default_worker\.py|ray/dashboard|log_monitor")
ITEMS_PER_ROW, USERS_PER_ROW = 0.02, 0.05


def parse_rows(text: str) -> int:
    """'0.5M' -> 500000, '200k' -> 200000, '1500' -> 1500."""
    t = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    return int(float(t[:-1] if scale > 1 else t) * scale)


@dataclass
class Peaks:
    driver_mb: float = 0.0
    others_mb: float = 0.0
    total_mb: float = 0.0
    processes: int = 0

    def add(self, driver: float, others: float, n: int) -> None:
        self.driver_mb = max(self.driver_mb, driver)
        self.others_mb = max(self.others_mb, others)
        self.total_mb = max(self.total_mb, driver + others)
        self.processes = max(self.processes, n)


@dataclass
class Sampler:
    """Peak memory per stage of a running nightly (see the module docstring)."""

    pid: int
    cluster: bool
    interval: float
    stage: str = "start"
    peaks: dict[str, Peaks] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _others(self, root: Any) -> list[Any]:
        import psutil

        procs = {p.pid: p for p in root.children(recursive=True)}
        if self.cluster:
            for p in psutil.process_iter(["cmdline"]):
                if p.pid != root.pid and RAY_PROCESS.search(" ".join(p.info["cmdline"] or [])):
                    procs.setdefault(p.pid, p)
        return list(procs.values())

    def sample(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        driver = root.memory_info().rss / 2**20
        others, n = 0.0, 1
        for p in self._others(root):
            try:
                others += p.memory_full_info().pss / 2**20
                n += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        self.peaks.setdefault(self.stage, Peaks()).add(driver, others, n)

    def run(self) -> None:
        import psutil

        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except psutil.NoSuchProcess:
                return

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()


def make_data(rows: int, work: Path, seed: int) -> Path:
    out = work / f"data-{rows}"
    if (out / "impressions.parquet").is_file():
        return out
    items, users = max(500, int(rows * ITEMS_PER_ROW)), max(500, int(rows * USERS_PER_ROW))
    tmp = work / f".data-{rows}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    sizes = ["--items", str(items), "--users", str(users), "--shown", str(rows)]
    cmd = [sys.executable, "-m", "recsys.cli", "generate", "--out", str(tmp), *sizes, "--seed",
           str(seed), "-q"]  # fmt: skip
    subprocess.run(cmd, check=True)
    os.replace(tmp, out)
    return out


def run_nightly(data: Path, run: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One nightly as a subprocess, sampled; its stages' walls and peaks."""
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "recsys.cli", "nightly", "--data", str(data), "--out", str(run),
           "--show-users", "0"]  # fmt: skip
    if args.config:
        cmd += ["--config", args.config]
    if args.ray_address:
        cmd += ["--ray-address", args.ray_address]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)  # fmt: skip
    sampler = Sampler(proc.pid, bool(args.ray_address), args.interval)
    thread = sampler.start()
    walls: dict[str, float] = {}
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = [*tail[-40:], line]
        if m := RUNNING.match(line):
            sampler.stage = m.group(1)
        elif m := DONE.match(line):
            walls[m.group(1)] = float(m.group(2))
            sampler.stage = f"after {m.group(1)}"
        if args.verbose:
            print(line, end="")
    rc = proc.wait()
    sampler.stop()
    thread.join()
    if rc != 0:
        raise SystemExit(f"nightly failed (exit {rc}):\n{''.join(tail)}")
    return {"wall_s": time.perf_counter() - t0, "walls": walls, "peaks": sampler.peaks}


def measure(rows: int, args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    data = make_data(rows, work, args.seed)
    users = pl.concat([pl.scan_parquet(data / f"{t}.parquet").select("user_id")
                       for t in ("impressions", "interactions")])  # fmt: skip
    n_users = int(users.select(pl.col("user_id").n_unique()).collect().item())
    run = work / f"run-{rows}"
    got = run_nightly(data, run, args)
    recs = pl.scan_parquet(run / "recommendations.parquet")
    listed = int(recs.select(pl.col("user_id").n_unique()).collect().item())
    stages = {}
    # every stage, and the moments between them (start-up; "after lists": publishing and the
    # registry's champion gate) where they were sampled
    names = list(dict.fromkeys([*got["peaks"], *got["walls"]]))
    for name in sorted(names, key=lambda n: _order(n, list(got["walls"]))):
        p = got["peaks"].get(name, Peaks())
        seconds = got["walls"].get(name)
        stages[name] = {"seconds": seconds, "rows_per_s": rows / seconds if seconds else None,
                        "driver_peak_mb": round(p.driver_mb), "ray_peak_mb": round(p.others_mb),
                        "total_peak_mb": round(p.total_mb), "processes": p.processes}  # fmt: skip
    allp = list(got["peaks"].values())
    return {
        "rows": rows,
        "users_in_log": n_users,
        "users_listed": listed,
        "wall_s": round(got["wall_s"], 1),
        "peak_total_mb": round(max((p.total_mb for p in allp), default=0.0)),
        "peak_driver_mb": round(max((p.driver_mb for p in allp), default=0.0)),
        "stages": stages,
    }


def _order(name: str, stages: list[str]) -> float:
    """Stages in run order, "after X" right after X, the start first."""
    if name in stages:
        return stages.index(name)
    after = name.removeprefix("after ")
    return stages.index(after) + 0.5 if after in stages else -1


def table(result: dict[str, Any], first: dict[str, Any] | None) -> str:
    head = ["stage", "seconds", "rows/s", "vs first", "driver MB", "Ray MB", "total MB", "procs"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for name, s in result["stages"].items():
        base = (first or {}).get("stages", {}).get(name, {}).get("rows_per_s")
        ratio = f"{s['rows_per_s'] / base:.2f}" if base and s["rows_per_s"] else ""
        rps = f"{s['rows_per_s']:,.0f}" if s["rows_per_s"] else ""
        secs = "" if s["seconds"] is None else f"{s['seconds']:.1f}"
        lines.append(" | ".join([name, secs, rps, ratio, str(s["driver_peak_mb"]),
                                 str(s["ray_peak_mb"]), str(s["total_peak_mb"]),
                                 str(s["processes"])]))  # fmt: skip
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r["rows"] for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name in results[-1]["stages"]:
        secs = [r["stages"].get(name, {}).get("seconds") for r in results]
        if not any(secs):
            continue
        pts = [(x, y) for x, y in zip(rows, secs, strict=True) if y]
        if pts:
            a.plot(*zip(*pts, strict=True), marker="o", label=name)
    ref = [rows[0], rows[-1]]
    total0 = sum(s["seconds"] or 0.0 for s in results[0]["stages"].values())
    a.plot(ref, [total0, total0 * rows[-1] / rows[0]], "k--", lw=0.8, label="linear")
    a.set(xscale="log", yscale="log", xlabel="shown rows", ylabel="seconds", title="stage wall")
    a.legend(fontsize=7)
    b.plot(rows, [r["peak_total_mb"] for r in results], marker="o", label="driver + Ray (PSS)")
    b.plot(rows, [r["peak_driver_mb"] for r in results], marker="o", label="driver (RSS)")
    b.set(xscale="log", yscale="log", xlabel="shown rows", ylabel="MB", title="peak memory")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="0.5M,1M,2M,4M,8M", help="log sizes, e.g. 0.5M,1M,200k")
    ap.add_argument("--work", default="/tmp/bench_scale", help="data sets, runs and results")
    ap.add_argument("--config", help="nightly config TOML (default: the built-in defaults)")
    ap.add_argument("--ray-address", help="run the nightlies on this Ray cluster")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="echo the nightlies' output")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for rows in sorted(parse_rows(r) for r in args.rows.split(",")):
        res = measure(rows, args)
        results.append(res)
        print(f"\n{rows:,} shown rows: {res['wall_s']:.0f} s, peak {res['peak_total_mb']:,} MB "
              f"(driver {res['peak_driver_mb']:,} MB), lists for {res['users_listed']:,} of "
              f"{res['users_in_log']:,} users")  # fmt: skip
        print(table(res, results[0] if len(results) > 1 else None))
        (work / "bench_scale.json").write_text(json.dumps(results, indent=1))
    plot(results, work / "bench_scale.png")
    print("\nrows | wall s | peak MB (driver + Ray) | driver MB | users listed / in log")
    for r in results:
        listed = f"{r['users_listed']:,} / {r['users_in_log']:,}"
        print(f"{r['rows']:,} | {r['wall_s']:.0f} | {r['peak_total_mb']:,} | "
              f"{r['peak_driver_mb']:,} | {listed}")  # fmt: skip
    print(f"\n{work / 'bench_scale.json'}, {work / 'bench_scale.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
