"""The ranking API: FastAPI over one loaded model bundle, swapped atomically on reload.

    create_app(settings, model=None) -> FastAPI       (routes below; OpenAPI at /docs)
    serve(bundle, model_uri, host, port, workers, tracking_uri)   (what `recsys serve` runs)

Routes
    POST /v1/rank                       rank candidates for a user / a history / cold start
    GET  /v1/recommendations/{user_id}  the nightly list, or popular items (`fallback: true`)
    GET  /healthz                       the process is up
    GET  /readyz                        200 once a bundle serves, else 503 with the reason
    GET  /metrics                       Prometheus text (serving/metrics.py)
    POST /v1/admin/reload               bearer RECSYS_ADMIN_TOKEN; loads a bundle beside the old
                                        one, then swaps one reference (off without a token)
    POST /v1/events                     items, impressions and clicks into the event log and the
                                        live features (on with RECSYS_EVENT_LOG; serving/events.py)

Every error is compact JSON `{"error": "...", "detail": [{"loc", "msg"}]}`: 4xx saying what to
fix for bad input, 413 above RECSYS_MAX_BODY_BYTES, 503 before a bundle is loaded, and a 503
without a trace but with the request id (logged with it, counted in
`recsys_unhandled_errors_total`) for bugs. Ranking runs on a thread pool, off the event loop.

A request reads the model reference once and uses that object to the end, so a reload never
changes the model under a request in flight; the old model is freed when the last one finishes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from features.live import epoch_us
from recsys.bundle import Bundle
from recsys.errors import ConfigError, DataError, RecsysError
from serving.events import EventStore
from serving.metrics import CONTENT_TYPE, Metrics
from serving.ranking import ServingModel
from serving.rules import request_rules
from serving.schemas import (
    MAX_EVENTS,
    ErrorResponse,
    EventsRequest,
    EventsResponse,
    Health,
    RankRequest,
    RankResponse,
    RecommendationsResponse,
    ReloadRequest,
    ReloadResponse,
)
from serving.settings import Settings
from serving.sync import NoteWatcher, read_note, write_note
from serving.workers import run_workers

logger = logging.getLogger("serving")
T = TypeVar("T")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what}
    for code, what in (
        (413, "request body too large"),
        (422, "invalid request: the message says what to fix"),
        (503, "no model bundle loaded yet"),
    )
}


# --------------------------------------------------------------------------- loading


def resolve_source(source: str, tracking_uri: str | None = None) -> Path:
    """A local bundle folder for `source`: a path as is, or a registered model
    (`models:/NAME@ALIAS`, `models:/NAME/VERSION`) or other MLflow artifact URI, downloaded.
    The registry is looked up at `tracking_uri` (None: MLflow's default). Download errors
    become a `DataError`."""
    if "://" not in source and not source.startswith(("models:/", "runs:/")):
        # Resolved once: through RUN_DIR/bundles/current, a load reads one published version
        # even if the nightly flips the pointer meanwhile.
        return Path(source).resolve()
    try:
        return Path(_download(source, tracking_uri))
    except Exception as e:
        raise DataError(
            f"{source}: could not download the bundle from MLflow ({type(e).__name__}: "
            f"{str(e)[:300]}); check the model name and alias and --tracking-uri "
            f"({tracking_uri or 'default'})"
        ) from e


def _download(uri: str, tracking_uri: str | None) -> str:
    """Download `uri`; a registered model version goes to a folder of its own under the temp
    dir (keyed by registry, name, version and source), reused when already complete, so
    reloads of the same version download nothing."""
    import mlflow

    if not uri.startswith("models:/"):
        return str(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri))
    # Resolve the version here: download_artifacts alone would ask the default registry.
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name, at, alias = uri.removeprefix("models:/").partition("@")
    if at:
        mv = client.get_model_version_by_alias(name, alias)
    else:
        name, _, version = name.partition("/")
        if not version.isdigit():
            raise DataError(f"{uri}: give models:/NAME@ALIAS or models:/NAME/VERSION")
        mv = client.get_model_version(name, version)
    source = client.get_model_version_download_uri(mv.name, mv.version)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in mv.name)
    key = hashlib.sha256(f"{tracking_uri}|{source}".encode()).hexdigest()[:12]
    dest = Path(tempfile.gettempdir()) / "recsys-bundles" / f"{safe}-v{mv.version}-{key}"
    if (dest / "manifest.json").is_file():
        return str(dest)  # Bundle.load still checks every part
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(work),
                                                       tracking_uri=tracking_uri))  # fmt: skip
        if dest.exists():  # another process finished first
            return str(dest)
        os.replace(got, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return str(dest)


def load_model(source: str, settings: Settings) -> ServingModel:
    """Load, prepare and self-check a bundle; `DataError` if it is missing, broken or skewed."""
    bundle = Bundle.load(resolve_source(source, settings.tracking_uri))
    try:
        return ServingModel.from_bundle(bundle, preload_encoder=settings.preload_encoder)
    except RecsysError:
        raise
    except Exception as e:  # a bundle whose parts load but do not fit together
        raise DataError(
            f"{source}: bundle failed its serving checks ({type(e).__name__}: {e})"
        ) from e


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
        self.events = EventStore(settings.event_log) if settings.event_log is not None else None

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


def _state(request: Request) -> AppState:
    return request.app.state.serving  # type: ignore[no-any-return]


def _model(request: Request) -> ServingModel:
    model = _state(request).model
    if model is None:
        st = _state(request)
        raise StarletteHTTPException(503, f"not ready ({st.status}): {st.detail}")
    return model


# --------------------------------------------------------------------------- errors


def _json_body(model: type[BaseModel], *, required: bool) -> dict[str, Any]:
    """OpenAPI for a JSON body the route reads itself (to answer bad input its own way)."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": required,
                            "content": {"application/json": {"schema": schema}}}}  # fmt: skip


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _details(errors: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for e in errors:
        msg = str(e.get("msg", "invalid"))
        if e.get("type") == "json_invalid":
            pos = e.get("loc", ("body", None))[-1]
            msg = f"malformed JSON ({e.get('ctx', {}).get('error', 'decode error')}"
            msg += f" at character {pos})" if isinstance(pos, int) else ")"
            out.append({"loc": "body", "msg": msg + "; send a JSON object"})
            continue
        if e.get("type") == "missing":
            msg = "field required"
        elif e.get("type") == "extra_forbidden":
            msg = "unknown field; remove it (see /docs for the fields)"
        msg = msg.removeprefix("Value error, ")
        out.append({"loc": _loc(e.get("loc", ())), "msg": msg})
    return out


def _error(status: int, message: str, detail: list[dict[str, str]] | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    return JSONResponse({"error": message, "detail": detail or []}, status, headers=headers)


def _json(content: Any) -> Response:
    """A JSON response from plain dicts and lists (the hot path skips pydantic models: the
    shapes are the documented response models, checked against them in the tests)."""
    body = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return Response(body.encode(), media_type="application/json")


def _invalid(detail: list[dict[str, str]]) -> JSONResponse:
    summary = "; ".join(f"{d['loc']}: {d['msg']}" for d in detail[:3])
    more = f" (and {len(detail) - 3} more)" if len(detail) > 3 else ""
    return _error(422, f"invalid request: {summary}{more}", detail)


def _install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    async def on_validation(_r: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError | ValidationError)
        return _invalid(_details(list(exc.errors())))  # type: ignore[arg-type]

    async def on_http(_r: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        headers = dict(exc.headers) if exc.headers else None
        if exc.status_code == 404 and exc.detail == "Not Found":
            return _error(404, "no such route; see /docs for the API", headers=headers)
        if exc.status_code == 405:
            return _error(405, "method not allowed on this route; see /docs", headers=headers)
        return _error(exc.status_code, str(exc.detail), headers=headers)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(ValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)


# --------------------------------------------------------------------------- middleware


def _request_id(scope: Scope) -> str:
    """The client's X-Request-ID (printable, at most 128 characters), else a new one."""
    given = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), b"")
    text = given.decode("latin-1")
    if 0 < len(text) <= 128 and text.isprintable():
        return text
    return uuid.uuid4().hex


class EdgeMiddleware:
    """Body size limit (413 before the app reads it), per-route metrics, a Server-Timing
    header (`app;dur=<ms>`: time from receiving the request to the response start) and the
    catch-all for bugs: an unexpected exception is logged with its trace and the request id,
    counted, and answered with a 503 JSON message that carries the id but no trace (the
    connection stays usable). Every response carries X-Request-ID (the client's, else new)."""

    def __init__(self, app: Any, metrics: Metrics, max_body_bytes: int, paths: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.paths = paths  # route paths, to label requests refused before routing

    @staticmethod
    async def _send_error(send: Send, status: int, message: str, request_id: str = "") -> None:
        body = json.dumps({"error": message, "detail": []}).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]  # fmt: skip
        if request_id:
            headers.append((b"x-request-id", request_id.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _too_large(self, send: Send) -> None:
        await self._send_error(
            send,
            413,
            f"request body larger than {self.max_body} bytes; send fewer candidates or items "
            "(the limit is RECSYS_MAX_BODY_BYTES)",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500
        started = False
        method = scope.get("method", "GET")
        request_id = _request_id(scope)

        def label() -> str:
            route = scope.get("route")
            if route is not None and hasattr(route, "path"):
                return str(route.path)
            return scope["path"] if scope["path"] in self.paths else "unmatched"

        try:
            length = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
            if length is not None and length.isdigit() and int(length) > self.max_body:
                status = 413
                await self._too_large(send)
                return
            if method in ("POST", "PUT", "PATCH"):
                chunks, size, more = [], 0, True
                while more:
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # the client went away
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body:
                        status = 413
                        await self._too_large(send)
                        return
                    chunks.append(chunk)
                    more = message.get("more_body", False)
                body, replayed = b"".join(chunks), False

                async def replay() -> Message:
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                receive = replay

            async def timed_send(message: Message) -> None:
                nonlocal status, started
                if message["type"] == "http.response.start":
                    status, started = int(message["status"]), True
                    ms = (time.perf_counter() - t0) * 1e3
                    message["headers"] = [
                        *message.get("headers", ()),
                        (b"server-timing", f"app;dur={ms:.3f}".encode()),
                        (b"x-request-id", request_id.encode()),
                    ]
                await send(message)

            try:
                await self.app(scope, receive, timed_send)
            except Exception as exc:
                self.metrics.unhandled_error()
                logger.exception(
                    "unhandled error on %s %s (request id %s)", method, scope.get("path"),
                    request_id,
                )  # fmt: skip
                if started:
                    raise  # too late for a clean answer; the server closes the connection
                status = 503
                await self._send_error(
                    send,
                    503,
                    f"internal error ({type(exc).__name__}), logged with request id {request_id}; "
                    "retry, and report it with that id if it persists",
                    request_id,
                )
        finally:
            self.metrics.observe(label(), method, status, time.perf_counter() - t0)


# --------------------------------------------------------------------------- the app


def create_app(settings: Settings | None = None, *, model: ServingModel | None = None) -> FastAPI:
    """The ranking API for `settings` (default: from the environment).

    `model`: an already loaded bundle to serve from the start (as `serve` does); without it
    the configured source loads during start-up, before connections are accepted. If that
    fails the process stays up and /readyz answers 503 with the error (a reload can fix it).
    """
    settings = settings or Settings()
    metrics = Metrics()
    state = AppState(settings, metrics)
    computing = anyio.CapacityLimiter(settings.rank_threads)

    async def compute(fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a worker thread, at most `rank_threads` at once."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=computing)

    if model is not None:
        state.swap(model, settings.source)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        restore = limit_native_threads(settings.native_threads)
        follower = None
        if settings.reload_file is not None:
            note = read_note(settings.reload_file)
            if note is not None and state.model is None:  # a worker started after a reload
                state.source, state.applied_note = note.source, note.id
            follower = asyncio.create_task(_follow_reloads(state, settings.reload_file))
        if state.model is None and state.source is not None:
            await _initial_load(state)  # before the worker accepts connections
        try:
            yield
        finally:
            if follower is not None:
                follower.cancel()
            restore()

    app = FastAPI(
        title="recsys ranking API",
        version="1",
        description="Ranks candidate items for a user with the nightly model bundle "
        "(text encoder + behavioural features + LightGBM LambdaRank).",
        lifespan=lifespan,
    )
    app.state.serving = state
    _install_error_handlers(app, metrics)
    paths: set[str] = set()
    app.add_middleware(
        EdgeMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes, paths=paths
    )

    @app.post("/v1/rank", response_model=RankResponse, response_model_exclude_none=True,
              responses=_ERRORS, tags=["ranking"])  # fmt: skip
    async def rank(body: RankRequest, request: Request) -> Response:
        """Rank `candidates` (1 to 1,000 distinct ids) and return the top `k`.

        A user the bundle knows is ranked with their stored profile, extended by `history`; an
        unknown user with a `history` with that history; with neither, by the popularity prior.
        With events on, features come from the live state as of `at` (default now) and the
        online ranker ranks any user id, new ones included; without events, the batch ranker
        ranks on features as of the cut-off (`at` is checked, but nothing later is counted).
        Candidates the bundle does not know but whose text is in `items` are embedded on the
        spot; unknown ones without text get the model's prior for an unseen item and are listed
        in `unknown_items`. `explain` adds each item's top feature contributions.
        """
        model = _model(request)  # read the reference once: a reload cannot change it under us
        at_us = None  # events keep the state fresh: as of `at`, default now
        if body.at is not None:
            asked = epoch_us(body.at)
            if asked < model.as_of_us:
                return _error(
                    422,
                    f"at {body.at.isoformat()} is before the bundle's cut-off "
                    f"{model.bundle.snapshot.as_of.isoformat()}; give a later moment",
                )
            if state.events is not None:
                at_us = asked
        elif state.events is not None:
            at_us = max(epoch_us(datetime.now(UTC)), model.as_of_us)
        # Without events nothing after the cut-off is counted: the batch ranker on features as
        # of the cut-off, whatever `at` says (the online ranker on counts frozen at the
        # cut-off ranked EB-NeRD's next week worse than random: AUC 0.466).
        new = None
        live = at_us is not None
        if body.items and model.strategy(body.user_id, body.history, live) != "popularity":
            needed = set(body.candidates) | set(body.history)
            if any(i.item_id in needed and i.item_id not in model.vectors.index
                   for i in body.items):  # fmt: skip
                new = await run_in_threadpool(model.embedder.embed, body.items, needed)
        try:  # features, LightGBM and explanations off the event loop (health stays live)
            return _json(await compute(model.rank, body, new, at_us))
        except ConfigError as e:  # a rule names an unknown item or category
            return _error(422, str(e))

    @app.get("/v1/recommendations/{user_id}", response_model=RecommendationsResponse,
             responses=_ERRORS, tags=["ranking"])  # fmt: skip
    async def recommendations(
        request: Request,
        user_id: str = PathParam(min_length=1, max_length=256),
        k: int = Query(10, ge=1, le=1000, description="list length"),
        exclude_items: Annotated[
            list[str] | None,
            Query(max_length=1000, description="never return these items (repeat the parameter)"),
        ] = None,
        exclude_categories: Annotated[
            list[str] | None,
            Query(max_length=100, description="never return items of these categories"),
        ] = None,
        max_per_category: int | None = Query(
            None, ge=0, le=1000, description="at most this many items per category (0 = no cap)"
        ),
        diversity: float | None = Query(
            None, ge=0.0, le=1.0, description="MMR weight (0 = pure relevance)"
        ),
    ) -> Response:
        """The user's nightly ranked list (top k), or popular items marked `fallback`. The
        bundle's business rules plus the request's (exclusions, a category cap, diversity)
        apply to either; a list they leave short is returned short, never padded."""
        model = _model(request)
        asks = (exclude_items, exclude_categories, max_per_category, diversity)
        if all(a is None for a in asks):  # the list as the nightly made it
            return _json(await compute(model.recommendations, user_id, k))
        try:
            rules = request_rules(
                model.rules, model.catalogue,
                exclude_items=exclude_items or (), exclude_categories=exclude_categories or (),
                max_per_category=max_per_category, diversity=diversity,
            )  # fmt: skip
        except ConfigError as e:
            return _error(422, str(e))
        return _json(await compute(model.recommendations, user_id, k, rules))

    @app.post(
        "/v1/events",
        response_model=EventsResponse,
        tags=["events"],
        responses={
            **_ERRORS,
            409: {"model": ErrorResponse, "description": "events are off (no RECSYS_EVENT_LOG)"},
            503: {"model": ErrorResponse, "description": "no bundle yet, or the log is unwritable"},
        },
        openapi_extra=_json_body(EventsRequest, required=True),
    )
    async def events(request: Request) -> Any:
        """Items, impressions and clicks (at most 1,000 per request), each with an `event_id`
        (idempotent) and a `ts`. Each event is checked on its own: a bad one is listed in
        `rejected` with its reason and the others are accepted. An accepted event is written to
        the event log (fsynced) before this answers, then counted: `/v1/rank` sees it at once,
        and an `item` event's item is embedded and joins the live catalogue."""
        store = state.events
        if store is None:
            return _error(409, "events are off: start the server with RECSYS_EVENT_LOG=DIR "
                               "(recsys serve --event-log DIR) to keep features fresh")  # fmt: skip
        _model(request)  # 503 until a bundle serves
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(422, f'the body is not JSON ({e}); send {{"events": [...]}}')
        raw = body.get("events") if isinstance(body, dict) else None
        if not isinstance(raw, list) or set(body) != {"events"}:
            return _error(422, 'the body must be a JSON object {"events": [event, ...]}')
        if len(raw) > MAX_EVENTS:
            return _error(
                422, f"{len(raw)} events in one request; send at most {MAX_EVENTS} per request"
            )
        try:
            result = await run_in_threadpool(store.ingest, lambda: _model(request), raw)
        except OSError as e:
            logger.error("event log write failed: %s", e)
            return _error(503, f"could not write the event log ({e}); nothing accepted, retry")
        return _json(result)

    @app.get("/healthz", response_model=Health, response_model_exclude_none=True,
             tags=["operations"])  # fmt: skip
    async def healthz() -> Health:
        """The process is up (says nothing about the model)."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, response_model_exclude_none=True,
             tags=["operations"],
             responses={503: {"model": Health, "description": "not ready"}})  # fmt: skip
    async def readyz() -> Any:
        """200 once a bundle serves; 503 while loading, with no bundle, or after a failed load."""
        if state.model is not None:
            ranker, freshness = state.model.served(live=state.events is not None)
            return Health(status="ready", model_version=state.model.model_version,
                          ranker=ranker, freshness=freshness)  # fmt: skip
        return JSONResponse(
            Health(status=state.status, detail=state.detail).model_dump(exclude_none=True), 503
        )

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text: requests, latency histogram, model version, reloads, errors."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post(
        "/v1/admin/reload",
        response_model=ReloadResponse,
        tags=["operations"],
        responses={
            401: {"model": ErrorResponse, "description": "missing or wrong bearer token"},
            404: {"model": ErrorResponse, "description": "admin is off (no RECSYS_ADMIN_TOKEN)"},
            409: {"model": ErrorResponse, "description": "another reload is running"},
            422: {"model": ErrorResponse, "description": "the new bundle failed; old one serves"},
        },
        openapi_extra=_json_body(ReloadRequest, required=False),
    )
    async def reload(request: Request) -> Any:
        """Load a bundle (body `{bundle}` or `{model_uri}`, default: the current source) beside
        the serving one and swap them; on any failure the old bundle keeps serving."""
        _authorize(request, settings)
        raw = await request.body()
        try:
            body = ReloadRequest.model_validate_json(raw) if raw.strip() else ReloadRequest()
        except ValidationError as e:
            return _invalid(_details(list(e.errors())))  # type: ignore[arg-type]
        source = body.bundle or body.model_uri or state.source
        if source is None:
            return _error(422, 'nothing to load: give {"bundle": PATH} or {"model_uri": URI}')
        if state.reload_lock.locked():
            return _error(409, "another reload is running; retry when it has finished")
        async with state.reload_lock:
            previous = state.model.model_version if state.model is not None else None
            t0 = time.perf_counter()
            try:
                new = await run_in_threadpool(load_model, source, settings)
            except (DataError, ConfigError) as e:
                metrics.reload(ok=False)
                return _error(422, f"reload failed, still serving {previous}: {e}")
            except Exception as e:  # anything else: report it, keep serving the old bundle
                metrics.reload(ok=False)
                logger.exception("reload of %s failed", source)
                return _error(
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

    paths.update(getattr(r, "path", "") for r in app.routes)
    return app


def limit_native_threads(n: int) -> Callable[[], None]:
    """Cap this process's BLAS (numpy) and OpenMP (LightGBM, torch) threads at `n`; returns
    the undo. Per-request work is small, extra threads do not speed it up, and idle OpenBLAS /
    OpenMP threads busy-wait: measured, a spinning BLAS thread used a whole core beside each
    worker. Needs `threadpoolctl`; without it a warning says to set OMP_NUM_THREADS and
    OPENBLAS_NUM_THREADS before start (`serve` sets them for its worker processes)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        logger.warning("threadpoolctl is not installed: native threads not limited; set "
                       "OMP_NUM_THREADS=%d OPENBLAS_NUM_THREADS=%d before start", n, n)  # fmt: skip
        return lambda: None
    limiter = threadpool_limits(limits=n)
    return limiter.restore_original_limits  # type: ignore[no-any-return]


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


async def _follow_reloads(state: AppState, path: Path) -> None:
    """Apply the reload notes other workers write (serving/sync.py), until cancelled."""
    watcher = NoteWatcher(path)
    while True:
        await asyncio.sleep(state.settings.reload_poll_seconds)
        note = watcher.poll()
        if note is None or note.id == state.applied_note:
            continue
        async with state.reload_lock:
            if note.id == state.applied_note:
                continue
            state.applied_note = note.id  # tried once: a bad bundle is not retried every second
            try:
                model = await run_in_threadpool(load_model, note.source, state.settings)
            except Exception as e:
                state.metrics.reload(ok=False)
                logger.error("could not follow the reload to %s: %s", note.source, e)
                continue
            await run_in_threadpool(state.swap, model, note.source)
            state.metrics.reload(ok=True)
            logger.info("followed the reload to %s (%s)", note.source, model.model_version)


async def _initial_load(state: AppState) -> None:
    source = state.source
    assert source is not None
    state.status, state.detail = "loading", f"loading {source}"
    try:
        model = await run_in_threadpool(load_model, source, state.settings)
    except Exception as e:  # keep the process up: /readyz says why, a reload can fix it
        logger.error("could not load %s: %s", source, e)
        state.status, state.detail = "failed", f"could not load {source}: {e}"
        return
    if state.model is None:  # an admin reload may have won the race
        await run_in_threadpool(state.swap, model, source)


def app_from_env() -> FastAPI:
    """The app of one uvicorn worker (`--workers N`): settings from the environment."""
    return create_app(Settings())


def default_event_log(bundle: Path) -> Path:
    """Where a served bundle's events go by default: RUN/events for a bundle the nightly
    published (RUN/bundles/VERSION or RUN/bundles/current), else events/ beside the bundle."""
    parent = bundle.absolute().parent
    return parent.parent / "events" if parent.name == "bundles" else parent / "events"


def serve(
    bundle: str | os.PathLike[str] | None = None,
    model_uri: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    tracking_uri: str | None = None,
    event_log: str | os.PathLike[str] | None = None,
    access_log: bool | None = None,
    events: bool = True,
) -> None:
    """Load the bundle (a folder, or a registered MLflow model) and serve it until stopped.

    Events (the live engine) are on by default with one worker: the event log is `event_log`,
    else RECSYS_EVENT_LOG, else `default_event_log(bundle)` beside the run's bundles (a
    model URI has no such place: give one). events=False (`--no-events`), several workers or
    a model URI without a log serve the batch ranker on features as of the cut-off.
    access_log: a line per request on the terminal (None: RECSYS_ACCESS_LOG, default off).

    The bundle is loaded and checked before the server starts, so a bad one is a one-line
    error. With workers > 1 each worker process (serving/workers.py: its own SO_REUSEPORT
    socket, so connections spread evenly) loads its own copy and keeps its own metrics; an
    admin reload is answered by one worker and followed by the others (serving/sync.py).
    """
    import uvicorn

    if (bundle is None) == (model_uri is None):
        raise ConfigError("give exactly one of --bundle PATH or --model-uri models:/NAME@ALIAS")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if workers > 1 and port == 0:
        raise ConfigError("--port 0 (any free port) works with one worker only; give a port")
    event_log = event_log or os.environ.get("RECSYS_EVENT_LOG")
    if not events and event_log:
        raise ConfigError("--no-events and --event-log contradict each other: give one")
    why_off = None
    if not events:
        why_off = "--no-events"
    elif not event_log and workers > 1:
        why_off = f"{workers} workers keep no shared live state"
    elif not event_log and bundle is None:
        why_off = "a model URI has no run folder for the log; give --event-log DIR"
    elif not event_log:
        event_log = default_event_log(Path(bundle))  # type: ignore[arg-type]
    if workers > 1 and event_log:
        raise ConfigError(
            "--event-log keeps the live state in one process; with several workers each would "
            "count only its own events and the log would have several writers. Run one worker "
            "with --event-log (shared state in Redis is not built yet), or several without it"
        )
    try:
        settings = Settings(
            bundle=Path(bundle) if bundle is not None else None,  # type: ignore[call-arg]
            model_uri=model_uri,
            tracking_uri=tracking_uri or os.environ.get("RECSYS_TRACKING_URI"),
            event_log=Path(event_log) if event_log else None,
        )
    except ValidationError as e:
        raise ConfigError(f"server settings: {_details(list(e.errors()))}") from e  # type: ignore[arg-type]
    source = settings.source
    assert source is not None
    model = load_model(source, settings)
    print(f"serving {model.model_version} from {source} on http://{host}:{port} (docs: /docs)")
    ranker, freshness = model.served(live=event_log is not None)
    if event_log is not None:
        print(f"events on, log {event_log} (--no-events to turn off): ranker {ranker}, {freshness}")
    else:
        print(f"events off ({why_off}): ranker {ranker}, {freshness}")
    log_level = os.environ.get("RECSYS_LOG_LEVEL", "info").lower()
    if access_log is None:
        access_log = os.environ.get("RECSYS_ACCESS_LOG", "false").lower() in ("1", "true", "yes")
    if workers == 1:
        uvicorn.run(create_app(settings, model=model), host=host, port=port,
                    log_level=log_level, access_log=access_log)  # fmt: skip
        return
    del model
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(settings.native_threads))  # read as workers start
    run_dir = None
    if settings.reload_file is None:  # admin reloads reach one worker; the others follow
        run_dir = Path(tempfile.mkdtemp(prefix="recsys-serve-"))
        os.environ["RECSYS_RELOAD_FILE"] = str(run_dir / "reload.json")
    os.environ["RECSYS_BUNDLE" if bundle is not None else "RECSYS_MODEL_URI"] = source
    os.environ.pop("RECSYS_MODEL_URI" if bundle is not None else "RECSYS_BUNDLE", None)
    if settings.tracking_uri:
        os.environ["RECSYS_TRACKING_URI"] = settings.tracking_uri
    try:
        run_workers(workers, host, port, log_level=log_level, access_log=access_log)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e}); pick another --port") from e
    finally:
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
