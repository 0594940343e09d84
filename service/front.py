"""The server's front: the pure-ASGI middleware around the FastAPI app that every HTTP request enters first.

In one pass it gives the request its id (the client's `X-Request-ID` when safe, else generated; echoed in
the response and set in `service.log.request_id` for every record logged on the request's behalf), checks
its bearer token (counting refusals in `bn_serve_auth_rejected_total`), and writes its access record
when it is answered. Then `POST /v2/models/{name}[/versions/{v}]/infer`, the hot path, is answered right
here from raw ASGI messages by `InferRoute`: it is the one infer route (FastAPI only documents it in the
schema), with one set of error handlers below. Everything else (metadata, health, metrics, repository, the
schema) goes on to FastAPI's routes, whose errors FastAPI's handlers answer with the same table.

Why: FastAPI's own path costs a small request more than the request itself (about six middleware layers,
routing, dependency solving, a `Request` and a `Response` object); here a small JSON request pays for a
regular expression match and two `send` calls. Both paths answer a `ServiceError` through
`service.http_errors.error_answer`, the one table of statuses.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING

from fastapi import FastAPI
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import Authenticator
from service.errors import Overloaded, ServiceError
from service.http_errors import INTERNAL_ERROR, error_answer, error_body
from service.http_request import header, request_headers
from service.infer_route import InferRoute, response_headers
from service.limits import declared_body_too_large, guarded
from service.log import RequestIds, request_id, write_access_record
from service.metrics import ServiceMetrics
from service.responses import SEND_SLICE_BYTES, ResponseBudget, body_slices

if TYPE_CHECKING:
    from service.direct_infer import DirectInfer

log = logging.getLogger("bn_serve")

# The infer paths, `{name}` being Starlette's `[^/]+`, on the percent-decoded path below any root_path.
INFER_PATH = re.compile(r"/v2/models/([^/]+)/(?:versions/([^/]+)/)?infer")
_JSON_HEADERS = [(b"content-type", b"application/json")]


class Front:
    """The ASGI middleware around `app` (FastAPI's own handling); see the module docstring and
    `ServingApp`, which puts it in place."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        route: InferRoute,
        authenticator: Authenticator,
        metrics: ServiceMetrics,
        request_timeout_s: float | None = None,
        max_other_body_bytes: int = 64 * 1024,
        responses: ResponseBudget | None = None,
    ) -> None:
        self.app = app
        self.responses = responses
        # The deadline and body limit of every route but infer (which has its own, in its admission).
        self.request_timeout_s = request_timeout_s
        self.max_other_body_bytes = max_other_body_bytes
        self.route = route
        self.authenticator = authenticator
        self.metrics = metrics
        self.ids = RequestIds()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = request_headers(scope)
        rid = self.ids.incoming(header(headers, b"x-request-id"))
        token = request_id.set(rid)
        method: str = scope["method"]
        path: str = scope["path"]
        status = 500  # what the server sends when the app fails before starting a response
        try:
            try:
                self.authenticator.check(path, header(headers, b"authorization"))
            except ServiceError as exc:
                status = await self._send_error(send, exc, method, path, rid)
                self.metrics.observe_auth_rejected(status)
                return
            match = INFER_PATH.fullmatch(_route_path(scope) if scope.get("root_path") else path)
            if match is not None:
                if method == "POST":
                    status = await guarded(
                        lambda out: self._infer(match[1], match[2], headers, receive, out, method, path, rid),
                        send,
                        rid,
                    )
                else:
                    body = error_body(f"{method} {path}: Method Not Allowed")
                    status = await _send(send, 405, [*_JSON_HEADERS, (b"allow", b"POST")], body, rid)
                return
            too_large = declared_body_too_large(headers, self.max_other_body_bytes)
            if too_large is not None:
                status = await self._send_error(send, too_large, method, path, rid)
                return

            rid_header = (b"x-request-id", rid.encode())

            def with_id(out: Send) -> Send:
                async def send_with_id(message: Message) -> None:
                    nonlocal status
                    if message["type"] == "http.response.start":
                        status = message["status"]
                        kept = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                        message = {**message, "headers": [*kept, rid_header]}
                    await out(message)

                return send_with_id

            answered = await guarded(
                lambda out: self.app(scope, receive, with_id(out)), send, rid, self.request_timeout_s
            )
            if answered is not None:
                status = answered
        finally:
            write_access_record(method, path, status, time.perf_counter() - started, rid)
            request_id.reset(token)

    async def _infer(
        self,
        model_name: str,
        model_version: str | None,
        headers: dict[bytes, bytes],
        receive: Receive,
        send: Send,
        method: str,
        path: str,
        rid: str,
    ) -> int:
        """Answer an infer request; its status."""
        try:
            encoded = await self.route.answer(model_name, model_version, headers, receive)
        except ServiceError as exc:
            return await self._send_error(send, exc, method, path, rid)
        except ClientDisconnect:
            return 499  # nobody is left to read an answer
        except Exception as exc:  # a bug, not a client's mistake: logged with its traceback, no details out
            log.error("%s %s: unexpected error", method, path, exc_info=exc)
            return await _send(send, 500, _JSON_HEADERS, INTERNAL_ERROR, rid)
        # Held until the last byte is handed to the transport: unread responses are bounded in bytes.
        budget, size = self.responses, encoded.length
        if budget is not None:
            try:
                budget.take(size)
            except Overloaded as exc:  # nothing sent yet
                return await self._send_error(send, exc, method, path, rid)
        try:
            return await _send(send, 200, response_headers(encoded), encoded.parts, rid)
        finally:
            if budget is not None:
                budget.give_back(size)

    @staticmethod
    async def _send_error(send: Send, exc: ServiceError, method: str, path: str, rid: str) -> int:
        status, extra, body = error_answer(exc, method, path)
        headers = [*_JSON_HEADERS, *((k.lower().encode(), v.encode("latin-1")) for k, v in extra.items())]
        return await _send(send, status, headers, body, rid)


