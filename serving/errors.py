"""Errors as the API answers them: validation errors as `{loc, msg}` lines that say what to
fix, and the exception handlers that turn FastAPI's and Starlette's errors into the compact
JSON body (serving/responses.py). Bugs are caught earlier, by serving/middleware.py."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.responses import error_response, invalid_response


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def details(errors: list[dict[str, Any]]) -> list[dict[str, str]]:
    """pydantic's errors as [{loc: "body.items[2].title", msg}] with messages that say what
    to do (malformed JSON, a missing or an unknown field)."""
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


async def _on_validation(_r: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError | ValidationError)
    return invalid_response(details(list(exc.errors())))  # type: ignore[arg-type]


async def _on_http(_r: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers) if exc.headers else None
    if exc.status_code == 404 and exc.detail == "Not Found":
        return error_response(404, "no such route; see /docs for the API", headers=headers)
    if exc.status_code == 405:
        return error_response(405, "method not allowed on this route; see /docs", headers=headers)
    return error_response(exc.status_code, str(exc.detail), headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer validation errors (422) and HTTP errors (404, 405, 503, ...) as compact JSON."""
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(ValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
