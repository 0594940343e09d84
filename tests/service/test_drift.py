"""DriftMonitor: live per-channel statistics of served inputs against frozen ones, in float64 numpy."""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from bn_export.errors import InvalidInputError
from bn_export.moments import shifted_moments
from service.drift import DriftMonitor

EPS = 1e-3
C = 6


def frozen(rng: np.random.Generator) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    return rng.normal(0.0, 2.0, C), rng.uniform(0.5, 3.0, C)


def served(rng: np.random.Generator, mean: NDArray[np.float64], var: NDArray[np.float64], n: int) -> NDArray:
    """n samples (n, C, 2, 2) whose channels follow N(mean, var), as float32 like a real request."""
    x = rng.normal(size=(n, C, 2, 2)) * np.sqrt(var)[:, None, None] + mean[:, None, None]
    return x.astype(np.float32)


def jeffreys_reference(mu_p: NDArray, var_p: NDArray, mu_q: NDArray, var_q: NDArray) -> NDArray:
    """KL(P||Q) + KL(Q||P) of 1-D Gaussians, from the textbook form with its log terms."""

    def kl(m1: NDArray, v1: NDArray, m2: NDArray, v2: NDArray) -> NDArray:
        return 0.5 * np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5

    return kl(mu_p, var_p, mu_q, var_q) + kl(mu_q, var_q, mu_p, var_p)


@pytest.mark.parametrize("mean_offset", [0.0, 1.0])
def test_figures_match_float64_numpy_over_everything_served(mean_offset: float) -> None:
    rng = np.random.default_rng(0)
    moving_mean, moving_var = frozen(rng)
    monitor = DriftMonitor(moving_mean, moving_var, EPS, axis=1)
    shifted_mean = moving_mean + mean_offset * np.sqrt(moving_var)
    batches = [served(rng, shifted_mean, moving_var, n) for n in (1, 7, 64, 200)]
    for batch in batches:
        snapshot = monitor.update(batch)

    values = np.concatenate(batches).astype(np.float64).transpose(1, 0, 2, 3).reshape(C, -1)
    live_mean, live_var = values.mean(axis=1), values.var(axis=1)
    shift = (live_mean - moving_mean) / np.sqrt(moving_var + EPS)
    ratio = (live_var + EPS) / (moving_var + EPS)
    score = jeffreys_reference(live_mean, live_var + EPS, moving_mean, moving_var + EPS).mean()
    assert snapshot.samples == 272
    assert snapshot.values == 272 * 4
    np.testing.assert_allclose(snapshot.live_mean, live_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(snapshot.live_var, live_var, rtol=1e-12)
    np.testing.assert_allclose(snapshot.mean_shift, shift, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(snapshot.var_ratio, ratio, rtol=1e-12)
    assert snapshot.score == pytest.approx(score, rel=1e-10)
    assert snapshot.max_abs_mean_shift == pytest.approx(np.abs(shift).max(), rel=1e-10)
    assert snapshot.max_abs_log_var_ratio == pytest.approx(np.abs(np.log(ratio)).max(), rel=1e-10)


def test_unshifted_inputs_stay_below_the_threshold_and_a_one_std_shift_scores_about_one() -> None:
    rng = np.random.default_rng(1)
    moving_mean, moving_var = frozen(rng)
    calm = DriftMonitor(moving_mean, moving_var, EPS)
    drifted = DriftMonitor(moving_mean, moving_var, EPS)
    calm_snapshot = calm.update(served(rng, moving_mean, moving_var, 2000))
    drifted_snapshot = drifted.update(served(rng, moving_mean + np.sqrt(moving_var + EPS), moving_var, 2000))
    assert calm_snapshot.score is not None
    assert calm_snapshot.score < 0.01
    assert not calm_snapshot.alerting
    # d = 1, r = 1 in every channel: J = d² = 1.
    assert drifted_snapshot.score == pytest.approx(1.0, abs=0.05)
    assert drifted_snapshot.alerting


def test_channels_last_inputs_are_reduced_over_every_other_axis() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=(50, 4, 4, C))
    monitor = DriftMonitor(np.zeros(C), np.ones(C), EPS, axis=3)
    snapshot = monitor.update(x)
    np.testing.assert_allclose(snapshot.live_mean, x.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(snapshot.live_var, x.var(axis=(0, 1, 2)), rtol=1e-12)


def test_a_channel_constant_in_training_and_serving_shows_no_drift() -> None:
    moving_var = np.array([0.0, 1.0])
    monitor = DriftMonitor(np.zeros(2), moving_var, EPS)
    x = np.stack([np.zeros(500), np.random.default_rng(3).normal(size=500)], axis=1)
    snapshot = monitor.update(x)
    assert snapshot.mean_shift is not None
    assert snapshot.var_ratio is not None
    assert snapshot.mean_shift[0] == 0.0
    assert snapshot.var_ratio[0] == 1.0
    assert np.isfinite(snapshot.score or np.nan)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=8), st.integers(0, 2**32 - 1))
