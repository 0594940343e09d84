"""BatchNorm maths and layer state against float64 closed forms, ONNX's reference and finite differences."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from bn_export.errors import InvalidInputError
from bn_export.layer import (
    BatchNorm,
    backward,
    batch_statistics,
    inference_forward,
    normalize_axis,
    reduction_axes,
    training_forward,
)

# (shape, channel axis): ranks 2..5, channels first and last.
LAYOUTS = [
    ((16, 3), 1),
    ((16, 3), -1),
    ((6, 3, 5), 1),
    ((6, 5, 3), -1),
    ((4, 3, 5, 6), 1),
    ((4, 5, 6, 3), -1),
    ((2, 3, 4, 5, 3), 1),
    ((2, 4, 5, 3, 3), -1),
]


def _channels_last(x: NDArray[Any], axis: int) -> NDArray[np.float64]:
    """x as a float64 (values, C) table: the closed forms below reduce over its rows."""
    return np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1).reshape(-1, x.shape[axis])


def _closed_form(x: NDArray[Any], axis: int, gamma: Any, beta: Any, mean: Any, var: Any, eps: float) -> Any:
    table = _channels_last(x, axis)
    y = gamma * (table - mean) / np.sqrt(var + eps) + beta
    moved = np.moveaxis(np.asarray(x), axis, -1).shape
    return np.moveaxis(y.reshape(moved), -1, axis)


def _data(shape: tuple[int, ...], seed: int = 0, dtype: Any = np.float64) -> NDArray[Any]:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * rng.uniform(0.5, 3.0) + rng.uniform(-5.0, 5.0)).astype(dtype)


def _state(layer: BatchNorm) -> dict[str, Any]:
    """Everything a failed call must leave as it was."""
    arrays = {name: getattr(layer, name).copy() for name in ("gamma", "beta", "moving_mean", "moving_var")}
    grads = {
        name: None if getattr(layer, name) is None else getattr(layer, name).copy()
        for name in ("grad_gamma", "grad_beta")
    }
    return {**arrays, **grads, "batches_seen": layer.batches_seen, "samples_seen": layer.samples_seen}


def _assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    for name, value in before.items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(value, after[name]), name
            assert value.dtype == after[name].dtype, name
        else:
            assert value == after[name], name


# --- axes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("axis", "rank", "expected"), [(1, 2, 1), (-1, 2, 1), (-1, 4, 3), (2, 5, 2), (-3, 4, 1)]
)
def test_normalize_axis_gives_the_non_negative_channel_axis(axis: int, rank: int, expected: int) -> None:
    assert normalize_axis(axis, rank) == expected


@pytest.mark.parametrize(
    ("axis", "rank", "words"),
    [(0, 4, "batch axis"), (-4, 4, "batch axis"), (4, 4, "out of range"), (1, 1, "rank"), (1, 6, "rank")],
)
def test_normalize_axis_rejects_batch_axis_out_of_range_and_unsupported_rank(
    axis: int, rank: int, words: str
) -> None:
    with pytest.raises(InvalidInputError, match=words):
        normalize_axis(axis, rank)


def test_reduction_axes_are_every_axis_but_the_channel() -> None:
    assert reduction_axes(4, 1) == (0, 2, 3)
    assert reduction_axes(4, -1) == (0, 1, 2)
    assert reduction_axes(2, 1) == (0,)


# --- forward formulas ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
def test_batch_statistics_are_the_mean_and_biased_variance_over_non_channel_axes(
    shape: tuple[int, ...], axis: int
) -> None:
    x = _data(shape, dtype=np.float32)
    mean, var = batch_statistics(x, axis)
    table = _channels_last(x, axis)
    np.testing.assert_allclose(mean, table.mean(axis=0), rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(
        var, ((table - table.mean(axis=0)) ** 2).sum(axis=0) / table.shape[0], rtol=1e-13
    )
    assert mean.dtype == var.dtype == np.float64


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
def test_training_forward_normalizes_with_batch_mean_and_biased_variance(
    shape: tuple[int, ...], axis: int
) -> None:
    x = _data(shape)
    C = shape[axis]
    rng = np.random.default_rng(1)
    gamma, beta = rng.uniform(0.5, 2.0, C), rng.normal(size=C)
    table = _channels_last(x, axis)
    expected = _closed_form(x, axis, gamma, beta, table.mean(axis=0), table.var(axis=0), 1e-3)
    y, cache = training_forward(x, gamma, beta, 1e-3, axis)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    assert y.dtype == np.float64
    assert cache.count == table.shape[0]
    np.testing.assert_allclose(cache.var, table.var(axis=0), rtol=1e-13)


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
def test_inference_forward_is_the_frozen_formula_in_the_input_dtype(
    shape: tuple[int, ...], axis: int
) -> None:
    x = _data(shape, dtype=np.float32)
    C = shape[axis]
    rng = np.random.default_rng(2)
    gamma, beta = rng.uniform(0.5, 2.0, C), rng.normal(size=C)
    mean, var = rng.normal(size=C), rng.uniform(0.1, 4.0, C)
    y = inference_forward(x, gamma, beta, mean, var, 1e-5, axis)
    assert y.dtype == np.float32
    expected = _closed_form(x, axis, gamma, beta, mean, var, 1e-5)
    np.testing.assert_allclose(y, expected.astype(np.float32), rtol=2e-7, atol=1e-6)


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
def test_layer_forward_matches_closed_forms_in_training_and_inference(
    shape: tuple[int, ...], axis: int
) -> None:
    x = _data(shape, dtype=np.float32)
    C = shape[axis]
    layer = BatchNorm(C, axis=axis, eps=1e-4)
    rng = np.random.default_rng(3)
    layer.set_parameters(gamma=rng.uniform(0.5, 2.0, C), beta=rng.normal(size=C))
    gamma, beta = layer.gamma.astype(np.float64), layer.beta.astype(np.float64)
    table = _channels_last(x, axis)
    y_train = layer.forward(x, training=True)
    expected = _closed_form(x, axis, gamma, beta, table.mean(axis=0), table.var(axis=0), 1e-4)
    assert y_train.dtype == np.float32
    assert y_train.shape == x.shape
    np.testing.assert_allclose(y_train, expected, rtol=1e-6, atol=1e-6)
    moving_mean, moving_var = layer.moving_mean.astype(np.float64), layer.moving_var.astype(np.float64)
    y_eval = layer.forward(x, training=False)
    expected = _closed_form(x, axis, gamma, beta, moving_mean, moving_var, 1e-4)
    np.testing.assert_allclose(y_eval, expected, rtol=1e-6, atol=1e-6)


def test_integer_input_is_normalized_as_float() -> None:
    x = np.arange(24, dtype=np.uint8).reshape(4, 3, 2)
    layer = BatchNorm(3)
    np.testing.assert_allclose(layer.forward(x, True), layer.forward(x.astype(np.float32), True), rtol=1e-6)


# --- moving statistics --------------------------------------------------------------------------------


def _onnx_training_step(momentum: float, eps: float) -> ReferenceEvaluator:
    """ONNX's reference BatchNormalization, training_mode=1 (opset 15): outputs Y, running mean and var."""
    names = ["X", "scale", "B", "input_mean", "input_var"]
    node = helper.make_node(
        "BatchNormalization",
        names,
        ["Y", "running_mean", "running_var"],
        epsilon=eps,
        momentum=momentum,
        training_mode=1,
    )
    graph = helper.make_graph(
        [node],
        "bn_training",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names],
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
            for n in ("Y", "running_mean", "running_var")
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
    return ReferenceEvaluator(model)


