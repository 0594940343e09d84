"""The HTTP protocol bn-serve runs under uvicorn: the head limits of `service.http_limits`, plus the hand-over
of small JSON infer requests to `service.direct_infer` instead of an ASGI task.

uvicorn's protocol starts one ASGI task per request once its head is parsed (`_start_asgi_task`, also
called for a pipelined request when the one before it is answered). Here that step first asks the app's
`DirectInfer` whether it takes the request; when it does, the body is gathered by uvicorn's own callbacks
into the request's cycle as usual, and once complete (`on_message_complete`) the request is submitted. A
body that does not arrive in the same read as its head goes the ASGI way at the end of that read: a slow
body is read under the upload place and the deadline of `service.admission`, as any other.
Whatever the direct path does not take or gives back starts its ASGI task then, exactly as it would have:
uvicorn's cycle, with its body complete, is what the app reads. A direct answer is written as uvicorn
writes one (its status line, its default `date`/`server` headers, `connection: close` when the connection
is not kept alive) and completes the cycle through uvicorn's own `on_response`, which starts a pipelined
request or arms the keep-alive timer. While the client is not reading its answers (writing paused),
requests go the ASGI way, whose send waits for the client.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from service.direct_infer import DirectHead, DirectInfer
from service.http_limits import BoundedHttpToolsProtocol, bounded_protocol


def direct_infer_of(app: Any) -> DirectInfer | None:
    """The `DirectInfer` of the app uvicorn runs, found through the middleware it wraps it in (each holds
    the next as `.app`); None for an app without one."""
    for _ in range(8):
        if app is None:
            return None
        direct = getattr(app, "direct_infer", None)
        if isinstance(direct, DirectInfer):
            return direct
        app = getattr(app, "app", None)
    return None


class DirectHttpToolsProtocol(BoundedHttpToolsProtocol):
    """`BoundedHttpToolsProtocol` with the direct path of the module docstring."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        **limits: Any,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop, **limits)
        self._direct = direct_infer_of(getattr(config, "loaded_app", None))
        self._direct_waiting: tuple[RequestResponseCycle, DirectHead] | None = None
        self._reading = False  # inside `data_received`: a body may still come in the same read

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        direct = self._direct
        if direct is not None and app is self.app and not self.flow.write_paused:
            scope = cycle.scope
            head = direct.takes(scope["method"], scope["path"], scope["root_path"], scope["headers"])
            if head is not None:
                if not cycle.more_body:  # a pipelined request, read whole before its turn
                    if self._submit(cycle, head):
                        return
                elif self._reading:  # its body may follow in this read: submitted once complete
                    self._direct_waiting = (cycle, head)
                    return
        super()._start_asgi_task(cycle, app)

    def data_received(self, data: bytes) -> None:
        self._reading = True
        try:
            super().data_received(data)
        finally:
            self._reading = False
        waiting = self._direct_waiting
        if waiting is not None:
            # The body did not come with its head: a slow body is the ASGI path's to read, under its
            # upload place and deadline (and answered 503 if shutdown cuts it short).
            self._direct_waiting = None
            HttpToolsProtocol._start_asgi_task(self, waiting[0], self.app)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        waiting = self._direct_waiting
        if waiting is not None and waiting[0] is self.cycle:
            self._direct_waiting = None
            cycle, head = waiting
            if not self._submit(cycle, head):
                HttpToolsProtocol._start_asgi_task(self, cycle, self.app)

    def _submit(self, cycle: RequestResponseCycle, head: DirectHead) -> bool:
        direct = self._direct
        return direct is not None and direct.submit(head, cycle.scope["path"], bytes(cycle.body), self, cycle)

    def direct_answer(
        self,
        exchange: Any,
        status: int,
        headers: Sequence[tuple[bytes, bytes]],
        parts: Sequence[bytes | memoryview],
    ) -> bool:
        """Write `exchange`'s (its cycle's) whole response as uvicorn's `send` would, and complete it."""
        cycle: RequestResponseCycle = exchange
        if cycle.disconnected or self.transport.is_closing():
            return False
        content: list[bytes | memoryview] = [_head_start(status, self.server_state.default_headers)]
        for name, value in headers:
            content.extend((name, b": ", value, b"\r\n"))
        length = len(parts[0]) if len(parts) == 1 else sum(map(len, parts))
        content.append(b"content-length: %d\r\n" % length)
        if not cycle.keep_alive:
            content.append(b"connection: close\r\n")
        content.append(b"\r\n")
        content.extend(parts)
        cycle.response_started = cycle.response_complete = True
        self.transport.write(b"".join(content))
        if not cycle.keep_alive:
            self.transport.close()
        cycle.on_response()
        return True

    def direct_fall_back(self, exchange: Any) -> None:
        """Start `exchange`'s ASGI task now: its body is complete in its cycle (a client already gone is
        answered 499 there, as any other)."""
        HttpToolsProtocol._start_asgi_task(self, exchange, self.app)


_head_starts: dict[int, tuple[object, bytes]] = {}


def _head_start(status: int, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """The status line and uvicorn's default headers (`date`, `server`) as bytes, joined once per status
    for each list of them (uvicorn replaces the list when the date changes, once a second)."""
    cached = _head_starts.get(status)
    if cached is not None and cached[0] is default_headers:
        return cached[1]
    joined = STATUS_LINE[status] + b"".join(name + b": " + value + b"\r\n" for name, value in default_headers)
    _head_starts[status] = (default_headers, joined)
    return joined


def serving_protocol(
    max_header_bytes: int, max_header_count: int, head_timeout_s: float, send_timeout_s: float
) -> functools.partial[DirectHttpToolsProtocol]:
    """The protocol factory for uvicorn's `http` setting: `bounded_protocol`'s limits on this protocol."""
    limits = bounded_protocol(max_header_bytes, max_header_count, head_timeout_s, send_timeout_s)
    return functools.partial(DirectHttpToolsProtocol, **limits.keywords)
