"""Resumable stages: a stage is a function; its fingerprint is computed from the arguments it is
given, so what it reads and what it is keyed on cannot drift apart.

`runner.run(name, fn, **inputs)` calls `fn(ctx, **inputs)` in a temporary folder beside its final
one (`ctx.work`); when it succeeds, `_stage.json` (the fingerprint and the stage's typed result as
JSON) is written and the folder is renamed into place. A rerun skips a stage whose folder holds
the same fingerprint and rebuilds its typed result from the JSON, so a run killed at any point
resumes where it stopped and no partial outputs are ever read.

Inputs are fingerprinted by `fingerprint_of`: an earlier stage's result (or anything with a
`fingerprint`) by its fingerprint, configs (dataclasses) and plain values by their content.
What may differ between runs without changing a stage's outputs (the log, the tracker, where Ray
runs) reaches the stage through `ctx.env`, never through its inputs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from recsys.io import json_digest, replace_dir, write_json

logger = logging.getLogger(__name__)
MARKER = "_stage.json"
S = TypeVar("S")


@dataclass(frozen=True)
class StageEnv:
    """What a stage may use that does not change its outputs."""

    log: Callable[[str], None] = print
    tracker: Any = None  # experiments.tracking.Tracker
    ray_address: str | None = None
    tracking_uri: str = ""
    # rows of a feature table held at once (pipeline.chunk_rows): memory, never outputs
    chunk_rows: int | None = None
    # where Ray workers exchange files (pipeline.storage): a folder or URI every node reaches
    storage: str | None = None


@dataclass(frozen=True)
class StageContext:
    work: Path  # write the outputs here (renamed into place when the stage succeeds)
    previous: Path | None  # the stage's last completed folder (for incremental work), or None
    env: StageEnv


@dataclass(frozen=True)
class StageResult(Generic[S]):
    name: str
    path: Path
    fingerprint: str
    summary: S
    skipped: bool
    seconds: float
    cpu_seconds: float


def fingerprint_of(value: Any) -> Any:
    """A JSON-able value that changes whenever `value` does: a stage result (anything with a
    `fingerprint` attribute) by its fingerprint, dataclasses field by field, containers item by
    item, times as ISO text, paths as text."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if hasattr(value, "fingerprint") and isinstance(value.fingerprint, str):
        return {"fingerprint": value.fingerprint}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: fingerprint_of(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): fingerprint_of(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [fingerprint_of(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(
        f"a stage input of type {type(value).__name__} cannot be fingerprinted; pass an earlier "
        "stage's result, a config dataclass or plain values (and the rest through ctx.env)"
    )


def to_json(value: Any) -> Any:
    """A stage result as JSON-able values (dataclasses as dicts, times as ISO text)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    return value


def from_json(tp: Any, value: Any) -> Any:
    """`value` (from `to_json`) as type `tp`: dataclasses, datetimes and the dicts, lists and
    optionals of them are rebuilt; anything else stays as JSON gave it."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else from_json(inner[0] if len(inner) == 1 else Any, value)
    if origin is dict and isinstance(value, dict):
        vt = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        return {k: from_json(vt, v) for k, v in value.items()}
    if origin is list and isinstance(value, list):
        et = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        return [from_json(et, v) for v in value]
    if tp is datetime and isinstance(value, str):
        return datetime.fromisoformat(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(value, dict):
        hints = typing.get_type_hints(tp)
        return tp(**{f.name: from_json(hints[f.name], value[f.name])
                     for f in dataclasses.fields(tp) if f.name in value})  # fmt: skip
    return value


@dataclass
class StageRunner:
    """Runs named stages under `run_dir`, skipping those already done with the same inputs."""

    run_dir: Path
    env: StageEnv = field(default_factory=StageEnv)
    results: dict[str, StageResult[Any]] = field(default_factory=dict)

    def done(self, name: str, fingerprint: str) -> dict[str, Any] | None:
        marker = self.run_dir / name / MARKER
        if not marker.is_file():
            return None
        try:
            info = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return info if info.get("fingerprint") == fingerprint else None

    def run(self, name: str, fn: Callable[..., S], **inputs: Any) -> StageResult[S]:
        """`fn(ctx, **inputs)` unless stage `name` is done with the same inputs; its result is
        typed by `fn`'s return annotation, rebuilt from JSON both when it ran and when it was
        reused (so a resumed run sees exactly what a fresh one sees). With a tracker, the
        stage is a run of its own nested under the tracker's (`ctx.env.tracker` is that run),
        with its seconds and whether it was reused."""
        tracker = self.env.tracker
        if tracker is None:
            return self._run(name, fn, self.env, inputs)
        with tracker.stage(name) as t:
            res = self._run(name, fn, dataclasses.replace(self.env, tracker=t), inputs)
            t.set_tags(
                {"stage.reused": str(res.skipped).lower(), "stage.fingerprint": res.fingerprint}
            )
            if not res.skipped:
                t.log_metrics({"seconds": res.seconds, "cpu_seconds": res.cpu_seconds})
        return res

    def _run(
        self, name: str, fn: Callable[..., S], env: StageEnv, inputs: dict[str, Any]
    ) -> StageResult[S]:
        fingerprint = json_digest({"stage": name, **fingerprint_of(inputs)})
        kind = typing.get_type_hints(fn).get("return", Any)
        final = self.run_dir / name
        info = self.done(name, fingerprint)
        if info is not None:
            env.log(f"[{name}] unchanged inputs, reusing {final}")
            summary = from_json(kind, info.get("summary"))
            return self._record(StageResult(name, final, fingerprint, summary, True, 0.0, 0.0))
        env.log(f"[{name}] running ...")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.run_dir.glob(f".{name}.*.tmp"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=self.run_dir))
        previous = final if final.is_dir() else None
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            out = json.loads(json.dumps(to_json(fn(StageContext(work, previous, env), **inputs))))
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            write_json(
                {"fingerprint": fingerprint, "summary": out, "seconds": seconds}, work / MARKER
            )
            replace_dir(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        env.log(f"[{name}] done in {seconds:.1f}s")
        res = StageResult(name, final, fingerprint, from_json(kind, out), False, seconds, cpu)
        return self._record(res)

    def _record(self, res: StageResult[S]) -> StageResult[S]:
        self.results[res.name] = res
        return res