@pytest.mark.parametrize(
    ("shape", "axis"), [((32, 4), 1), ((8, 4, 5, 5), 1), ((8, 5, 5, 4), -1), ((4, 4, 3, 3, 3), 1)]
)
def test_moving_statistics_after_several_steps_match_onnx_training_mode(
    shape: tuple[int, ...], axis: int
) -> None:
    momentum, eps = 0.8, 1e-5
    C = shape[axis]
    layer = BatchNorm(C, momentum=momentum, eps=eps, axis=axis)
    rng = np.random.default_rng(4)
    layer.set_parameters(gamma=rng.uniform(0.5, 2.0, C), beta=rng.normal(size=C))
    onnx_bn = _onnx_training_step(momentum, eps)
    mean, var = layer.moving_mean.copy(), layer.moving_var.copy()
    for step in range(6):
        x = _data(shape, seed=10 + step, dtype=np.float32)
        y = layer.forward(x, training=True)
        feeds = {"X": np.moveaxis(x, axis, 1), "scale": layer.gamma, "B": layer.beta}
        y_ref, mean, var = onnx_bn.run(None, {**feeds, "input_mean": mean, "input_var": var})
        # The reference normalizes in float32 (x - mean loses ~|x|·2⁻²⁴); ours is float64 then rounded.
        np.testing.assert_allclose(y, np.moveaxis(y_ref, 1, axis), rtol=1e-5, atol=2e-5)
        # Both round to float32 after each step; they may differ by a few float32 ulps.
        np.testing.assert_allclose(layer.moving_mean, mean, rtol=4e-7, atol=4e-7)
        np.testing.assert_allclose(layer.moving_var, var, rtol=4e-7, atol=4e-7)
    assert layer.batches_seen == 6
    assert layer.samples_seen == 6 * shape[0]


def test_update_rule_weighs_the_past_by_momentum() -> None:
    layer = BatchNorm(2, momentum=0.75, dtype=np.float64)
    layer.update_statistics(np.array([4.0, -8.0]), np.array([2.0, 5.0]), count=10)
    np.testing.assert_array_equal(layer.moving_mean, [0.0 * 0.75 + 4.0 * 0.25, -8.0 * 0.25])
    np.testing.assert_array_equal(layer.moving_var, [1.0 * 0.75 + 2.0 * 0.25, 0.75 + 5.0 * 0.25])
    assert (layer.batches_seen, layer.samples_seen) == (1, 10)


def test_training_forward_goes_through_update_statistics() -> None:
    x = _data((5, 3, 4), dtype=np.float64)
    by_forward = BatchNorm(3, momentum=0.6, dtype=np.float64, unbiased_moving_var=True)
    by_forward.forward(x, training=True)
    by_update = BatchNorm(3, momentum=0.6, dtype=np.float64, unbiased_moving_var=True)
    by_update.update_statistics(*batch_statistics(x, 1), count=20, samples=5)
    np.testing.assert_array_equal(by_forward.moving_mean, by_update.moving_mean)
    np.testing.assert_array_equal(by_forward.moving_var, by_update.moving_var)
    assert (by_forward.batches_seen, by_forward.samples_seen) == (
        by_update.batches_seen,
        by_update.samples_seen,
    )


@pytest.mark.parametrize("unbiased", [False, True])
def test_momentum_none_is_the_cumulative_average_of_batch_statistics(unbiased: bool) -> None:
    layer = BatchNorm(3, momentum=None, dtype=np.float64, unbiased_moving_var=unbiased)
    batches = [_data((n, 3), seed=n) for n in (4, 9, 2, 7)]
    for batch in batches:
        layer.forward(batch, training=True)
    ddof = 1 if unbiased else 0
    np.testing.assert_allclose(
        layer.moving_mean, np.mean([b.mean(axis=0) for b in batches], axis=0), rtol=1e-13
    )
    np.testing.assert_allclose(
        layer.moving_var, np.mean([b.var(axis=0, ddof=ddof) for b in batches], axis=0), rtol=1e-13
    )
    assert layer.samples_seen == 22


@settings(max_examples=25, deadline=None)
@given(
    momentum=st.floats(0.0, 0.99),
    steps=st.integers(1, 30),
    seed=st.integers(0, 2**32 - 1),
)
def test_ema_approaches_population_statistics_geometrically_on_stationary_data(
    momentum: float, steps: int, seed: int
) -> None:
    # Every batch is a reshuffle of one population, so each batch statistic is the population's and the
    # distance to it shrinks by exactly `momentum` per step.
    rng = np.random.default_rng(seed)
    population = rng.normal(size=(64, 3)) * rng.uniform(0.1, 10.0, 3) + rng.uniform(-10.0, 10.0, 3)
    layer = BatchNorm(3, momentum=momentum, dtype=np.float64)
    for _ in range(steps):
        layer.forward(rng.permutation(population), training=True)
    mu, var = population.mean(axis=0), population.var(axis=0)
    shrink = momentum**steps
    np.testing.assert_allclose(
        layer.moving_mean - mu, (0.0 - mu) * shrink, atol=1e-12 * (1 + np.abs(mu).max())
    )
    np.testing.assert_allclose(layer.moving_var - var, (1.0 - var) * shrink, atol=1e-11 * (1 + var.max()))


def test_ema_of_random_batches_settles_near_the_population_statistics() -> None:
    rng = np.random.default_rng(5)
    population = rng.normal(loc=[2.0, -1.0], scale=[1.0, 3.0], size=(20_000, 2))
    layer = BatchNorm(2, momentum=0.9, dtype=np.float64, unbiased_moving_var=True)
    for _ in range(300):
        layer.forward(population[rng.integers(0, len(population), 512)], training=True)
    # The EMA of 512-sample batches has a standard error of about σ/√512·√(0.1/1.9) ≈ 0.01σ; allow 6×.
    sigma = population.std(axis=0)
    assert np.all(np.abs(layer.moving_mean - population.mean(axis=0)) < 0.06 * sigma)
    assert np.all(np.abs(layer.moving_var / population.var(axis=0) - 1) < 0.06 * np.sqrt(2))


def test_inference_changes_no_state() -> None:
    layer = BatchNorm(3, axis=-1)
    layer.forward(_data((8, 3), dtype=np.float32), training=True)
    before = _state(layer)
    layer.forward(_data((5, 3), seed=1, dtype=np.float32), training=False)
    _assert_same_state(before, _state(layer))


@settings(max_examples=30, deadline=None)
@given(
    layout=st.sampled_from(LAYOUTS),
    batch=st.integers(1, 9),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_inference_output_ignores_batch_companions(
    layout: tuple[tuple[int, ...], int], batch: int, data: st.DataObject, seed: int
) -> None:
    shape, axis = layout
    C = shape[axis]
    layer = BatchNorm(C, axis=axis)
    rng = np.random.default_rng(seed)
    layer.set_parameters(
        gamma=rng.normal(size=C), beta=rng.normal(size=C), moving_mean=rng.normal(size=C),
        moving_var=rng.uniform(0.0, 5.0, C),
    )  # fmt: skip
    x = _data((batch, *shape[1:]), seed=seed % 1000, dtype=np.float32)
    i = data.draw(st.integers(0, batch - 1))
    together = layer.forward(x, training=False)[i]
    alone = layer.forward(x[i : i + 1], training=False)[0]
    assert np.array_equal(together, alone)


# --- gradients ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "axis"), [((5, 3), 1), ((3, 2, 4), -1), ((2, 3, 3, 2), 1), ((2, 2, 2, 2, 3), -1)]
)
def test_backward_matches_finite_differences(shape: tuple[int, ...], axis: int) -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=shape) * 2.0 + 1.0
    C = shape[axis]
    gamma, beta = rng.uniform(0.5, 2.0, C), rng.normal(size=C)
    weights = rng.normal(size=shape)  # loss = Σ weights·y, so dL/dy = weights

    def loss(x_: NDArray[np.float64], gamma_: NDArray[np.float64], beta_: NDArray[np.float64]) -> float:
        return float(np.sum(weights * training_forward(x_, gamma_, beta_, 1e-3, axis)[0]))

    _, cache = training_forward(x, gamma, beta, 1e-3, axis)
    grad_x, grad_gamma, grad_beta = backward(weights, cache, gamma)

    def numeric(f: Any, value: NDArray[np.float64]) -> NDArray[np.float64]:
        grad = np.zeros_like(value)
        h = 1e-6
        for index in np.ndindex(value.shape):
            step = np.zeros_like(value)
            step[index] = h
            grad[index] = (f(value + step) - f(value - step)) / (2 * h)
        return grad

    np.testing.assert_allclose(grad_x, numeric(lambda v: loss(v, gamma, beta), x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad_gamma, numeric(lambda v: loss(x, v, beta), gamma), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad_beta, numeric(lambda v: loss(x, gamma, v), beta), rtol=1e-6, atol=1e-7)


def test_layer_backward_stores_parameter_gradients() -> None:
    layer = BatchNorm(3, dtype=np.float64)
    x = _data((4, 3, 2))
    layer.forward(x, training=True)
    g = np.ones_like(x)
    grad_x = layer.backward(g)
    _, cache = training_forward(x, layer.gamma, layer.beta, layer.eps, 1)
    expected = backward(g, cache, layer.gamma)
    np.testing.assert_array_equal(grad_x, expected[0])
    assert layer.grad_gamma is not None
    assert layer.grad_beta is not None
    np.testing.assert_array_equal(layer.grad_gamma, expected[1])
    np.testing.assert_array_equal(layer.grad_beta, expected[2])


def test_backward_before_a_training_forward_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="training forward"):
        BatchNorm(2).backward(np.ones((3, 2)))


# --- bad input leaves the state untouched --------------------------------------------------------------


def _with_nan() -> NDArray[np.float32]:
    x = _data((4, 3, 2), dtype=np.float32)
    x[1, 2, 0] = np.nan
    return x


