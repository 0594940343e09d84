"""Convert a `BatchNorm` to and from the parameter layouts of PyTorch and Keras, as plain numpy arrays.

No framework is imported: a PyTorch state dict is taken as `{name: array}` (e.g.
`{k: v.numpy() for k, v in module.state_dict().items()}`) and Keras weights as the list
`layer.get_weights()` returns.

| framework | momentum m (default)            | None            | eps (default)  | channel axis | moving var |
|-----------|---------------------------------|-----------------|----------------|--------------|------------|
| PyTorch   | new: r = (1-m)·r + m·b (0.1)    | cumulative mean | eps (1e-5)     | 1            | unbiased   |
| Keras     | past: r = m·r + (1-m)·b (0.99)  | n/a             | epsilon (1e-3) | axis (-1)    | biased     |
| ONNX      | past: r = m·r + (1-m)·b (0.9)   | n/a             | epsilon (1e-5) | 1            | biased     |
| BatchNorm | past: r = m·r + (1-m)·b (0.9)   | cumulative mean | eps (1e-5)     | axis (1)     | biased, or |
|           |                                 |                 |                |              | unbiased * |

All four normalize a training batch with its biased variance; "moving var" is the batch variance folded
into the moving one (unbiased = × n/(n-1) over n values per channel; * with `unbiased_moving_var=True`).
Parameter names: PyTorch `weight, bias, running_mean, running_var, num_batches_tracked`; Keras
`[gamma, beta, moving_mean, moving_variance]`; ONNX inputs `scale, B, input_mean, input_var`.

How the conversions map them: from PyTorch, `momentum = 1 - torch_momentum` (None stays None) and
`unbiased_moving_var=True`, so further training updates the statistics exactly as PyTorch would;
`num_batches_tracked` becomes `batches_seen` (the sample count is not stored by PyTorch and starts at 0).
From Keras, momentum and epsilon copy unchanged and the moving variance stays biased. Inference reads the
stored statistics as they are in every framework, so the arrays themselves are never rescaled.
References: torch.nn.BatchNorm2d and keras.layers.BatchNormalization documentation; the ONNX operator
specification of BatchNormalization (opset 15).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bn_export.errors import InvalidInputError
from bn_export.layer import BatchNorm

TORCH_KEYS = ("weight", "bias", "running_mean", "running_var")
TORCH_COUNTER = "num_batches_tracked"
KERAS_NAMES = ("gamma", "beta", "moving_mean", "moving_variance")


def to_torch_state_dict(layer: BatchNorm) -> dict[str, NDArray[Any]]:
    """The layer as a PyTorch BatchNorm state dict: (C,) float arrays and a 0-d int64 batch counter.

    The arrays are copies. The moving statistics carry over as they are; pair them with
    `momentum = 1 - layer.momentum` on the PyTorch side.
    """
    return {
        "weight": layer.gamma.copy(),
        "bias": layer.beta.copy(),
        "running_mean": layer.moving_mean.copy(),
        "running_var": layer.moving_var.copy(),
        TORCH_COUNTER: np.array(layer.batches_seen, dtype=np.int64),
    }


def from_torch_state_dict(
    state: Mapping[str, ArrayLike], *, momentum: float | None = 0.1, eps: float = 1e-5, axis: int = 1
) -> BatchNorm:
    """A `BatchNorm` from a PyTorch BatchNorm state dict; `momentum` in PyTorch's convention.

    Needs `running_mean` and `running_var`; `weight` and `bias` come together or not at all (a module with
    `affine=False`, which behaves as gamma=1, beta=0); `num_batches_tracked` is optional. Our momentum is
    `1 - momentum` (None, the cumulative average, stays None) and the moving variance is updated with the
    unbiased batch variance, as in PyTorch.
    """
    if not isinstance(state, Mapping):
        raise InvalidInputError(
            f"a state dict must be a mapping of names to arrays, got {type(state).__name__}"
        )
    unknown = sorted(set(state) - {*TORCH_KEYS, TORCH_COUNTER})
    if unknown:
        raise InvalidInputError(
            f"unexpected keys {unknown} in a BatchNorm state dict; expected {[*TORCH_KEYS, TORCH_COUNTER]} "
            "(strip any module prefix such as 'bn1.')"
        )
    missing = [key for key in ("running_mean", "running_var") if key not in state]
    if missing:
        raise InvalidInputError(f"state dict is missing {missing} (a module built with track_running_stats?)")
    if ("weight" in state) != ("bias" in state):
        raise InvalidInputError("state dict has only one of 'weight' and 'bias'; expected both or neither")
    if momentum is not None:
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise InvalidInputError(f"PyTorch momentum must be in [0, 1] or None, got {momentum!r}")
        momentum = 1.0 - float(momentum)
    arrays = _parameters({key: state[key] for key in TORCH_KEYS if key in state}, "state dict")
    layer = BatchNorm(
        arrays["running_mean"].shape[0],
        momentum=momentum,
        eps=eps,
        axis=axis,
        dtype=arrays["running_mean"].dtype,
        unbiased_moving_var=True,
    )
    layer.set_parameters(
        gamma=arrays.get("weight"),
        beta=arrays.get("bias"),
        moving_mean=arrays["running_mean"],
        moving_var=arrays["running_var"],
    )
    if TORCH_COUNTER in state:
        counter = np.asarray(state[TORCH_COUNTER])
        if counter.shape not in ((), (1,)) or counter.dtype.kind not in "iu" or int(counter.ravel()[0]) < 0:
            raise InvalidInputError(
                f"'{TORCH_COUNTER}' must be a non-negative integer scalar, "
                f"got {counter.dtype} of shape {counter.shape}"
            )
        layer.batches_seen = int(counter.ravel()[0])
    return layer


def to_keras_weights(layer: BatchNorm) -> list[NDArray[Any]]:
    """`[gamma, beta, moving_mean, moving_variance]`, copies, the order Keras' `set_weights` takes."""
    return [layer.gamma.copy(), layer.beta.copy(), layer.moving_mean.copy(), layer.moving_var.copy()]


