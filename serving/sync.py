"""Reloads across worker processes: the worker that served POST /v1/admin/reload writes a note,
the others follow it.

With `recsys serve --workers N` each worker holds its own model, and an admin request reaches
one of them. That worker loads and checks the new bundle (so its answer says whether the bundle
is good), swaps it in, then writes a note `{"id", "source"}` to the shared file
RECSYS_RELOAD_FILE (atomically: write beside, then rename). Every worker polls the file's
modification time about once a second and, on a note it has not applied, loads that source and
swaps; a worker that starts later (uvicorn replaces dead workers) starts from the latest note.
A follower that fails to load keeps its model and counts the failure in
`recsys_model_reloads_total{result="error"}`.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ReloadNote:
    id: str
    source: str


def write_note(path: Path, source: str) -> ReloadNote:
    """Publish `source` as the bundle every worker should serve; returns the note."""
    note = ReloadNote(id=f"{time.time_ns()}-{uuid.uuid4().hex[:8]}", source=source)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"id": note.id, "source": note.source}))
    os.replace(tmp, path)
    return note


def read_note(path: Path) -> ReloadNote | None:
    """The latest note, or None when there is none (or it cannot be read: tried again later)."""
    try:
        raw = json.loads(path.read_text())
        return ReloadNote(id=str(raw["id"]), source=str(raw["source"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class NoteWatcher:
    """Reads the note only when the file's modification time or size changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int] | None = None

    def poll(self) -> ReloadNote | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        key = (st.st_mtime_ns, st.st_size)
        if key == self._seen:
            return None
        note = read_note(self.path)
        if note is not None:
            self._seen = key
        return note
