"""Reading an HTTP request at the ASGI level: its headers, its body within a size limit, its framing.

Plain functions over the ASGI scope and `receive`, so the pure-ASGI infer path and the FastAPI routes read
requests the same way, without building a framework `Request` on the hot path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope

from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
HEADER_LENGTH = "inference-header-content-length"
_HEADER_LENGTH = HEADER_LENGTH.encode()
# Tensors viewed from a binary body start on this boundary: a cache line, and the widest SIMD load (AVX-512).
TENSOR_ALIGNMENT = 64

Headers = Mapping[bytes, bytes]
_DIGITS = re.compile(r"[0-9]{1,20}")


def request_headers(scope: Scope) -> dict[bytes, bytes]:
    """The request's headers by lower-case name (ASGI lower-cases them); the first of repeated ones wins,
    as with Starlette's `Headers.get`."""
    return dict(reversed(scope["headers"]))


def header(headers: Headers, name: bytes) -> str | None:
    """The value of header `name` (lower case) as text, None when absent."""
    value = headers.get(name)
    return None if value is None else value.decode("latin-1")


def framing(headers: Headers) -> int | None:
    """The JSON header's length for a binary-extension body, None for a JSON body; checks the media type.

    Clients may omit Content-Type (Triton's does): the header-length header alone then marks a binary body.
    """
    encoding = (header(headers, b"content-encoding") or "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaType(
            f"Content-Encoding {_shown(encoding)} is not supported; send the body uncompressed"
        )
    media_type = (header(headers, b"content-type") or "").split(";")[0].strip().lower()
    raw_length = header(headers, _HEADER_LENGTH)
    if raw_length is None:
        if media_type in ("", JSON):
            return None
        if media_type == OCTET_STREAM:
            raise InvalidInput(f"a {OCTET_STREAM} body needs the Inference-Header-Content-Length header")
        raise UnsupportedMediaType(
            f"Content-Type {_shown(media_type)} is not supported; send {JSON} or {OCTET_STREAM}"
        )
    if media_type not in ("", OCTET_STREAM):
        raise UnsupportedMediaType(
            f"Content-Type {_shown(media_type)} with Inference-Header-Content-Length: "
            f"a binary body is {OCTET_STREAM}"
        )
    return _decimal(raw_length, "Inference-Header-Content-Length")


def _shown(value: str, limit: int = 64) -> str:
    """A header value as quoted in an answer: ASCII-escaped and cut at `limit` characters."""
    return ascii(value[:limit]) + ("..." if len(value) > limit else "")


def _decimal(value: str, name: str) -> int:
    """Header `name`'s `value` as a non-negative integer of ASCII digits; raises `InvalidInput`.

    `str.isdigit` would take Unicode digits (`"²"`, `"٣"`) that `int` then refuses. The value is never
    repeated in the message: header values stay out of answers and logs.
    """
    digits = value.strip(" \t")
    if not _DIGITS.fullmatch(digits):
        raise InvalidInput(f"{name} must be a non-negative integer of at most 20 ASCII digits")
    return int(digits)


async def read_body(
    receive: Receive, headers: Headers, limit: int, *, align_at: int | None = None
) -> bytes | memoryview:
    """The request body, refused with `PayloadTooLarge` beyond `limit` bytes: by Content-Length before reading
    anything, and while streaming for bodies without one (chunked) or that lie about it.

    A body with a Content-Length that comes in several messages is written into one buffer allocated up front
    (no list of chunks joined at the end: one copy of the body less), and byte `align_at` of it (the first
    tensor's, for binary bodies) lands on a `TENSOR_ALIGNMENT` boundary, so arrays viewed from it are aligned.
    Raises Starlette's `ClientDisconnect` when the client goes away before the body is complete.
    """
    declared = header(headers, b"content-length")
    length = None
    if declared is not None:
        length = _decimal(declared, "Content-Length")
        if length > limit:
            raise PayloadTooLarge(f"the body has {length} bytes, the limit is {limit} (max_request_bytes)")
    message = await receive()
    if message["type"] != "http.request":  # http.disconnect
        raise ClientDisconnect()
    first: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        # One message is the common case (small bodies): no copy then.
        if len(first) > limit:
            raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes (max_request_bytes)")
        return first
    if length is None:
        return await _read_chunks(receive, [first], limit, more=True)
    buffer = aligned_buffer(length, align_at)
    filled = 0
    chunk = first
    while True:
        end = filled + len(chunk)
        if end > length:  # longer than declared: read on as a body of unknown length
            return await _read_chunks(
                receive, [bytes(buffer[:filled]), chunk], limit, more=message.get("more_body", False)
            )
        buffer[filled:end] = chunk
        filled = end
        if not message.get("more_body", False):
            break
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            raise ClientDisconnect()
        chunk = message.get("body", b"")
    return buffer[:filled]


async def _read_chunks(receive: Receive, chunks: list[bytes], limit: int, *, more: bool) -> bytes:
    """A body of unknown length (chunked transfer encoding): `chunks` read so far, then the rest, joined."""
    size = sum(len(chunk) for chunk in chunks)
    while True:
        if size > limit:
            raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes (max_request_bytes)")
        if not more:
            return b"".join(chunks)
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        chunks.append(chunk)
        more = message.get("more_body", False)


def aligned_buffer(length: int, align_at: int | None) -> memoryview:
    """A writable, uninitialised `length`-byte buffer whose byte `align_at` sits on a `TENSOR_ALIGNMENT`
    boundary (numpy's `empty`: unlike `bytearray(length)` it does not write zeros the body overwrites)."""
    storage = np.empty(length + TENSOR_ALIGNMENT, dtype=np.uint8)
    start = -(storage.ctypes.data + (align_at or 0)) % TENSOR_ALIGNMENT
    return storage[start : start + length].data
