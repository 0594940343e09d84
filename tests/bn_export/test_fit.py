"""The fit loop: exact population statistics in every format, EMA by its recurrence, determinism, bounded
memory, NaN reporting and a head that learns on the digits demo data."""

from __future__ import annotations

import tracemalloc
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest

from bn_export import data as data_module
from bn_export import fit as fit_module
from bn_export.errors import DataError, InvalidInputError
from bn_export.fit import MAX_TRAJECTORY_POINTS, fit

DIGITS = str(files("bn_export") / "demo_data" / "digits.npz")


def _values(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # An offset much larger than the spread: naive float32 sums of squares would lose the variance.
    return (
        rng.normal(size=shape) * rng.uniform(0.5, 2.0, size=shape[1]).reshape(-1, *[1] * (len(shape) - 2))
        + 100
    ).astype(np.float32)


def _reference(values: np.ndarray, axis: int, ddof: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x = np.moveaxis(values.astype(np.float64), axis, -1).reshape(-1, values.shape[axis])
    return x.mean(axis=0), x.var(axis=0, ddof=ddof)


def _write(tmp_path: Path, values: np.ndarray, fmt: str) -> str:
    if fmt == "npy":
        np.save(tmp_path / "x.npy", values)
        return str(tmp_path / "x.npy")
    if fmt == "npz":
        np.savez(tmp_path / "x.npz", data=values)
        return str(tmp_path / "x.npz")
    if fmt == "csv":
        np.savetxt(tmp_path / "x.csv", values, delimiter=",", header="a,b,c", comments="", fmt="%.9g")
        return str(tmp_path / "x.csv")
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, part in enumerate(np.array_split(values, 3)):
        np.save(shards / f"{i:02d}.npy", part)
    return str(shards)


_LAYOUTS = [((103, 3), 1), ((53, 3, 4, 5), 1), ((53, 4, 5, 3), -1)]


@pytest.mark.parametrize(
    ("fmt", "shape", "axis"),
    [
        (fmt, shape, axis)
        for fmt in ("npy", "npz", "csv", "shards")
        for shape, axis in _LAYOUTS
        if fmt != "csv" or len(shape) == 2  # a CSV holds rank-2 data
    ],
)
def test_population_statistics_equal_float64_numpy_for_every_format_and_layout(
    tmp_path: Path, fmt: str, shape: tuple[int, ...], axis: int
) -> None:
    values = _values(shape)
    path = _write(tmp_path, values, fmt)
    if fmt == "csv":
        values = np.loadtxt(path, delimiter=",", skiprows=1)  # the values as written, in float64
    checkpoint = fit(path, stats="population", batch_size=16, axis=axis, epochs=3)
    mean, var = _reference(values, axis)
    np.testing.assert_allclose(checkpoint.moving_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(checkpoint.moving_var, var, rtol=1e-5)
    assert checkpoint.samples_seen == shape[0]  # one pass whatever --epochs says
    assert checkpoint.extras["epochs"] == 1
    np.testing.assert_array_equal(checkpoint.gamma, 1.0)
    np.testing.assert_array_equal(checkpoint.beta, 0.0)


def test_population_statistics_do_not_depend_on_batch_size(tmp_path: Path) -> None:
    values = _values((97, 2, 3), seed=1).astype(np.float64)
    path = _write(tmp_path, values, "npy")
    results = [fit(path, stats="population", batch_size=b, unbiased_moving_var=True) for b in (1, 7, 97, 500)]
    mean, var = _reference(values, 1, ddof=1)
    for checkpoint in results:
        np.testing.assert_allclose(checkpoint.moving_mean, mean, rtol=1e-13)
        np.testing.assert_allclose(checkpoint.moving_var, var, rtol=1e-12)


def test_ema_statistics_follow_the_momentum_recurrence(tmp_path: Path) -> None:
    values = _values((40, 3), seed=2).astype(np.float64)
    path = _write(tmp_path, values, "npy")
    checkpoint = fit(path, stats="ema", batch_size=8, momentum=0.8, epochs=2, seed=5)
    # The same batches, rebuilt independently from the dataset's seeded order.
    dataset = data_module.open_dataset(path)
    mean, var = np.zeros(3), np.ones(3)
    for epoch in range(2):
        for batch in dataset.batches(8, shuffle=True, seed=5, epoch=epoch):
            x = values[batch.indices]
            mean = 0.8 * mean + 0.2 * x.mean(axis=0)
            var = 0.8 * var + 0.2 * x.var(axis=0)
    np.testing.assert_allclose(checkpoint.moving_mean, mean, rtol=1e-12)
    np.testing.assert_allclose(checkpoint.moving_var, var, rtol=1e-12)
    assert (checkpoint.batches_seen, checkpoint.samples_seen) == (10, 80)


def test_cumulative_momentum_over_one_pass_averages_the_batch_means(tmp_path: Path) -> None:
    values = _values((64, 2), seed=3).astype(np.float64)
    checkpoint = fit(_write(tmp_path, values, "npy"), stats="ema", batch_size=16, momentum=None)
    np.testing.assert_allclose(checkpoint.moving_mean, values.mean(axis=0), rtol=1e-12)


def test_same_seed_same_checkpoint_other_seed_other_ema(tmp_path: Path) -> None:
    path = _write(tmp_path, _values((300, 4), seed=4), "npy")

    def run(seed: int) -> tuple[dict[str, object], list[np.ndarray]]:
        checkpoint = fit(path, stats="ema", batch_size=32, epochs=2, seed=seed)
        meta = checkpoint.metadata()
        del meta["created"]
        arrays = [checkpoint.moving_mean, checkpoint.moving_var, checkpoint.trajectory.mean]  # type: ignore[union-attr]
        return meta, arrays

    first, again, other = run(1), run(1), run(2)
    assert first[0] == again[0]
    for a, b in zip(first[1], again[1], strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[1][0], other[1][0])


def test_same_seed_same_trained_head() -> None:
    runs = [fit(DIGITS, targets=DIGITS, head="linear", epochs=1, seed=0, batch_size=128) for _ in range(2)]
    for name in ("gamma", "beta", "moving_mean", "moving_var"):
        np.testing.assert_array_equal(getattr(runs[0], name), getattr(runs[1], name))
    np.testing.assert_array_equal(runs[0].head.weight, runs[1].head.weight)  # type: ignore[union-attr]


def test_trajectory_is_bounded_and_ends_at_the_ema(tmp_path: Path) -> None:
    path = _write(tmp_path, _values((2000, 2), seed=5), "npy")
    checkpoint = fit(path, stats="ema", batch_size=2, epochs=1)
    trajectory = checkpoint.trajectory
    assert trajectory is not None
    assert 2 <= len(trajectory.samples) <= MAX_TRAJECTORY_POINTS + 1
    assert np.all(np.diff(trajectory.samples) > 0)
    assert trajectory.samples[-1] == 2000
    np.testing.assert_array_equal(trajectory.mean[-1], checkpoint.moving_mean)


def test_fitting_a_large_npy_stays_in_bounded_memory(tmp_path: Path) -> None:
    values = np.lib.format.open_memmap(
        tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(4096, 8, 32, 32)
    )
    values[:] = 1.0  # 128 MiB on disk
    values.flush()
    del values
    size = (tmp_path / "big.npy").stat().st_size
    # Importing numba and loading its compiled kernels (the 'fast' extra) is a one-time cost of the
    # process, tens of MiB of Python objects, not memory that grows with the data: taken before tracing.
    fit(tmp_path / "big.npy", stats="population", batch_size=64)
    for stats in ("population", "ema"):
        tracemalloc.start()
        try:
            checkpoint = fit(tmp_path / "big.npy", stats=stats, batch_size=64)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert checkpoint.samples_seen == 4096
        assert peak < size / 8, f"{stats}: peak {peak / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB file"


@pytest.mark.parametrize("stats", ["population", "ema"])
def test_nan_in_the_data_names_the_sample(tmp_path: Path, stats: str) -> None:
    values = _values((50, 3), seed=6)
    values[37, 1] = np.nan
    with pytest.raises(DataError, match=r"sample 37 in batch \d+"):
        fit(_write(tmp_path, values, "npy"), stats=stats, batch_size=8)  # type: ignore[arg-type]


def test_inf_while_training_names_the_sample(tmp_path: Path) -> None:
    values = _values((50, 3), seed=7)
    values[12, 0] = np.inf
    path = _write(tmp_path, values, "npy")
    with pytest.raises(DataError, match="sample 12 in batch"):
        fit(path, targets=np.zeros(50, np.int64), head="linear", batch_size=8)


def test_head_learns_on_the_digits_demo_data() -> None:
    losses = [fit(DIGITS, targets=DIGITS, head="linear", epochs=e, stats="population").extras for e in (1, 3)]
    assert losses[1]["train_loss"] < losses[0]["train_loss"] < np.log(10)  # below chance, and decreasing
    assert losses[1]["train_accuracy"] > 0.85


def test_head_trains_gamma_and_beta_and_regresses_with_mse(tmp_path: Path) -> None:
    values = _values((256, 3, 2, 2), seed=8).astype(np.float64)
    targets = 2.0 * values[:, 0].mean(axis=(1, 2)) - values[:, 2].mean(axis=(1, 2))
    path = _write(tmp_path, values, "npy")
    checkpoint = fit(path, targets=targets, head="linear", loss="mse", epochs=30, batch_size=32, lr=0.05)
    assert checkpoint.head is not None
    assert checkpoint.head.weight.shape == (3, 1)
    assert not np.array_equal(checkpoint.gamma, np.ones(3))
    assert checkpoint.extras["train_loss"] < 0.05 * targets.var()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"epochs": 0}, "epochs"),
        ({"stats": "median"}, "stats"),
        ({"axis": 0}, "batch axis"),
        ({"eps": -1.0}, "eps"),
        ({"momentum": 1.5}, "momentum"),
        ({"head": "linear"}, "targets and a head go together"),
        ({"targets": np.zeros(10)}, "targets and a head go together"),
        ({"targets": np.zeros(9), "head": "linear"}, "9 targets for 10"),
        ({"targets": np.full(10, 0.5), "head": "linear"}, "integer class labels"),
        ({"targets": np.full(10, -1), "head": "linear"}, ">= 0"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    path = _write(tmp_path, _values((10, 2), seed=9), "npy")
    with pytest.raises((InvalidInputError, DataError), match=message):
        fit(path, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("kernels", ["numba", "numpy"])
@pytest.mark.parametrize("stats", ["ema", "population"])
@pytest.mark.parametrize(("shape", "axis"), [((3000, 8), 1), ((700, 3, 4, 4), 1), ((700, 4, 4, 3), -1)])
def test_small_batches_folded_a_group_at_a_time_fit_what_batch_by_batch_fits(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kernels: str,
    stats: str,
    shape: tuple[int, ...],
    axis: int,
) -> None:
    if kernels == "numba":
        pytest.importorskip("numba", reason="the 'fast' extra is not installed")
    monkeypatch.setenv("BN_EXPORT_KERNELS", kernels)
    monkeypatch.setattr(data_module, "SHUFFLE_BLOCK_BYTES", 40_000)  # several blocks and groups
    monkeypatch.setattr(data_module, "GROUP_BYTES", 12_000)
    rng = np.random.default_rng(3)
    np.save(tmp_path / "x.npy", (rng.normal(size=shape) * 2.0 + 5.0).astype(np.float32))
    grouped = fit(tmp_path / "x.npy", stats=stats, batch_size=37, axis=axis, seed=4, epochs=2)
    monkeypatch.setattr(fit_module, "GROUPED_BATCH_BYTES", 0)  # every batch on its own
    single = fit(tmp_path / "x.npy", stats=stats, batch_size=37, axis=axis, seed=4, epochs=2)
    assert (grouped.batches_seen, grouped.samples_seen) == (single.batches_seen, single.samples_seen)
    np.testing.assert_allclose(grouped.moving_mean, single.moving_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grouped.moving_var, single.moving_var, rtol=1e-6)
    assert grouped.trajectory is not None
    assert single.trajectory is not None
    np.testing.assert_array_equal(grouped.trajectory.samples, single.trajectory.samples)
    np.testing.assert_allclose(grouped.trajectory.mean, single.trajectory.mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grouped.trajectory.var, single.trajectory.var, rtol=1e-6)


def test_a_nan_in_a_grouped_batch_is_named_and_no_statistics_are_folded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = np.ones((5000, 4), dtype=np.float32)
    x[4321, 2] = np.nan
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(DataError, match=r"4321"):
        fit(tmp_path / "x.npy", stats="population", batch_size=64)
