"""The one table from the service's errors to HTTP statuses, and the V2 error answer built from it.

Both ways a request is served (the pure-ASGI infer path in `service.front` and the FastAPI routes) answer
a `ServiceError` through `error_answer`, so a given error has one status, one set of headers and one body,
`{"error": "<message>"}`, whichever path served it.
"""

from __future__ import annotations

import logging

import orjson

from service.errors import (
    ConfigurationError,
    Forbidden,
    InferenceFailed,
    InvalidInput,
    LoadRefused,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServerNotReady,
    ServiceError,
    Unauthorized,
    UnsupportedMediaType,
)

log = logging.getLogger("bn_serve")

STATUS: dict[type[ServiceError], int] = {
    InvalidInput: 400,
    LoadRefused: 400,
    Unauthorized: 401,
    Forbidden: 403,
    ModelNotFound: 404,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    InferenceFailed: 500,
    ConfigurationError: 500,
    ModelNotReady: 503,
    ModelLoadError: 503,
    ServerNotReady: 503,
    Overloaded: 503,
    RequestTimeout: 504,
}
INTERNAL_ERROR = b'{"error":"internal server error; the server log has the details"}'


def status_for(exc: ServiceError) -> int:
    """The HTTP status of `exc`: the table entry of its nearest class (500 for one the table lacks)."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_body(message: str) -> bytes:
    """The V2 error body `{"error": message}`."""
    return orjson.dumps({"error": message})


def error_answer(exc: ServiceError, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    """`(status, headers, body)` answering `exc` on `method path`; server-side faults are logged.

    A 401 carries the bearer challenge, a 503 for a full queue `Retry-After`. Overload and timeouts are
    the server working as configured, not faults, so they are not logged as errors.
    """
    status = status_for(exc)
    if status >= 500 and not isinstance(exc, (Overloaded, RequestTimeout)):
        log.error("%s %s: %s", method, path, exc)
    headers = {}
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="bn-serve"'
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(exc.retry_after_s)
    return status, headers, error_body(str(exc))
