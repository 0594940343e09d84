"""PyTorch and Keras conversions: round trips, and training updates that follow each framework's own rule."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from bn_export.conventions import (
    from_keras_weights,
    from_torch_state_dict,
    to_keras_weights,
    to_torch_state_dict,
)
from bn_export.errors import InvalidInputError
from bn_export.layer import BatchNorm


def _trained_layer(**kwargs: Any) -> BatchNorm:
    layer = BatchNorm(3, **kwargs)
    rng = np.random.default_rng(0)
    layer.set_parameters(gamma=rng.uniform(0.5, 2.0, 3), beta=rng.normal(size=3))
    shape = (8, 3, 4) if layer.axis == 1 else (8, 4, 3)
    for _ in range(3):
        layer.forward(rng.normal(2.0, 3.0, size=shape), training=True)
    return layer


def _batches(axis: int) -> list[NDArray[np.float64]]:
    rng = np.random.default_rng(1)
    shape = (6, 3, 5) if axis == 1 else (6, 5, 3)
    return [rng.normal(1.0, 2.0, size=shape) + step for step in range(5)]


def _per_channel(x: NDArray[np.float64], axis: int) -> NDArray[np.float64]:
    return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])


def _torch_running_stats(
    batches: list[NDArray[np.float64]], momentum: float | None, mean: Any, var: Any, axis: int = 1
) -> tuple[Any, Any, int]:
    """PyTorch's `_BatchNorm.forward` in training, written out: new-batch weight, unbiased variance."""
    tracked = 0
    for x in batches:
        table = _per_channel(x, axis)
        tracked += 1
        factor = 1.0 / tracked if momentum is None else momentum
        mean = (1 - factor) * mean + factor * table.mean(axis=0)
        var = (1 - factor) * var + factor * table.var(axis=0, ddof=1)
    return mean, var, tracked


def _keras_moving_stats(
    batches: list[NDArray[np.float64]], momentum: float, mean: Any, var: Any, axis: int = -1
) -> tuple[Any, Any]:
    """Keras' `BatchNormalization` in training, written out: past weight, biased variance."""
    for x in batches:
        table = _per_channel(x, axis)
        mean = mean * momentum + table.mean(axis=0) * (1 - momentum)
        var = var * momentum + table.var(axis=0) * (1 - momentum)
    return mean, var


def test_torch_state_dict_has_pytorch_names_shapes_and_counter() -> None:
    layer = _trained_layer()
    state = to_torch_state_dict(layer)
    assert list(state) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    for key, name in [("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean")]:
        np.testing.assert_array_equal(state[key], getattr(layer, name))
    np.testing.assert_array_equal(state["running_var"], layer.moving_var)
    assert state["num_batches_tracked"].dtype == np.int64
    assert state["num_batches_tracked"].shape == ()
    assert int(state["num_batches_tracked"]) == 3
    state["weight"][0] = 99.0  # a copy, not a view into the layer
    assert layer.gamma[0] != 99.0


@pytest.mark.parametrize("momentum", [0.9, 0.5, None])
def test_torch_round_trip_keeps_parameters_and_maps_momentum(momentum: float | None) -> None:
    layer = _trained_layer(momentum=momentum, eps=1e-4, unbiased_moving_var=True)
    torch_momentum = None if momentum is None else 1 - momentum
    back = from_torch_state_dict(to_torch_state_dict(layer), momentum=torch_momentum, eps=1e-4)
    for name in ("gamma", "beta", "moving_mean", "moving_var"):
        np.testing.assert_array_equal(getattr(back, name), getattr(layer, name))
        assert getattr(back, name).dtype == layer.dtype
    assert back.momentum == pytest.approx(momentum) if momentum is not None else back.momentum is None
    assert (back.eps, back.axis, back.unbiased_moving_var, back.batches_seen) == (1e-4, 1, True, 3)


