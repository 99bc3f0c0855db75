"""POST /v1/events: items, impressions and clicks into the event log and the live features
(on with RECSYS_EVENT_LOG; serving/events.py)."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool

from serving.responses import ERROR_RESPONSES, error_response, json_body, json_response
from serving.schemas import MAX_EVENTS, ErrorResponse, EventsRequest, EventsResponse
from serving.shared_events import LiveStateUnavailable
from serving.state import ready_model, serving_state

logger = logging.getLogger("serving")


async def events(request: Request) -> Any:
    """Items, impressions and clicks (at most 1,000 per request), each with an `event_id`
    (idempotent) and a `ts`. Each event is checked on its own: a bad one is listed in
    `rejected` with its reason and the others are accepted. An accepted event is written to
    the event log (fsynced) before this answers, then counted: `/v1/rank` sees it at once,
    and an `item` event's item is embedded and joins the live catalogue."""
    state = serving_state(request)
    store = state.events
    if store is None:
        return error_response(
            409,
            "events are off: start the server with RECSYS_EVENT_LOG=DIR "
            "(recsys serve --event-log DIR) to keep features fresh",
        )
    ready_model(state)  # 503 until a bundle serves
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return error_response(422, f'the body is not JSON ({e}); send {{"events": [...]}}')
    raw = body.get("events") if isinstance(body, dict) else None
    if not isinstance(raw, list) or set(body) != {"events"}:
        return error_response(422, 'the body must be a JSON object {"events": [event, ...]}')
    if len(raw) > MAX_EVENTS:
        return error_response(
            422, f"{len(raw)} events in one request; send at most {MAX_EVENTS} per request"
        )
    try:
        result = await run_in_threadpool(store.ingest, lambda: ready_model(state), raw)
    except OSError as e:
        logger.error("event log write failed: %s", e)
        return error_response(503, f"could not write the event log ({e}); nothing accepted, retry")
    except LiveStateUnavailable as e:
        return error_response(
            503,
            f"{e}: these events are logged but not counted yet; retry them with the same "
            "event ids (a repeated id counts once). /v1/rank keeps ranking from the last state",
        )
    state.metrics.events(result["accepted"], result["duplicates"], len(result["rejected"]))
    state.metrics.live_items(len(ready_model(state).live.items.ids))
    return json_response(result)


def add_routes(app: FastAPI) -> None:
    app.post(
        "/v1/events",
        response_model=EventsResponse,
        tags=["events"],
        responses={
            **ERROR_RESPONSES,
            409: {"model": ErrorResponse, "description": "events are off (no RECSYS_EVENT_LOG)"},
            503: {
                "model": ErrorResponse,
                "description": "no bundle yet, the log is unwritable, or Redis is unreachable",
            },
        },
        openapi_extra=json_body(EventsRequest, required=True),
    )(events)
