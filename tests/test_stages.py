"""Resumable stages: atomic outputs, fingerprints, skip when unchanged, no partial folders."""

import pytest

from pipelines.stages import MARKER, StageRunner


def _writer(calls, fail=False):
    def fn(work, prev):
        calls.append(prev)
        (work / "out.txt").write_text("partial")
        if fail:
            raise RuntimeError("killed mid-stage")
        (work / "out.txt").write_text("done")
        return {"n": len(calls)}

    return fn


def test_rerun_skips_unchanged_and_reruns_changed(tmp_path):
    calls: list = []
    r = StageRunner(tmp_path, log=lambda s: None)
    a = r.run("s", {"x": 1}, _writer(calls))
    assert not a.skipped and (tmp_path / "s" / "out.txt").read_text() == "done"
    b = StageRunner(tmp_path, log=lambda s: None).run("s", {"x": 1}, _writer(calls))
    assert b.skipped and len(calls) == 1 and b.summary == {"n": 1}
    c = StageRunner(tmp_path, log=lambda s: None).run("s", {"x": 2}, _writer(calls))
    assert not c.skipped and len(calls) == 2
    assert calls[1] == tmp_path / "s"  # the previous output is offered for incremental work


def test_a_crash_leaves_no_partial_output(tmp_path):
    calls: list = []
    r = StageRunner(tmp_path, log=lambda s: None)
    with pytest.raises(RuntimeError, match="killed"):
        r.run("s", {"x": 1}, _writer(calls, fail=True))
    assert not (tmp_path / "s").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # temp folder removed
    # an earlier complete output survives a failed rerun
    r.run("s", {"x": 1}, _writer(calls))
    with pytest.raises(RuntimeError):
        r.run("s", {"x": 2}, _writer(calls, fail=True))
    assert (tmp_path / "s" / "out.txt").read_text() == "done"
    assert (tmp_path / "s" / MARKER).is_file()


def test_leftovers_of_a_killed_run_are_cleared(tmp_path):
    stale = tmp_path / ".s.abc123.tmp"
    stale.mkdir()
    (stale / "out.txt").write_text("partial")
    StageRunner(tmp_path, log=lambda s: None).run("s", {"x": 1}, _writer([]))
    assert not stale.exists()
    assert (tmp_path / "s" / "out.txt").read_text() == "done"
