"""The errors bn_export raises: one base class, so callers (the CLI, the service) catch one thing."""

from __future__ import annotations


class BnExportError(Exception):
    """Base of every error bn_export raises on purpose; its message is meant for the user."""


class InvalidInputError(BnExportError, ValueError):
    """An array, argument or option is not what the operation needs (shape, dtype, NaN/Inf, range)."""


class DataError(BnExportError):
    """A dataset on disk cannot be read or does not have the layout the fit needs."""


class CheckpointError(BnExportError):
    """A checkpoint file is missing, malformed, truncated or from an incompatible format."""


class ExportError(BnExportError):
    """An ONNX export failed its own checks; nothing was written."""


class ModelFileError(BnExportError):
    """A file given as an ONNX model cannot be parsed as one."""


class MissingDependencyError(BnExportError):
    """An optional extra the operation needs is not installed; the message says which to install."""
