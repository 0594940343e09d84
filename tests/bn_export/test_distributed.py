"""The Dask engine: population statistics over shards equal the float64 two-pass formulas, for any split.

A real `LocalCluster` (two worker processes on 127.0.0.1) runs every fit; the references are numpy's
float64 `mean`/`var` over the concatenated data.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

distributed = pytest.importorskip("distributed")

from distributed import WorkerPlugin  # noqa: E402

from bn_export.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from bn_export.cli import main  # noqa: E402
from bn_export.data import open_dataset  # noqa: E402
from bn_export.distributed import Block, fit_population_dask, local_cluster, reduce_block  # noqa: E402
from bn_export.errors import DataError, InvalidInputError  # noqa: E402
from bn_export.fit import fit  # noqa: E402

RTOL = 1e-12
CLUSTER_TIMEOUT_S = 60


def _cluster() -> Any:
    return local_cluster(n_workers=2, threads_per_worker=1)


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with _cluster() as cluster, distributed.Client(cluster, timeout=CLUSTER_TIMEOUT_S) as connected:
        yield connected


def _write_shards(directory: Path, x: np.ndarray, cuts: list[int]) -> list[Path]:
    """Save `x` split at the sorted sample positions `cuts` as shard-000.npy, shard-001.npy, ..."""
    bounds = [0, *cuts, len(x)]
    paths = []
    for i, (start, stop) in enumerate(itertools.pairwise(bounds)):
        path = directory / f"shard-{i:03d}.npy"
        np.save(path, x[start:stop])
        paths.append(path)
    return paths


def _reference(x: np.ndarray, axis: int, ddof: int = 0) -> tuple[np.ndarray, np.ndarray]:
    reduce = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    x64 = x.astype(np.float64)
    return x64.mean(axis=reduce), x64.var(axis=reduce, ddof=ddof)


@st.composite
def _sharded_data(draw: st.DrawFn) -> tuple[np.ndarray, int, list[int], int]:
    """Data (N, C, *spatial) with an offset mean, channel axis, shard cut points and a block size."""
    n = draw(st.integers(2, 40))
    channels = draw(st.integers(1, 4))
    spatial = draw(st.sampled_from([(), (3,), (2, 3)]))
    channels_last = draw(st.booleans())
    shape = (n, *spatial, channels) if channels_last else (n, channels, *spatial)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # A large offset against a small spread: the case where a one-pass Σx² formula would lose digits.
    x = rng.normal(100.0, 0.5, size=shape) + rng.normal(0.0, 3.0)
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=min(6, n - 1))))
    block = draw(st.integers(1, n))
    return x, (-1 if channels_last else 1), cuts, block


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_sharded_data())
def test_statistics_equal_the_float64_reference_for_any_sharding_and_block_size(
    client: Any, case: tuple[np.ndarray, int, list[int], int]
) -> None:
    x, axis, cuts, block = case
    with tempfile.TemporaryDirectory() as tmp:
        _write_shards(Path(tmp), x, cuts)
        checkpoint = fit_population_dask(tmp, axis=axis, block_samples=block, client=client)
    mean, var = _reference(x, axis)
    np.testing.assert_allclose(checkpoint.moving_mean, mean, rtol=RTOL, atol=0)
    np.testing.assert_allclose(checkpoint.moving_var, var, rtol=RTOL, atol=0)
    assert checkpoint.samples_seen == len(x)
    assert (
        checkpoint.extras["partitions"]
        == checkpoint.batches_seen
        == sum(-(-(stop - start) // block) for start, stop in zip([0, *cuts], [*cuts, len(x)], strict=True))
    )


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_checkpoint_equals_the_single_machine_population_fit(
    client: Any, tmp_path: Path, dtype: type[np.floating[Any]]
) -> None:
    x = np.random.default_rng(8).normal(-4.0, 0.25, size=(45, 3, 2, 2)).astype(dtype)
    _write_shards(tmp_path, x, [4, 5, 30])
    local = fit(tmp_path, stats="population", batch_size=16)
    dask = fit_population_dask(tmp_path, client=client, block_samples=6)
    assert dask.moving_mean.dtype == local.moving_mean.dtype
    rtol = RTOL if dtype == np.float64 else 1e-6  # float32 storage: each side rounds once
    np.testing.assert_allclose(dask.moving_mean, local.moving_mean, rtol=rtol)
    np.testing.assert_allclose(dask.moving_var, local.moving_var, rtol=rtol)
    for field in ("axis", "sample_shape", "stats", "eps", "samples_seen", "data_fingerprint"):
        assert getattr(dask, field) == getattr(local, field), field
    assert dask.extras["population_count"] == local.extras["population_count"]


def test_checkpoint_is_a_population_fit_with_identity_affine_and_the_dataset_fingerprint(
    client: Any, tmp_path: Path
) -> None:
    x = np.random.default_rng(1).normal(2.0, 3.0, size=(50, 3, 4, 4)).astype(np.float32)
    _write_shards(tmp_path, x, [10, 35])
    checkpoint = fit_population_dask(tmp_path, client=client, block_samples=8)

    assert checkpoint.stats == "population"
    assert checkpoint.momentum is None
    assert (checkpoint.axis, checkpoint.sample_shape) == (1, (3, 4, 4))
    assert checkpoint.gamma.dtype == np.float32
    np.testing.assert_array_equal(checkpoint.gamma, np.ones(3, np.float32))
    np.testing.assert_array_equal(checkpoint.beta, np.zeros(3, np.float32))
    mean, var = _reference(x, 1)
    np.testing.assert_allclose(checkpoint.moving_mean, mean.astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(checkpoint.moving_var, var.astype(np.float32), rtol=1e-6)
    # Same fingerprint as the single-machine path reading the same directory.
    assert checkpoint.data_fingerprint == open_dataset(tmp_path).fingerprint()
    assert checkpoint.extras["engine"] == "dask"
    assert checkpoint.extras["shards"] == 3

    loaded = load_checkpoint(save_checkpoint(checkpoint, tmp_path / "out" / "ckpt.npz"))
    assert loaded.extras["engine"] == "dask"
    assert loaded.extras["partitions"] == checkpoint.extras["partitions"] == 2 + 4 + 2


def test_unbiased_moving_var_divides_by_count_minus_one(client: Any, tmp_path: Path) -> None:
    x = np.random.default_rng(2).normal(size=(9, 2, 3))
    _write_shards(tmp_path, x, [4])
    checkpoint = fit_population_dask(tmp_path, client=client, unbiased_moving_var=True, block_samples=3)
    np.testing.assert_allclose(checkpoint.moving_var, _reference(x, 1, ddof=1)[1], rtol=RTOL)
    assert checkpoint.unbiased_moving_var


def test_glob_and_explicit_list_select_the_same_shards(client: Any, tmp_path: Path) -> None:
    x = np.random.default_rng(3).normal(size=(30, 2))
    paths = _write_shards(tmp_path, x, [10, 20])
    np.save(tmp_path / "other.npy", np.full((5, 2), 1e6))  # not matched by the glob below
    by_glob = fit_population_dask(str(tmp_path / "shard-*.npy"), client=client)
    by_list = fit_population_dask(paths, client=client)
    np.testing.assert_allclose(by_glob.moving_mean, _reference(x, 1)[0], rtol=RTOL)
    np.testing.assert_array_equal(by_glob.moving_mean, by_list.moving_mean)
    np.testing.assert_array_equal(by_glob.moving_var, by_list.moving_var)


def test_scheduler_address_connects_to_a_running_cluster(client: Any, tmp_path: Path) -> None:
    x = np.random.default_rng(4).normal(size=(12, 3))
    _write_shards(tmp_path, x, [5])
    checkpoint = fit_population_dask(tmp_path, scheduler=client.scheduler.address)
    np.testing.assert_allclose(checkpoint.moving_var, _reference(x, 1)[1], rtol=RTOL)


def test_exported_graph_passes_verification(client: Any, tmp_path: Path) -> None:
    export = pytest.importorskip("bn_export.export")
    verify = pytest.importorskip("bn_export.verify")
    x = np.random.default_rng(5).normal(1.0, 2.0, size=(20, 4, 3, 3)).astype(np.float32)
    _write_shards(tmp_path, x, [7])
    checkpoint = fit_population_dask(tmp_path, client=client)
    model = tmp_path / "model.onnx"
    export.export_onnx(checkpoint, model)
    assert verify.verify_model(model).passed


class _KillFirstBlockTask(WorkerPlugin):
    """Kills the worker process the first time any worker starts a block task (once, via a marker file)."""

    name = "kill-first-block-task"

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if finish != "executing" or "bn-block" not in str(key):
            return
        try:  # O_EXCL: of the two workers, only the first to get here dies
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os._exit(1)


def test_worker_killed_mid_fit_is_replaced_and_the_result_is_unchanged(client: Any, tmp_path: Path) -> None:
    x = np.random.default_rng(6).normal(5.0, 2.0, size=(64, 3, 2))
    _write_shards(tmp_path, x, [16, 32, 48])
    expected = fit_population_dask(tmp_path, client=client, block_samples=4)
    marker = tmp_path / "killed"
    with _cluster() as cluster, distributed.Client(cluster, timeout=CLUSTER_TIMEOUT_S) as fragile:
        fragile.register_plugin(_KillFirstBlockTask(str(marker)))
        survived = fit_population_dask(tmp_path, client=fragile, block_samples=4)
    assert marker.exists(), "no worker was killed; the test did not exercise a lost worker"
    # The merge tree's shape is fixed by block order, so rerunning lost tasks changes no bit.
    np.testing.assert_array_equal(survived.moving_mean, expected.moving_mean)
    np.testing.assert_array_equal(survived.moving_var, expected.moving_var)


def test_shard_with_a_corrupt_header_fails_naming_it(client: Any, tmp_path: Path) -> None:
    _write_shards(tmp_path, np.zeros((10, 2)), [5])
    bad = tmp_path / "shard-001.npy"
    raw = bytearray(bad.read_bytes())
    raw[10:20] = b"#garbage#!"  # inside the header's dict literal
    bad.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"shard-001\.npy"):
        fit_population_dask(tmp_path, client=client)


def test_shard_with_another_channel_count_fails_naming_it(client: Any, tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((4, 3, 2)))
    np.save(tmp_path / "b.npy", np.zeros((4, 5, 2)))
    with pytest.raises(DataError, match=r"b\.npy: 5 channels on axis 1 .* expected 3"):
        fit_population_dask(tmp_path, client=client)


def test_nan_found_by_a_worker_fails_naming_the_shard_and_samples(client: Any, tmp_path: Path) -> None:
    x = np.ones((20, 2))
    x[13, 1] = np.nan
    _write_shards(tmp_path, x, [10])
    with pytest.raises(DataError, match=r"shard-001\.npy: samples 3\.\.5: .*NaN"):
        fit_population_dask(tmp_path, client=client, block_samples=3, retries=0)


def test_a_shard_changed_behind_the_driver_fails_on_the_worker_naming_it(tmp_path: Path) -> None:
    np.save(tmp_path / "s.npy", np.zeros((3, 2)))
    with pytest.raises(DataError, match=r"s\.npy: shape \(3, 2\) on this worker, expected at least 5"):
        reduce_block(Block(str(tmp_path / "s.npy"), 0, 5), 1, (2,))


def test_bad_arguments_are_refused_before_any_work(client: Any, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no \.npy shards"):
        fit_population_dask(tmp_path, client=client)
    np.save(tmp_path / "s.npy", np.zeros((3, 2)))
    with pytest.raises(InvalidInputError, match="block_samples"):
        fit_population_dask(tmp_path, client=client, block_samples=0)
    with pytest.raises(InvalidInputError, match="batch axis"):
        fit_population_dask(tmp_path, client=client, axis=0)
    with pytest.raises(InvalidInputError, match="not both"):
        fit_population_dask(tmp_path, client=client, scheduler="tcp://127.0.0.1:1")


@pytest.mark.slow
def test_without_a_scheduler_a_private_local_cluster_runs_the_fit(tmp_path: Path) -> None:
    x = np.random.default_rng(7).normal(size=(10, 2))
    _write_shards(tmp_path, x, [3])
    checkpoint = fit_population_dask(tmp_path)
    np.testing.assert_allclose(checkpoint.moving_mean, _reference(x, 1)[0], rtol=RTOL)


def test_cli_dask_engine_writes_the_population_checkpoint(
    client: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = np.random.default_rng(9).normal(size=(24, 3, 2))
    _write_shards(tmp_path, x, [10])
    out = tmp_path / "ckpt.npz"
    address = client.scheduler.address
    argv = ["fit", str(tmp_path), "--engine", "dask", "--scheduler", address, "--stats", "population"]
    assert main([*argv, "--out", str(out)]) == 0
    checkpoint = load_checkpoint(out)
    np.testing.assert_allclose(checkpoint.moving_var, _reference(x, 1)[1], rtol=RTOL)
    assert checkpoint.extras["engine"] == "dask"
    assert "population on dask" in capsys.readouterr().out


def test_cli_dask_engine_writes_no_checkpoint_when_a_shard_is_bad(
    client: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "a.npy", np.zeros((4, 3)))
    np.save(tmp_path / "b.npy", np.zeros((4, 2)))
    out = tmp_path / "out" / "ckpt.npz"
    address = client.scheduler.address
    argv = ["fit", str(tmp_path), "--engine", "dask", "--scheduler", address, "--stats", "population"]
    assert main([*argv, "--out", str(out)]) == 2
    assert "b.npy" in capsys.readouterr().err
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_cli_dask_engine_refuses_what_it_cannot_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "a.npy", np.zeros((4, 3)))
    out = tmp_path / "ckpt.npz"
    assert main(["fit", str(tmp_path), "--engine", "dask", "--out", str(out)]) == 2  # --stats ema
    assert "--stats population" in capsys.readouterr().err
    assert main(["fit", str(tmp_path), "--scheduler", "tcp://127.0.0.1:1", "--out", str(out)]) == 2
    assert "--engine dask" in capsys.readouterr().err
    assert not out.exists()