def _with_inf() -> NDArray[np.float32]:
    x = _data((4, 3, 2), dtype=np.float32)
    x[3, 0, 1] = -np.inf
    return x


BAD_INPUTS = {
    "rank 1": (np.ones(3, np.float32), "rank"),
    "rank 6": (np.ones((2, 3, 1, 1, 1, 1), np.float32), "rank"),
    "wrong channel count": (np.ones((4, 5, 2), np.float32), "channels"),
    "NaN": (_with_nan(), "NaN"),
    "Inf": (_with_inf(), "NaN or Inf"),
    "complex": (np.ones((4, 3), np.complex64), "dtype"),
    "strings": (np.full((4, 3), "a"), "dtype"),
    "bool": (np.ones((4, 3), bool), "dtype"),
    "empty": (np.ones((0, 3), np.float32), "empty"),
}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_and_leaves_state_untouched(case: str, training: bool) -> None:
    layer = BatchNorm(3)
    first = _data((6, 3, 2), dtype=np.float32)
    layer.forward(first, training=True)
    grad_before = layer.backward(np.ones_like(first))
    before = _state(layer)
    x, words = BAD_INPUTS[case]
    with pytest.raises(InvalidInputError, match=words):
        layer.forward(x, training=training)
    _assert_same_state(before, _state(layer))
    # The cache still belongs to the last good forward.
    np.testing.assert_array_equal(layer.backward(np.ones_like(first)), grad_before)


def test_a_training_batch_with_one_value_per_channel_is_refused_without_state_change() -> None:
    layer = BatchNorm(3)
    before = _state(layer)
    with pytest.raises(InvalidInputError, match="more than one value per channel"):
        layer.forward(np.ones((1, 3), np.float32), training=True)
    _assert_same_state(before, _state(layer))
    assert layer.forward(np.ones((1, 3), np.float32), training=False).shape == (1, 3)


@pytest.mark.parametrize(
    ("mean", "var", "count", "words"),
    [
        (np.zeros(2), np.ones(3), 4, "batch_mean has shape"),
        (np.zeros(3), np.ones((3, 1)), 4, "batch_var has shape"),
        (np.zeros(3), -np.ones(3), 4, "negative"),
        (np.full(3, np.nan), np.ones(3), 4, "NaN"),
        (np.zeros(3), np.ones(3), 1, "count"),
        (np.zeros(3), np.ones(3), 2.5, "count"),
        (np.zeros(3, complex), np.ones(3), 4, "dtype"),
    ],
)
def test_bad_update_statistics_raise_and_leave_state_untouched(
    mean: Any, var: Any, count: Any, words: str
) -> None:
    layer = BatchNorm(3, unbiased_moving_var=True)
    layer.forward(_data((4, 3), dtype=np.float32), training=True)
    before = _state(layer)
    with pytest.raises(InvalidInputError, match=words):
        layer.update_statistics(mean, var, count)
    _assert_same_state(before, _state(layer))


def test_backward_with_a_mismatched_gradient_leaves_gradients_untouched() -> None:
    layer = BatchNorm(3)
    x = _data((4, 3), dtype=np.float32)
    layer.forward(x, training=True)
    layer.backward(np.ones_like(x))
    before = _state(layer)
    with pytest.raises(InvalidInputError, match="shape"):
        layer.backward(np.ones((5, 3), np.float32))
    _assert_same_state(before, _state(layer))


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"num_channels": 0}, "num_channels"),
        ({"num_channels": 3, "momentum": 1.5}, "momentum"),
        ({"num_channels": 3, "eps": 0.0}, "eps"),
        ({"num_channels": 3, "axis": 0}, "batch axis"),
        ({"num_channels": 3, "dtype": np.int32}, "float"),
    ],
)
def test_invalid_layer_settings_are_refused(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidInputError, match=words):
        BatchNorm(**kwargs)


def test_checkpoint_round_trip_keeps_parameters_conventions_and_counters() -> None:
    layer = BatchNorm(3, momentum=None, eps=1e-3, axis=-1, dtype=np.float64, unbiased_moving_var=True)
    layer.forward(_data((10, 4, 3)), training=True)
    checkpoint = layer.to_checkpoint(
        sample_shape=(4, 3), stats="ema", data_fingerprint="x", created="now", version="test"
    )
    assert checkpoint.axis == 2
    restored = BatchNorm.from_checkpoint(checkpoint)
    for name in ("gamma", "beta", "moving_mean", "moving_var"):
        np.testing.assert_array_equal(getattr(restored, name), getattr(layer, name))
        assert getattr(restored, name).dtype == np.float64
    assert (restored.momentum, restored.eps, restored.unbiased_moving_var) == (None, 1e-3, True)
    assert (restored.batches_seen, restored.samples_seen) == (1, 10)
    x = _data((2, 4, 3), seed=9)
    np.testing.assert_array_equal(restored.forward(x, training=False), layer.forward(x, training=False))


