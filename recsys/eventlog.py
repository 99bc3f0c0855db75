"""The event log: append-only JSON-lines segments in one folder, durable before acknowledged.

    log = EventLog(directory)          # recovers a torn tail left by a crash
    log.append([{...}, ...])           # one write + fsync per batch; returns once on disk
    for event in log.read(): ...       # every event, in append order

A batch is written with one `write` of complete lines and `fsync`ed (the folder too when a
segment is created) before `append` returns, so an acknowledged event survives a crash. A crash
inside a write leaves at most a partial last line in the newest segment; opening the log cuts
it off (that batch was never acknowledged). Segments are `events-<first event number>.jsonl`,
a new one once the current passes `segment_bytes`; closed segments never change. Each event is
a JSON object (the API's normalised event: event_id, type, ts in ISO 8601, its fields).

    log = EventLog(directory, shared=True)   # several writer processes (API workers) at once

Shared: every append, and the recovery at open, holds an exclusive `flock` on `.writer.lock` in
the folder, and finds the newest segment afresh (another process may have started one); a
partial last line left by a writer that crashed is cut before the next batch is written after
it. The same event may then be logged by two workers (each checks ids against the shared state
only after its batch is durable); readers count an `event_id` once (the importer, the replay).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from recsys.errors import DataError
from recsys.io import fsync_dir

PREFIX, SUFFIX = "events-", ".jsonl"
SEGMENT_BYTES = 64 * 1024 * 1024


class EventLog:
    """One writer process per folder (the API worker that owns it); readers may be anywhere.

    writer=False opens an existing log to read it (the importer): nothing is created or cut,
    so a reader never touches a batch a running server is writing. shared=True: several writer
    processes (see the module's docstring); `count` is then this process's view, not exact."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        segment_bytes: int = SEGMENT_BYTES,
        *,
        writer: bool = True,
        shared: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.writer = writer
        self.shared = shared and writer
        if writer:
            self.directory.mkdir(parents=True, exist_ok=True)
        elif not self.directory.is_dir():
            raise DataError(f"{self.directory}: no such event log folder")
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self.count = 0
        self.recovered_bytes = 0
        with self._writers():
            segments = self.segments()
            if segments:
                if writer:
                    self.recovered_bytes = _cut_torn_tail(segments[-1])
                self.count = _first_number(segments[-1]) + _count_lines(segments[-1])
        self._current = segments[-1] if segments else None
        self._fd: int | None = None
        self._size = 0

    @contextmanager
    def _writers(self) -> Iterator[None]:
        """Shared: hold the folder's writer lock (other processes wait); else nothing."""
        if not self.shared:
            yield
            return
        fd = os.open(self.directory / ".writer.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def segments(self) -> list[Path]:
        """The segment files, oldest first."""
        found = [p for p in self.directory.glob(f"{PREFIX}*{SUFFIX}") if p.is_file()]
        return sorted(found, key=_first_number)

    def append(self, events: list[dict[str, Any]]) -> None:
        """Write `events` as complete lines and fsync them; raises OSError if the disk fails."""
        if not self.writer:
            raise DataError(f"{self.directory}: opened for reading; open it with writer=True")
        if not events:
            return
        data = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events).encode()
        with self._lock, self._writers():
            if self.shared:
                self._follow_others()
            if self._fd is None or self._size >= self.segment_bytes:
                self._open_segment()
            assert self._fd is not None
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
            self._size += len(data)
            self.count += len(events)

    def _follow_others(self) -> None:
        """Shared, under the writer lock: write to the newest segment (another process may have
        started it), and cut a torn line a crashed writer left at its end."""
        segments = self.segments()
        newest = segments[-1] if segments else None
        if newest != self._current:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._current = newest
            if newest is not None:
                self.count = _first_number(newest) + _count_lines(newest)
        if newest is not None:
            size = newest.stat().st_size
            if size:
                with newest.open("rb") as f:
                    f.seek(size - 1)
                    torn = f.read(1) != b"\n"
                if torn:
                    self.recovered_bytes += _cut_torn_tail(newest)
            if self._fd is not None:
                self._size = os.fstat(self._fd).st_size

    def _open_segment(self) -> None:
        """Open the newest segment for appending, or start a new one once it is full. The file
        stays open between batches: each batch is one write and one fsync (fewer system calls,
        so fewer waits for the interpreter lock when other requests are busy)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        current = self._current
        if current is None or current.stat().st_size >= self.segment_bytes:
            if self.shared and current is not None:  # others appended: number from the file
                self.count = _first_number(current) + _count_lines(current)
            current = self.directory / f"{PREFIX}{self.count:012d}{SUFFIX}"
            self._fd = os.open(current, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            fsync_dir(self.directory)
        else:
            self._fd = os.open(current, os.O_WRONLY | os.O_APPEND)
        self._current = current
        self._size = os.fstat(self._fd).st_size

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def read(self) -> Iterator[dict[str, Any]]:
        """Every event in append order (a line that is not JSON is a DataError naming it)."""
        for path in self.segments():
            with path.open("rb") as f:
                for n, line in enumerate(f, 1):
                    if not line.endswith(b"\n"):
                        break  # a batch being written right now: not acknowledged yet
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(
                            f"{path}:{n}: not a JSON event ({e}); the event log is damaged"
                        ) from e


def _first_number(path: Path) -> int:
    try:
        return int(path.name[len(PREFIX) : -len(SUFFIX)])
    except ValueError:
        return -1


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _cut_torn_tail(path: Path) -> int:
    """Truncate `path` after its last newline; returns the bytes cut (0 when it ends cleanly)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with path.open("rb+") as f:
        pos, keep = size, 0
        while pos > 0:
            step = min(1 << 16, pos)
            f.seek(pos - step)
            block = f.read(step)
            nl = block.rfind(b"\n")
            if nl >= 0:
                keep = pos - step + nl + 1
                break
            pos -= step
        if keep == size:
            return 0
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep
