"""`export_onnx`: write a checkpoint as a frozen inference-mode ONNX graph, checked before it is written.

The file is deterministic (same checkpoint and options -> same bytes: opset, IR version and producer pinned,
no export-time clock), and nothing is written unless the model passes
`onnx.checker.check_model(full_check=True)` and onnxruntime's outputs match the float64 inference formula
within the tolerance documented in `bn_export.reference` (`(16 + n)·u·magnitude`, u the unit roundoff of the
model's dtype).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray
from onnx import helper

from bn_export.checkpoint import Checkpoint
from bn_export.errors import ExportError
from bn_export.files import write_atomically
from bn_export.onnx_graph import (
    DEFAULT_OPSET,
    LOGITS_NAME,
    OUTPUT_NAME,
    Dtype,
    Form,
    build_model,
    checkpoint_metadata,
    ir_version_for,
)
from bn_export.reference import compare, head_formula, inference_formula, relative_tolerance

EXPORT_BATCH_SIZES = (1, 7)
_ALTERNATE_SPATIAL = 3  # a second spatial size besides the fitted one: the graph's spatial dims are dynamic


@dataclass(frozen=True)
class ExportResult:
    """What `export_onnx` wrote and how close onnxruntime came to the float64 formula on it.

    `max_error` is the largest |onnxruntime - formula| over every checked output element; `error_ratio` the
    largest error/tolerance (<= 1 for every file written).
    """

    path: Path
    form: Form
    dtype: Dtype
    opset: int
    ir_version: int
    with_head: bool
    max_error: float
    error_ratio: float
    sha256: str
    size_bytes: int


def export_onnx(
    checkpoint: Checkpoint,
    path: str | os.PathLike[str],
    *,
    form: Form = "batchnorm",
    opset: int = DEFAULT_OPSET,
    dtype: Dtype = "float32",
    with_head: bool = False,
) -> ExportResult:
    """Build, check and atomically write the frozen graph of `checkpoint` to `path`.

    Raises `ExportError` (and writes nothing) when the statistics are unusable (non-finite, negative
    variance), the options are invalid, the checker rejects the graph, or onnxruntime's outputs on generated
    inputs (batch sizes 1 and 7, the fitted and another spatial size) are past the tolerance.
    """
    _validate(checkpoint, dtype, with_head)
    metadata = checkpoint_metadata(checkpoint, form, dtype)
    model = build_model(
        checkpoint, form=form, opset=opset, dtype=dtype, with_head=with_head, metadata=metadata
    )
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # ValidationError / InferenceError: an export bug or an unsupported combination
        raise ExportError(f"the exported graph fails onnx.checker: {exc}") from exc
    max_error, ratio = _measure(model, checkpoint, form, dtype, with_head)
    if not ratio <= 1.0:
        raise ExportError(
            f"onnxruntime's output differs from the float64 formula by up to {max_error:.3g} "
            f"({ratio:.3g} times the {dtype} tolerance); nothing was written"
        )
    metadata["export_max_error"] = repr(max_error)
    metadata["export_tolerance"] = (
        f"(16 + n)*u*magnitude, u = unit roundoff of {dtype} (see bn_export.reference)"
    )
    helper.set_model_props(model, metadata)
    data = model.SerializeToString(deterministic=True)
    written = write_atomically(Path(path), data)
    return ExportResult(
        path=written,
        form=form,
        dtype=dtype,
        opset=opset,
        ir_version=ir_version_for(opset),
        with_head=with_head,
        max_error=max_error,
        error_ratio=ratio,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
    )


def _validate(checkpoint: Checkpoint, dtype: Dtype, with_head: bool) -> None:
    """Refuse statistics no graph should freeze: the message names the array and what was expected."""
    eps = float(checkpoint.eps)
    if not (np.isfinite(eps) and eps >= 0):
        raise ExportError(f"eps is {eps!r}, expected a finite value >= 0")
    for name in ("gamma", "beta", "moving_mean", "moving_var"):
        values = np.asarray(getattr(checkpoint, name), dtype=np.float64)
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise ExportError(f"{name} has {bad} non-finite value(s) (NaN/Inf); expected finite statistics")
    var = np.asarray(checkpoint.moving_var, dtype=np.float64)
    if np.any(var < 0) or np.any(var + eps <= 0):
        raise ExportError(
            f"moving_var has values < 0 or moving_var + eps <= 0 (min {var.min():.3g}, eps {eps:.3g})"
        )
    if np.dtype(dtype) == np.float16:
        # Samples within a few standard deviations of the mean must be float16 numbers, or the model is moot.
        reach = np.abs(np.asarray(checkpoint.moving_mean, np.float64)) + 4 * np.sqrt(var + eps)
        limit = float(np.finfo(np.float16).max)
        if np.any(reach > limit):
            raise ExportError(
                f"the data's range (|mean| + 4 std up to {reach.max():.3g}) exceeds float16's {limit:.0f}; "
                "export as float32"
            )
    if with_head and checkpoint.head is not None:
        for name in ("weight", "bias"):
            if not np.all(np.isfinite(getattr(checkpoint.head, name))):
                raise ExportError(f"head {name} has non-finite values")


def _inputs(checkpoint: Checkpoint, io_dtype: np.dtype[Any]) -> list[NDArray[Any]]:
    """Samples around the statistics (mean ± 2 std per channel) at each export batch size and spatial size."""
    rng = np.random.default_rng(0)
    fitted = tuple(checkpoint.sample_shape)
    alternate = tuple(
        size if a == checkpoint.axis else _ALTERNATE_SPATIAL for a, size in enumerate(fitted, start=1)
    )
    shape_along = [1] * checkpoint.rank
    shape_along[checkpoint.axis] = -1
    mean = np.asarray(checkpoint.moving_mean, dtype=np.float64).reshape(shape_along)
    std = np.sqrt(np.asarray(checkpoint.moving_var, dtype=np.float64) + checkpoint.eps).reshape(shape_along)
    batches = []
    for sample in dict.fromkeys([fitted, alternate]):
        for n in EXPORT_BATCH_SIZES:
            batches.append((mean + 2 * std * rng.standard_normal((n, *sample))).astype(io_dtype))
    return batches


def _measure(
    model: onnx.ModelProto, checkpoint: Checkpoint, form: Form, dtype: Dtype, with_head: bool
) -> tuple[float, float]:
    """(max error, max error/tolerance) of onnxruntime against the float64 formula on `_inputs`."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types
        raise ExportError(f"onnxruntime {ort.__version__} cannot load the exported graph: {exc}") from exc
    io_dtype = np.dtype(dtype)
    # ONNX holds BatchNormalization's epsilon as a float32 attribute; hold the graph to the value it stores.
    eps = float(np.float32(checkpoint.eps)) if form == "batchnorm" else float(checkpoint.eps)
    names = [OUTPUT_NAME, LOGITS_NAME] if with_head else [OUTPUT_NAME]
    worst_error, worst_ratio = 0.0, 0.0
    for x in _inputs(checkpoint, io_dtype):
        outputs = dict(zip(names, session.run(names, {"input": x}), strict=True))
        y, mag = inference_formula(
            x,
            checkpoint.gamma,
            checkpoint.beta,
            checkpoint.moving_mean,
            checkpoint.moving_var,
            eps,
            checkpoint.axis,
        )
        _refuse_overflow(outputs[OUTPUT_NAME], y, checkpoint.axis, dtype, "the normalized output", "channel")
        error, ratio = compare(outputs[OUTPUT_NAME], y, mag, relative_tolerance(io_dtype), io_dtype)
        worst_error, worst_ratio = max(worst_error, error), max(worst_ratio, ratio)
        if with_head and checkpoint.head is not None:
            logits, lmag, terms = head_formula(
                y, mag, checkpoint.head.weight, checkpoint.head.bias, checkpoint.axis
            )
            _refuse_overflow(outputs[LOGITS_NAME], logits, 1, dtype, "the logits", "class")
            rtol = relative_tolerance(io_dtype, terms)
            error, ratio = compare(outputs[LOGITS_NAME], logits, lmag, rtol, io_dtype)
            worst_error, worst_ratio = max(worst_error, error), max(worst_ratio, ratio)
    return worst_error, worst_ratio


