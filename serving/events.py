"""Events into a serving worker: checked one by one, made durable, then counted.

    store = EventStore(directory)              # opens (recovers) the event log, learns its ids
    store.ingest(current_model, raw_events) -> {"accepted", "duplicates", "rejected"}
    store.attach(model, swap)                  # replay the log into a new model, then swap

Several workers share one live state through Redis with `serving.shared_events.SharedEventStore`
(the same interface).

An accepted event is in the event log (`recsys.eventlog`, fsynced) before the answer leaves, and
only then in the model's live state; a repeated `event_id` (in the log or earlier in the same
batch) is counted as a duplicate and changes nothing. A loaded model (start, restart, reload)
gets every logged event replayed before it serves, so a new bundle loses no freshness: its live
state is its snapshot plus the events after its cut-off (`features.live`).

One lock orders writers: appends, their application and the replay-and-swap of a reload, so a
reload cannot miss an event that arrives while it loads.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from recsys.eventlog import EventLog
from serving.ranking import ServingModel
from serving.schemas import EVENT


def _reason(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg', '')}" if loc else str(err.get("msg", "")))
    return "; ".join(parts)


class EventStore:
    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.log = EventLog(directory)
        self.seen: set[str] = {e["event_id"] for e in self.log.read()}
        self.lock = threading.Lock()

    def check(self, raw: Sequence[Any]) -> tuple[list[dict[str, Any]], int, list[dict[str, Any]]]:
        """(normalised new events, duplicates, rejected [{index, reason}]) of a request's list."""
        records: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        duplicates = 0
        batch: set[str] = set()
        for i, obj in enumerate(raw):
            try:
                event = EVENT.validate_python(obj)
            except ValidationError as e:
                rejected.append({"index": i, "reason": _reason(e)})
                continue
            if event.event_id in self.seen or event.event_id in batch:
                duplicates += 1
                continue
            batch.add(event.event_id)
            records.append(event.model_dump(mode="json", exclude_none=True))
        return records, duplicates, rejected

    def ingest(self, current: Callable[[], ServingModel], raw: Sequence[Any]) -> dict[str, Any]:
        """Check, log (durably) and apply `raw` events to the serving model (`current()`, read
        under the writers' lock, so a reload that swapped models meanwhile still gets them);
        OSError if the log cannot be written (then nothing of this batch is accepted)."""
        records, duplicates, rejected = self.check(raw)
        items = [r for r in records if r["type"] == "item"]
        model = current()
        vectors = model.embedder.embed_events(items)  # the slow part, outside the lock
        with self.lock:
            fresh = [r for r in records if r["event_id"] not in self.seen]  # a concurrent batch
            duplicates += len(records) - len(fresh)
            self.log.append(fresh)
            self.seen.update(r["event_id"] for r in fresh)
            serving = current()
            if serving is not model:  # reloaded meanwhile: its own encoder embeds the items
                vectors = serving.embedder.embed_events([r for r in fresh if r["type"] == "item"])
            serving.live.apply(fresh, vectors)
        return {"accepted": len(fresh), "duplicates": duplicates, "rejected": rejected}

    def replay(self, model: ServingModel) -> int:
        """Apply every logged event to `model` (a model not serving yet); returns the count."""
        events = list(self.log.read())
        items = [e for e in events if e["type"] == "item"]
        model.live.apply(events, model.embedder.embed_events(items))
        return len(events)

    def attach(self, model: ServingModel, swap: Callable[[ServingModel], Any]) -> int:
        """Replay the log into `model` and call `swap(model)`, both under the writers' lock."""
        with self.lock:
            n = self.replay(model)
            swap(model)
        return n

    def live_status(self) -> tuple[bool, str] | None:
        """(in step, a line for /readyz) of a shared live state; None: this process's own."""
        return None

    def close(self) -> None:
        """Stop what the store runs beside the requests (nothing, in process)."""
