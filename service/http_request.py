"""Reading an HTTP request at the ASGI level: its headers, its body within a size limit, its framing.

Plain functions over the ASGI scope and `receive`, so the pure-ASGI infer path and the FastAPI routes read
requests the same way, without building a framework `Request` on the hot path.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope

from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
HEADER_LENGTH = "inference-header-content-length"
_HEADER_LENGTH = HEADER_LENGTH.encode()

Headers = Mapping[bytes, bytes]


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
            f"Content-Encoding {encoding!r} is not supported; send the body uncompressed"
        )
    media_type = (header(headers, b"content-type") or "").split(";")[0].strip().lower()
    raw_length = header(headers, _HEADER_LENGTH)
    if raw_length is None:
        if media_type in ("", JSON):
            return None
        if media_type == OCTET_STREAM:
            raise InvalidInput(f"a {OCTET_STREAM} body needs the Inference-Header-Content-Length header")
        raise UnsupportedMediaType(
            f"Content-Type {media_type!r} is not supported; send {JSON} or {OCTET_STREAM}"
        )
    if media_type not in ("", OCTET_STREAM):
        raise UnsupportedMediaType(
            f"Content-Type {media_type!r} with Inference-Header-Content-Length: "
            f"a binary body is {OCTET_STREAM}"
        )
    if not raw_length.strip().isdigit():
        raise InvalidInput(
            f"Inference-Header-Content-Length must be a non-negative integer, got {raw_length!r}"
        )
    return int(raw_length)


async def read_body(receive: Receive, headers: Headers, limit: int) -> bytes:
    """The request body, refused with `PayloadTooLarge` beyond `limit` bytes: by Content-Length before reading
    anything, and while streaming for bodies without one (chunked) or that lie about it.

    Raises Starlette's `ClientDisconnect` when the client goes away before the body is complete.
    """
    declared = header(headers, b"content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise InvalidInput(f"Content-Length must be a non-negative integer, got {declared!r}")
        if int(declared) > limit:
            raise PayloadTooLarge(
                f"the body has {int(declared)} bytes, the limit is {limit} (max_request_bytes)"
            )
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes (max_request_bytes)")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    # One message is the common case (small bodies): no copy then.
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
