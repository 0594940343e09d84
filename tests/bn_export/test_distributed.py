"""The Dask engine: population statistics over shards equal the float64 two-pass formulas, for any split.

A real `LocalCluster` (two worker processes on 127.0.0.1) runs every fit; the references are numpy's
float64 `mean`/`var` over the concatenated data. The sources are `.npy` shards and Zarr arrays (the Zarr
tests skip where zarr is not installed).
"""

from __future__ import annotations

import itertools
import os
import pickle
import re
import sys
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
from bn_export.distributed import (  # noqa: E402
    Block,
    ZarrBlock,
    fit_population_dask,
    local_cluster,
    reduce_block,
    reduce_zarr_block,
)
from bn_export.errors import DataError, InvalidInputError, MissingDependencyError  # noqa: E402
from bn_export.fit import fit  # noqa: E402

RTOL = 1e-12


def _assert_same_fit(dask: Any, local: Any, dtype: Any) -> None:
    """The Dask checkpoint holds the single-machine fit's statistics and metadata."""
    assert dask.moving_mean.dtype == local.moving_mean.dtype
    rtol = RTOL if dtype == np.float64 else 1e-6  # float32 storage: each side rounds once
    np.testing.assert_allclose(dask.moving_mean, local.moving_mean, rtol=rtol)
    np.testing.assert_allclose(dask.moving_var, local.moving_var, rtol=rtol)
    for field in ("axis", "sample_shape", "stats", "eps", "samples_seen", "data_fingerprint"):
        assert getattr(dask, field) == getattr(local, field), field
    assert dask.extras["population_count"] == local.extras["population_count"]


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
    _assert_same_fit(dask, local, dtype)


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


# Zarr arrays as the source: read by the workers in blocks of whole chunks along the batch axis.


@pytest.fixture(scope="module")
def zarr() -> Any:
    return pytest.importorskip("zarr")


def _write_zarr(
    zarr: Any, path: Path, x: np.ndarray, chunks: tuple[int, ...], zarr_format: int = 3, **kwargs: Any
) -> Any:
    array = zarr.create_array(
        store=str(path), shape=x.shape, chunks=chunks, dtype=x.dtype, zarr_format=zarr_format, **kwargs
    )
    array[:] = x
    return array


def _chunk_files(path: Path) -> list[Path]:
    """The chunk (or shard) objects of a Zarr directory store, metadata files left out."""
    metadata = {"zarr.json", ".zarray", ".zattrs", ".zgroup"}
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name not in metadata)


@st.composite
def _chunked_data(draw: st.DrawFn) -> tuple[np.ndarray, int, tuple[int, ...], int, int]:
    """Data (N, C, *spatial), its channel axis, a chunk shape over every axis, a block size, a Zarr format."""
    n = draw(st.integers(2, 30))
    channels = draw(st.integers(1, 4))
    spatial = draw(st.sampled_from([(), (3,), (2, 3)]))
    channels_last = draw(st.booleans())
    shape = (n, *spatial, channels) if channels_last else (n, channels, *spatial)
    chunks = tuple(draw(st.integers(1, size)) for size in shape)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.normal(100.0, 0.5, size=shape) + rng.normal(0.0, 3.0)  # offset mean, small spread
    return x, (-1 if channels_last else 1), chunks, draw(st.integers(1, n)), draw(st.sampled_from([2, 3]))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_chunked_data())
