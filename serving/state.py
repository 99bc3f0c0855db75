"""What the routes share, kept on `app.state.serving`: settings, metrics, the one model
reference (swapped atomically on reload), the event store and the ranking thread limit.

    state = serving_state(request)
    model = ready_model(state)      # read the reference once; a 503 until a bundle serves
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from fastapi import Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.events import EventStore
from serving.metrics import Metrics
from serving.ranking import ServingModel
from serving.settings import Settings

logger = logging.getLogger("serving")
T = TypeVar("T")


class AppState:
    """What the routes share: settings, metrics and the one model reference."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.model: ServingModel | None = None
        self.source: str | None = settings.source
        self.status = "no bundle"
        self.detail: str | None = (
            "no bundle configured; set RECSYS_BUNDLE or RECSYS_MODEL_URI, or POST /v1/admin/reload"
        )
        self.reload_lock = asyncio.Lock()
        self.applied_note: str | None = None  # the last cross-worker reload note applied
        self.events: EventStore | None = None
        if settings.event_log is not None and settings.redis_url is not None:
            from serving.shared_events import SharedEventStore

            self.events = SharedEventStore(
                settings.event_log, settings.redis_url, settings.redis_prefix
            )
        elif settings.event_log is not None:
            self.events = EventStore(settings.event_log)
        self.computing = anyio.CapacityLimiter(settings.rank_threads)

    async def compute(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a worker thread, at most `rank_threads` at once."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.computing)

    def swap(self, model: ServingModel, source: str | None) -> ServingModel | None:
        """Serve `model` from now on (with events on: after the event log is replayed into it,
        under the writers' lock, so no event falls between the old model and the new)."""
        old = self.model

        def install(m: ServingModel) -> None:
            self.model = m  # the single reference swap
            self.source, self.status, self.detail = source, "ready", None
            self.metrics.model_loaded(m.model_version)
            ranker, freshness = m.served(live=self.events is not None)
            logger.info("serving %s: ranker %s, %s", m.model_version, ranker, freshness)

        if self.events is not None:
            self.events.attach(model, install)
        else:
            install(model)
        return old


def serving_state(request: Request) -> AppState:
    return request.app.state.serving  # type: ignore[no-any-return]


def ready_model(state: AppState) -> ServingModel:
    """The model serving now; a 503 saying why while there is none."""
    model = state.model
    if model is None:
        raise StarletteHTTPException(503, f"not ready ({state.status}): {state.detail}")
    return model
