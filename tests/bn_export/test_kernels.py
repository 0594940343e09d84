"""The compiled block sums: which batches take them, and that they sum what the NumPy path sums."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bn_export.errors import InvalidInputError
from bn_export.kernels import ENV_VAR, MIN_VALUES, block_sums
from bn_export.moments import Moments, per_batch_moments

numba = pytest.importorskip("numba", reason="the 'fast' extra is not installed")

F32 = np.dtype(np.float32)


def test_auto_takes_the_kernels_for_large_batches_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert block_sums(MIN_VALUES - 1, F32, channels_last=False) is None
    assert block_sums(MIN_VALUES, F32, channels_last=False) is not None
    assert block_sums(MIN_VALUES, F32, channels_last=True) is not block_sums(MIN_VALUES, F32, False)


@pytest.mark.parametrize(
    ("choice", "dtype", "taken"),
    [
        ("numba", np.float32, True),
        ("numba", np.float64, True),
        ("numba", np.float16, False),  # numba has no float16 arithmetic on the CPU
        ("numba", np.dtype(">f4"), False),  # nor non-native byte orders
        ("numpy", np.float32, False),
        (" NumPy ", np.float32, False),
    ],
)
def test_the_choice_and_the_dtype_decide_the_path(
    monkeypatch: pytest.MonkeyPatch, choice: str, dtype: Any, taken: bool
) -> None:
    monkeypatch.setenv(ENV_VAR, choice)
    assert (block_sums(10, np.dtype(dtype), channels_last=False) is not None) is taken


def test_an_unknown_choice_is_refused_with_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "fortran")
    with pytest.raises(InvalidInputError, match="auto, numba, numpy"):
        Moments.from_batch(np.ones((4, 2), dtype=np.float32), 1)


@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        ((64, 16, 32, 32), 1),  # NCHW: row blocks, whole rows
        ((4, 3, 100_000), 1),  # rows longer than a block: several column blocks per row block
        ((300_000, 5), -1),  # channels-last, many row blocks
        ((700, 9, 3, 3), 1),  # short rows
    ],
)
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_kernels_agree_with_the_numpy_path_to_float64_rounding(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], axis: int, offset: float
) -> None:
    rng = np.random.default_rng(sum(shape))
    x = (rng.normal(size=shape) * 2.5 + offset).astype(np.float32)
    x[: shape[0] // 3] += np.float32(50.0)  # blocks about different centres: the re-summing path too
    monkeypatch.setenv(ENV_VAR, "numpy")
    reference = Moments.from_batch(x, axis, workers=1)
    monkeypatch.setenv(ENV_VAR, "numba")
    compiled = Moments.from_batch(x, axis, workers=1)
    assert compiled.count == reference.count
    np.testing.assert_allclose(compiled.mean, reference.mean, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(compiled.m2, reference.m2, rtol=1e-13)


def test_a_non_contiguous_batch_is_summed_through_its_strides(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(4).normal(size=(40, 6, 30, 30)).astype(np.float32)[::2, :, ::3, 1:]
    monkeypatch.setenv(ENV_VAR, "numba")
    compiled = Moments.from_batch(x, 1, workers=1)
    table = np.moveaxis(x.astype(np.float64), 1, -1).reshape(-1, 6)
    np.testing.assert_allclose(compiled.mean, table.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(compiled.m2, ((table - table.mean(axis=0)) ** 2).sum(axis=0), rtol=1e-12)


def test_the_cli_names_a_bad_choice_in_one_line(tmp_path: Path) -> None:
    data = tmp_path / "x.npy"
    np.save(data, np.ones((8, 3), dtype=np.float32))
    result = subprocess.run(
        [sys.executable, "-m", "bn_export.cli", "fit", str(data), "--out", str(tmp_path / "c.npz")],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", ENV_VAR: "fortran"},
        check=False,
    )
    assert result.returncode == 2
    assert ENV_VAR in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "c.npz").exists()


@pytest.mark.parametrize(
    ("shape", "axis", "batch"),
    [((1000, 7), 1, 64), ((300, 3, 9, 9), 1, 32), ((90, 6, 5, 4), -1, 16), ((50, 2, 700), 1, 50)],
)
def test_per_batch_moments_are_each_batch_s_moments(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], axis: int, batch: int
) -> None:
    monkeypatch.setenv(ENV_VAR, "numba")
    rng = np.random.default_rng(len(shape))
    x = (rng.normal(size=shape) * 3.0 + 2e3).astype(np.float32)
    x[shape[0] // 2 :] -= np.float32(4e3)  # later batches far from the pilot shift: summed again
    rows = per_batch_moments(x, axis, batch)
    assert rows is not None
    counts, means, m2s = rows
    starts = range(0, shape[0], batch)
    assert len(counts) == len(starts)
    for g, start in enumerate(starts):
        alone = Moments.from_batch(x[start : start + batch], axis, workers=1)
        assert counts[g] == alone.count
        np.testing.assert_allclose(means[g], alone.mean, rtol=1e-14)
        np.testing.assert_allclose(m2s[g], alone.m2, rtol=1e-12)


def test_per_batch_moments_leave_it_to_the_caller_without_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "numpy")
    assert per_batch_moments(np.ones((10, 3), dtype=np.float32), 1, 4) is None
