"""The ranking API: FastAPI over one loaded model bundle, swapped atomically on reload.

    create_app(settings, model=None) -> FastAPI       (OpenAPI at /docs)
    app_from_env() -> FastAPI                         (one uvicorn worker; serving/workers.py)

Routes (serving/routes/)
    POST /v1/rank                       rank candidates for a user / a history / cold start
    GET  /v1/recommendations/{user_id}  the nightly list, or popular items (`fallback: true`)
    GET  /healthz                       the process is up
    GET  /readyz                        200 once a bundle serves, else 503 with the reason
    GET  /metrics                       Prometheus text (serving/metrics.py)
    POST /v1/admin/reload               bearer RECSYS_ADMIN_TOKEN; loads a bundle beside the old
                                        one, then swaps one reference (off without a token)
    POST /v1/events                     items, impressions and clicks into the event log and the
                                        live features (on with RECSYS_EVENT_LOG; serving/events.py)

Every error is compact JSON `{"error": "...", "detail": [{"loc", "msg"}]}` (serving/errors.py):
4xx saying what to fix for bad input, 413 above RECSYS_MAX_BODY_BYTES, 503 before a bundle is
loaded, and a 503 without a trace but with the request id (logged with it, counted in
`recsys_unhandled_errors_total`; serving/middleware.py) for bugs. Ranking runs on a thread pool,
off the event loop.

A request reads the model reference once and uses that object to the end, so a reload never
changes the model under a request in flight; the old model is freed when the last one finishes.
`recsys serve` is serving/server.py.
"""

from __future__ import annotations

from fastapi import FastAPI

from serving.errors import install_error_handlers
from serving.lifespan import lifespan
from serving.metrics import Metrics
from serving.middleware import EdgeMiddleware
from serving.ranking import ServingModel
from serving.routes import add_routes
from serving.settings import Settings
from serving.state import AppState


def create_app(settings: Settings | None = None, *, model: ServingModel | None = None) -> FastAPI:
    """The ranking API for `settings` (default: from the environment).

    `model`: an already loaded bundle to serve from the start (as `serve` does); without it
    the configured source loads during start-up, before connections are accepted. If that
    fails the process stays up and /readyz answers 503 with the error (a reload can fix it).
    """
    settings = settings or Settings()
    metrics = Metrics()
    state = AppState(settings, metrics)
    if model is not None:
        state.swap(model, settings.source)
    app = FastAPI(
        title="recsys ranking API",
        version="1",
        description="Ranks candidate items for a user with the nightly model bundle "
        "(text encoder + behavioural features + LightGBM LambdaRank).",
        lifespan=lifespan,
    )
    app.state.serving = state
    install_error_handlers(app)
    paths: set[str] = set()
    app.add_middleware(
        EdgeMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes, paths=paths
    )
    add_routes(app)
    paths.update(getattr(r, "path", "") for r in app.routes)
    return app


def app_from_env() -> FastAPI:
    """The app of one uvicorn worker (`--workers N`): settings from the environment."""
    return create_app(Settings())
