"""Limits on a request's head (request line and headers), enforced while it arrives, before the app runs.

uvicorn's httptools protocol (the one `uvicorn[standard]` picks) bounds neither the size nor the count of
headers, and has no deadline for the head: httptools gathers a header value of any length before handing it
over, so one 64 MiB header holds the event loop for seconds, and a client sending its head one byte at a
time holds a connection forever. `BoundedHttpToolsProtocol` counts the head's bytes as they arrive and its
headers as they are parsed, and answers past a limit at once with a V2 error body, closing the connection
without reading the rest:

- 431 past `max_header_bytes` (request line and headers together, as received) or `max_header_count`;
- 408 when the head is not complete `head_timeout_s` after its first byte.

It also cuts off a client that stops reading its response: when the transport's write buffer stays above
its high-water mark (asyncio pauses writing) for `send_timeout_s`, the connection is aborted, which frees
the buffer and ends the handler's wait to send (`service.responses` sends bodies in slices, so what waits
in memory meanwhile is counted in the response budget).

The ASGI app, authentication included, sees only requests within the limits. The raw count is checked
before each chunk the socket delivers is parsed, so at most one chunk (asyncio reads 256 KiB at a time)
past the limit is ever parsed.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

DEFAULT_MAX_HEADER_BYTES = 32 * 1024
DEFAULT_MAX_HEADER_COUNT = 100
_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class HeadLimitError(Exception):
    """Raised from a parser callback to stop parsing a head past its limits (httptools re-raises it)."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the head limits of the module docstring."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_header_count: int = DEFAULT_MAX_HEADER_COUNT,
        head_timeout_s: float = 30.0,
        send_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.max_header_bytes = max_header_bytes
        self.max_header_count = max_header_count
        self.head_timeout_s = head_timeout_s
        self.send_timeout_s = send_timeout_s
        self._send_timer: asyncio.TimerHandle | None = None
        self._in_head = True
        self._head_bytes = 0  # bytes received since the head began (may include the first body bytes)
        self._parsed_bytes = 0  # bytes of the request line and headers parsed so far
        self._header_count = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, str] | None = None

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            before = self._head_bytes
            self._head_bytes += len(data)
            if before > self.max_header_bytes:
                self._refuse(431, self._too_large())
                return
        super().data_received(data)
        # The head's deadline is armed only for a head still incomplete after this read: most requests
        # arrive whole in one read, and a timer armed and cancelled per request costs the event loop's
        # timer heap at high concurrency.
        waiting = self._in_head and self._head_bytes > 0 and self._head_timer is None
        if waiting and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def on_url(self, url: bytes) -> None:
        self._count(len(url), headers=0)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        # `_count` inlined: this runs for every header of every request.
        self._parsed_bytes += len(name) + len(value) + 4  # name, ": ", value, CRLF
        self._header_count += 1
        if self._header_count > self.max_header_count or self._parsed_bytes > self.max_header_bytes:
            self._count(0, headers=0)  # raises with the reason
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # The next request's head starts after this one's body.
        self._in_head = True
        self._head_bytes = self._parsed_bytes = self._header_count = 0

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_send_timer()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_timeout_s, self._send_timed_out)

    def resume_writing(self) -> None:
        self._cancel_send_timer()
        super().resume_writing()

    def _send_timed_out(self) -> None:
        self._send_timer = None
        self.logger.info(
            "closing a connection whose client read nothing for %gs (send_timeout_s)", self.send_timeout_s
        )
        self.transport.abort()

    def _cancel_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers any parser error here, the one our callbacks raise included: send ours instead.
        if self._refusal is None:
            super().send_400_response(msg)
        else:
            self._refuse(*self._refusal)

    def _count(self, size: int, headers: int) -> None:
        self._parsed_bytes += size
        self._header_count += headers
        if self._header_count > self.max_header_count:
            self._refusal = (
                431,
                f"the request has more than {self.max_header_count} headers (max_header_count)",
            )
            raise HeadLimitError
        if self._parsed_bytes > self.max_header_bytes:
            self._refusal = (431, self._too_large())
            raise HeadLimitError

    def _too_large(self) -> str:
        return f"the request line and headers exceed {self.max_header_bytes} bytes (max_header_bytes)"

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and self._head_bytes > 0 and not self.transport.is_closing():
            self._refuse(408, f"the request's headers did not arrive within {self.head_timeout_s:g}s")

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` with a V2 error body and close the connection: the rest is never read."""
        self._cancel_head_timer()
        if self.transport.is_closing():
            return
        body = orjson.dumps({"error": message})
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, _REASONS[status], len(body))
        )
        self.transport.write(head + body)
        self.transport.close()


def bounded_protocol(
    max_header_bytes: int, max_header_count: int, head_timeout_s: float, send_timeout_s: float
) -> functools.partial[BoundedHttpToolsProtocol]:
    """The protocol factory for uvicorn's `http` setting (a partial: picklable for worker processes)."""
    return functools.partial(
        BoundedHttpToolsProtocol,
        max_header_bytes=max_header_bytes,
        max_header_count=max_header_count,
        head_timeout_s=head_timeout_s,
        send_timeout_s=send_timeout_s,
    )