@pytest.mark.parametrize("torch_momentum", [0.1, 0.3, None])
def test_from_torch_then_training_updates_running_stats_as_pytorch(torch_momentum: float | None) -> None:
    rng = np.random.default_rng(2)
    mean0, var0 = rng.normal(size=3), rng.uniform(0.5, 2.0, 3)
    state = {
        "weight": np.ones(3),
        "bias": np.zeros(3),
        "running_mean": mean0,
        "running_var": var0,
        "num_batches_tracked": np.array(0, dtype=np.int64),
    }
    layer = from_torch_state_dict(state, momentum=torch_momentum)
    assert layer.momentum == (None if torch_momentum is None else pytest.approx(1 - torch_momentum))
    batches = _batches(axis=1)
    for x in batches:
        layer.forward(x, training=True)
    mean, var, tracked = _torch_running_stats(batches, torch_momentum, mean0, var0)
    np.testing.assert_allclose(layer.moving_mean, mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(layer.moving_var, var, rtol=1e-12)
    assert int(to_torch_state_dict(layer)["num_batches_tracked"]) == tracked


def test_torch_state_without_affine_parameters_is_gamma_one_beta_zero() -> None:
    layer = from_torch_state_dict(
        {"running_mean": np.full(2, 3.0, np.float32), "running_var": np.full(2, 4.0, np.float32)}
    )
    np.testing.assert_array_equal(layer.gamma, [1.0, 1.0])
    np.testing.assert_array_equal(layer.beta, [0.0, 0.0])
    assert layer.dtype == np.float32
    assert layer.batches_seen == 0


def test_keras_weights_are_gamma_beta_moving_mean_moving_variance_copies() -> None:
    layer = _trained_layer(axis=-1)
    weights = to_keras_weights(layer)
    for array, name in zip(weights, ("gamma", "beta", "moving_mean", "moving_var"), strict=True):
        np.testing.assert_array_equal(array, getattr(layer, name))
    weights[3][0] = -1.0
    assert layer.moving_var[0] != -1.0


def test_keras_round_trip_and_defaults() -> None:
    layer = _trained_layer(momentum=0.99, eps=1e-3, axis=-1)
    back = from_keras_weights(to_keras_weights(layer))
    for name in ("gamma", "beta", "moving_mean", "moving_var"):
        np.testing.assert_array_equal(getattr(back, name), getattr(layer, name))
    assert (back.momentum, back.eps, back.axis, back.unbiased_moving_var) == (0.99, 1e-3, -1, False)


def test_from_keras_then_training_updates_moving_stats_as_keras() -> None:
    rng = np.random.default_rng(3)
    mean0, var0 = rng.normal(size=3), rng.uniform(0.5, 2.0, 3)
    layer = from_keras_weights([np.ones(3), np.zeros(3), mean0, var0], momentum=0.8, epsilon=1e-3)
    batches = _batches(axis=-1)
    for x in batches:
        layer.forward(x, training=True)
    mean, var = _keras_moving_stats(batches, 0.8, mean0, var0)
    np.testing.assert_allclose(layer.moving_mean, mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(layer.moving_var, var, rtol=1e-12)


def test_torch_and_keras_agree_on_inference() -> None:
    # Inference reads the stored statistics as they are: the same arrays give the same outputs.
    layer = _trained_layer(axis=1)
    from_torch = from_torch_state_dict(to_torch_state_dict(layer), eps=layer.eps)
    from_keras = from_keras_weights(to_keras_weights(layer), epsilon=layer.eps, axis=1)
    x = np.random.default_rng(4).normal(size=(5, 3, 2)).astype(np.float32)
    expected = layer.forward(x, training=False)
    np.testing.assert_array_equal(from_torch.forward(x, training=False), expected)
    np.testing.assert_array_equal(from_keras.forward(x, training=False), expected)


GOOD = {"weight": np.ones(3), "bias": np.zeros(3), "running_mean": np.zeros(3), "running_var": np.ones(3)}


@pytest.mark.parametrize(
    ("state", "kwargs", "words"),
    [
        ({**GOOD, "bn1.weight": np.ones(3)}, {}, "unexpected keys"),
        ({k: v for k, v in GOOD.items() if k != "running_var"}, {}, "missing"),
        ({k: v for k, v in GOOD.items() if k != "bias"}, {}, "both or neither"),
        ({**GOOD, "running_mean": np.zeros(4)}, {}, "channel count"),
        ({**GOOD, "running_mean": np.zeros((3, 1))}, {}, "shape"),
        ({**GOOD, "weight": np.ones(3, np.int64)}, {}, "dtype"),
        ({**GOOD, "weight": np.ones(3, np.float32)}, {}, "disagree on the dtype"),
        ({**GOOD, "running_var": -np.ones(3)}, {}, "negative"),
        ({**GOOD, "num_batches_tracked": np.array(1.5)}, {}, "num_batches_tracked"),
        ({**GOOD, "num_batches_tracked": np.array(-1)}, {}, "num_batches_tracked"),
        (GOOD, {"momentum": 1.5}, "momentum"),
        (GOOD, {"axis": 0}, "batch axis"),
        ([1, 2], {}, "mapping"),
    ],
)
def test_malformed_torch_state_is_refused_with_the_reason(
    state: Any, kwargs: dict[str, Any], words: str
) -> None:
    with pytest.raises(InvalidInputError, match=words):
        from_torch_state_dict(state, **kwargs)


@pytest.mark.parametrize(
    ("weights", "kwargs", "words"),
    [
        ([np.ones(3), np.zeros(3), np.zeros(3)], {}, "got 3"),
        ([np.ones(3), np.zeros(3), np.zeros(2), np.ones(3)], {}, "channel count"),
        ([np.ones(3), np.zeros(3), np.zeros(3), np.full(3, np.nan)], {}, "NaN"),
        ([np.ones(3)] * 4, {"momentum": -0.1}, "momentum"),
        ([np.ones(3)] * 4, {"epsilon": 0.0}, "eps"),
        ("abcd", {}, "Keras weights"),
    ],
)
def test_malformed_keras_weights_are_refused_with_the_reason(
    weights: Any, kwargs: dict[str, Any], words: str
) -> None:
    with pytest.raises(InvalidInputError, match=words):
        from_keras_weights(weights, **kwargs)
