"""Structured logs: one JSON object per line, each carrying the id of the request it belongs to.

The request id comes from the client's `X-Request-ID` (when it is a short token of safe characters) or is
generated, is echoed back in the response's `X-Request-ID`, and follows the request into the inference
threads through a context variable. Records hold what happened (method, path, status, duration, error
message), never bodies, tensor values or headers, so neither data nor credentials reach the logs.

Every request leaves one access record on `bn_serve.access`. It is written as one preformatted line
straight to the JSON handler when that handler is the only place the record would go (the server's own
configuration, `configure_logging`): the same line `logging` would write, without a `LogRecord`, the
formatter's generic passes and the handler lookup per request. Under any other configuration (a handler or
filter of the embedding application's, pytest's capture) it goes through `logging` as usual.
"""

from __future__ import annotations

import contextvars
import datetime
import itertools
import logging
import math
import os
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

import orjson

from service.native import name_this_thread

REQUEST_ID_HEADER = "x-request-id"
# A client-supplied id is echoed into headers and logs, so only short tokens of inert characters pass;
# anything else (newlines, quotes, megabytes) is replaced by a generated id.
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# The attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
# uvicorn adds `color_message`, the message with terminal colour codes: noise in a JSON log.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}
ACCESS_LOGGER = "bn_serve.access"

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
# Set during a run that merged several requests (adaptive batching): the ids of all of them, in order.
batch_request_ids: contextvars.ContextVar[tuple[str | None, ...] | None] = contextvars.ContextVar(
    "batch_request_ids", default=None
)
access_log = logging.getLogger(ACCESS_LOGGER)

_second: tuple[int, str] = (-1, "")


