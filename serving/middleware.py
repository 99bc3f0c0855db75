"""The ASGI middleware at the edge of the API (`EdgeMiddleware`): body size limit, per-route
metrics, timing and request ids, and the catch-all for bugs."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from serving.metrics import Metrics

logger = logging.getLogger("serving")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def request_id(scope: Scope) -> str:
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

    def _label(self, scope: Scope) -> str:
        """The metrics label of a request: its route, its path if a route has it, else
        "unmatched" (so random paths do not make new series)."""
        route = scope.get("route")
        if route is not None and hasattr(route, "path"):
            return str(route.path)
        return scope["path"] if scope["path"] in self.paths else "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500
        started = False
        method = scope.get("method", "GET")
        rid = request_id(scope)
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
                        (b"x-request-id", rid.encode()),
                    ]
                await send(message)

            try:
                await self.app(scope, receive, timed_send)
            except Exception as exc:
                self.metrics.unhandled_error()
                logger.exception("unhandled error on %s %s (request id %s)", method,
                                 scope.get("path"), rid)  # fmt: skip
                if started:
                    raise  # too late for a clean answer; the server closes the connection
                status = 503
                await self._send_error(send, 503, _bug_message(exc, rid), rid)
        finally:
            self.metrics.observe(self._label(scope), method, status, time.perf_counter() - t0)


def _bug_message(exc: Exception, request_id: str) -> str:
    return (
        f"internal error ({type(exc).__name__}), logged with request id {request_id}; "
        "retry, and report it with that id if it persists"
    )