def _refuse_overflow(
    actual: NDArray[Any], expected: NDArray[np.float64], axis: int, dtype: Dtype, what: str, unit: str
) -> None:
    """Raise when the graph gives Inf where the float64 formula is finite: values past the dtype's range.

    actual, expected: (N, ...) with the channels (or classes) at `axis`. Without this the comparison would
    report an infinite error, which reads like a wrong graph rather than statistics too wide for `dtype`.
    """
    overflow = np.isinf(np.asarray(actual)) & np.isfinite(expected)
    if not np.any(overflow):
        return
    peak = np.where(overflow, np.abs(expected), 0.0)
    others = tuple(a for a in range(peak.ndim) if a != axis)
    per_channel = peak.max(axis=others) if others else peak
    worst = int(np.argmax(per_channel))
    limit = float(np.finfo(np.dtype(dtype)).max)
    remedy = {"float16": "export with --dtype float32", "float32": "export with --dtype float64"}.get(
        dtype, "no wider dtype exists: check gamma and moving_var"
    )
    symbol = "y" if unit == "channel" else "logit"
    raise ExportError(
        f"{what} overflows {dtype}: {unit} {worst} reaches |{symbol}| = {float(per_channel[worst]):.3g} on "
        f"samples within 2 std of the mean, past {dtype}'s largest {limit:.6g}; {remedy}; nothing was written"
    )
