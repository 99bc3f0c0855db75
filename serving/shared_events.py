"""Events shared by every worker and replica through Redis: one event stream, one set of ids.

    store = SharedEventStore(log_dir, "redis://host:6379/0")   # seeds Redis from the log
    store.ingest(current_model, raw_events) -> {"accepted", "duplicates", "rejected"}
    store.attach(model, swap)        # the events so far into a new model, then swap
    store.live_status() -> (fresh, "...")   # for /readyz
    store.close()

Why a stream and not counters in Redis: the live features (`features.live`) are cumulative rows
per key with window arithmetic, equal to the offline point-in-time path to 1e-9. Keeping them in
one place (each worker's in-process `LiveState`) and sharing only the *events* keeps one feature
code path; Redis holds what must agree across processes: which event ids were accepted (the
de-duplication) and in which order (the stream). Each worker applies the stream to its own state,
so every worker counts the same events and ranks with the same numbers.

A batch of events:
1. is checked event by event (as in process) and appended to the event log (durable, fsynced;
   several workers share the folder: `EventLog(shared=True)`);
2. goes to Redis in one round trip, a Lua script (atomic): each id is added to the id set
   (`SADD`: 1 = new, so the check is atomic across workers), the new events are appended to the
   stream as one entry, and the entries after the caller's last one come back;
3. the worker applies those entries (its own among them) before it answers, so an event is
   counted by the worker that took it when the answer leaves. Other workers read the stream in
   a background thread (`XREAD BLOCK`) and apply new entries within milliseconds.

A worker remembers the ids it applied, so an entry is never counted twice, whatever Redis does.
Redis unreachable: events answer 503 (they are in the log; a retry with the same ids counts them
once), `/v1/rank` ranks from the state the worker has, `/readyz` says it is stale. A Redis that
lost its data (restarted without persistence: the `epoch` key is gone) is seeded again from the
event log, as at every start: replaying a log is idempotent (the ids).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

from recsys.eventlog import EventLog
from serving.events import EventStore
from serving.ranking import ServingModel

logger = logging.getLogger("serving")

SEED_BATCH = 1_000  # logged events per round trip when seeding Redis from the log

# KEYS: the id set, the stream, the epoch key. ARGV[1] "1": refuse (return {"reset"}) when the
# epoch is missing (Redis lost its data: seed it first); ARGV[2] the caller's last stream id
# ("" = return no entries); then event id, event JSON, ... Returns {indices of the new events
# (0-based), entries after ARGV[2]}.
_PUBLISH = """
if ARGV[1] == '1' and redis.call('EXISTS', KEYS[3]) == 0 then
  return {'reset'}
