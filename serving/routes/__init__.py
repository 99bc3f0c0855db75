"""The API's route handlers, one module per theme, as module-level functions:

    ranking      POST /v1/rank, GET /v1/recommendations/{user_id}
    events       POST /v1/events
    operations   GET /healthz, /readyz, /metrics; POST /v1/admin/reload

Handlers reach the shared state through `request.app.state.serving` (serving/state.py).
`add_routes(app)` registers them on the app itself, in this order (not through
`include_router`, whose routers FastAPI resolves per request).
"""

from fastapi import FastAPI

from serving.routes import events, operations, ranking


def add_routes(app: FastAPI) -> None:
    ranking.add_routes(app)
    events.add_routes(app)
    operations.add_routes(app)
