"""Batch Normalization: the maths as pure functions, and a thin stateful layer that owns the parameters.

Conventions (the ONNX `BatchNormalization` operator and Keras; Ioffe & Szegedy 2015, arXiv:1502.03167):

- input `x: (N, *)` of rank 2..5 with the channel at `axis` (1 is channels-first, -1 channels-last); the
  statistics of a channel reduce over every other axis, so a channel has `count = x.size // C` values;
- training normalizes with the batch mean and the *biased* batch variance (divide by `count`):
  `y = gamma * (x - mean_B) / sqrt(var_B + eps) + beta`;
- the moving statistics follow `moving = moving * momentum + batch_stat * (1 - momentum)`, so momentum is
  the weight of the *past* (ONNX, Keras: 0.9, 0.99). PyTorch's `momentum` is the weight of the new batch,
  `1 - ours` (torch.nn.BatchNorm2d docs), and its `momentum=None` is a cumulative average
  `moving += (batch_stat - moving) / batches_seen`;
- the moving variance takes the biased batch variance (ONNX `training_mode=1`, Keras) unless
  `unbiased_moving_var=True`, which takes `var_B * count / (count - 1)` as PyTorch does;
- inference uses the moving statistics only, `y = gamma * (x - moving_mean) / sqrt(moving_var + eps) + beta`,
  an elementwise formula: a sample's output does not depend on the rest of its batch.

Statistics and normalization are computed in float64 and returned in the requested dtype, so float32
layers get statistics exact to float32 rounding whatever the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from bn_export.checkpoint import Checkpoint, LinearHead, StatsKind, Trajectory
from bn_export.errors import InvalidInputError
from bn_export.kernels import fold_kernel

FloatArray = NDArray[np.floating[Any]]
MIN_RANK, MAX_RANK = 2, 5


def normalize_axis(axis: int, rank: int) -> int:
    """The channel axis of a rank-`rank` input as a non-negative index in `1 .. rank-1`.

    Negative axes count from the end (-1 is channels-last). Axis 0 (or `-rank`) is the batch axis, which
    statistics always reduce over, so it cannot hold the channels.
    """
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise InvalidInputError(f"channel axis must be an integer, got {axis!r}")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise InvalidInputError(f"rank must be an integer, got {rank!r}")
    if not MIN_RANK <= rank <= MAX_RANK:
        raise InvalidInputError(f"input rank {rank} is not supported, expected {MIN_RANK} to {MAX_RANK}")
    if not -rank <= axis < rank:
        raise InvalidInputError(f"channel axis {axis} is out of range for rank-{rank} input")
    positive = int(axis) % rank
    if positive == 0:
        raise InvalidInputError(
            f"channel axis {axis} is the batch axis of rank-{rank} input; "
            f"expected 1..{rank - 1} or -1..{1 - rank}"
        )
    return positive


def reduction_axes(rank: int, axis: int) -> tuple[int, ...]:
    """Every axis of a rank-`rank` input except the channel axis: the axes the statistics reduce over."""
    channel = normalize_axis(axis, rank)
    return tuple(a for a in range(rank) if a != channel)


def check_input(
    x: ArrayLike, axis: int, num_channels: int | None = None, *, check_finite: bool = True
) -> tuple[FloatArray, int]:
    """Validate a batch and return it as a float array with its non-negative channel axis.

    Float arrays pass through without a copy; integer arrays become float64. Raises `InvalidInputError` for
    a rank outside 2..5, a bad channel axis, a channel count other than `num_channels`, an empty batch, a
    dtype that is not a real number (bool, complex, strings, objects) or, with `check_finite`, a NaN/Inf
    value (callers whose sums reveal NaN/Inf anyway skip that pass).
    """
    array = np.asarray(x)
    if array.dtype.kind == "f":
        data: FloatArray = array
    elif array.dtype.kind in "iu":
        data = array.astype(np.float64)
    else:
        raise InvalidInputError(f"input has dtype {array.dtype}, expected a real float or integer type")
    channel = normalize_axis(axis, data.ndim)
    if num_channels is not None and data.shape[channel] != num_channels:
        raise InvalidInputError(
            f"input of shape {data.shape} has {data.shape[channel]} channels on axis {axis}, "
            f"expected {num_channels}"
        )
    if data.size == 0:
        raise InvalidInputError(f"input of shape {data.shape} is empty")
    if check_finite:
        require_finite(data, "input")
    return data, channel


def require_finite(x: FloatArray, name: str) -> None:
    """Raise `InvalidInputError` naming `name` and how many values are NaN or Inf, if any."""
    # A float64 sum is NaN/Inf exactly when some value is (overflow aside), without allocating a mask.
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is told apart below
        if np.isfinite(np.add.reduce(x, axis=None, dtype=np.float64)):
            return
    bad = x.size - int(np.count_nonzero(np.isfinite(x)))
    if bad:
        raise InvalidInputError(f"{name} holds {bad} NaN or Inf value(s) of {x.size}")


def _channel_shape(rank: int, channel: int, num_channels: int) -> tuple[int, ...]:
    """The broadcast shape of a per-channel (C,) array against a rank-`rank` input."""
    return tuple(num_channels if a == channel else 1 for a in range(rank))


def _per_channel(value: ArrayLike, name: str, num_channels: int) -> NDArray[np.float64]:
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise InvalidInputError(f"{name} has dtype {array.dtype}, expected a real float type")
    if array.shape != (num_channels,):
        raise InvalidInputError(f"{name} has shape {array.shape}, expected ({num_channels},)")
    result = array.astype(np.float64)
    require_finite(result, name)
    return result


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)):
        raise InvalidInputError(f"eps must be a positive number, got {eps!r}")
    value = float(eps)
    if not (np.isfinite(value) and value > 0.0):
        raise InvalidInputError(f"eps must be a positive finite number, got {eps!r}")
    return value


def batch_statistics(x: ArrayLike, axis: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-channel batch mean and *biased* variance (divide by the count, not count - 1), float64 (C,).

    `x: (N, *)` with channels at `axis`; two passes in float64 (mean, then mean of squared deviations), so
    the result is exact to float64 rounding whatever the dtype and offset of `x`.
    """
    data, channel = check_input(x, axis)
    axes = reduction_axes(data.ndim, channel)
    mean: NDArray[np.float64] = np.asarray(np.mean(data, axis=axes, dtype=np.float64))
    deviation = data - mean.reshape(_channel_shape(data.ndim, channel, mean.shape[0]))
    with np.errstate(over="ignore", invalid="ignore"):  # refused just below
        var = np.mean(np.square(deviation, dtype=np.float64), axis=axes)
    _require_finite_variance(var)
    return mean, var


