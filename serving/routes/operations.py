"""Operations routes: GET /healthz, /readyz, /metrics and POST /v1/admin/reload (bearer
RECSYS_ADMIN_TOKEN; loads a bundle beside the serving one, then swaps one reference)."""

from __future__ import annotations

import hmac
import logging
import time
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from features.live import epoch_us
from recsys.errors import ConfigError, DataError
from serving.errors import details
from serving.live import Freshness
from serving.metrics import CONTENT_TYPE
from serving.responses import error_response, invalid_response, json_body
from serving.schemas import ErrorResponse, Health, ReloadRequest, ReloadResponse
from serving.settings import Settings
from serving.source import load_model
from serving.state import AppState, serving_state
from serving.sync import write_note

logger = logging.getLogger("serving")


def live_freshness(state: AppState) -> Freshness | None:
    """The serving model's live state freshness at the latest moment asked (now before any
    request), None without events."""
    if state.model is None or state.events is None:
        return None
    return state.model.live.freshness(epoch_us(datetime.now(UTC)))


async def healthz() -> Health:
    """The process is up (says nothing about the model)."""
    return Health(status="ok")


async def readyz(request: Request) -> Any:
    """200 once a bundle serves; 503 while loading, with no bundle, or after a failed load."""
    state = serving_state(request)
    if state.model is not None:
        fresh = live_freshness(state)
        stale = fresh is not None and fresh.stale
        ranker, freshness = state.model.served(live=state.events is not None, stale=stale)
        shared = state.events.live_status() if state.events is not None else None
        # a stale state (shared or this process's) still serves (every worker shares the
        # outage: a 503 here would take them all out of the balancer), and says so
        return Health(
            status="ready", model_version=state.model.model_version, ranker=ranker,
            freshness=freshness, live=shared[1] if shared is not None else None,
            stale=None if fresh is None else fresh.stale,
            last_event=None if fresh is None else fresh.last_event,
            stale_since=None if fresh is None else fresh.stale_since,
            max_event_lag_s=None if fresh is None else fresh.max_lag_s,
        )  # fmt: skip
    return JSONResponse(
        Health(status=state.status, detail=state.detail).model_dump(exclude_none=True), 503
    )


async def prometheus(request: Request) -> Response:
    """Prometheus text: requests, latency histogram, model version, reloads, errors, events;
    with several workers, all of them (serving/metrics.py)."""
    state = serving_state(request)
    if state.model is not None and state.events is not None:
        state.metrics.live_items(len(state.model.live.items.ids))
        fresh = live_freshness(state)
        if fresh is not None:
            state.metrics.live_freshness(fresh.stale, fresh.last_event.timestamp())
    return Response(await run_in_threadpool(state.metrics.render), media_type=CONTENT_TYPE)


async def reload(request: Request) -> Any:
    """Load a bundle (body `{bundle}` or `{model_uri}`, default: the current source) beside
    the serving one and swap them; on any failure the old bundle keeps serving."""
    state = serving_state(request)
    settings, metrics = state.settings, state.metrics
    _authorize(request, settings)
    raw = await request.body()
    try:
        body = ReloadRequest.model_validate_json(raw) if raw.strip() else ReloadRequest()
    except ValidationError as e:
        return invalid_response(details(list(e.errors())))  # type: ignore[arg-type]
    source = body.bundle or body.model_uri or state.source
    if source is None:
        return error_response(422, 'nothing to load: give {"bundle": PATH} or {"model_uri": URI}')
    if state.reload_lock.locked():
        return error_response(409, "another reload is running; retry when it has finished")
    async with state.reload_lock:
        previous = state.model.model_version if state.model is not None else None
        t0 = time.perf_counter()
        try:
            new = await run_in_threadpool(load_model, source, settings)
        except (DataError, ConfigError) as e:
            metrics.reload(ok=False)
            return error_response(422, f"reload failed, still serving {previous}: {e}")
        except Exception as e:  # anything else: report it, keep serving the old bundle
            metrics.reload(ok=False)
            logger.exception("reload of %s failed", source)
            return error_response(
                503, f"reload failed ({type(e).__name__}: {e}), still serving {previous}"
            )
        await run_in_threadpool(state.swap, new, source)
        metrics.reload(ok=True)
        logger.info("reloaded %s: %s -> %s", source, previous, new.model_version)
        if settings.reload_file is not None:
            state.applied_note = write_note(settings.reload_file, source).id
    return ReloadResponse(
        model_version=new.model_version,
        previous_model_version=previous,
        source=source,
        seconds=round(time.perf_counter() - t0, 3),
        workers_follow=settings.reload_file is not None,
    )


def _authorize(request: Request, settings: Settings) -> None:
    if settings.admin_token is None:
        raise StarletteHTTPException(
            404, "the admin API is off; set RECSYS_ADMIN_TOKEN on the server to enable it"
        )
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    expected = settings.admin_token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
        raise StarletteHTTPException(
            401,
            "missing or wrong admin token; send 'Authorization: Bearer <RECSYS_ADMIN_TOKEN>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


def add_routes(app: FastAPI) -> None:
    app.get("/healthz", response_model=Health, response_model_exclude_none=True,
            tags=["operations"])(healthz)  # fmt: skip
    app.get("/readyz", response_model=Health, response_model_exclude_none=True, tags=["operations"],
            responses={503: {"model": Health, "description": "not ready"}})(readyz)  # fmt: skip
    app.get("/metrics", tags=["operations"], response_class=Response)(prometheus)
    app.post(
        "/v1/admin/reload",
        response_model=ReloadResponse,
        tags=["operations"],
        responses={
            401: {"model": ErrorResponse, "description": "missing or wrong bearer token"},
            404: {"model": ErrorResponse, "description": "admin is off (no RECSYS_ADMIN_TOKEN)"},
            409: {"model": ErrorResponse, "description": "another reload is running"},
            422: {"model": ErrorResponse, "description": "the new bundle failed; old one serves"},
        },
        openapi_extra=json_body(ReloadRequest, required=False),
    )(reload)
