"""The one adapter between the service and `bn_export.verify`: the frozen-statistics check run at load."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.errors import ModelLoadError


def verify_frozen(path: Path, providers: Sequence[str]) -> dict[str, Any]:
    """Run `bn_export.verify.verify_model` on the model at `path`; its report as a dict when it passed.

    Raises `ModelLoadError` with the failed checks when the graph normalizes with batch statistics (or fails
    any other check), when the file is not ONNX, or when the check itself is not installed: a model is never
    served unverified.
    """
    try:
        # Imported when a model loads, not with the service, so that the service runs without it installed
        # and refuses models with a clear reason instead of failing to start.
        verify_model: Any = importlib.import_module("bn_export.verify").verify_model
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(
            f"the frozen-statistics check bn_export.verify is not available: {exc}"
        ) from None
    from bn_export.errors import BnExportError

    try:
        report = verify_model(path, providers=list(providers))
    except BnExportError as exc:
        raise ModelLoadError(f"{path} failed verification: {exc}") from None
    if not report.passed:
        failed = "; ".join(f"{c.name}: {c.detail}" for c in report.checks if not c.passed)
        raise ModelLoadError(f"refused: the graph does not pass the frozen-statistics checks ({failed})")
    result: dict[str, Any] = report.to_dict()
    return result