def _require_finite_variance(var: NDArray[np.float64]) -> None:
    if not np.all(np.isfinite(var)):
        raise InvalidInputError("the batch variance overflows float64; the input values are too large")


def inference_forward(
    x: ArrayLike,
    gamma: ArrayLike,
    beta: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    eps: float,
    axis: int,
    *,
    dtype: DTypeLike | None = None,
) -> FloatArray:
    """The frozen formula `y = gamma * (x - mean) / sqrt(var + eps) + beta`, per channel.

    `x: (N, *)`, channels at `axis`; `gamma, beta, mean, var: (C,)`. Computed elementwise in float64 and
    returned in `dtype` (default: x's float dtype), so each sample's output is bitwise independent of the
    other samples in its batch.
    """
    data, channel = check_input(x, axis)
    C = data.shape[channel]
    eps = _check_eps(eps)
    g, b, m, v = (
        _per_channel(a, n, C) for a, n in ((gamma, "gamma"), (beta, "beta"), (mean, "mean"), (var, "var"))
    )
    if np.any(v < 0):
        raise InvalidInputError("var holds negative values; a variance is >= 0")
    shape = _channel_shape(data.ndim, channel, C)
    y = np.subtract(data, m.reshape(shape), dtype=np.float64)
    y /= np.sqrt(v + eps).reshape(shape)
    y *= g.reshape(shape)
    y += b.reshape(shape)
    return y.astype(data.dtype if dtype is None else dtype, copy=False)


def folded_scale_shift(
    gamma: ArrayLike, beta: ArrayLike, mean: ArrayLike, var: ArrayLike, eps: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The frozen formula folded into `y = x*scale + shift`, both (C,) float64:

        scale = gamma/sqrt(var + eps),  shift = beta - mean*scale

    No checks: a negative variance gives NaN scales, which inspection reports as such.
    """
    g, b, m, v = (np.asarray(a, dtype=np.float64) for a in (gamma, beta, mean, var))
    scale = g / np.sqrt(v + float(eps))
    return scale, b - m * scale


@dataclass(frozen=True)
class TrainingCache:
    """What `backward` needs from a training forward.

    `x_hat = (x - mean) / sqrt(var + eps)` (same shape as x, float64), `inv_std = 1 / sqrt(var + eps)`,
    the batch `mean` and biased `var` (C,), the non-negative channel `axis`, `count` values per channel and
    the `dtype` of the forward's output (gradients w.r.t. x come back in it).
    """

    x_hat: NDArray[np.float64]
    inv_std: NDArray[np.float64]
    mean: NDArray[np.float64]
    var: NDArray[np.float64]
    axis: int
    count: int
    dtype: np.dtype[Any]


def training_forward(
    x: ArrayLike,
    gamma: ArrayLike,
    beta: ArrayLike,
    eps: float,
    axis: int,
    *,
    dtype: DTypeLike | None = None,
) -> tuple[FloatArray, TrainingCache]:
    """Normalize with the batch's own statistics: `y = gamma * (x - mean_B) / sqrt(var_B + eps) + beta`.

    `mean_B`, `var_B: (C,)` are the batch mean and biased variance over every axis but `axis` (float64).
    Needs at least two values per channel (one value has no spread to normalize by, as in PyTorch).
    Returns `y` in `dtype` (default: x's float dtype) and the cache for `backward`.
    """
    data, channel = check_input(x, axis)
    C = data.shape[channel]
    count = data.size // C
    if count < 2:
        raise InvalidInputError(
            f"training needs more than one value per channel, input of shape {data.shape} has {count}"
        )
    eps = _check_eps(eps)
    g, b = _per_channel(gamma, "gamma", C), _per_channel(beta, "beta", C)
    shape = _channel_shape(data.ndim, channel, C)
    axes = reduction_axes(data.ndim, channel)
    mean: NDArray[np.float64] = np.asarray(np.mean(data, axis=axes, dtype=np.float64))
    x_hat = np.subtract(data, mean.reshape(shape), dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # refused just below
        var = np.mean(np.square(x_hat), axis=axes)
    _require_finite_variance(var)
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat *= inv_std.reshape(shape)
    out_dtype = np.dtype(data.dtype if dtype is None else dtype)
    y = (x_hat * g.reshape(shape) + b.reshape(shape)).astype(out_dtype, copy=False)
    cache = TrainingCache(
        x_hat=x_hat, inv_std=inv_std, mean=mean, var=var, axis=channel, count=count, dtype=out_dtype
    )
    return y, cache


def backward(
    grad_out: ArrayLike, cache: TrainingCache, gamma: ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Gradients of a training forward: `(dL/dx, dL/dgamma, dL/dbeta)` from `g = dL/dy`.

    With `m` values per channel and sums over the reduced axes (the batch statistics depend on x):
    `dbeta = Σ g`, `dgamma = Σ g·x_hat`, `dx = gamma·inv_std/m · (m·g − dbeta − x_hat·dgamma)`.
    `dx` comes back in the forward's dtype, `dgamma`, `dbeta` in gamma's float dtype.
    """
    g = np.asarray(grad_out)
    if g.dtype.kind not in "fiu":
        raise InvalidInputError(f"grad_out has dtype {g.dtype}, expected a real float type")
    if g.shape != cache.x_hat.shape:
        raise InvalidInputError(f"grad_out has shape {g.shape}, expected the forward's {cache.x_hat.shape}")
    C = cache.inv_std.shape[0]
    gamma_array = np.asarray(gamma)
    gamma64 = _per_channel(gamma_array, "gamma", C)
    g64 = g.astype(np.float64)
    require_finite(g64, "grad_out")
    rank, channel = g.ndim, cache.axis
    shape = _channel_shape(rank, channel, C)
    axes = reduction_axes(rank, channel)
    grad_beta = np.sum(g64, axis=axes)
    grad_gamma = np.sum(g64 * cache.x_hat, axis=axes)
    m = cache.count
    grad_x = m * g64
    grad_x -= grad_beta.reshape(shape)
    grad_x -= cache.x_hat * grad_gamma.reshape(shape)
    grad_x *= (gamma64 * cache.inv_std / m).reshape(shape)
    param_dtype = gamma_array.dtype if gamma_array.dtype.kind == "f" else np.dtype(np.float64)
    return (
        grad_x.astype(cache.dtype, copy=False),
        grad_gamma.astype(param_dtype, copy=False),
        grad_beta.astype(param_dtype, copy=False),
    )


class BatchNorm:
    """A BatchNorm layer: parameters `gamma`, `beta`, moving statistics and the update rule in one place.

    `momentum` weighs the past, ONNX/Keras style: `moving = moving*momentum + batch_stat*(1 - momentum)`;
    `None` is PyTorch's cumulative average `moving += (batch_stat - moving) / batches_seen`.
    `moving_var` takes the biased batch variance, or the unbiased one (`× n/(n-1)`) with
    `unbiased_moving_var=True` (PyTorch). `axis` is the channel axis of the full input (batch included;
    -1 is channels-last). Arrays are (C,) of `dtype`; `batches_seen` counts training updates and
    `samples_seen` the samples (batch rows) they came from.

    Invalid input raises `InvalidInputError` and leaves every piece of state as it was.
    """

    def __init__(
        self,
        num_channels: int,
        *,
        momentum: float | None = 0.9,
        eps: float = 1e-5,
        axis: int = 1,
        dtype: DTypeLike = np.float32,
        unbiased_moving_var: bool = False,
    ) -> None:
        if (
            isinstance(num_channels, bool)
            or not isinstance(num_channels, (int, np.integer))
            or num_channels < 1
        ):
            raise InvalidInputError(f"num_channels must be a positive integer, got {num_channels!r}")
        if momentum is not None:
            if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating, np.integer)):
                raise InvalidInputError(f"momentum must be a number in [0, 1] or None, got {momentum!r}")
            if not 0.0 <= float(momentum) <= 1.0:
                raise InvalidInputError(f"momentum must be in [0, 1] (weight of the past), got {momentum!r}")
            momentum = float(momentum)
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise InvalidInputError(f"channel axis must be an integer, got {axis!r}")
        if axis == 0:
            raise InvalidInputError(
                "channel axis 0 is the batch axis; expected 1 (channels-first) or -1 (last)"
            )
        try:
            layer_dtype = np.dtype(dtype)
        except TypeError as exc:
            raise InvalidInputError(f"dtype {dtype!r} is not a numpy dtype") from exc
        if layer_dtype.kind != "f":
            raise InvalidInputError(f"layer dtype must be a float type, got {layer_dtype}")
        C = int(num_channels)
        self.num_channels = C
        self.momentum: float | None = momentum
        self.eps = _check_eps(eps)
        self.axis = int(axis)
        self.dtype: np.dtype[Any] = layer_dtype
        self.unbiased_moving_var = bool(unbiased_moving_var)
        self.gamma: FloatArray = np.ones(C, dtype=layer_dtype)
        self.beta: FloatArray = np.zeros(C, dtype=layer_dtype)
        self.moving_mean: FloatArray = np.zeros(C, dtype=layer_dtype)
        self.moving_var: FloatArray = np.ones(C, dtype=layer_dtype)
        self.batches_seen = 0
        self.samples_seen = 0
        self.grad_gamma: FloatArray | None = None
        self.grad_beta: FloatArray | None = None
        self._cache: TrainingCache | None = None

    def __repr__(self) -> str:
        return (
            f"BatchNorm({self.num_channels}, momentum={self.momentum}, eps={self.eps}, axis={self.axis}, "
            f"dtype={self.dtype}, unbiased_moving_var={self.unbiased_moving_var})"
        )

    def forward(self, x: ArrayLike, training: bool) -> FloatArray:
        """Normalize `x: (N, *)` (channels at `axis`); returns an array of x's shape in the layer dtype.

        Training normalizes with the batch statistics, updates the moving statistics through
        `update_statistics` and keeps what `backward` needs. Inference uses the moving statistics only
        and changes nothing.
        """
        data, channel = check_input(x, self.axis, self.num_channels)
        if not training:
            return inference_forward(
                data, self.gamma, self.beta, self.moving_mean, self.moving_var, self.eps, channel,
                dtype=self.dtype,
            )  # fmt: skip
        y, cache = training_forward(data, self.gamma, self.beta, self.eps, channel, dtype=self.dtype)
        self.update_statistics(cache.mean, cache.var, cache.count, samples=data.shape[0])
        self._cache = cache
        return y

    def update_statistics(
        self, batch_mean: ArrayLike, batch_var: ArrayLike, count: int, *, samples: int | None = None
    ) -> None:
        """Fold one batch's per-channel statistics into the moving ones; the layer's only update rule.

        `batch_mean`, `batch_var: (C,)` are the batch mean and *biased* variance over `count >= 2` values
        per channel; `samples` is the number of samples (batch rows) they came from, `count` by default
        (right for (N, C) input). EMA: `moving = moving*momentum + stat*(1 - momentum)`; momentum None:
        `moving += (stat - moving) / batches_seen`. With `unbiased_moving_var` the variance folded in is
        `batch_var * count / (count - 1)`. Arithmetic in float64, stored in the layer dtype.
        """
        C = self.num_channels
        mean = _per_channel(batch_mean, "batch_mean", C)
        var = _per_channel(batch_var, "batch_var", C)
        if np.any(var < 0):
            raise InvalidInputError("batch_var holds negative values; a variance is >= 0")
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 2:
            raise InvalidInputError(f"count must be an integer >= 2 values per channel, got {count!r}")
        n_samples = int(count) if samples is None else samples
        if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
            raise InvalidInputError(f"samples must be a positive integer, got {samples!r}")
        if self.unbiased_moving_var:
            var = var * (count / (count - 1))
        batches = self.batches_seen + 1
        old_mean = self.moving_mean.astype(np.float64)
        old_var = self.moving_var.astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below
            if self.momentum is None:
                factor = 1.0 / batches  # weight of the new batch: a running average of all batches
                new_mean = old_mean + (mean - old_mean) * factor
                new_var = old_var + (var - old_var) * factor
            else:
                new_mean = old_mean * self.momentum + mean * (1.0 - self.momentum)
                new_var = old_var * self.momentum + var * (1.0 - self.momentum)
            stored_mean, stored_var = new_mean.astype(self.dtype), new_var.astype(self.dtype)
        if not (np.all(np.isfinite(stored_mean)) and np.all(np.isfinite(stored_var))):
            raise InvalidInputError(
                f"the updated moving statistics overflow {self.dtype}; the batch statistics are too large"
            )
        # Everything is validated: commit the new state together.
        self.moving_mean, self.moving_var = stored_mean, stored_var
        self.batches_seen = batches
        self.samples_seen += int(n_samples)

    def fold_batches(
        self,
        batch_means: NDArray[np.float64],
        batch_vars: NDArray[np.float64],
        counts: NDArray[Any],
        samples: NDArray[Any],
        *,
        compiled: bool = False,
    ) -> tuple[FloatArray, FloatArray]:
        """`update_statistics` for G batches in turn (`(G, C)` means and biased variances, `(G,)` counts
        and samples), the same bits as G calls; returns the stored `(moving_mean, moving_var)` after each
        batch, `(G, C)` each. Checked as a whole first and committed at the end, so a bad batch leaves
        the layer as it was. One Python step per batch with no validation in it: a fit of many small
        batches folds them a group at a time. `compiled` runs the loop in numba where installed (the
        same bits; for callers that already loaded it, see `bn_export.kernels.fold_kernel`).
        """
        C = self.num_channels
        means = np.asarray(batch_means, dtype=np.float64)
        variances = np.asarray(batch_vars, dtype=np.float64)
        counts = np.asarray(counts)
        samples = np.asarray(samples)
        G = len(counts)
        if means.shape != (G, C) or variances.shape != (G, C) or samples.shape != (G,) or counts.ndim != 1:
            raise InvalidInputError(
                f"expected (G, {C}) means and variances with (G,) counts and samples, got {means.shape}, "
                f"{variances.shape}, {counts.shape}, {samples.shape}"
            )
        if not (np.all(np.isfinite(means)) and np.all(np.isfinite(variances))):
            raise InvalidInputError("batch statistics hold NaN or Inf")
        if np.any(variances < 0):
            raise InvalidInputError("batch_var holds negative values; a variance is >= 0")
        if counts.dtype.kind not in "iu" or np.any(counts < 2):
            raise InvalidInputError("counts must be integers >= 2 values per channel")
        if samples.dtype.kind not in "iu" or np.any(samples < 1):
            raise InvalidInputError("samples must be positive integers")
        if self.unbiased_moving_var:
            # The same division per batch as `update_statistics`' `count / (count - 1)`.
            variances = variances * (counts / (counts - 1))[:, None]
        stored_means = np.empty((G, C), dtype=self.dtype)
        stored_vars = np.empty((G, C), dtype=self.dtype)
        old_mean = self.moving_mean.astype(np.float64)
        old_var = self.moving_var.astype(np.float64)
        kernel = fold_kernel() if compiled else None
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below
            if self.momentum is not None:
                means = means * (1.0 - self.momentum)
                variances = variances * (1.0 - self.momentum)
            if kernel is not None:
                momentum = -1.0 if self.momentum is None else self.momentum
                kernel(
                    old_mean,
                    old_var,
                    means,
                    variances,
                    momentum,
                    self.batches_seen + 1,
                    stored_means,
                    stored_vars,
                )
            for g in range(G if kernel is None else 0):
                if self.momentum is None:
                    factor = 1.0 / (self.batches_seen + g + 1)
                    mean = old_mean + (means[g] - old_mean) * factor
                    var = old_var + (variances[g] - old_var) * factor
                else:
                    mean = old_mean * self.momentum + means[g]
                    var = old_var * self.momentum + variances[g]
                stored_means[g], stored_vars[g] = mean, var
                old_mean = stored_means[g].astype(np.float64)
                old_var = stored_vars[g].astype(np.float64)
        if not (np.all(np.isfinite(stored_means)) and np.all(np.isfinite(stored_vars))):
            raise InvalidInputError(
                f"the updated moving statistics overflow {self.dtype}; the batch statistics are too large"
            )
        if G:
            self.moving_mean, self.moving_var = stored_means[-1].copy(), stored_vars[-1].copy()
            self.batches_seen += G
            self.samples_seen += int(samples.sum())
        return stored_means, stored_vars

    def backward(self, grad_out: ArrayLike) -> FloatArray:
        """`dL/dx` from `dL/dy` of the last training forward; stores `grad_gamma` and `grad_beta`."""
        if self._cache is None:
            raise InvalidInputError("backward needs a training forward first")
        grad_x, grad_gamma, grad_beta = backward(grad_out, self._cache, self.gamma)
        self.grad_gamma, self.grad_beta = grad_gamma, grad_beta
        return grad_x

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> BatchNorm:
        """The layer a checkpoint describes: parameters, moving statistics, conventions and counters."""
        layer = cls(
            checkpoint.num_channels,
            momentum=checkpoint.momentum,
            eps=checkpoint.eps,
            axis=checkpoint.axis,
            dtype=checkpoint.gamma.dtype,
            unbiased_moving_var=checkpoint.unbiased_moving_var,
        )
        layer.set_parameters(
            gamma=checkpoint.gamma,
            beta=checkpoint.beta,
            moving_mean=checkpoint.moving_mean,
            moving_var=checkpoint.moving_var,
        )
        layer.batches_seen = int(checkpoint.batches_seen)
        layer.samples_seen = int(checkpoint.samples_seen)
        return layer

    def set_parameters(
        self,
        *,
        gamma: ArrayLike | None = None,
        beta: ArrayLike | None = None,
        moving_mean: ArrayLike | None = None,
        moving_var: ArrayLike | None = None,
    ) -> None:
        """Replace any of the (C,) arrays (cast to the layer dtype); all are validated before any is set."""
        C = self.num_channels
        given = {"gamma": gamma, "beta": beta, "moving_mean": moving_mean, "moving_var": moving_var}
        checked = {name: _per_channel(value, name, C) for name, value in given.items() if value is not None}
        if "moving_var" in checked and np.any(checked["moving_var"] < 0):
            raise InvalidInputError("moving_var holds negative values; a variance is >= 0")
        for name, value in checked.items():
            setattr(self, name, value.astype(self.dtype))

    def to_checkpoint(
        self,
        *,
        sample_shape: tuple[int, ...],
        stats: StatsKind,
        data_fingerprint: str,
        created: str,
        version: str,
        head: LinearHead | None = None,
        trajectory: Trajectory | None = None,
        extras: dict[str, Any] | None = None,
    ) -> Checkpoint:
        """A `Checkpoint` of this layer for inputs `(N, *sample_shape)`; the axis is stored non-negative."""
        sample_shape = tuple(int(d) for d in sample_shape)
        channel = normalize_axis(self.axis, len(sample_shape) + 1)
        if sample_shape[channel - 1] != self.num_channels:
            raise InvalidInputError(
                f"sample shape {sample_shape} has {sample_shape[channel - 1]} channels on axis {self.axis}, "
                f"expected {self.num_channels}"
            )
        return Checkpoint(
            gamma=self.gamma.copy(),
            beta=self.beta.copy(),
            moving_mean=self.moving_mean.copy(),
            moving_var=self.moving_var.copy(),
            eps=self.eps,
            momentum=self.momentum,
            axis=channel,
            sample_shape=sample_shape,
            stats=stats,
            samples_seen=self.samples_seen,
            batches_seen=self.batches_seen,
            data_fingerprint=data_fingerprint,
            created=created,
            version=version,
            unbiased_moving_var=self.unbiased_moving_var,
            head=head,
            trajectory=trajectory,
            extras=dict(extras or {}),
        )