def utc_timestamp(seconds: float) -> str:
    """`seconds` since the epoch (>= 0) in UTC to the millisecond, `2026-11-25T11:52:45.123+00:00`: what
    `datetime.fromtimestamp(seconds, utc).isoformat(timespec="milliseconds")` writes, with the date and time
    of day formatted once a second rather than per record."""
    global _second
    # Rounded to the microsecond first, as `datetime.fromtimestamp` does, so both give the same text.
    fraction, integral = math.modf(seconds)
    whole, micros = int(integral), round(fraction * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    cached, prefix = _second  # one tuple read: another thread may replace it meanwhile
    if whole != cached:
        moment = datetime.datetime.fromtimestamp(whole, datetime.timezone.utc)
        prefix = moment.strftime("%Y-%m-%dT%H:%M:%S")
        _second = (whole, prefix)
    return f"{prefix}.{micros // 1000:03d}+00:00"


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", "request_id"?, "request_ids"?, **extra, "exception"?}` as one
    line of JSON; `request_ids` lists every request of a merged run."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": utc_timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        current = request_id.get()
        if current is not None:
            document["request_id"] = current
        merged = batch_request_ids.get()
        if merged is not None:
            document["request_ids"] = list(merged)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                document[key] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(document, default=str).decode()


def configure_logging(level: str, flush_interval_s: float = 0.0) -> None:
    """Send every logger (ours, uvicorn's, onnxruntime's Python side) to stderr as JSON lines at `level`;
    access records are written out at most `flush_interval_s` after they are made (0: each at once)."""
    handler = JsonLinesHandler(flush_interval_s)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own loggers carry handlers when it configured them; ours replace them via propagation.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


class JsonLinesHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler writing `JsonFormatter` lines, and preformatted documents by `write_document`.

    With `flush_interval_s` > 0 the documents (access records) are kept and written together: at most that
    long after the first of them, once `buffer_bytes` are kept, before any other record (so the stream keeps
    the order they were made in), and on `flush`/`close` (`logging.shutdown` calls both at exit). A write
    and a flush per request was most of an access record's cost; what a crash (SIGKILL) can lose is at most
    the last `flush_interval_s` of access records. 0 writes each one at once.
    """

    def __init__(self, flush_interval_s: float = 0.0, buffer_bytes: int = 64 * 1024) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        if flush_interval_s < 0:
            raise ValueError(f"flush_interval_s must be at least 0, got {flush_interval_s}")
        self.flush_interval_s = flush_interval_s
        self.buffer_bytes = buffer_bytes
        self._kept: list[str] = []  # lines not written yet, each ending in a newline; under the lock
        self._kept_bytes = 0
        self._due = threading.Event()  # set when the first line is kept: the writer's timer starts
        self._writer: threading.Thread | None = None

    def write_document(self, document: dict[str, Any]) -> None:
        """Write `document` as one JSON line (or keep it for the next write), under the handler's lock as
        `emit` does."""
        self.write_documents((document,))

    def write_documents(self, documents: Sequence[dict[str, Any]]) -> None:
        """`write_document` for each of `documents`, in order, under one hold of the lock."""
        lines = [orjson.dumps(document, default=str).decode() + "\n" for document in documents]
        self.acquire()
        try:
            if self.flush_interval_s == 0:
                self.stream.write("".join(lines))
                self.stream.flush()
                return
            first = not self._kept
            self._kept.extend(lines)
            self._kept_bytes += sum(map(len, lines))
            if self._kept_bytes >= self.buffer_bytes:
                self._write_kept()
            elif first:
                if self._writer is None:
                    self._writer = threading.Thread(
                        target=self._write_when_due, name="bn-serve-log", daemon=True
                    )
                    self._writer.start()
                self._due.set()
        except Exception:  # as `emit`: a broken stream must not fail the request that is logged
            self.handleError(logging.makeLogRecord({"msg": "".join(lines)}))
        finally:
            self.release()

    def _write_kept(self) -> None:
        """Write the kept lines in one call; the caller holds the lock."""
        if self._kept:
            text, self._kept, self._kept_bytes = "".join(self._kept), [], 0
            self.stream.write(text)
            self.stream.flush()

    def _write_when_due(self) -> None:
        name_this_thread()
        while True:
            self._due.wait()
            self._due.clear()
            time.sleep(self.flush_interval_s)
            self.flush()

    def emit(self, record: logging.LogRecord) -> None:
        # Called under the lock: the kept access records go first, in the order they were made.
        if self._kept:
            try:
                self._write_kept()
            except Exception:
                self.handleError(record)
        super().emit(record)

    def flush(self) -> None:
        self.acquire()
        try:
            if self._kept:
                self._write_kept()
        except Exception:  # as `emit`: a broken stream loses its lines, not the server
            self._kept, self._kept_bytes = [], 0
        finally:
            self.release()
        super().flush()


def _only_json_handler(logger: logging.Logger) -> JsonLinesHandler | None:
    """The handler `logger`'s INFO records reach, when that is one `JsonLinesHandler` and no filter is on
    the way; else None (the record then goes through `logging`)."""
    found = None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for handler in current.handlers:
            if found is not None or type(handler) is not JsonLinesHandler or handler.filters:
                return None
            if handler.level > logging.INFO:
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    return found


def write_access_record(method: str, path: str, status: int, seconds: float, rid: str) -> None:
    """The access record of one request, on `bn_serve.access` at INFO (see the module docstring)."""
    write_access_records(method, ((path, status, seconds, rid),))


def write_access_records(method: str, records: Sequence[tuple[str, int, float, str]]) -> None:
    """The access records of requests answered together (`path, status, seconds, rid` each), in order: one
    timestamp and one hold of the JSON handler's lock for all of them."""
    if not records or not access_log.isEnabledFor(logging.INFO):
        return
    handler = _only_json_handler(access_log)
    if handler is None:
        for path, status, seconds, rid in records:
            extra = {
                "request_id": rid,
                "method": method,
                "path": path,
                "status": status,
                "duration_ms": round(seconds * 1000, 3),
            }
            access_log.info("%s", f"{method} {path} {status}", extra=extra)
        return
    ts = utc_timestamp(time.time())
    handler.write_documents(
        [
            {
                "ts": ts,
                "level": "info",
                "logger": ACCESS_LOGGER,
                "message": f"{method} {path} {status}",
                "request_id": rid,
                "method": method,
                "path": path,
                "status": status,
                "duration_ms": round(seconds * 1000, 3),
            }
            for path, status, seconds, rid in records
        ]
    )


class RequestIds:
    """Request ids: the client's when it is a safe token, else generated.

    A generated id is a random 64-bit prefix drawn when the server starts and a 64-bit counter, 32 hex
    digits: unique across requests, workers and restarts (with overwhelming probability), at a tenth of
    `uuid4`'s cost.
    """

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count()

    def incoming(self, value: str | None) -> str:
        """The client's id when it is a safe token, else a fresh one."""
        if value is not None and _SAFE_ID.fullmatch(value):
            return value
        return f"{self._prefix}{next(self._counter) & 0xFFFF_FFFF_FFFF_FFFF:016x}"
