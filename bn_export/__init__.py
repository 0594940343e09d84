"""frozen-bn's training side: fit Batch Normalization statistics, export them frozen into ONNX, verify.

The public names below are imported on first use, so `import bn_export` stays cheap (no onnx or
onnxruntime until an export or a verification needs them).
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("frozen-bn")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

_EXPORTS = {
    "BatchNorm": "bn_export.layer",
    "Moments": "bn_export.moments",
    "Checkpoint": "bn_export.checkpoint",
    "load_checkpoint": "bn_export.checkpoint",
    "save_checkpoint": "bn_export.checkpoint",
    "open_dataset": "bn_export.data",
    "export_onnx": "bn_export.export",
    "verify_model": "bn_export.verify",
}

__all__ = [
    "BatchNorm",
    "Checkpoint",
    "Moments",
    "__version__",
    "export_onnx",
    "load_checkpoint",
    "open_dataset",
    "save_checkpoint",
    "verify_model",
]

if TYPE_CHECKING:
    from bn_export.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from bn_export.data import open_dataset
    from bn_export.export import export_onnx
    from bn_export.layer import BatchNorm
    from bn_export.moments import Moments
    from bn_export.verify import verify_model


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bn_export' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
