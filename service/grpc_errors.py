"""The one table from the service's errors to gRPC status codes, as `service.http_errors` is for HTTP.

Every gRPC call answers a `ServiceError` through `error_status`, with the message REST sends in its
`{"error": ...}` body. A client's mistake is INVALID_ARGUMENT (or NOT_FOUND, UNAUTHENTICATED, ...), never
UNKNOWN or INTERNAL: those are kept for the server's own faults.
"""

from __future__ import annotations

import logging

import grpc

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

CODE: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    LoadRefused: grpc.StatusCode.INVALID_ARGUMENT,
    UnsupportedMediaType: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
    Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    PayloadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    InferenceFailed: grpc.StatusCode.INTERNAL,
    ConfigurationError: grpc.StatusCode.INTERNAL,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    ModelLoadError: grpc.StatusCode.UNAVAILABLE,
    ServerNotReady: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.UNAVAILABLE,
    RequestTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
}
INTERNAL_ERROR = "internal server error; the server log has the details"


def code_for(exc: ServiceError) -> grpc.StatusCode:
    """The status code of `exc`: the table entry of its nearest class (INTERNAL for one the table lacks)."""
    for cls in type(exc).__mro__:
        if cls in CODE:
            return CODE[cls]
    return grpc.StatusCode.INTERNAL


def error_status(exc: ServiceError, method: str) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """`(code, message, trailing metadata)` answering `exc` on `method`; server-side faults are logged.

    A full queue carries `retry-after` (seconds) in the trailing metadata, as REST's 503 carries the header.
    """
    code = code_for(exc)
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        log.error("%s: %s", method, exc)
    trailers: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, Overloaded):
        trailers = (("retry-after", str(exc.retry_after_s)),)
    return code, str(exc), trailers
