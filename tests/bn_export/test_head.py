"""The linear head: gradients against central finite differences, stable log-softmax, optimizer formulas."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from bn_export.errors import InvalidInputError
from bn_export.head import (
    SGD,
    Adam,
    cross_entropy,
    linear,
    linear_backward,
    log_softmax,
    make_optimizer,
    mse,
    pool,
    pool_backward,
)


def _numeric_grad(f: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        old = x[index]
        x[index] = old + h
        up = f(x)
        x[index] = old - h
        down = f(x)
        x[index] = old
        grad[index] = (up - down) / (2 * h)
    return grad


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_cross_entropy_gradient_matches_finite_differences(rng: np.random.Generator) -> None:
    logits = rng.normal(size=(5, 4))
    labels = np.array([0, 3, 1, 1, 2])
    _, grad = cross_entropy(logits, labels)
    np.testing.assert_allclose(grad, _numeric_grad(lambda z: cross_entropy(z, labels)[0], logits), atol=1e-8)


def test_mse_gradient_matches_finite_differences(rng: np.random.Generator) -> None:
    pred, target = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    loss, grad = mse(pred, target)
    assert loss == pytest.approx(np.mean((pred - target) ** 2))
    np.testing.assert_allclose(grad, _numeric_grad(lambda p: mse(p, target)[0], pred), atol=1e-8)


@pytest.mark.parametrize(
    ("shape", "axis"), [((4, 3), 1), ((4, 3, 5), 1), ((4, 2, 3, 3), 1), ((4, 5, 2, 3), 3)]
)
def test_pool_and_linear_gradients_match_finite_differences(
    rng: np.random.Generator, shape: tuple[int, ...], axis: int
) -> None:
    y = rng.normal(size=shape)
    channels = shape[axis]
    weight, bias = rng.normal(size=(channels, 2)), rng.normal(size=2)
    upstream = rng.normal(size=(shape[0], 2))  # L = Σ upstream · logits, so dL/dlogits = upstream

    def loss(y_: np.ndarray, w_: np.ndarray, b_: np.ndarray) -> float:
        return float(np.sum(upstream * linear(pool(y_, axis), w_, b_)))

    pooled = pool(y, axis)
    assert pooled.shape == (shape[0], channels)
    grad_pooled, grad_w, grad_b = linear_backward(upstream, pooled, weight)
    grad_y = pool_backward(grad_pooled, y.shape, axis)
    np.testing.assert_allclose(grad_y, _numeric_grad(lambda v: loss(v, weight, bias), y), atol=1e-7)
    np.testing.assert_allclose(grad_w, _numeric_grad(lambda v: loss(y, v, bias), weight), atol=1e-7)
    np.testing.assert_allclose(grad_b, _numeric_grad(lambda v: loss(y, weight, v), bias), atol=1e-7)


def test_log_softmax_is_stable_for_huge_logits() -> None:
    logits = np.array([[1000.0, 0.0, -1000.0], [1e30, 1e30, 0.0]])
    result = log_softmax(logits)
    assert np.all(np.isfinite(result))
    np.testing.assert_allclose(result[0], [0.0, -1000.0, -2000.0])
    np.testing.assert_allclose(result[1, :2], [-np.log(2), -np.log(2)])
    loss, grad = cross_entropy(logits, np.array([0, 1]))
    assert np.isfinite(loss)
    assert np.all(np.isfinite(grad))


def test_cross_entropy_rejects_labels_outside_the_classes(rng: np.random.Generator) -> None:
    with pytest.raises(InvalidInputError, match=r"labels must lie in 0\.\.2"):
        cross_entropy(rng.normal(size=(2, 3)), np.array([0, 3]))


def test_sgd_step_is_minus_lr_times_gradient() -> None:
    param, grad = np.array([1.0, -2.0]), np.array([0.5, 0.25])
    SGD(0.1).step([param], [grad])
    np.testing.assert_allclose(param, [0.95, -2.025])


def test_adam_matches_its_formulas_over_two_steps() -> None:
    param = np.array([1.0, -1.0])
    grads = [np.array([0.1, -0.3]), np.array([0.2, 0.4])]
    expected = param.copy()
    m = v = np.zeros(2)
    for t, g in enumerate(grads, start=1):
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g**2
        expected -= 0.01 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    adam = Adam(0.01)
    for g in grads:
        adam.step([param], [g])
    np.testing.assert_allclose(param, expected, rtol=1e-12)


def test_optimizers_descend_a_quadratic() -> None:
    for name in ("sgd", "adam"):
        x = np.array([3.0, -4.0])
        optimizer = make_optimizer(name, 0.1)
        for _ in range(200):
            optimizer.step([x], [2 * x])
        assert np.linalg.norm(x) < 0.1, name


@pytest.mark.parametrize("lr", [0.0, -1.0, float("nan")])
def test_make_optimizer_rejects_bad_learning_rates(lr: float) -> None:
    with pytest.raises(InvalidInputError, match="learning rate"):
        make_optimizer("adam", lr)
