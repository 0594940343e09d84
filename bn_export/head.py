"""A linear head on the normalized features, its losses and optimizers, in plain numpy.

Forward: `pooled = pool(y)` averages `y: (N, C, *spatial)` (channel axis `axis`) over its spatial axes into
`(N, C)` (identity for rank 2), then `logits = pooled @ W + b` with `W: (C, K)`, `b: (K,)`. Each function
beside its gradient, so the fit back-propagates by hand: loss -> logits -> (W, b, pooled) -> y -> the
BatchNorm layer's backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from bn_export.errors import InvalidInputError

LossName = Literal["mse", "cross-entropy"]
OptimizerName = Literal["sgd", "adam"]
LOSSES: tuple[LossName, ...] = ("mse", "cross-entropy")
OPTIMIZERS: tuple[OptimizerName, ...] = ("sgd", "adam")

Array = NDArray[Any]


def _spatial_axes(rank: int, axis: int) -> tuple[int, ...]:
    return tuple(a for a in range(1, rank) if a != axis)


def pool(y: Array, axis: int) -> Array:
    """`(N, C, *spatial) -> (N, C)`: the mean over the spatial axes; `y` itself at rank 2 (axis 1)."""
    spatial = _spatial_axes(y.ndim, axis)
    return np.asarray(y.mean(axis=spatial)) if spatial else y


def pool_backward(grad_pooled: Array, shape: tuple[int, ...], axis: int) -> Array:
    """Gradient of `pool` w.r.t. `y: shape`: `grad_pooled[n, c] / S` broadcast over S spatial positions."""
    spatial = _spatial_axes(len(shape), axis)
    if not spatial:
        return grad_pooled
    size = math.prod(shape[a] for a in spatial)
    expanded = np.expand_dims(grad_pooled / size, spatial)
    return np.broadcast_to(expanded, shape)


def linear(pooled: Array, weight: Array, bias: Array) -> Array:
    """`logits = pooled @ W + b`: `(N, C) @ (C, K) + (K,) -> (N, K)`."""
    return pooled @ weight + bias


def linear_backward(grad_logits: Array, pooled: Array, weight: Array) -> tuple[Array, Array, Array]:
    """Gradients of `linear`: `(dpooled = g @ Wᵀ, dW = pooledᵀ @ g, db = Σₙ g)`."""
    return grad_logits @ weight.T, pooled.T @ grad_logits, grad_logits.sum(axis=0)


def mse(pred: Array, target: Array) -> tuple[float, Array]:
    """Mean squared error over all elements and its gradient.

    `L = (1/(N·K)) Σ (pred - target)²`, `∂L/∂pred = 2 (pred - target) / (N·K)`; `pred: (N, K)`,
    `target: (N, K)` or `(N,)` when K = 1.
    """
    target = target.reshape(pred.shape)
    diff = pred - target.astype(pred.dtype, copy=False)
    return float(np.mean(np.square(diff, dtype=np.float64))), (2.0 / diff.size) * diff


def log_softmax(logits: Array) -> Array:
    """`z - logsumexp(z)` row-wise, stable: the row maximum is subtracted before exponentiating."""
    shifted: Array = logits - logits.max(axis=1, keepdims=True)
    result: Array = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return result


def cross_entropy(logits: Array, labels: NDArray[np.integer[Any]]) -> tuple[float, Array]:
    """Mean softmax cross-entropy and its gradient.

    `L = (1/N) Σₙ (logsumexp(zₙ) - zₙ[yₙ])`, `∂L/∂z = (softmax(z) - onehot(y)) / N`; `logits: (N, K)`,
    `labels: (N,)` integers in `0..K-1`.
    """
    n, k = logits.shape
    if labels.shape != (n,):
        raise InvalidInputError(f"labels must have shape ({n},), got {labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= k):
        raise InvalidInputError(f"labels must lie in 0..{k - 1}, got {labels.min()}..{labels.max()}")
    logp = log_softmax(logits)
    rows = np.arange(n)
    loss = -float(np.mean(logp[rows, labels], dtype=np.float64))
    grad = np.exp(logp)
    grad[rows, labels] -= 1
    return loss, grad / n


def loss_and_grad(loss: LossName, logits: Array, targets: Array) -> tuple[float, Array]:
    """Dispatch to `mse` or `cross_entropy` by name."""
    if loss == "mse":
        return mse(logits, targets)
    if loss == "cross-entropy":
        return cross_entropy(logits, targets)
    raise InvalidInputError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")


def init_linear(
    channels: int, outputs: int, rng: np.random.Generator, dtype: np.dtype[Any]
) -> tuple[Array, Array]:
    """`W ~ N(0, 1/C)` (unit-variance logits for unit-variance features), `b = 0`; seeded by `rng`."""
    weight = rng.standard_normal((channels, outputs)) / math.sqrt(channels)
    return weight.astype(dtype), np.zeros(outputs, dtype=dtype)


class SGD:
    """Plain stochastic gradient descent: `p ← p - lr·g`, in place."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def step(self, params: Sequence[Array], grads: Sequence[Array]) -> None:
        for param, grad in zip(params, grads, strict=True):
            param -= self.lr * grad


class Adam:
    """Adam (Kingma & Ba, 2015), in place.

    `m ← β₁m + (1-β₁)g`, `v ← β₂v + (1-β₂)g²`, `p ← p - lr·m̂/(√v̂ + ε)` with the bias corrections
    `m̂ = m/(1-β₁ᵗ)`, `v̂ = v/(1-β₂ᵗ)` at step t = 1, 2, ...
    """

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.t = 0
        self._m: list[Array] = []
        self._v: list[Array] = []

    def step(self, params: Sequence[Array], grads: Sequence[Array]) -> None:
        if not self._m:
            self._m = [np.zeros_like(p) for p in params]
            self._v = [np.zeros_like(p) for p in params]
        self.t += 1
        c1, c2 = 1 - self.beta1**self.t, 1 - self.beta2**self.t
        for param, grad, m, v in zip(params, grads, self._m, self._v, strict=True):
            m *= self.beta1
            m += (1 - self.beta1) * grad
            v *= self.beta2
            v += (1 - self.beta2) * np.square(grad)
            param -= self.lr * (m / c1) / (np.sqrt(v / c2) + self.eps)


def make_optimizer(name: OptimizerName, lr: float) -> SGD | Adam:
    """An optimizer by name, validating the learning rate."""
    if not (math.isfinite(lr) and lr > 0):
        raise InvalidInputError(f"learning rate must be a positive finite number, got {lr}")
    if name == "sgd":
        return SGD(lr)
    if name == "adam":
        return Adam(lr)
    raise InvalidInputError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