@pytest.mark.parametrize(
    ("x", "words"),
    [
        (np.full((3, 2), 1e200), "overflow float32"),  # fine in float64, not as a float32 moving mean
        (np.array([[1e300, 1.0], [-1e300, 2.0], [1e308, 3.0]]), "overflows float64"),
    ],
)
def test_statistics_that_overflow_are_refused_without_state_change(
    x: NDArray[np.float64], words: str
) -> None:
    layer = BatchNorm(2)
    before = _state(layer)
    with pytest.raises(InvalidInputError, match=words):
        layer.forward(x, training=True)
    _assert_same_state(before, _state(layer))


@pytest.mark.parametrize("momentum", [0.9, 0.99, None])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("compiled", [False, True])
def test_folding_batches_gives_the_bits_of_one_update_per_batch(
    momentum: float | None, unbiased: bool, dtype: Any, compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if compiled:
        pytest.importorskip("numba", reason="the 'fast' extra is not installed")
        monkeypatch.setenv("BN_EXPORT_KERNELS", "numba")
    rng = np.random.default_rng(7)
    G, C = 37, 5
    means = rng.normal(3.0, 2.0, (G, C))
    variances = rng.uniform(0.1, 4.0, (G, C))
    counts = rng.integers(2, 500, G)
    samples = rng.integers(1, 50, G)
    one_by_one = BatchNorm(C, momentum=momentum, dtype=dtype, unbiased_moving_var=unbiased)
    folded = BatchNorm(C, momentum=momentum, dtype=dtype, unbiased_moving_var=unbiased)
    one_by_one.update_statistics(means[0], variances[0], int(counts[0]), samples=int(samples[0]))
    folded.update_statistics(means[0], variances[0], int(counts[0]), samples=int(samples[0]))
    states = []
    for g in range(1, G):
        one_by_one.update_statistics(means[g], variances[g], int(counts[g]), samples=int(samples[g]))
        states.append((one_by_one.moving_mean.copy(), one_by_one.moving_var.copy()))
    stored_means, stored_vars = folded.fold_batches(
        means[1:], variances[1:], counts[1:], samples[1:], compiled=compiled
    )
    np.testing.assert_array_equal(stored_means, np.stack([s[0] for s in states]))
    np.testing.assert_array_equal(stored_vars, np.stack([s[1] for s in states]))
    np.testing.assert_array_equal(folded.moving_mean, one_by_one.moving_mean)
    np.testing.assert_array_equal(folded.moving_var, one_by_one.moving_var)
    assert folded.moving_mean.dtype == np.dtype(dtype)
    assert (folded.batches_seen, folded.samples_seen) == (one_by_one.batches_seen, one_by_one.samples_seen)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda m, v, c, s: (m, -v, c, s), "negative"),
        (lambda m, v, c, s: (m * np.nan, v, c, s), "NaN or Inf"),
        (lambda m, v, c, s: (m, v, c * 0 + 1, s), ">= 2"),
        (lambda m, v, c, s: (m, v, c, s * 0), "positive"),
        (lambda m, v, c, s: (m[:, :2], v, c, s), "expected"),
        (lambda m, v, c, s: (m * 1e300, v * 1e300, c, s), "overflow"),
    ],
)
def test_a_bad_batch_in_a_fold_leaves_the_layer_as_it_was(change: Any, words: str) -> None:
    layer = BatchNorm(3)
    layer.update_statistics(np.ones(3), np.ones(3), 10)
    before = (layer.moving_mean.copy(), layer.moving_var.copy(), layer.batches_seen, layer.samples_seen)
    good = (np.zeros((4, 3)), np.ones((4, 3)), np.full(4, 8), np.full(4, 8))
    with pytest.raises(InvalidInputError, match=words):
        layer.fold_batches(*change(*good))
    np.testing.assert_array_equal(layer.moving_mean, before[0])
    np.testing.assert_array_equal(layer.moving_var, before[1])
    assert (layer.batches_seen, layer.samples_seen) == before[2:]
