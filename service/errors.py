"""The errors the service raises on purpose. No HTTP here: `service.http_errors` maps each to a status."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the service raises on purpose; its message is meant for the client or operator."""


class InvalidInput(ServiceError):
    """The request is malformed or does not fit the model (framing, shape, datatype, names, NaN/Inf)."""


class ModelNotFound(ServiceError):
    """No model, or no version of a model, with the requested name is in the repository."""


class ModelNotReady(ServiceError):
    """The model exists but cannot serve now: still loading, or its load failed (the message says why)."""


class ServerNotReady(ServiceError):
    """The server has not finished loading and warming up its models."""


class PayloadTooLarge(ServiceError):
    """The request body is larger than the configured `max_request_bytes`."""


class UnsupportedMediaType(ServiceError):
    """The request's Content-Type or Content-Encoding is not one the endpoint reads."""


class InferenceFailed(ServiceError):
    """The runtime failed on a request that passed validation: the server's or the model's fault."""


class ModelLoadError(ServiceError):
    """A model could not be loaded or was refused (unreadable file, batch statistics); marks it not ready."""


class ConfigurationError(ServiceError):
    """The server cannot start as configured (no model given, CUDA requested but unusable, bad directory)."""


class Unauthorized(ServiceError):
    """A protected route was called without a bearer token."""


class Forbidden(ServiceError):
    """The bearer token matches none of the configured API keys."""


class Overloaded(ServiceError):
    """Every inference slot and queue place is taken; the client should retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeout(ServiceError):
    """The request did not finish within the configured `request_timeout_s`."""


class LoadRefused(ServiceError):
    """A repository load was refused (missing, corrupt or non-frozen model); the old version serves on."""