def test_zarr_statistics_equal_the_float64_reference_for_any_chunking(
    client: Any, zarr: Any, case: tuple[np.ndarray, int, tuple[int, ...], int, int]
) -> None:
    x, axis, chunks, block, zarr_format = case
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "x.zarr"
        _write_zarr(zarr, store, x, chunks, zarr_format)
        checkpoint = fit_population_dask(store, axis=axis, block_samples=block, client=client)
    mean, var = _reference(x, axis)
    np.testing.assert_allclose(checkpoint.moving_mean, mean, rtol=RTOL, atol=0)
    np.testing.assert_allclose(checkpoint.moving_var, var, rtol=RTOL, atol=0)
    assert checkpoint.samples_seen == len(x)
    # Blocks are whole chunk rows: the block size rounded down to whole chunks, one at least.
    block_samples = max(1, block // chunks[0]) * chunks[0]
    assert checkpoint.extras["block_samples"] == block_samples
    assert checkpoint.extras["partitions"] == checkpoint.batches_seen == -(-len(x) // block_samples)
    assert checkpoint.extras["zarr_format"] == zarr_format


@pytest.mark.parametrize(("dtype", "axis"), [(np.float64, 1), (np.float64, -1), (np.float32, 1)])
def test_zarr_fit_equals_the_single_machine_fit_of_the_same_samples_as_npy(
    client: Any, zarr: Any, tmp_path: Path, dtype: type[np.floating[Any]], axis: int
) -> None:
    x = np.random.default_rng(10).normal(-4.0, 0.25, size=(45, 3, 2, 4)).astype(dtype)
    np.save(tmp_path / "x.npy", x)
    # Chunked on every axis, so each task reads whole samples from several chunks.
    _write_zarr(zarr, tmp_path / "x.zarr", x, (7, 2, 1, 3))
    local = fit(tmp_path / "x.npy", stats="population", batch_size=16, axis=axis)
    dask = fit_population_dask(tmp_path / "x.zarr", axis=axis, client=client, block_samples=14)
    _assert_same_fit(dask, local, dtype)
    assert dask.extras["engine"] == "dask"
    assert dask.extras["partitions"] == 4  # blocks of 14 samples: two chunks of 7
    assert dask.extras["zarr_chunks"] == [7, 2, 1, 3]


def test_zarr_fingerprint_of_a_large_array_equals_that_of_the_same_samples_as_npy(
    client: Any, zarr: Any, tmp_path: Path
) -> None:
    # 6 MiB: above the size hashed whole, so the fingerprint samples blocks spread over the array.
    x = np.random.default_rng(11).normal(size=(3072, 256)).astype(np.float64)
    np.save(tmp_path / "x.npy", x)
    _write_zarr(zarr, tmp_path / "x.zarr", x, (100, 64))
    checkpoint = fit_population_dask(tmp_path / "x.zarr", client=client)
    assert checkpoint.data_fingerprint == open_dataset(tmp_path / "x.npy").fingerprint()
    np.testing.assert_allclose(checkpoint.moving_var, _reference(x, 1)[1], rtol=RTOL)


def test_zarr_sharded_array_and_group_with_an_array_named_data(
    client: Any, zarr: Any, tmp_path: Path
) -> None:
    x = np.random.default_rng(12).normal(3.0, 2.0, size=(23, 4, 3))
    sharded = _write_zarr(zarr, tmp_path / "s.zarr", x, (2, 2, 3), shards=(6, 4, 3))
    assert sharded.shards == (6, 4, 3)
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("labels", shape=(23,), dtype="i8")
    group.create_array("data", shape=x.shape, chunks=(5, 4, 3), dtype=x.dtype)[:] = x
    mean, var = _reference(x, 1)
    by_shards = fit_population_dask(tmp_path / "s.zarr", client=client, block_samples=1)
    by_group = fit_population_dask(str(tmp_path / "g.zarr"), client=client)
    for checkpoint in (by_shards, by_group):
        np.testing.assert_allclose(checkpoint.moving_mean, mean, rtol=RTOL)
        np.testing.assert_allclose(checkpoint.moving_var, var, rtol=RTOL)
    assert by_shards.extras["partitions"] == 4  # a shard (6 samples) is the unit, not its inner chunks
    assert by_shards.extras["zarr_chunks"] == [6, 4, 3]


def test_zarr_missing_chunk_fails_naming_it_unless_read_as_the_fill_value(
    client: Any, zarr: Any, tmp_path: Path
) -> None:
    x = np.random.default_rng(13).normal(size=(12, 2))
    store = tmp_path / "x.zarr"
    _write_zarr(zarr, store, x, (4, 2))
    (store / "c" / "1" / "0").unlink()  # samples 4..7, lost as in an interrupted copy
    with pytest.raises(DataError, match=r"x\.zarr: chunk c/1/0 \(grid position \(1, 0\)\) is missing"):
        fit_population_dask(store, client=client, retries=0)

    filled = fit_population_dask(store, client=client, missing_chunks="fill")
    x[4:8] = 0.0  # the fill value
    np.testing.assert_allclose(filled.moving_var, _reference(x, 1)[1], rtol=RTOL)
    assert filled.extras["zarr_missing_chunks"] == "fill"


def test_zarr_array_whose_all_fill_chunks_were_skipped_by_the_writer_fits_with_fill(
    client: Any, zarr: Any, tmp_path: Path
) -> None:
    x = np.random.default_rng(14).normal(size=(9, 2, 3)).astype(np.float32)
    x[3:6] = 0.0
    _write_zarr(zarr, tmp_path / "x.zarr", x, (3, 2, 3))  # zarr writes no chunk holding only zeros
    assert len(_chunk_files(tmp_path / "x.zarr")) == 2
    with pytest.raises(DataError, match=r"chunk c/1/0/0 .*write_empty_chunks"):
        fit_population_dask(tmp_path / "x.zarr", client=client, retries=0)
    checkpoint = fit_population_dask(tmp_path / "x.zarr", client=client, missing_chunks="fill")
    np.testing.assert_allclose(checkpoint.moving_mean, _reference(x, 1)[0].astype(np.float32), rtol=1e-6)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_corrupt_chunk_fails_naming_the_array_and_the_chunk(
    client: Any, zarr: Any, tmp_path: Path, zarr_format: int
) -> None:
    store = tmp_path / "x.zarr"
    array = _write_zarr(zarr, store, np.ones((12, 2)), (4, 2), zarr_format)
    key = array.metadata.encode_chunk_key((2, 0))
    (store / key).write_bytes(b"not zstd")
    with pytest.raises(
        DataError, match=rf"x\.zarr: chunk {re.escape(key)} \(samples 8\.\.11\) cannot be read"
    ):
        fit_population_dask(store, client=client, retries=0)
    # The worker's own read names the chunk too (the driver's fingerprint may have found it first above).
    block = ZarrBlock(str(store), "", 8, 12, (12, 2), "<f8", fill_missing=False)
    with pytest.raises(DataError, match=rf"x\.zarr: chunk {re.escape(key)} \(samples 8\.\.11\)"):
        reduce_zarr_block(block, 1, (2,))


def test_zarr_nan_found_by_a_worker_fails_naming_the_array_and_samples(
    client: Any, zarr: Any, tmp_path: Path
) -> None:
    x = np.ones((20, 2))
    x[13, 1] = np.nan
    _write_zarr(zarr, tmp_path / "x.zarr", x, (5, 1))
    with pytest.raises(DataError, match=r"x\.zarr: samples 10\.\.14: .*NaN"):
        fit_population_dask(tmp_path / "x.zarr", client=client, block_samples=5, retries=0)


def test_zarr_array_changed_behind_the_driver_fails_on_the_worker_naming_it(
    zarr: Any, tmp_path: Path
) -> None:
    _write_zarr(zarr, tmp_path / "x.zarr", np.zeros((8, 5)), (4, 5))  # 5 channels where 3 were planned
    block = ZarrBlock(str(tmp_path / "x.zarr"), "", 0, 4, (8, 3), "<f8", fill_missing=False)
    with pytest.raises(DataError, match=r"x\.zarr: shape \(8, 5\) .* on this worker, expected \(8, 3\)"):
        reduce_zarr_block(block, 1, (3,))


def test_zarr_sources_that_cannot_be_fitted_fail_naming_the_array(zarr: Any, tmp_path: Path) -> None:
    # Each is refused by the driver from the metadata, before any task (so no client is needed).
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(DataError, match=r"empty\.zarr: not a readable Zarr array"):
        fit_population_dask(tmp_path / "empty.zarr")
    with pytest.raises(DataError, match=r"absent\.zarr: no Zarr directory store"):
        fit_population_dask(tmp_path / "absent.zarr")
    zarr.open_group(str(tmp_path / "group.zarr"), mode="w").create_array("features", shape=(4, 2), dtype="f8")
    with pytest.raises(
        DataError, match=r"group\.zarr: a Zarr group without an array named 'data' .*features"
    ):
        fit_population_dask(tmp_path / "group.zarr")
    _write_zarr(zarr, tmp_path / "ints.zarr", np.arange(8, dtype=np.int32).reshape(4, 2), (2, 2))
    with pytest.raises(DataError, match=r"ints\.zarr: Zarr array of dtype int32, expected floating-point"):
        fit_population_dask(tmp_path / "ints.zarr")
    _write_zarr(zarr, tmp_path / "flat.zarr", np.zeros(6), (3,))
    with pytest.raises(
        DataError, match=r"flat\.zarr: Zarr array of shape \(6,\) \(rank 1\), expected rank 2"
    ):
        fit_population_dask(tmp_path / "flat.zarr")
    _write_zarr(zarr, tmp_path / "x.zarr", np.zeros((4, 2)), (2, 2))
    with pytest.raises(InvalidInputError, match="batch axis"):
        fit_population_dask(tmp_path / "x.zarr", axis=0)


class _TouchOnUnpickle:
    """Unpickling this creates the file `path`: proof that a chunk was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return (Path.touch, (self.path,))


def test_zarr_array_with_a_pickle_codec_is_refused_unread(zarr: Any, tmp_path: Path) -> None:
    numcodecs = pytest.importorskip("numcodecs")
    store, marker = tmp_path / "x.zarr", tmp_path / "unpickled"
    _write_zarr(zarr, store, np.zeros((4, 2)), (2, 2), zarr_format=2, filters=[numcodecs.Pickle()])
    payload = numcodecs.Zstd().encode(pickle.dumps(_TouchOnUnpickle(marker)))
    for chunk in _chunk_files(store):
        chunk.write_bytes(payload)  # what the pickle filter would decode, after zstd
    with pytest.raises(DataError, match=r"x\.zarr: .*pickle"):
        fit_population_dask(store)
    with pytest.raises(DataError, match="pickle"):
        reduce_zarr_block(ZarrBlock(str(store), "", 0, 2, (4, 2), "<f8", fill_missing=False), 1, (2,))
    assert not marker.exists()


def test_zarr_without_zarr_installed_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "x.zarr").mkdir()
    monkeypatch.setitem(sys.modules, "zarr", None)  # makes `import zarr` raise ImportError
    with pytest.raises(MissingDependencyError, match=r"zarr>=3: pip install 'frozen-bn\[dask\]'"):
        fit_population_dask(tmp_path / "x.zarr")


def test_cli_fits_a_zarr_array_whose_checkpoint_exports_and_verifies(
    client: Any, zarr: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = np.random.default_rng(15).normal(1.0, 2.0, size=(30, 3, 4)).astype(np.float32)
    _write_zarr(zarr, tmp_path / "x.zarr", x, (8, 3, 2))
    ckpt, model = tmp_path / "c.npz", tmp_path / "model.onnx"
    address = client.scheduler.address
    argv = ["fit", str(tmp_path / "x.zarr"), "--engine", "dask", "--scheduler", address]
    assert main([*argv, "--stats", "population", "--out", str(ckpt)]) == 0
    assert "a Zarr array in chunks of (8, 3, 2)" in capsys.readouterr().out
    checkpoint = load_checkpoint(ckpt)
    np.testing.assert_allclose(checkpoint.moving_var, _reference(x, 1)[1].astype(np.float32), rtol=1e-6)
    assert checkpoint.extras["engine"] == "dask"
    assert checkpoint.extras["partitions"] == 1  # the default block (64 MiB of float64) holds every chunk
    assert main(["export", str(ckpt), "--out", str(model)]) == 0
    assert main(["verify", str(model)]) == 0


def test_cli_writes_no_checkpoint_when_a_zarr_chunk_is_missing(
    client: Any, zarr: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "x.zarr"
    _write_zarr(zarr, store, np.ones((8, 2)), (4, 2))
    (store / "c" / "1" / "0").unlink()
    out = tmp_path / "out" / "c.npz"
    address = client.scheduler.address
    argv = ["fit", str(store), "--engine", "dask", "--scheduler", address, "--stats", "population"]
    assert main([*argv, "--out", str(out)]) == 2
    assert "chunk c/1/0" in capsys.readouterr().err
    assert not out.exists()
    assert main([*argv, "--zarr-missing-chunks", "fill", "--out", str(out)]) == 0
    np.testing.assert_allclose(load_checkpoint(out).moving_mean, [0.5, 0.5], rtol=RTOL)
    # The option means nothing for .npy data or the local engine, so it is refused there.
    np.save(tmp_path / "x.npy", np.ones((8, 2)))
    npy = ["fit", str(tmp_path / "x.npy"), "--stats", "population", "--zarr-missing-chunks", "fill"]
    assert main([*npy, "--engine", "dask", "--out", str(tmp_path / "n.npz")]) == 2
    assert main([*npy, "--out", str(tmp_path / "n.npz")]) == 2
    assert capsys.readouterr().err.count("--zarr-missing-chunks is for a Zarr array") == 2
    assert not (tmp_path / "n.npz").exists()
    assert main(["fit", str(store), "--stats", "population", "--out", str(tmp_path / "n.npz")]) == 2
    assert "a Zarr array is read by --engine dask" in capsys.readouterr().err
