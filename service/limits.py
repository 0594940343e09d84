"""What every route gets, whichever way it is served: a deadline, a body limit, and an answer at shutdown.

`guarded` runs one request's handling and answers with a V2 error body `{"error": ...}` when the handling
cannot: 504 when `timeout_s` (counted from the request's arrival, so reading the body is covered) passes
before the response has started, 503 when the server cuts the request short at the end of a graceful
shutdown (uvicorn cancels it; without this its answer is a text/plain 500 and a logged traceback). A
request whose response had already started cannot be answered again: its connection is closed.

`declared_body_too_large` refuses, before anything is read, a body whose Content-Length is past a route's
limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from starlette.types import Message, Send

from service.errors import PayloadTooLarge
from service.http_errors import error_body
from service.http_request import Headers, header

T = TypeVar("T")

SHUTTING_DOWN = "the server is shutting down and could not finish this request; retry on another instance"


async def guarded(
    handle: Callable[[Send], Awaitable[T]],
    send: Send,
    rid: str,
    timeout_s: float | None = None,
) -> T | int:
    """`handle(send)`'s result; or the status (504, 503) of the V2 error answer sent in its place."""
    started = False

    async def tracking_send(message: Message) -> None:
        nonlocal started
        if message["type"] == "http.response.start":
            started = True
        await send(message)

    try:
        if timeout_s is None:
            return await handle(tracking_send)
        return await asyncio.wait_for(handle(tracking_send), timeout_s)
    except asyncio.TimeoutError:
        if started:
            return 504
        message = f"the request did not finish within {timeout_s:g}s (request_timeout_s)"
        return await _answer(send, 504, message, rid)
    except asyncio.CancelledError:
        # Cancelled from outside: uvicorn ending a graceful shutdown. The task ends here, answered.
        if started:
            return 503
        return await _answer(send, 503, SHUTTING_DOWN, rid)


def declared_body_too_large(headers: Headers, limit: int) -> PayloadTooLarge | None:
    """The refusal for a body whose Content-Length exceeds `limit`, None otherwise (or without one)."""
    declared = (header(headers, b"content-length") or "").strip()
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        return PayloadTooLarge(f"the body has {declared} bytes, the limit for this route is {limit}")
    return None


async def _answer(send: Send, status: int, message: str, rid: str) -> int:
    body = error_body(message)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", rid.encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
    return status
