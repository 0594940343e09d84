"""Population statistics on a Dask cluster, for datasets spread over more shards than one machine reads.

The fit is the single-machine population fit, split: every shard `.npy` (x: (N_i, *sample_shape)) is cut
into blocks of whole samples along the batch axis; one task per block opens its shard with `mmap` on the
worker, reduces the block to partial moments (count, mean, M2 per channel, float64) and returns only those
(C,) vectors; the partials merge with the exact pairwise update of Chan et al. (`Moments.merge`) up a
`dask.delayed` tree of fan-in `split_every`. The driver reads only the `.npy` headers (shapes, dtypes),
never the samples, so the data must sit where the workers see it under the same paths.

Why a hand-built `dask.delayed` tree and not `dask.array.reduction` or `dask.bag.reduction`: the partials
are not arrays but (count, mean, M2) triples whose merge is not elementwise, `dask.array` would also have to
know every chunk's shape up front and re-validate dtypes we already check, and a bag's partitions would be
lists of blocks we would open by hand anyway. An explicit tree keeps one task per block (so a lost worker
costs one block, not a partition), names every task (`bn-block-*`, `bn-merge-*` on the dashboard), and fixes
the merge order by block position rather than by which worker finished first, so the same shards and block
size give bit-identical statistics on any cluster.
"""

from __future__ import annotations

import glob
import math
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from bn_export import __version__
from bn_export.checkpoint import Checkpoint
from bn_export.data import Dataset, open_dataset
from bn_export.errors import DataError, InvalidInputError, MissingDependencyError
from bn_export.layer import BatchNorm, normalize_axis
from bn_export.moments import Moments, merge_all

if TYPE_CHECKING:
    from dask.delayed import Delayed
    from distributed import Client

DEFAULT_BLOCK_BYTES = 64 * 2**20
"""Float64 bytes one block task holds in memory when `block_samples` is not given."""
DEFAULT_SPLIT_EVERY = 8
CONNECT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Block:
    """Samples `start:stop` (batch axis) of the shard at `path`; one task reduces it to partial moments."""

    path: str
    start: int
    stop: int


