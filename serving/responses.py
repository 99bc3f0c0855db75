"""JSON on the wire: the compact error body `{"error": "...", "detail": [{"loc", "msg"}]}`,
the hot path's response encoder, and the OpenAPI entries the routes share."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from serving.schemas import ErrorResponse

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what}
    for code, what in (
        (413, "request body too large"),
        (422, "invalid request: the message says what to fix"),
        (503, "no model bundle loaded yet"),
    )
}


def json_body(model: type[BaseModel], *, required: bool) -> dict[str, Any]:
    """OpenAPI for a JSON body the route reads itself (to answer bad input its own way)."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": required,
                            "content": {"application/json": {"schema": schema}}}}  # fmt: skip


def error_response(status: int, message: str, detail: list[dict[str, str]] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    return JSONResponse({"error": message, "detail": detail or []}, status, headers=headers)


def invalid_response(detail: list[dict[str, str]]) -> JSONResponse:
    """A 422 whose message sums up the first three problems of `detail` (serving/errors.py)."""
    summary = "; ".join(f"{d['loc']}: {d['msg']}" for d in detail[:3])
    more = f" (and {len(detail) - 3} more)" if len(detail) > 3 else ""
    return error_response(422, f"invalid request: {summary}{more}", detail)


def json_response(content: Any) -> Response:
    """A JSON response from plain dicts and lists (the hot path skips pydantic models: the
    shapes are the documented response models, checked against them in the tests)."""
    body = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return Response(body.encode(), media_type="application/json")
