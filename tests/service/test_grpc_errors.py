"""`service.grpc_errors`: every error the service raises has its gRPC code, and no client mistake is
answered as the server's fault."""

from __future__ import annotations

import inspect

import grpc
import pytest

from service import errors
from service.grpc_errors import CODE, code_for, error_status
from service.http_errors import status_for

SERVICE_ERRORS = [
    cls
    for _, cls in inspect.getmembers(errors, inspect.isclass)
    if issubclass(cls, errors.ServiceError) and cls is not errors.ServiceError
]


@pytest.mark.parametrize("cls", SERVICE_ERRORS, ids=lambda cls: cls.__name__)
def test_every_error_has_a_code_that_agrees_with_its_http_status(cls: type[errors.ServiceError]) -> None:
    assert cls in CODE
    exc = cls("message")
    status, code = status_for(exc), code_for(exc)
    # 4xx: the client's mistake, never INTERNAL or UNKNOWN; 5xx: the server's state or fault.
    if status < 500:
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
    else:
        assert code in (
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )


def test_a_full_queue_says_when_to_retry_and_keeps_its_message() -> None:
    code, message, trailers = error_status(errors.Overloaded("full", retry_after_s=3), "/x")
    assert (code, message, trailers) == (grpc.StatusCode.UNAVAILABLE, "full", (("retry-after", "3"),))


def test_a_subclass_takes_its_nearest_entry() -> None:
    class Narrower(errors.ModelNotFound):
        pass

    assert code_for(Narrower("x")) is grpc.StatusCode.NOT_FOUND
