"""The one adapter between the service and `bn_export.verify`: the frozen-statistics check run at load."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from service.errors import ModelLoadError


def parse_model(data: bytes, what: str) -> Any:
    """The ONNX ModelProto in `data` (the bytes of `what`, e.g. "model 'digits' version 1");
    `ModelLoadError` when it is not one."""
    import onnx  # with the models, not with the service

    try:
        return onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors: all mean "not ONNX"
        raise ModelLoadError(f"{what} is not an ONNX model: {exc}") from None


def verify_frozen(
    model: Any, providers: Sequence[str], what: str, budget_s: float | None = None
) -> dict[str, Any]:
    """Run `bn_export.verify.verify_model` on `model` (a parsed ModelProto, the very bytes the session was
    built from); its report as a dict when it passed. `budget_s`: the seconds its empirical checks may take
    (None: verify's default, `bn_export.probes.DEFAULT_BUDGET_S`).

    Raises `ModelLoadError` with the failed checks when the graph normalizes with batch statistics (or fails
    any other check), or when the check itself is not installed: a model is never served unverified.
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
        options: dict[str, Any] = {} if budget_s is None else {"budget_s": budget_s}
        report = verify_model(model, providers=list(providers), **options)
    except BnExportError as exc:
        raise ModelLoadError(f"{what} failed verification: {exc}") from None
    if not report.passed:
        failed = "; ".join(f"{c.name}: {c.detail}" for c in report.checks if not c.passed)
        raise ModelLoadError(f"refused: the graph does not pass the frozen-statistics checks ({failed})")
    result: dict[str, Any] = report.to_dict()
    return result
