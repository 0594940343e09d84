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

The common case is read without httptools' callbacks: a read that holds exactly one whole request, on a
connection with nothing in progress, whose head has the narrow form of `_WHOLE_HEAD` (a `POST` to an
origin-form path without `%`, `?` or `#`, HTTP/1.1, headers of printable ASCII within the head limits) is
read with two regular expressions; while the direct path has it, a small `_WholeExchange` stands for its
uvicorn cycle, which is built, as uvicorn's callbacks would build it, only if it falls back. Anything
else, however valid, and anything the direct path then declines, is fed to httptools as it came: the
parser never saw the bytes, so it is still between messages. Refusals are httptools': a head the narrow
form does not match goes to it whole.

Large bodies with a Content-Length going the ASGI way are gathered into one buffer (`_GatheredBody`): what
came with the head through the parser, the rest read by the socket straight into the buffer (`_BodyReader`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections.abc import Sequence
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from service.direct_infer import DirectHead, DirectInfer
from service.http_limits import BoundedHttpToolsProtocol, bounded_protocol
from service.http_request import aligned_buffer

# A body of at least this many bytes with a Content-Length is gathered into one buffer (`_GatheredBody`).
GATHERED_BODY_BYTES = 256 * 1024
_DIGITS = re.compile(rb"[0-9]{1,20}")


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


_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# The request line and headers the protocol reads itself; the body follows the final CRLF.
_WHOLE_HEAD = re.compile(
    rb"POST (/[^\x00-\x20\x7f-\xff%?#]*) HTTP/1\.1\r\n((?:" + _TOKEN + rb":[\t -~]*\r\n)*)\r\n"
)
_HEADER = re.compile(rb"(" + _TOKEN + rb"):[\t ]*([\t -~]*)\r\n")


class WholeRequest:
    """A request read by `read_whole_request`: the parts of the ASGI scope uvicorn's callbacks would give."""

    __slots__ = ("body", "headers", "keep_alive", "path")

    def __init__(self, path: str, headers: list[tuple[bytes, bytes]], body: bytes, keep_alive: bool) -> None:
        self.path = path
        self.headers = headers  # as uvicorn gives them: names in lower case, values without trailing OWS
        self.body = body
        self.keep_alive = keep_alive


def read_whole_request(data: bytes, max_header_bytes: int, max_header_count: int) -> WholeRequest | None:
    """`data` read as one whole request in the narrow form of the module docstring, or None: not that form,
    more or fewer bytes than its Content-Length says, past a head limit, or a header that asks for more
    than a plain request (`transfer-encoding`, `upgrade`, a `connection` other than keep-alive or close, a
    repeated or non-numeric `content-length`)."""
    match = _WHOLE_HEAD.match(data)
    if match is None:
        return None
    end = match.end()
    if end > max_header_bytes:
        return None
    headers = [(name.lower(), value.rstrip(b" \t")) for name, value in _HEADER.findall(match[2])]
    if len(headers) > max_header_count:
        return None
    length = None
    keep_alive = True
    for name, value in headers:
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return None
            length = int(value)
        elif name == b"connection":
            option = value.lower()
            if option == b"close":
                keep_alive = False
            elif option != b"keep-alive":
                return None
        elif name == b"transfer-encoding" or name == b"upgrade":
            return None
    if length is None or len(data) - end != length:
        return None
    return WholeRequest(match[1].decode("ascii"), headers, data[end:], keep_alive)


class _GatheredBody:
    """A large request body written straight into one buffer as it arrives, for its ASGI task.

    uvicorn appends each chunk to the cycle's `bytearray`, pauses reading past 64 KiB until the app has
    received what is there, and hands it over as a `bytes` copy, which `service.http_request.read_body`
    copies once more into its own buffer: for a 4.8 MB binary body, three copies and some seventy pauses of
    the socket. Its Content-Length known (the parser holds the body to it), the body is written once into a
    buffer of that size instead, its first tensor aligned as `read_body` aligns it, and the app receives
    it whole in one message, a view of that buffer.
    """

    __slots__ = ("buffer", "complete", "cycle", "filled")

    def __init__(self, cycle: RequestResponseCycle, length: int, align_at: int | None) -> None:
        self.cycle = cycle
        self.buffer = aligned_buffer(length, align_at)
        self.filled = 0
        self.complete = False

    def write(self, chunk: bytes) -> bool:
        """Add `chunk`; False (nothing written) when it would run past the buffer."""
        end = self.filled + len(chunk)
        if end > len(self.buffer):
            return False
        self.buffer[self.filled : end] = chunk
        self.filled = end
        return True

    async def receive(self) -> Any:
        """The cycle's `receive`, as uvicorn's but for the body: one message once it is whole, then the
        disconnect when it comes."""
        cycle = self.cycle
        if self.filled >= 0:
            while not (self.complete or cycle.disconnected or cycle.response_complete):
                cycle.flow.resume_reading()  # as uvicorn's: reading may have been paused before the task
                await cycle.message_event.wait()
                cycle.message_event.clear()
            body = self.buffer[: self.filled]
            # Handed over (or dropped): the cycle and this refer to each other, and a buffer of megabytes
            # must not wait for the garbage collector to find them.
            self.buffer = memoryview(b"")
            self.filled = -1
            if not (cycle.disconnected or cycle.response_complete):
                return {"type": "http.request", "body": body, "more_body": False}
        while not (cycle.disconnected or cycle.response_complete):
            cycle.message_event.clear()
            await cycle.message_event.wait()
        return {"type": "http.disconnect"}


def _gathered_body(cycle: RequestResponseCycle, limit: int) -> _GatheredBody | None:
    """A `_GatheredBody` for `cycle`'s request when its body is large, of a Content-Length within `limit`
    (past it, the app refuses the request before reading), and plainly framed; else None."""
    if cycle.waiting_for_100_continue:
        return None
    length = align_at = None
    for name, value in cycle.scope["headers"]:
        if name == b"content-length":
            if length is not None or not _DIGITS.fullmatch(value):
                return None
            length = int(value)
        elif name == b"transfer-encoding":
            return None
        elif name == b"inference-header-content-length" and _DIGITS.fullmatch(value.strip(b" \t")):
            align_at = int(value.strip(b" \t"))
    if length is None or not GATHERED_BODY_BYTES <= length <= limit:
        return None
    return _GatheredBody(cycle, length, align_at)


class _BodyReader(asyncio.BufferedProtocol):
    """The transport's protocol while the rest of a gathered body arrives, on a kept-alive connection.

    Through the parser, each read of a 4.8 MB body was a `bytes` from the event loop, a `bytes` of its body
    part from httptools and a copy into the buffer. Here the socket reads into the buffer itself, never
    past the body's end, so the bytes of a request that follows are left for the HTTP protocol, which
    takes the transport back with the body's last byte (`DirectHttpToolsProtocol.body_read`). A body
    answered before it was read (the app refused it from its head) is read into a scratch buffer and
    dropped, as the parser drops it. The transport's other events go to the HTTP protocol.
    """

    __slots__ = ("_gathered", "_into_body", "_protocol", "_remaining", "_scratch")

    def __init__(self, protocol: DirectHttpToolsProtocol, gathered: _GatheredBody) -> None:
        self._protocol = protocol
        self._gathered = gathered
        self._remaining = len(gathered.buffer) - gathered.filled
        self._into_body = True
        self._scratch: memoryview | None = None

    def get_buffer(self, sizehint: int) -> memoryview:
        gathered = self._gathered
        self._into_body = gathered.filled >= 0 and not gathered.cycle.response_complete
        if self._into_body:
            return gathered.buffer[gathered.filled :]
        if self._scratch is None:
            self._scratch = memoryview(bytearray(min(self._remaining, _SCRATCH_BYTES)))
        return self._scratch[: self._remaining]

    def buffer_updated(self, nbytes: int) -> None:
        if self._into_body:
            self._gathered.filled += nbytes
        self._remaining -= nbytes
        if not self._remaining:
            self._protocol.body_read()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass  # only ever set on a transport the HTTP protocol holds

    def connection_lost(self, exc: Exception | None) -> None:
        self._protocol.connection_lost(exc)

    def eof_received(self) -> None:
        self._protocol.eof_received()  # uvicorn's returns None: the transport closes

    def pause_writing(self) -> None:
        self._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._protocol.resume_writing()


_SCRATCH_BYTES = 64 * 1024


class _NoEvent:
    """A `_WholeExchange`'s `message_event`: nothing waits on it (uvicorn sets it when the client goes)."""

    __slots__ = ()

    def set(self) -> None:
        pass


class _WholeExchange:
    """A request read whole by `read_whole_request`, while the direct path has it: the protocol's current
    cycle, as far as uvicorn's protocol looks at one (answered yet, client gone, keep-alive), without the
    ASGI scope, cycle and event a request the direct path answers never uses. A fall-back makes the real
    cycle then (`DirectHttpToolsProtocol._whole_cycle`)."""

    __slots__ = ("disconnected", "keep_alive", "request", "response_complete", "response_started")
    message_event = _NoEvent()

    def __init__(self, request: WholeRequest) -> None:
        self.request = request
        self.keep_alive = request.keep_alive
        self.disconnected = False
        self.response_started = False
        self.response_complete = False


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
        self._gathering: _GatheredBody | None = None

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
        if direct is not None and cycle.more_body and app is self.app:
            gathered = _gathered_body(cycle, direct.max_request_bytes)
            # What came before the task starts (a pipelined request's first chunks) is in the cycle already.
            if gathered is not None and gathered.write(bytes(cycle.body)):
                cycle.body = bytearray()
                self._gathering = gathered
                cycle.receive = gathered.receive  # type: ignore[method-assign]
        super()._start_asgi_task(cycle, app)

    def on_body(self, body: bytes) -> None:
        gathering = self._gathering
        if gathering is None or gathering.cycle is not self.cycle:
            super().on_body(body)
        elif self.cycle.response_complete:  # answered before its body was read: the rest is dropped
            gathering.buffer = memoryview(b"")
            gathering.filled = 0
        elif not gathering.write(body):
            # Past the Content-Length, which the parser does not allow: not a connection to go on with.
            self._gathering = None
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if (
            self._direct is not None
            and data.startswith(b"POST /")
            and self._in_head
            and not self._head_bytes
            and (self.cycle is None or self.cycle.response_complete)
            and not self.flow.write_paused
            and self.limit_concurrency is None
            and self._read_whole(data)
        ):
            return
        self._reading = True
        try:
            super().data_received(data)
        finally:
            self._reading = False
        gathering = self._gathering
        if gathering is not None:
            self._read_rest(gathering)
        waiting = self._direct_waiting
        if waiting is not None:
            # The body did not come with its head: a slow body is the ASGI path's to read, under its
            # upload place and deadline (and answered 503 if shutdown cuts it short).
            self._direct_waiting = None
            HttpToolsProtocol._start_asgi_task(self, waiting[0], self.app)

    def _read_rest(self, gathering: _GatheredBody) -> None:
        """Read the rest of `gathering`'s body with a `_BodyReader` when it is the current request's and
        the connection goes on after it (the parser stays in charge of a last request's trailing bytes)."""
        cycle = self.cycle
        if (
            gathering.cycle is cycle
            and not gathering.complete
            and cycle.keep_alive
            and not cycle.response_complete
            and not self.transport.is_closing()
        ):
            self.transport.set_protocol(_BodyReader(self, gathering))

    def body_read(self) -> None:
        """The `_BodyReader`'s body is whole: the transport is this protocol's again, its parser a fresh
        one (the one it had saw only the body's first bytes), and the request's message is complete."""
        self.parser = httptools.HttpRequestParser(self)
        with contextlib.suppress(AttributeError):  # as uvicorn sets its parser up (httptools >= 0.6.3)
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.transport.set_protocol(self)
        self.on_message_complete()

    def _read_whole(self, data: bytes) -> bool:
        """Submit `data`, one whole request, to the direct path without httptools; False when it is not
        one the direct path takes that way (nothing done: the bytes are httptools' to parse)."""
        direct = self._direct
        request = read_whole_request(data, self.max_header_bytes, self.max_header_count)
        if direct is None or request is None:
            return False
        head = direct.takes("POST", request.path, self.root_path, request.headers)
        if head is None:
            return False
        self._unset_keepalive_if_required()
        exchange = _WholeExchange(request)
        if not direct.submit(head, request.path, request.body, self, exchange):
            return False
        self.cycle = exchange  # type: ignore[assignment]
        return True

    def _whole_cycle(self, exchange: _WholeExchange) -> RequestResponseCycle:
        """The uvicorn cycle `exchange`'s request would have had from httptools' callbacks, its body whole."""
        request = exchange.request
        scope: Any = {
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "root_path": self.root_path,
            "headers": request.headers,
            "state": self.app_state.copy(),
            "method": "POST",
            "path": request.path,
            "raw_path": request.path.encode("ascii"),
            "query_string": b"",
        }
        cycle = RequestResponseCycle(
            scope=scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=False,
            keep_alive=exchange.keep_alive,
            on_response=self.on_response_complete,
        )
        cycle.body += request.body
        cycle.more_body = False
        cycle.disconnected = exchange.disconnected
        cycle.message_event.set()  # the body is whole: `receive` must not wait for it
        return cycle

    def on_message_complete(self) -> None:
        gathering = self._gathering
        if gathering is not None and gathering.cycle is self.cycle:
            self._gathering = None
            gathering.complete = True
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
        """Write `exchange`'s (its cycle's, or its `_WholeExchange`'s) whole response as uvicorn's `send`
        would, and complete it."""
        cycle: RequestResponseCycle | _WholeExchange = exchange
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
        self.on_response_complete()  # what uvicorn gives every cycle as its `on_response`
        return True

    def direct_fall_back(self, exchange: Any) -> None:
        """Start `exchange`'s ASGI task now: its body is complete in its cycle, made now for a request read
        whole (a client already gone is answered 499 there, as any other)."""
        if isinstance(exchange, _WholeExchange):
            cycle = self._whole_cycle(exchange)
            if self.cycle is exchange:
                self.cycle = cycle
            exchange = cycle
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
