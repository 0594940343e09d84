"""The float64 reference formulas the numeric checks compare onnxruntime with, and their tolerances.

Tolerance (used by `verify`'s formula check and by `export`). Each element is compared with a bound
proportional to the magnitude of the terms the graph adds up, not to the output, because `x*scale + shift`
can cancel (x near the mean of a large-mean channel) and rounding error scales with the terms, not the
result::

    magnitude = |x|·|s| + |mean|·|s| + |beta|,   s = gamma/sqrt(var + eps)
    |onnxruntime - formula| <= (16 + n)·u·magnitude + tiny

with `u` the unit roundoff of the dtype compared (2^-11 float16, 2^-24 float32, 2^-53 float64), 16 a budget
for the rounding of the stored parameters, the few elementwise operations and the final cast, `n` the number
of terms summed (0 for a normalized output; C + spatial size for `logits`, Higham's γ_n bound for a dot
product), and `tiny` the dtype's smallest normal number. ONNX stores BatchNormalization's epsilon as a float32
attribute; the formula uses the value stored (frozen-bn's metadata keeps the exact one).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

ROUNDING_BUDGET = 16

F64 = NDArray[np.float64]


def along(values: ArrayLike, axis: int, rank: int) -> F64:
    """(C,) -> shaped to broadcast along `axis` of a rank-`rank` array."""
    shape = [1] * rank
    shape[axis] = -1
    return np.asarray(values, dtype=np.float64).reshape(shape)


def inference_formula(
    x: ArrayLike,
    gamma: ArrayLike,
    beta: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    eps: float,
    axis: int,
) -> tuple[F64, F64]:
    """`y = gamma*(x - mean)/sqrt(var + eps) + beta` along channel `axis` in float64, and its magnitude.

    x: (N, *sample) with C channels at `axis`; gamma, beta, mean, var: (C,). Returns (y, magnitude), both
    shaped like x (see the module docstring for the magnitude).
    """
    x64 = np.asarray(x, dtype=np.float64)
    rank = x64.ndim
    g, b, m, v = (along(a, axis, rank) for a in (gamma, beta, mean, var))
    scale = g / np.sqrt(v + float(eps))
    y = (x64 - m) * scale + b
    magnitude = np.abs(x64) * np.abs(scale) + np.abs(m) * np.abs(scale) + np.abs(b)
    return y, magnitude


def head_formula(
    y: ArrayLike, magnitude: ArrayLike, weight: ArrayLike, bias: ArrayLike, axis: int
) -> tuple[F64, F64, int]:
    """`logits = mean_spatial(y) @ weight + bias` in float64, its magnitude, and the number of summed terms.

    y: (N, *sample) with C channels at `axis`; weight: (C, K); bias: (K,). Returns ((N, K), (N, K), n).
    """
    y64 = np.asarray(y, dtype=np.float64)
    mag64 = np.asarray(magnitude, dtype=np.float64)
    spatial = tuple(a for a in range(1, y64.ndim) if a != axis)
    pooled = y64.mean(axis=spatial) if spatial else y64
    pooled_mag = mag64.mean(axis=spatial) if spatial else mag64
    w = np.asarray(weight, dtype=np.float64)
    b = np.asarray(bias, dtype=np.float64)
    spatial_size = int(np.prod([y64.shape[a] for a in spatial])) if spatial else 1
    return pooled @ w + b, np.abs(pooled_mag) @ np.abs(w) + np.abs(b), w.shape[0] + spatial_size


def relative_tolerance(dtype: np.dtype[Any] | str, terms: int = 0) -> float:
    """`(ROUNDING_BUDGET + terms)·u` for the I/O dtype `dtype` (u = unit roundoff, eps/2)."""
    unit = float(np.finfo(np.dtype(dtype)).eps) / 2
    return (ROUNDING_BUDGET + terms) * unit


def compare(
    actual: ArrayLike, expected: F64, magnitude: F64, rtol: float, dtype: np.dtype[Any]
) -> tuple[float, float]:
    """(max |actual - expected|, max error/bound); NaN or Inf against a finite formula is infinite."""
    a = np.asarray(actual, dtype=np.float64)
    if a.shape != expected.shape:
        return float("inf"), float("inf")
    if a.size == 0:
        return 0.0, 0.0
    # Inf - Inf, or NaN data (whose bound is NaN too), is a mismatch like any other, reported as infinite;
    # the arithmetic on them must not warn (verify never prints).
    with np.errstate(all="ignore"):
        error = np.abs(a - expected)
        error = np.where(np.isfinite(error), error, np.inf)
        ratio = error / (rtol * magnitude + float(np.finfo(dtype).smallest_normal))
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    return float(error.max()), float(ratio.max())


def layer_formula(
    x: ArrayLike, gamma: ArrayLike, beta: ArrayLike, mean: ArrayLike, var: ArrayLike, eps: float
) -> tuple[F64, F64] | None:
    """One BatchNormalization node's formula and magnitude in float64: x (N, C, *spatial) with (C,)
    statistics along axis 1, or (opset < 9, `spatial=0`) statistics shaped like one sample; None when they
    fit neither."""
    x64 = np.asarray(x, dtype=np.float64)
    stats = [np.asarray(a, dtype=np.float64) for a in (gamma, beta, mean, var)]
    if x64.ndim >= 2 and all(s.size == x64.shape[1] for s in stats):
        return inference_formula(x64, stats[0], stats[1], stats[2], stats[3], eps, 1)
    sample = x64.shape[1:]
    if all(s.size == int(np.prod(sample)) for s in stats):
        g, b, m, v = (s.reshape((1, *sample)) for s in stats)
        scale = g / np.sqrt(v + float(eps))
        magnitude = np.abs(x64) * np.abs(scale) + np.abs(m) * np.abs(scale) + np.abs(b)
        return (x64 - m) * scale + b, magnitude
    return None
