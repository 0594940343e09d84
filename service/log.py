"""Structured logs: one JSON object per line, each carrying the id of the request it belongs to.

The request id comes from the client's `X-Request-ID` (when it is a short token of safe characters) or is
generated, is echoed back in the response's `X-Request-ID`, and follows the request into the inference
threads through a context variable. Records hold what happened (method, path, status, duration, error
message), never bodies, tensor values or headers, so neither data nor credentials reach the logs.
"""

from __future__ import annotations

import contextvars
import datetime
import logging
import re
import time
import uuid
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "x-request-id"
# A client-supplied id is echoed into headers and logs, so only short tokens of inert characters pass;
# anything else (newlines, quotes, megabytes) is replaced by a generated id.
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# The attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
access_log = logging.getLogger("bn_serve.access")


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", "request_id"?, **extra, "exception"?}` as one line of JSON."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        current = request_id.get()
        if current is not None:
            document["request_id"] = current
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                document[key] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(document, default=str).decode()


def configure_logging(level: str) -> None:
    """Send every logger (ours, uvicorn's, onnxruntime's Python side) to stderr as JSON lines at `level`."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own loggers carry handlers when it configured them; ours replace them via propagation.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def incoming_request_id(value: str | None) -> str:
    """The client's id when it is a safe token, else a fresh one (32 hex digits)."""
    if value is not None and _SAFE_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex


class RequestContext:
    """ASGI middleware: sets the request id, echoes it as `X-Request-ID`, writes one access record.

    A pure ASGI middleware rather than Starlette's `BaseHTTPMiddleware`, so bodies stream through untouched
    and the id is set before any other layer (authentication included) runs.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                supplied = value.decode("latin-1")
                break
        rid = incoming_request_id(supplied)
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 500  # what the server sends when the app fails before starting a response

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            access_log.info(
                "%s %s %d",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                },
            )
            request_id.reset(token)
