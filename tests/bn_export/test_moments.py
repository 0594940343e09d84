"""Exact mergeable moments against a two-pass float64 reference, and the laws of their merge."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from bn_export.errors import InvalidInputError
from bn_export.kernels import ENV_VAR
from bn_export.moments import Moments, ShiftedSums, merge_all, shifted_sums


@pytest.fixture(autouse=True, params=["numpy", "numba"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on both paths of `Moments.from_batch`, whatever the batch's size."""
    if request.param == "numba":
        pytest.importorskip("numba", reason="the 'fast' extra is not installed")
    monkeypatch.setenv(ENV_VAR, request.param)
    return str(request.param)


def _two_pass(x: NDArray[Any], axis: int) -> tuple[int, NDArray[np.float64], NDArray[np.float64]]:
    """count, mean and M2 per channel, in float64: the mean first, then the squared deviations from it."""
    table = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1).reshape(-1, x.shape[axis])
    mean = table.mean(axis=0)
    return table.shape[0], mean, ((table - mean) ** 2).sum(axis=0)


def _assert_moments(actual: Moments, count: int, mean: Any, m2: Any, rtol: float = 1e-12) -> None:
    assert actual.count == count
    scale = np.abs(mean) + np.sqrt(m2 / count)  # relative to the data's magnitude: a mean may be ~0
    np.testing.assert_array_less(np.abs(actual.mean - mean), rtol * scale + 1e-300)
    np.testing.assert_allclose(actual.m2, m2, rtol=rtol)


def _data(shape: tuple[int, ...], seed: int, offset: float = 1e3, dtype: Any = np.float32) -> NDArray[Any]:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * rng.uniform(0.1, 3.0) + offset).astype(dtype)


@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        ((7, 3), 1),
        ((9, 4, 5), 1),
        ((9, 5, 4), -1),
        ((6, 4, 11, 9), 1),  # short rows after the channel: the channels-last path
        ((6, 11, 9, 4), -1),
        ((3, 2, 300), 1),  # long rows: the row path
        ((4, 2, 3, 4, 70), 2),
        ((50_000, 3), 1),  # many blocks of rows
        ((2, 3, 70_000), 1),  # rows longer than one block
    ],
)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_from_batch_equals_two_pass_float64_reference(shape: tuple[int, ...], axis: int, dtype: Any) -> None:
    x = _data(shape, seed=sum(shape), dtype=dtype)
    _assert_moments(Moments.from_batch(x, axis), *_two_pass(x, axis))


@pytest.mark.parametrize("workers", [2, 3, 7])
def test_threads_give_the_single_thread_result(workers: int) -> None:
    x = _data((37, 3, 40, 40), seed=1)
    alone = Moments.from_batch(x, 1, workers=1)
    shared = Moments.from_batch(x, 1, workers=workers)
    assert shared.count == alone.count
    np.testing.assert_allclose(shared.mean, alone.mean, rtol=1e-14)
    np.testing.assert_allclose(shared.m2, alone.m2, rtol=1e-12)
    _assert_moments(shared, *_two_pass(x, 1))


@pytest.mark.parametrize(
    ("shape", "offset"), [((37, 3, 40, 40), 1e3), ((9, 300, 2000), 0.0), ((90_001, 3), 50.0)]
)
def test_threads_give_the_single_thread_result_bit_for_bit(shape: tuple[int, ...], offset: float) -> None:
    # Threads take whole blocks, so the blocks and their merge tree are the same for any worker count.
    x = _data(shape, seed=3, offset=offset)
    alone = Moments.from_batch(x, 1, workers=1)
    for workers in (2, 3):
        shared = Moments.from_batch(x, 1, workers=workers)
        np.testing.assert_array_equal(shared.mean, alone.mean)
        np.testing.assert_array_equal(shared.m2, alone.m2)


def test_a_large_offset_costs_no_accuracy() -> None:
    # mean/std = 1e6: the naive one-pass Σx² - (Σx)²/n would lose every digit of M2 here.
    x = (np.random.default_rng(2).normal(size=(4000, 2)) + 1e6).astype(np.float64)
    _assert_moments(Moments.from_batch(x, 1), *_two_pass(x, 1), rtol=1e-9)