def test_how_requests_split_the_samples_does_not_change_the_figures(sizes: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    data = rng.normal(1.0, 3.0, size=(sum(sizes), C))
    whole = DriftMonitor(np.zeros(C), np.ones(C), EPS).update(data)
    split = DriftMonitor(np.zeros(C), np.ones(C), EPS)
    for part in np.split(data, np.cumsum(sizes)[:-1]):
        snapshot = split.update(part)
    assert snapshot.samples == whole.samples
    np.testing.assert_allclose(snapshot.live_mean, whole.live_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(snapshot.live_var, whole.live_var, rtol=1e-10, atol=1e-12)
    assert snapshot.score == pytest.approx(whole.score, rel=1e-10)


def test_a_window_keeps_only_the_latest_blocks_of_samples() -> None:
    rng = np.random.default_rng(4)
    monitor = DriftMonitor(np.zeros(C), np.ones(C), EPS, window=100)
    old = rng.normal(50.0, 1.0, size=(100, C))
    recent = [rng.normal(0.0, 1.0, size=(100, C)), rng.normal(0.0, 1.0, size=(60, C))]
    monitor.update(old)
    for batch in recent:
        snapshot = monitor.update(batch)
    # `old` filled the first block; the first `recent` batch filled the second and pushed it out.
    expected = np.concatenate(recent)
    assert snapshot.samples == 160
    np.testing.assert_allclose(snapshot.live_mean, expected.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(snapshot.live_var, expected.var(axis=0), rtol=1e-12)


def test_warning_is_logged_once_per_crossing_and_again_after_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = np.random.default_rng(5)
    moving_mean, moving_var = np.zeros(C), np.ones(C)
    monitor = DriftMonitor(moving_mean, moving_var, EPS, name="digits", min_samples=50, window=200)
    calm = lambda: served(rng, moving_mean, moving_var, 100)  # noqa: E731
    shifted = lambda: served(rng, moving_mean + 2.0, moving_var, 100)  # noqa: E731

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    with caplog.at_level(logging.INFO, logger="service.drift"):
        for _ in range(4):
            monitor.update(calm())
        assert warnings() == []
        for _ in range(6):
            monitor.update(shifted())
        assert len(warnings()) == 1
        assert "digits" in warnings()[0]
        for _ in range(6):
            snapshot = monitor.update(calm())
        assert not snapshot.alerting
        assert any("recovered" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
        for _ in range(6):
            monitor.update(shifted())
        assert len(warnings()) == 2


def test_no_warning_before_min_samples_even_for_a_large_shift(caplog: pytest.LogCaptureFixture) -> None:
    monitor = DriftMonitor(np.zeros(C), np.ones(C), EPS, min_samples=100)
    with caplog.at_level(logging.WARNING, logger="service.drift"):
        snapshot = monitor.update(np.full((99, C), 10.0))
    assert snapshot.score is not None
    assert snapshot.score > monitor.threshold
    assert not snapshot.alerting
    assert caplog.records == []


def test_batches_with_nan_or_inf_are_skipped_and_counted() -> None:
    monitor = DriftMonitor(np.zeros(C), np.ones(C), EPS)
    good = np.random.default_rng(6).normal(size=(10, C))
    before = monitor.update(good)
    bad = good.copy()
    bad[3, 2] = np.nan
    monitor.update(bad)
    bad[3, 2] = np.inf
    after = monitor.update(bad)
    assert after.skipped_batches == 2
    assert after.samples == before.samples
    np.testing.assert_array_equal(after.live_mean, before.live_mean)


def test_concurrent_updates_lose_no_sample() -> None:
    rng = np.random.default_rng(7)
    batches = [rng.normal(size=(int(n), C)) for n in rng.integers(1, 30, size=200)]
    monitor = DriftMonitor(np.zeros(C), np.ones(C), EPS)
    threads = [
        threading.Thread(target=lambda i=i: [monitor.update(b) for b in batches[i::4]]) for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snapshot = monitor.snapshot()
    everything = np.concatenate(batches)
    assert snapshot.samples == len(everything)
    np.testing.assert_allclose(snapshot.live_mean, everything.mean(axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(snapshot.live_var, everything.var(axis=0), rtol=1e-10)


def test_snapshot_is_json_serialisable_before_and_after_samples() -> None:
    monitor = DriftMonitor(np.zeros(C), np.ones(C), EPS)
    empty = json.loads(json.dumps(monitor.snapshot().to_json()))
    assert empty["samples"] == 0
    assert empty["score"] is None
    snapshot = monitor.update(np.ones((5, C)))
    document = json.loads(json.dumps(snapshot.to_json()))
    assert document["score"] == snapshot.score
    assert snapshot.mean_shift is not None
    assert document["channels"]["mean_shift"] == pytest.approx(snapshot.mean_shift.tolist())


def test_a_batch_with_the_wrong_channel_count_is_refused() -> None:
    monitor = DriftMonitor(np.zeros(C), np.ones(C), EPS)
    with pytest.raises(InvalidInputError, match=f"{C} channels on axis 1"):
        monitor.update(np.zeros((4, C + 1)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"moving_var": -np.ones(C)}, "moving_var"),
        ({"moving_mean": np.zeros(C + 1)}, "shape"),
        ({"eps": 0.0}, "eps"),
        ({"threshold": 0.0}, "threshold"),
        ({"window": 0}, "window"),
    ],
)
def test_invalid_configuration_is_refused_with_what_was_expected(kwargs: dict, message: str) -> None:
    arguments = {"moving_mean": np.zeros(C), "moving_var": np.ones(C), "eps": EPS, **kwargs}
    with pytest.raises(InvalidInputError, match=message):
        DriftMonitor(**arguments)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from([np.float16, np.float32, np.float64, np.int32]),
    st.sampled_from([0.0, 3.0, 1e4]),
    st.sampled_from([(5, C), (3, C, 7), (2, C, 300, 301)]),
)
def test_shifted_sums_match_two_pass_float64_numpy_for_any_dtype_offset_and_layout(
    seed: int, dtype: type, offset: float, shape: tuple[int, ...]
) -> None:
    # The offset moves the data `offset` standard deviations away from the shift (the frozen mean), which
    # forces the second, self-centred pass; 300x301 spatial values span several chunks.
    rng = np.random.default_rng(seed)
    moving_mean = rng.normal(0.0, 2.0, C)
    per_channel = (1, C) + (1,) * (len(shape) - 2)
    x64 = rng.normal(size=shape) * 2.0 + (moving_mean + offset * 2.0).reshape(per_channel)
    x = (np.round(x64 * 50) if dtype is np.int32 else x64).astype(dtype)
    moments = shifted_moments(x, 1, moving_mean)
    assert moments is not None
    values = np.moveaxis(x.astype(np.float64), 1, 0).reshape(C, -1)
    assert moments.count == values.shape[1]
    np.testing.assert_allclose(moments.mean, values.mean(axis=1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(moments.variance(), values.var(axis=1), rtol=1e-10)


def test_shifted_sums_of_a_batch_holding_nan_or_inf_are_none() -> None:
    x = np.ones((4, C), dtype=np.float32)
    x[1, 2] = np.inf
    assert shifted_moments(x, 1, np.zeros(C)) is None
    x[1, 2] = np.nan
    assert shifted_moments(x, 1, np.zeros(C)) is None
    # Finite float64 values whose squares overflow are as unusable.
    assert shifted_moments(np.full((2, C), 1e300), 1, np.zeros(C)) is None