async def _send(
    send: Send,
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes | tuple[bytes | memoryview, ...],
    rid: str,
) -> int:
    """Send a whole response: `headers` plus Content-Length and X-Request-ID; returns `status`.

    A body given in parts goes out in `http.response.body` messages of at most a slice each: binary outputs
    are written from their arrays' memory instead of being copied into one `bytes` first.
    """
    parts = (body,) if isinstance(body, bytes) else body
    length = sum(len(part) for part in parts)
    headers = [*headers, (b"content-length", str(length).encode()), (b"x-request-id", rid.encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    if len(parts) == 1 and length <= SEND_SLICE_BYTES:  # the usual small answer: one message
        await send({"type": "http.response.body", "body": parts[0], "more_body": False})
        return status
    # In slices: the transport holds about one at a time (service.responses).
    slices = list(body_slices(parts))
    last = len(slices) - 1
    for index, part in enumerate(slices):
        await send({"type": "http.response.body", "body": part, "more_body": index < last})
    return status


def _route_path(scope: Scope) -> str:
    """The path routes match: below the root_path the server is mounted at, as Starlette routes it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :]
    return path


class ServingApp(FastAPI):
    """FastAPI with `Front` around it: once `front` is set, every HTTP request enters there first and
    reaches FastAPI through `framework`; lifespan and other scopes go to FastAPI directly.

    Around, not inside: `add_middleware` would put the front behind FastAPI's own outer layers (error,
    telemetry and body-limit middleware), which every infer request would then pay for.
    """

    front: Front | None = None
    # Small JSON infer requests answered by the HTTP protocol itself (`service.http_direct`); None: none.
    direct_infer: DirectInfer | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.front is not None and scope["type"] == "http":
            await self.front(scope, receive, send)
        else:
            await self.framework(scope, receive, send)

    async def framework(self, scope: Scope, receive: Receive, send: Send) -> None:
        """FastAPI's own handling: its middleware, routing and exception handlers."""
        await super().__call__(scope, receive, send)