end
local fresh, idx = {}, {}
for i = 3, #ARGV, 2 do
  if redis.call('SADD', KEYS[1], ARGV[i]) == 1 then
    fresh[#fresh + 1] = ARGV[i + 1]
    idx[#idx + 1] = (i - 3) / 2
  end
end
if #fresh > 0 then
  redis.call('XADD', KEYS[2], '*', 'b', '[' .. table.concat(fresh, ',') .. ']')
end
local entries = {}
if ARGV[2] ~= '' then
  entries = redis.call('XRANGE', KEYS[2], '(' .. ARGV[2], '+')
end
return {idx, entries}
"""

Entry = tuple[str, list[dict[str, Any]]]  # (stream id, its events)


class LiveStateUnavailable(RuntimeError):
    """Redis could not be reached (or answered an error); the message says what to do."""


def redacted(url: str) -> str:
    """`url` without a password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _sid(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _entry(raw: Any) -> Entry:
    """(id, events) of a stream entry as XRANGE in Lua ([id, [field, value]]) or redis-py's
    XREAD ((id, {field: value})) returns it."""
    entry_id, fields = raw[0], raw[1]
    if not isinstance(fields, dict):
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    body = fields[b"b"]
    sid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return sid, json.loads(body)


class RedisEvents:
    """The Redis side: the id set, the stream and the epoch under one prefix (a hash tag, so
    they share a cluster slot). Raises LiveStateUnavailable instead of redis' errors."""

    def __init__(self, url: str, prefix: str = "recsys", block_ms: int = 1_000) -> None:
        self.url = url
        self.block_ms = block_ms
        tag = "{" + prefix + "}"
        self.ids, self.stream, self.epoch_key = f"{tag}:ids", f"{tag}:stream", f"{tag}:epoch"
        opts: dict[str, Any] = {"socket_connect_timeout": 0.5, "retry_on_timeout": False}
        try:
            self.client = redis.Redis.from_url(url, socket_timeout=2.0, **opts)
            # the follower's blocking reads wait up to block_ms for news
            self.reader = redis.Redis.from_url(url, socket_timeout=block_ms / 1e3 + 2, **opts)
        except ValueError as e:
            raise LiveStateUnavailable(f"bad Redis URL {redacted(url)!r} ({e})") from e
        self._publish = self.client.register_script(_PUBLISH)

    def _fail(self, e: Exception) -> LiveStateUnavailable:
        return LiveStateUnavailable(
            f"the shared live state (Redis at {redacted(self.url)}) is unreachable "
            f"({type(e).__name__}: {e})"
        )

    def publish(
        self, events: Sequence[dict[str, Any]], after: str | None, *, seeding: bool = False
    ) -> tuple[list[int], list[Entry]] | None:
        """Add `events` (normalised, distinct ids) in one round trip: (the indices of those
        Redis did not know, the stream entries after `after`; none when `after` is None).
        None when Redis lost its data (seed it, then retry); seeding=True adds regardless."""
        args: list[Any] = ["0" if seeding else "1", after or ""]
        for e in events:
            args += [e["event_id"], json.dumps(e, separators=(",", ":"))]
        try:
            out = self._publish(keys=[self.ids, self.stream, self.epoch_key], args=args)
        except redis.RedisError as e:
            raise self._fail(e) from e
        if out and out[0] == b"reset":
            return None
        return [int(i) for i in out[0]], [_entry(x) for x in out[1]]

    def read(self, after: str, count: int = 100, block: bool = False) -> list[Entry]:
        """Stream entries after `after` (at most `count`); block: wait up to block_ms for one."""
        got: Any
        try:
            if block:
                got = self.reader.xread({self.stream: after}, count=count, block=self.block_ms)
                return [_entry(x) for _, entries in got or () for x in entries]
            got = self.client.xrange(self.stream, f"({after}", "+", count=count)
        except redis.RedisError as e:
            raise self._fail(e) from e
        return [_entry(x) for x in got]

    def epoch(self) -> str | None:
        """The token of this Redis' data (None: empty, or never seeded)."""
        try:
            token: Any = self.client.get(self.epoch_key)
        except redis.RedisError as e:
            raise self._fail(e) from e
        return token.decode() if token is not None else None

    def mark_seeded(self) -> str:
        """Set the epoch token unless another worker did; returns the one in force."""
        try:
            self.client.set(self.epoch_key, uuid.uuid4().hex, nx=True)
        except redis.RedisError as e:
            raise self._fail(e) from e
        token = self.epoch()
        assert token is not None
        return token

    def close(self) -> None:
        self.client.close()
        self.reader.close()


class SharedEventStore(EventStore):
    """EventStore's interface, with the de-duplication and the order of events in Redis (see
    the module's docstring). `seen` holds the ids this worker has applied."""

    def __init__(self, directory: str | os.PathLike[str], url: str, prefix: str = "recsys") -> None:
        self.log = EventLog(directory, shared=True)
        self.redis = RedisEvents(url, prefix)
        self.seen: set[str] = set()
        self.lock = threading.Lock()  # orders application and the attach of a new model
        self.applied: list[dict[str, Any]] = []  # every event applied, for a reloaded model
        self.last = "0-0"  # the last stream entry applied
        self.model: ServingModel | None = None
        self.epoch: str | None = None
        self.error: str | None = None  # why the state may be stale (None: in step)
        self.since: datetime | None = None
        self._seed_lock = threading.Lock()
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None

    # ---------------------------------------------------------------- Redis, kept in step

    def _ok(self) -> None:
        if self.error is not None:
            logger.info("the shared live state is reachable again (%s)", redacted(self.redis.url))
        self.error, self.since = None, None

    def _down(self, e: LiveStateUnavailable) -> None:
        if self.error is None:
            logger.warning("%s; ranking from the last state", e)
            self.since = datetime.now(UTC)
        self.error = str(e)

    def seed(self) -> None:
        """Replay the event log into Redis (ids already there are skipped), then mark Redis as
        seeded. At start, and when Redis lost its data. LiveStateUnavailable if unreachable."""
        with self._seed_lock:
            batch: list[dict[str, Any]] = []
            ids: set[str] = set()
            for e in self.log.read():
                if e["event_id"] in ids:  # logged by two workers
                    continue
                ids.add(e["event_id"])
                batch.append(e)
                if len(batch) == SEED_BATCH:
                    self.redis.publish(batch, None, seeding=True)
                    batch = []
            if batch:
                self.redis.publish(batch, None, seeding=True)
            epoch = self.redis.mark_seeded()
            if self.epoch is not None and epoch != self.epoch:
                with self.lock:
                    self.last = "0-0"  # a new stream: read it all (applied ids are skipped)
            self.epoch = epoch

    def sync(self) -> None:
        """Seed Redis if it lost its data, then apply every entry not applied yet."""
        if self.redis.epoch() != self.epoch or self.epoch is None:
            self.seed()
        while entries := self.redis.read(self.last, count=100):
            self.absorb(entries)

    def absorb(self, entries: Sequence[Entry]) -> None:
        """Apply the stream `entries` after the last one applied (others are old), skipping
        events already applied; item events are embedded by the serving model's encoder."""

        def todo() -> list[dict[str, Any]]:
            out, ids = [], set()
            for sid, events in entries:
                if _sid(sid) > _sid(self.last):
                    for e in events:
                        if e["event_id"] not in self.seen and e["event_id"] not in ids:
                            ids.add(e["event_id"])
                            out.append(e)
            return out

        model, guess = self.model, todo()  # the slow part, embedding, outside the lock
        vectors = None
        if model is not None:
            vectors = model.embedder.embed_events([e for e in guess if e["type"] == "item"])
        with self.lock:
            events = todo()
            serving = self.model
            if serving is not None and (serving is not model or events != guess):
                vectors = serving.embedder.embed_events([e for e in events if e["type"] == "item"])
            if events:
                if serving is not None:
                    serving.live.apply(events, vectors)
                self.applied.extend(events)
                self.seen.update(e["event_id"] for e in events)
            newest = max((sid for sid, _ in entries), key=_sid, default=self.last)
            if _sid(newest) > _sid(self.last):
                self.last = newest

    def _follow(self) -> None:
        """The background reader: new entries as they come; on a failure, retry with backoff."""
        wait = 0.05
        while not self._stop.is_set():
            try:
                if self.error is not None or self.epoch is None:
                    self.sync()
                    self._ok()
                entries = self.redis.read(self.last, block=True)
                if entries:
                    self.absorb(entries)
                elif self.redis.epoch() != self.epoch:  # Redis lost its data meanwhile
                    self.sync()
                wait = 0.05
            except LiveStateUnavailable as e:
                self._down(e)
                self._stop.wait(wait)
                wait = min(wait * 2, 1.0)
            except Exception:  # a bug: keep following, say so
                logger.exception("the shared live state follower failed; retrying")
                self._stop.wait(1.0)

    # ---------------------------------------------------------------- EventStore's interface

    def ingest(self, current: Callable[[], ServingModel], raw: Sequence[Any]) -> dict[str, Any]:
        """Check, log (durably), then publish `raw` to Redis in one round trip and apply what
        is new; OSError if the log cannot be written, LiveStateUnavailable if Redis cannot be
        reached (the events are logged but not counted: a retry with the same ids counts them
        once)."""
        current()  # 503 until a model serves
        records, duplicates, rejected = self.check(raw)
        self.log.append(records)
        accepted = 0
        if records:
            try:
                out = self.redis.publish(records, self.last)
                if out is None:  # Redis lost its data: seed it from the log, then again
                    self.seed()
                    out = self.redis.publish(records, self.last)
                    if out is None:
                        raise LiveStateUnavailable("Redis lost its data again while seeding")
            except LiveStateUnavailable as e:
                self._down(e)
                raise
            fresh, entries = out
            accepted = len(fresh)
            duplicates += len(records) - accepted
            self.absorb(entries)
        return {"accepted": accepted, "duplicates": duplicates, "rejected": rejected}

    def replay(self, model: ServingModel) -> int:
        """Apply every event applied so far to `model` (not serving yet); returns the count."""
        items = [e for e in self.applied if e["type"] == "item"]
        model.live.apply(self.applied, model.embedder.embed_events(items))
        return len(self.applied)

    def attach(self, model: ServingModel, swap: Callable[[ServingModel], Any]) -> int:
        """Bring the shared state up to date (if Redis answers), apply it to `model`, then
        `swap(model)`, under the lock; the first attach starts the background reader."""
        try:
            self.sync()
            self._ok()
        except LiveStateUnavailable as e:
            self._down(e)
        with self.lock:
            n = self.replay(model)
            self.model = model
            swap(model)
        if self._follower is None:
            self._follower = threading.Thread(
                target=self._follow, name="recsys-live-follower", daemon=True
            )
            self._follower.start()
        return n

    def live_status(self) -> tuple[bool, str]:
        """(in step, a line for /readyz)."""
        where = f"Redis at {redacted(self.redis.url)}"
        if self.error is None:
            return True, f"shared: {where}, {len(self.seen)} events applied"
        since = self.since.isoformat(timespec="seconds") if self.since else "?"
        return False, (
            f"stale: {where} unreachable since {since}; ranking from the {len(self.seen)} "
            f"events applied until then ({self.error})"
        )

    def close(self) -> None:
        self._stop.set()
        if self._follower is not None:
            deadline = time.monotonic() + self.redis.block_ms / 1e3 + 3
            self._follower.join(timeout=max(0.1, deadline - time.monotonic()))
        self.redis.close()
        self.log.close()
