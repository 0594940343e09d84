"""frozen-bn's training side: fit Batch Normalization statistics, export them frozen into ONNX, verify."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("frozen-bn")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