def from_keras_weights(
    weights: Sequence[ArrayLike], *, momentum: float = 0.99, epsilon: float = 1e-3, axis: int = -1
) -> BatchNorm:
    """A `BatchNorm` from Keras' `[gamma, beta, moving_mean, moving_variance]` and its settings.

    Keras' momentum is already the weight of the past and its moving variance is biased, so both carry
    over unchanged; the defaults are Keras' (momentum 0.99, epsilon 1e-3, channels-last).
    """
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != 4:
        count = len(weights) if isinstance(weights, Sequence) else type(weights).__name__
        raise InvalidInputError(
            f"expected Keras weights [gamma, beta, moving_mean, moving_variance], got {count} "
            "(a layer built with center=False or scale=False has fewer; add ones/zeros for the missing ones)"
        )
    arrays = _parameters(dict(zip(KERAS_NAMES, weights, strict=True)), "Keras weights")
    layer = BatchNorm(
        arrays["gamma"].shape[0], momentum=momentum, eps=epsilon, axis=axis, dtype=arrays["gamma"].dtype
    )
    layer.set_parameters(
        gamma=arrays["gamma"],
        beta=arrays["beta"],
        moving_mean=arrays["moving_mean"],
        moving_var=arrays["moving_variance"],
    )
    return layer


def _parameters(named: Mapping[str, ArrayLike], source: str) -> dict[str, NDArray[np.floating[Any]]]:
    """Check that the named arrays are real floats of one (C,) shape and one dtype; returns them."""
    arrays = {name: np.asarray(value) for name, value in named.items()}
    for name, array in arrays.items():
        if array.dtype.kind != "f":
            raise InvalidInputError(f"{source}: {name} has dtype {array.dtype}, expected a float type")
        if array.ndim != 1 or array.shape[0] == 0:
            raise InvalidInputError(f"{source}: {name} has shape {array.shape}, expected (C,) with C >= 1")
    shapes = {name: array.shape for name, array in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise InvalidInputError(f"{source}: arrays disagree on the channel count: {shapes}")
    dtypes = {name: str(array.dtype) for name, array in arrays.items()}
    if len(set(dtypes.values())) != 1:
        raise InvalidInputError(f"{source}: arrays disagree on the dtype: {dtypes}")
    return arrays