def fit_population_dask(
    source: str | Path | Sequence[str | Path],
    *,
    axis: int = 1,
    scheduler: str | None = None,
    eps: float = 1e-5,
    unbiased_moving_var: bool = False,
    block_samples: int | None = None,
    split_every: int = DEFAULT_SPLIT_EVERY,
    retries: int = 2,
    client: Client | None = None,
) -> Checkpoint:
    """Fit population statistics (gamma=1, beta=0) over `.npy` shards with a Dask cluster.

    `source`: a directory of `.npy` shards (read in name order, as `bn_export.data` does), a glob, or a
    list of shard paths; each x_i: (N_i, *sample_shape) with one shared sample shape and dtype. `axis` is
    the channel axis of a batch (batch axis included). Over the n values of channel c (all samples, all
    spatial positions): `moving_mean[c] = Σx/n`, `moving_var[c] = Σ(x - mean)²/(n - ddof)` with ddof = 1 if
    `unbiased_moving_var` (PyTorch's running_var) else 0 (Keras/ONNX); accumulated in float64 and equal to
    the single-machine population fit (`bn_export.fit.fit(..., stats="population")`) to float64 rounding
    whatever the sharding or `block_samples`, then stored as that fit stores them: float64 for float64
    data, float32 otherwise.

    The cluster: `client` if given (left open); else `Client(scheduler)` for an address such as
    `tcp://scheduler:8786`; else a `LocalCluster` on 127.0.0.1 for the duration of the fit. A worker lost
    mid-fit costs only its tasks, which Dask reruns elsewhere; `retries` reruns a task that raised (a
    flaky network file system). A shard that cannot be read, does not match the others or holds NaN/Inf
    raises `DataError` naming it, and no checkpoint is returned.
    """
    if block_samples is not None and (isinstance(block_samples, bool) or block_samples < 1):
        raise InvalidInputError(f"block_samples must be a positive number of samples, got {block_samples}")
    if split_every < 2:
        raise InvalidInputError(f"split_every must be at least 2, got {split_every}")
    if retries < 0:
        raise InvalidInputError(f"retries must be >= 0, got {retries}")
    if client is not None and scheduler is not None:
        raise InvalidInputError("pass either a scheduler address or a connected client, not both")

    paths = list_shards(source)
    # Opening memory-maps each shard: the driver reads the headers, and only the fingerprint's samples.
    shards = {path: open_dataset(path) for path in paths}
    sample_shape, channel, data_dtype = _common_layout(shards, axis)
    channels = sample_shape[channel - 1]
    num_samples = sum(shard.num_samples for shard in shards.values())
    count = num_samples * math.prod(sample_shape) // channels  # values per channel
    if unbiased_moving_var and count < 2:
        raise InvalidInputError("an unbiased variance needs at least two values per channel")
    layer = BatchNorm(
        channels,
        momentum=None,  # population statistics are the cumulative average over every sample
        eps=eps,
        axis=channel,
        dtype=np.float64 if data_dtype == np.float64 else np.float32,  # the rule of bn_export.fit
        unbiased_moving_var=unbiased_moving_var,
    )
    if block_samples is None:
        block_samples = max(1, DEFAULT_BLOCK_BYTES // (max(1, math.prod(sample_shape)) * 8))
    blocks = plan_blocks({path: shard.num_samples for path, shard in shards.items()}, block_samples)
    with _connect(scheduler, client) as dask_client:
        graph = moments_graph(blocks, axis=channel, sample_shape=sample_shape, split_every=split_every)
        future = dask_client.compute(graph, retries=retries)  # type: ignore[no-untyped-call]
        try:
            # The same fingerprint as the single-machine fit (bounded reads, see bn_export.data), taken
            # while the workers reduce the blocks.
            fingerprint = Dataset(Path(str(source)), [_Shard(s) for s in shards.values()]).fingerprint()
            moments: Moments = future.result()
        finally:
            future.release()

    layer.set_parameters(
        moving_mean=moments.mean, moving_var=moments.variance(ddof=1 if unbiased_moving_var else 0)
    )
    layer.samples_seen = num_samples
    layer.batches_seen = len(blocks)
    return layer.to_checkpoint(
        sample_shape=sample_shape,
        stats="population",
        data_fingerprint=fingerprint,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        version=__version__,
        extras={
            "engine": "dask",
            "partitions": len(blocks),
            "shards": len(paths),
            "block_samples": block_samples,
            "population_count": moments.count,
            "bytes_read": sum(shard.nbytes for shard in shards.values()),
        },
    )


def list_shards(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """The `.npy` shards of `source`: a directory's in name order, a glob's matches sorted, or the list."""
    if not isinstance(source, (str, Path)):
        paths = [Path(p) for p in source]
    elif Path(source).is_dir():
        paths = sorted(p for p in Path(source).iterdir() if p.suffix == ".npy" and p.is_file())
    elif any(ch in str(source) for ch in "*?["):
        paths = sorted(Path(p) for p in glob.glob(str(source)) if Path(p).is_file())
    else:
        paths = [Path(source)]
    if not paths:
        raise DataError(f"{source}: no .npy shards found")
    for path in paths:
        if path.suffix != ".npy":
            raise DataError(f"{path}: not a .npy shard (the dask engine reads .npy files, memory-mapped)")
    return paths


def plan_blocks(lengths: dict[Path, int], block_samples: int) -> list[Block]:
    """Cut each shard of `lengths` (path -> N_i) into blocks of at most `block_samples` samples."""
    return [
        Block(str(path), start, min(start + block_samples, n))
        for path, n in lengths.items()
        for start in range(0, n, block_samples)
    ]


def moments_graph(
    blocks: Sequence[Block], *, axis: int, sample_shape: tuple[int, ...], split_every: int
) -> Delayed:
    """The lazy tree: one `bn-block` task per block, merged `split_every` at a time into one `Moments`."""
    from dask.delayed import delayed

    run = uuid.uuid4().hex[:12]  # tasks of concurrent fits on one cluster must not share keys
    level = [
        delayed(reduce_block, pure=False)(block, axis, sample_shape, dask_key_name=f"bn-block-{run}-{i}")
        for i, block in enumerate(blocks)
    ]
    depth = 0
    while depth == 0 or len(level) > 1:  # at least one merge, so a single block still ends in bn-merge
        depth += 1
        level = [
            delayed(merge_partials, pure=False)(
                level[i : i + split_every], dask_key_name=f"bn-merge-{run}-{depth}-{i // split_every}"
            )
            for i in range(0, len(level), split_every)
        ]
    root: Delayed = level[0]
    return root


def reduce_block(block: Block, axis: int, sample_shape: tuple[int, ...]) -> Moments:
    """Runs on a worker: memory-map the shard, reduce samples start:stop to float64 partial moments."""
    path = Path(block.path)
    shard = open_dataset(path)
    if shard.sample_shape != sample_shape or shard.num_samples < block.stop:
        raise DataError(
            f"{path}: shape {shard.shape} on this worker, expected at least {block.stop} samples of shape "
            f"{sample_shape} (is the file different here, or did it change during the fit?)"
        )
    try:
        return Moments.from_batch(shard.read(block.start, block.stop), axis)
    except InvalidInputError as exc:  # NaN/Inf or overflow: say where, not only what
        raise DataError(f"{path}: samples {block.start}..{block.stop - 1}: {exc}") from exc


def merge_partials(parts: Sequence[Moments]) -> Moments:
    """Merge partial moments with the exact pairwise update (Chan et al.), in block order."""
    return merge_all(parts)


class _Shard:
    """One opened shard seen as a run of samples, so `Dataset` can fingerprint shards listed by a glob."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.shape: tuple[int, ...] = dataset.shape
        self.dtype: np.dtype[Any] = dataset.dtype

    def read(self, start: int, stop: int) -> NDArray[Any]:
        return self.dataset.read(start, stop)


def _common_layout(shards: dict[Path, Dataset], axis: int) -> tuple[tuple[int, ...], int, np.dtype[Any]]:
    """(sample shape, channel axis made non-negative, dtype) every shard shares; `DataError` names a misfit.

    The first shard sets the layout; a shard with another channel count, sample shape or dtype fails the
    fit before any task runs.
    """
    first_path, first = next(iter(shards.items()))
    channel = normalize_axis(axis, len(first.shape))
    channels = first.shape[channel]
    for path, shard in shards.items():
        shape = shard.shape
        if len(shape) != len(first.shape):
            raise DataError(
                f"{path}: shape {shape} has rank {len(shape)}, expected rank {len(first.shape)} "
                f"like {first_path.name} {first.shape}"
            )
        if shape[channel] != channels:
            raise DataError(
                f"{path}: {shape[channel]} channels on axis {channel} (shape {shape}), expected {channels} "
                f"like {first_path.name}"
            )
        if shard.sample_shape != first.sample_shape or shard.dtype != first.dtype:
            raise DataError(
                f"{path}: samples of shape {shard.sample_shape} and dtype {shard.dtype}, expected "
                f"{first.sample_shape} and {first.dtype} like {first_path.name}"
            )
    return first.sample_shape, channel, first.dtype


@contextmanager
def _connect(scheduler: str | None, client: Client | None) -> Iterator[Client]:
    """The client to compute with: the caller's, one connected to `scheduler`, or a private LocalCluster."""
    if client is not None:
        yield client
        return
    try:
        from distributed import Client
    except ImportError as exc:
        raise MissingDependencyError(
            "the dask engine needs dask[distributed]: pip install 'frozen-bn[dask]'"
        ) from exc
    if scheduler is not None:
        try:
            connected = Client(scheduler, timeout=CONNECT_TIMEOUT_S)  # type: ignore[no-untyped-call]
        except (OSError, TimeoutError, ValueError) as exc:
            raise InvalidInputError(f"cannot connect to the Dask scheduler at {scheduler}: {exc}") from exc
        with connected:
            yield connected
        return
    with local_cluster() as cluster, Client(cluster) as local:  # type: ignore[no-untyped-call]
        yield local


def local_cluster(n_workers: int | None = None, threads_per_worker: int | None = None) -> Any:
    """A `distributed.LocalCluster` of worker processes on 127.0.0.1, with no fixed port and no dashboard.

    Worker processes, not threads: the per-block reduction holds the GIL for part of its work. The
    scheduler's HTTP endpoint (health, metrics) takes a free loopback port instead of 8787, so several
    fits (or a test suite) on one machine do not collide. Defaults split the cores as Dask does.
    """
    from distributed import LocalCluster

    return LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        timeout=CONNECT_TIMEOUT_S,
    )
