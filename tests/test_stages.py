"""Resumable stages: atomic outputs, fingerprints, skip when unchanged, no partial folders."""

from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from pipelines.stages import MARKER, StageContext, StageEnv, StageRunner, fingerprint_of

QUIET = StageEnv(log=lambda s: None)


def _writer(calls, fail=False):
    def fn(ctx: StageContext, x: int) -> dict:
        calls.append(ctx.previous)
        (ctx.work / "out.txt").write_text("partial")
        if fail:
            raise RuntimeError("killed mid-stage")
        (ctx.work / "out.txt").write_text("done")
        return {"n": len(calls)}

    return fn


def test_rerun_skips_unchanged_and_reruns_changed(tmp_path):
    calls: list = []
    r = StageRunner(tmp_path, QUIET)
    a = r.run("s", _writer(calls), x=1)
    assert not a.skipped and (tmp_path / "s" / "out.txt").read_text() == "done"
    b = StageRunner(tmp_path, QUIET).run("s", _writer(calls), x=1)
    assert b.skipped and len(calls) == 1 and b.summary == {"n": 1}
    c = StageRunner(tmp_path, QUIET).run("s", _writer(calls), x=2)
    assert not c.skipped and len(calls) == 2
    assert calls[1] == tmp_path / "s"  # the previous output is offered for incremental work


def test_a_crash_leaves_no_partial_output(tmp_path):
    calls: list = []
    r = StageRunner(tmp_path, QUIET)
    with pytest.raises(RuntimeError, match="killed"):
        r.run("s", _writer(calls, fail=True), x=1)
    assert not (tmp_path / "s").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # temp folder removed
    # an earlier complete output survives a failed rerun
    r.run("s", _writer(calls), x=1)
    with pytest.raises(RuntimeError):
        r.run("s", _writer(calls, fail=True), x=2)
    assert (tmp_path / "s" / "out.txt").read_text() == "done"
    assert (tmp_path / "s" / MARKER).is_file()


def test_leftovers_of_a_killed_run_are_cleared(tmp_path):
    stale = tmp_path / ".s.abc123.tmp"
    stale.mkdir()
    (stale / "out.txt").write_text("partial")
    StageRunner(tmp_path, QUIET).run("s", _writer([]), x=1)
    assert not stale.exists()
    assert (tmp_path / "s" / "out.txt").read_text() == "done"


@dataclass(frozen=True)
class _Settings:
    size: int
    names: tuple[str, ...] = ("a",)


@dataclass(frozen=True)
class _Made:
    at: datetime
    sizes: dict[str, int]
    note: str | None = None


def _make(ctx: StageContext, settings: _Settings, at: datetime) -> _Made:
    (ctx.work / "out.txt").write_text(str(settings.size))
    return _Made(at, {n: settings.size for n in settings.names})


def test_the_fingerprint_is_the_arguments_and_the_result_keeps_its_type(tmp_path):
    t = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    first = StageRunner(tmp_path, QUIET).run("make", _make, settings=_Settings(3), at=t)
    again = StageRunner(tmp_path, QUIET).run("make", _make, settings=_Settings(3), at=t)
    assert not first.skipped and again.skipped and again.fingerprint == first.fingerprint
    # the result is the same typed value whether the stage ran or was reused
    assert first.summary == again.summary == _Made(t, {"a": 3})
    # any field of a config argument changes the fingerprint, and the stage runs again
    other = StageRunner(tmp_path, QUIET).run("make", _make, settings=_Settings(3, ("a", "b")), at=t)
    assert not other.skipped and other.summary.sizes == {"a": 3, "b": 3}
    # a later stage given an earlier one's result is keyed on that result's fingerprint
    assert fingerprint_of(other) == {"fingerprint": other.fingerprint}


def test_an_input_that_cannot_be_fingerprinted_is_refused(tmp_path):
    with pytest.raises(TypeError, match="cannot be fingerprinted; pass an earlier stage's result"):
        StageRunner(tmp_path, QUIET).run("s", _writer([]), x=object())
    assert not (tmp_path / "s").exists()
