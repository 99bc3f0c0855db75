"""Resumable stages: each writes its outputs atomically and records a fingerprint of its inputs.

A stage runs in a temporary folder beside its final one; when it succeeds, `_stage.json` (the
fingerprint and a small summary) is written and the folder is renamed into place. A rerun skips a
stage whose folder exists with the same fingerprint, so a run killed at any point resumes where it
stopped and no partial outputs are ever read.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys.io import json_digest, replace_dir, write_json

logger = logging.getLogger(__name__)
MARKER = "_stage.json"


@dataclass
class StageResult:
    name: str
    path: Path
    fingerprint: str
    summary: dict[str, Any]
    skipped: bool
    seconds: float
    cpu_seconds: float


@dataclass
class StageRunner:
    """Runs named stages under `run_dir`, skipping those already done with the same inputs."""

    run_dir: Path
    log: Callable[[str], None] = print
    results: dict[str, StageResult] = field(default_factory=dict)

    def done(self, name: str, fingerprint: str) -> dict[str, Any] | None:
        marker = self.run_dir / name / MARKER
        if not marker.is_file():
            return None
        try:
            info = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return info if info.get("fingerprint") == fingerprint else None

    def run(
        self,
        name: str,
        inputs: dict[str, Any],
        fn: Callable[[Path, Path | None], dict[str, Any]],
    ) -> StageResult:
        """Run `fn(work_dir, previous_dir)` unless `name` is done with the same `inputs`.

        `previous_dir` is the stage's last completed folder (for incremental work), or None.
        `fn` writes its outputs into `work_dir` and returns a JSON-able summary.
        """
        fingerprint = json_digest({"stage": name, **inputs})
        final = self.run_dir / name
        info = self.done(name, fingerprint)
        if info is not None:
            self.log(f"[{name}] unchanged inputs, reusing {final}")
            res = StageResult(name, final, fingerprint, info.get("summary", {}), True, 0.0, 0.0)
            self.results[name] = res
            return res
        self.log(f"[{name}] running ...")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.run_dir.glob(f".{name}.*.tmp"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=self.run_dir))
        previous = final if final.is_dir() else None
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            summary = fn(work, previous)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            write_json(
                {"fingerprint": fingerprint, "summary": summary, "seconds": seconds}, work / MARKER
            )
            replace_dir(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        self.log(f"[{name}] done in {seconds:.1f}s")
        res = StageResult(name, final, fingerprint, summary, False, seconds, cpu)
        self.results[name] = res
        return res
