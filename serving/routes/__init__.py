"""The API's route handlers, one router per theme; serving/app.py includes them in this order.

    ranking.router      POST /v1/rank, GET /v1/recommendations/{user_id}
    events.router       POST /v1/events
    operations.router   GET /healthz, /readyz, /metrics; POST /v1/admin/reload

Handlers reach the shared state through `request.app.state.serving` (serving/state.py).
"""

from serving.routes import events, operations, ranking

ROUTERS = (ranking.router, events.router, operations.router)