@pytest.mark.parametrize(("shape", "axis"), [((400, 2, 1000), 1), ((400_000, 2), 1)])
def test_a_batch_whose_later_blocks_drift_far_off_centre_keeps_full_accuracy(
    shape: tuple[int, ...], axis: int
) -> None:
    # Centred blocks are summed unshifted; blocks far from zero must switch to shifted sums.
    x = _data(shape, seed=6, offset=0.0)
    x[shape[0] // 2 :] += np.float32(3e4)
    _assert_moments(Moments.from_batch(x, axis, workers=1), *_two_pass(x, axis))
    x[: shape[0] // 2] = x[shape[0] // 2 :]  # every block far off centre
    _assert_moments(Moments.from_batch(x, axis, workers=1), *_two_pass(x, axis))


def test_a_constant_channel_has_zero_variance() -> None:
    x = np.full((100, 3, 7), 0.1, dtype=np.float32)
    moments = Moments.from_batch(x, 1)
    np.testing.assert_array_equal(moments.variance(), 0.0)
    np.testing.assert_array_equal(moments.mean, np.float64(np.float32(0.1)))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 60),
    channels=st.integers(1, 4),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
    offset=st.sampled_from([0.0, 1.0, -50.0, 1e4]),
)
def test_moments_of_any_split_merge_to_the_moments_of_the_whole(
    n: int, channels: int, data: st.DataObject, seed: int, offset: float
) -> None:
    x = _data((n, channels, 3), seed=seed % 10_000, offset=offset, dtype=np.float64)
    cuts = sorted(data.draw(st.lists(st.integers(1, n - 1), max_size=6, unique=True)))
    parts = [Moments.from_batch(part, 1) for part in np.split(x, cuts)]
    count, mean, m2 = whole = _two_pass(x, 1)
    # A part's mean is exact only to ε·|μ|, so merging costs up to ~ε·|μ|/σ relative in M2: 1e-12 for
    # well-conditioned data, a little more where the offset dwarfs the spread (|μ|/σ up to 1e5 here).
    rtol = max(1e-12, 50 * np.finfo(np.float64).eps * float(np.max(np.abs(mean) / np.sqrt(m2 / count))))
    _assert_moments(merge_all(parts), *whole, rtol=rtol)
    sequential = Moments.empty(channels)
    for part in parts:
        sequential = sequential.merge(part)
    _assert_moments(sequential, *whole, rtol=rtol)
    _assert_moments(merge_all(reversed(parts)), *whole, rtol=rtol)  # the order of the parts does not matter


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(8, 200),
    first=st.integers(1, 64),
    second=st.integers(1, 64),
    seed=st.integers(0, 2**32 - 1),
)
def test_resplitting_into_other_batch_sizes_gives_the_same_population_statistics(
    n: int, first: int, second: int, seed: int
) -> None:
    x = _data((n, 2, 2, 2), seed=seed % 10_000, offset=10.0)

    def population(batch_size: int) -> Moments:
        return merge_all(Moments.from_batch(x[i : i + batch_size], 1) for i in range(0, n, batch_size))

    a, b = population(first), population(second)
    assert a.count == b.count == n * 4
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-13)
    np.testing.assert_allclose(a.variance(), b.variance(), rtol=1e-12)
    np.testing.assert_allclose(a.variance(ddof=1), b.variance(ddof=1), rtol=1e-12)


def test_merging_an_empty_moments_is_the_identity() -> None:
    m = Moments.from_batch(_data((5, 3), seed=3), 1)
    for merged in (m.merge(Moments.empty(3)), Moments.empty(3).merge(m), merge_all([Moments.empty(3), m])):
        assert merged.count == m.count
        np.testing.assert_array_equal(merged.mean, m.mean)
        np.testing.assert_array_equal(merged.m2, m.m2)
    assert merge_all([Moments.empty(2), Moments.empty(2)]).count == 0


def test_variance_divides_m2_by_count_minus_ddof() -> None:
    x = _data((10, 2), seed=4, dtype=np.float64)
    m = Moments.from_batch(x, 1)
    np.testing.assert_allclose(m.variance(), x.var(axis=0), rtol=1e-13)
    np.testing.assert_allclose(m.variance(ddof=1), x.var(axis=0, ddof=1), rtol=1e-13)
    with pytest.raises(InvalidInputError, match="ddof"):
        Moments.from_batch(x[:1], 1).variance(ddof=1)


def test_moments_are_read_only_values() -> None:
    mean = np.zeros(2)
    m = Moments(3, mean, np.ones(2))
    mean[0] = 5.0
    assert m.mean[0] == 0.0
    with pytest.raises(ValueError, match="read-only"):
        m.m2[0] = 1.0


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (lambda: Moments.empty(2).merge(Moments.empty(3)), "channels"),
        (lambda: merge_all([]), "at least one"),
        (lambda: Moments(-1, np.zeros(2), np.zeros(2)), "count"),
        (lambda: Moments(1, np.zeros(2), np.zeros(3)), "shape"),
        (lambda: Moments.from_batch(np.ones((4, 3)), 0), "batch axis"),
        (lambda: Moments.from_batch(np.ones((4, 3)), 1, workers=0), "workers"),
        (lambda: Moments.from_batch(np.ones((4, 3), dtype=complex), 1), "dtype"),
    ],
)
def test_invalid_arguments_are_refused_with_the_reason(build: Any, words: str) -> None:
    with pytest.raises(InvalidInputError, match=words):
        build()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(("shape", "axis", "where"), [((6, 3, 80), 1, (5, 2, 79)), ((40, 3), -1, (0, 0))])
def test_nan_or_inf_anywhere_is_refused(
    bad: float, shape: tuple[int, ...], axis: int, where: tuple[int, ...]
) -> None:
    x = _data(shape, seed=5)
    x[where] = bad
    with pytest.raises(InvalidInputError, match="1 NaN or Inf"):
        Moments.from_batch(x, axis)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_running_shifted_sums_give_the_float64_moments_of_every_batch_across_takes(offset: float) -> None:
    # Batches 1e4 std from the starting shift (the sums then move it to their mean at the first take) and
    # near it: each take is the float64 two-pass moments of the batches added since the one before.
    rng = np.random.default_rng(3)
    sums = ShiftedSums(np.zeros(3), np.dtype(np.float32))
    for _ in range(3):
        batches = [
            (offset + rng.standard_normal((int(n), 3))).astype(np.float32) for n in rng.integers(1, 20, 30)
        ]
        for x in batches:
            shift = sums.shift
            n, s1, s2 = shifted_sums(x, 1, shift)
            sums.add(n, shift, s1, s2)
        taken = sums.take()
        assert taken is not None
        rows = np.concatenate(batches).astype(np.float64)
        np.testing.assert_allclose(taken.mean, rows.mean(axis=0), rtol=1e-13)
        np.testing.assert_allclose(taken.m2, ((rows - rows.mean(axis=0)) ** 2).sum(axis=0), rtol=1e-6)
    assert sums.take() is None  # nothing added since


def test_sums_made_about_a_shift_that_moved_since_are_recentred() -> None:
    x = np.random.default_rng(4).standard_normal((50, 2)) + 100.0
    sums = ShiftedSums(np.zeros(2), np.dtype(np.float64))
    old = sums.shift
    first = sums.take()  # nothing yet: the shift stays
    assert first is None
    n, s1, s2 = shifted_sums(x[:25], 1, old)
    sums.add(n, old, s1, s2)
    sums.take()  # 100 std from 0: the shift moves to the mean
    assert not np.array_equal(sums.shift, old)
    n, s1, s2 = shifted_sums(x[25:], 1, old)  # summed about the old shift meanwhile
    sums.add(n, old, s1, s2)
    taken = sums.take()
    assert taken is not None
    np.testing.assert_allclose(taken.mean, x[25:].mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(taken.m2, ((x[25:] - x[25:].mean(axis=0)) ** 2).sum(axis=0), rtol=1e-9)
