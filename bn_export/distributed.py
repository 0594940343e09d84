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

A Zarr array (zarr-python 3: a directory store in format 2 or 3, or a group holding one array named
`data`) is the other source: x: (N, *sample_shape), chunked any way. A block is then a run of whole chunks
along the batch axis, and its task opens the array by path and reads those samples whole (every chunk they
touch on the other axes), so chunking the channel or spatial axes changes nothing in the statistics. With
sharding, a shard is the unit (it is what the store holds as one object). Before reading, each task checks
that the chunks of its samples exist in the store: zarr would read an absent chunk as the fill value, which
is right for a chunk the writer skipped because it held only the fill value (zarr's default
`write_empty_chunks=False`) and silently wrong for one lost in an interrupted write or copy; the two cannot
be told apart, so an absent chunk fails the fit unless `missing_chunks="fill"` says the array was written
that way. Arrays whose codecs include `pickle` are refused unread: decoding them would unpickle the file.
"""

from __future__ import annotations

import glob
import itertools
import math
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray

from bn_export import __version__
from bn_export.checkpoint import Checkpoint
from bn_export.data import DATA_RANKS, Dataset, open_dataset
from bn_export.errors import DataError, InvalidInputError, MissingDependencyError
from bn_export.layer import BatchNorm, normalize_axis
from bn_export.moments import Moments, merge_all

if TYPE_CHECKING:
    from typing import TypeAlias

    import zarr
    from dask.delayed import Delayed
    from distributed import Client

    ZarrArray: TypeAlias = zarr.Array[Any]

DEFAULT_BLOCK_BYTES = 64 * 2**20
"""Float64 bytes one block task holds in memory when `block_samples` is not given."""
DEFAULT_SPLIT_EVERY = 8
CONNECT_TIMEOUT_S = 30.0
ZARR_METADATA_FILES = ("zarr.json", ".zarray", ".zgroup")
"""Files at the root of a Zarr directory store (format 3; format 2 array, group) that mark DATA as Zarr."""
ZARR_GROUP_ARRAY = "data"
"""The array read from a Zarr group, the name `bn_export.data` reads from an `.npz`."""
MissingChunks = Literal["error", "fill"]


@dataclass(frozen=True)
class Block:
    """Samples `start:stop` (batch axis) of the shard at `path`; one task reduces it to partial moments."""

    path: str
    start: int
    stop: int


@dataclass(frozen=True)
class ZarrBlock:
    """Samples `start:stop` (whole chunks on the batch axis) of the Zarr array `array` in the store `store`.

    `shape` and `dtype` are the array's as the driver planned the fit, so a worker that sees another array
    under the same path fails instead of reducing it; `fill_missing` reads absent chunks as the fill value.
    """

    store: str
    array: str
    start: int
    stop: int
    shape: tuple[int, ...]
    dtype: str
    fill_missing: bool

    @property
    def name(self) -> str:
        return _zarr_name(self.store, self.array)


@dataclass(frozen=True)
class _Plan:
    """What the driver learned about the data before any task runs, whatever its format."""

    blocks: Sequence[Block | ZarrBlock]
    sample_shape: tuple[int, ...]
    channel: int
    dtype: np.dtype[Any]
    num_samples: int
    block_samples: int
    fingerprint: Callable[[], str]
    extras: dict[str, Any]


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
    missing_chunks: MissingChunks = "error",
) -> Checkpoint:
    """Fit population statistics (gamma=1, beta=0) over `.npy` shards or a Zarr array with a Dask cluster.

    `source`: a directory of `.npy` shards (read in name order, as `bn_export.data` does), a glob, or a
    list of shard paths; each x_i: (N_i, *sample_shape) with one shared sample shape and dtype. Or a Zarr
    array x: (N, *sample_shape) of floats (see `is_zarr`), read in blocks of whole chunks along the batch
    axis: `block_samples` is then rounded down to whole chunks (one chunk at least), and an absent chunk
    raises `DataError` unless `missing_chunks="fill"` (read it as the fill value). `axis` is
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
    raises `DataError` naming it (a Zarr array: naming it and, where known, the chunk), and no checkpoint
    is returned.
    """
    if block_samples is not None and (isinstance(block_samples, bool) or block_samples < 1):
        raise InvalidInputError(f"block_samples must be a positive number of samples, got {block_samples}")
    if split_every < 2:
        raise InvalidInputError(f"split_every must be at least 2, got {split_every}")
    if retries < 0:
        raise InvalidInputError(f"retries must be >= 0, got {retries}")
    if client is not None and scheduler is not None:
        raise InvalidInputError("pass either a scheduler address or a connected client, not both")
    if missing_chunks not in ("error", "fill"):
        raise InvalidInputError(f"missing_chunks must be 'error' or 'fill', got {missing_chunks!r}")

    if isinstance(source, (str, Path)) and is_zarr(source):
        plan = _plan_zarr(Path(source), axis, block_samples, fill_missing=missing_chunks == "fill")
    else:
        plan = _plan_npy(source, axis, block_samples)
    channels = plan.sample_shape[plan.channel - 1]
    count = plan.num_samples * math.prod(plan.sample_shape) // channels  # values per channel
    if unbiased_moving_var and count < 2:
        raise InvalidInputError("an unbiased variance needs at least two values per channel")
    layer = BatchNorm(
        channels,
        momentum=None,  # population statistics are the cumulative average over every sample
        eps=eps,
        axis=plan.channel,
        dtype=np.float64 if plan.dtype == np.float64 else np.float32,  # the rule of bn_export.fit
        unbiased_moving_var=unbiased_moving_var,
    )
    with _connect(scheduler, client) as dask_client:
        graph = moments_graph(
            plan.blocks, axis=plan.channel, sample_shape=plan.sample_shape, split_every=split_every
        )
        future = dask_client.compute(graph, retries=retries)  # type: ignore[no-untyped-call]
        try:
            # Taken while the workers reduce the blocks (bounded reads, see bn_export.data).
            fingerprint = plan.fingerprint()
            moments: Moments = future.result()
        finally:
            future.release()

    layer.set_parameters(
        moving_mean=moments.mean, moving_var=moments.variance(ddof=1 if unbiased_moving_var else 0)
    )
    layer.samples_seen = plan.num_samples
    layer.batches_seen = len(plan.blocks)
    return layer.to_checkpoint(
        sample_shape=plan.sample_shape,
        stats="population",
        data_fingerprint=fingerprint,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        version=__version__,
        extras={
            "engine": "dask",
            "partitions": len(plan.blocks),
            **plan.extras,
            "block_samples": plan.block_samples,
            "population_count": moments.count,
            "bytes_read": plan.num_samples * math.prod(plan.sample_shape) * plan.dtype.itemsize,
        },
    )


def _plan_npy(source: str | Path | Sequence[str | Path], axis: int, block_samples: int | None) -> _Plan:
    """Blocks of the `.npy` shards of `source`, from their headers; the fingerprint the local fit takes."""
    paths = list_shards(source)
    # Opening memory-maps each shard: the driver reads the headers, and only the fingerprint's samples.
    shards = {path: open_dataset(path) for path in paths}
    sample_shape, channel, data_dtype = _common_layout(shards, axis)
    if block_samples is None:
        block_samples = max(1, DEFAULT_BLOCK_BYTES // (max(1, math.prod(sample_shape)) * 8))
    blocks = plan_blocks({path: shard.num_samples for path, shard in shards.items()}, block_samples)
    sources = [_Shard(s) for s in shards.values()]
    return _Plan(
        blocks=blocks,
        sample_shape=sample_shape,
        channel=channel,
        dtype=data_dtype,
        num_samples=sum(shard.num_samples for shard in shards.values()),
        block_samples=block_samples,
        fingerprint=lambda: Dataset(Path(str(source)), sources).fingerprint(),
        extras={"shards": len(paths)},
    )


def _plan_zarr(store: Path, axis: int, block_samples: int | None, *, fill_missing: bool) -> _Plan:
    """Blocks of whole chunks (batch axis) of the Zarr array at `store`, from its metadata alone.

    The fingerprint is `Dataset.fingerprint` over the array's values (shape, dtype, then evenly spaced
    sample ranges), so it equals the fingerprint of the same samples saved as `.npy`; the driver decodes
    only the chunk rows (batch axis) those ranges fall in.
    """
    array, array_path = _open_zarr(store, None)
    name = _zarr_name(str(store), array_path)
    shape, dtype = tuple(array.shape), np.dtype(array.dtype)
    if dtype.kind != "f":
        raise DataError(f"{name}: Zarr array of dtype {dtype}, expected floating-point samples")
    if not DATA_RANKS[0] <= len(shape) <= DATA_RANKS[1]:
        raise DataError(
            f"{name}: Zarr array of shape {shape} (rank {len(shape)}), expected rank {DATA_RANKS[0]} to "
            f"{DATA_RANKS[1]} with the samples on the first axis"
        )
    if math.prod(shape) == 0:
        raise DataError(f"{name}: Zarr array is empty (shape {shape})")
    channel = normalize_axis(axis, len(shape))
    chunk_rows = _storage_chunks(array)[0]
    if block_samples is None:
        block_samples = DEFAULT_BLOCK_BYTES // (max(1, math.prod(shape[1:])) * 8)
    block_samples = max(1, block_samples // chunk_rows) * chunk_rows  # whole chunks, one at least
    blocks = [
        ZarrBlock(
            str(store),
            array_path,
            start,
            min(start + block_samples, shape[0]),
            shape,
            dtype.str,
            fill_missing,
        )
        for start in range(0, shape[0], block_samples)
    ]
    source = _ZarrSamples(array, name)
    return _Plan(
        blocks=blocks,
        sample_shape=shape[1:],
        channel=channel,
        dtype=dtype,
        num_samples=shape[0],
        block_samples=block_samples,
        fingerprint=lambda: Dataset(store, [source]).fingerprint(),
        extras={
            "zarr_format": int(array.metadata.zarr_format),
            "zarr_chunks": list(_storage_chunks(array)),
            "zarr_missing_chunks": "fill" if fill_missing else "error",
        },
    )


def open_zarr_dataset(store: str | Path, *, missing_chunks: MissingChunks = "error") -> Dataset:
    """A Zarr array (see `is_zarr`) as a `Dataset` read on this machine a row of chunks at a time, for
    readers that stream batches in order (`bn-export recalibrate`). Checked as the Dask fit checks it:
    floating-point samples of rank 2 to 5, not empty, and every chunk in the store unless
    `missing_chunks="fill"`."""
    if missing_chunks not in ("error", "fill"):
        raise InvalidInputError(f"missing_chunks must be 'error' or 'fill', got {missing_chunks!r}")
    plan = _plan_zarr(Path(store), 1, None, fill_missing=missing_chunks == "fill")
    array, array_path = _open_zarr(Path(store), None)
    if missing_chunks == "error":
        for block in plan.blocks:
            if isinstance(block, ZarrBlock):
                _require_chunks(array, Path(store), block)
    return Dataset(Path(store), [_ZarrSamples(array, _zarr_name(str(store), array_path))])


def is_zarr(source: str | Path) -> bool:
    """Whether DATA names a Zarr store: a directory with Zarr metadata at its root, or a name ending .zarr.

    The suffix alone counts so that `x.zarr` which holds no array fails as a Zarr array, saying so,
    rather than as a directory without `.npy` shards.
    """
    path = Path(source)
    if path.suffix.lower() == ".zarr":
        return True
    return path.is_dir() and any((path / name).is_file() for name in ZARR_METADATA_FILES)


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
            raise DataError(
                f"{path}: not a .npy shard (the dask engine reads .npy files memory-mapped, or a Zarr array)"
            )
    return paths


def plan_blocks(lengths: dict[Path, int], block_samples: int) -> list[Block]:
    """Cut each shard of `lengths` (path -> N_i) into blocks of at most `block_samples` samples."""
    return [
        Block(str(path), start, min(start + block_samples, n))
        for path, n in lengths.items()
        for start in range(0, n, block_samples)
    ]


def moments_graph(
    blocks: Sequence[Block | ZarrBlock], *, axis: int, sample_shape: tuple[int, ...], split_every: int
) -> Delayed:
    """The lazy tree: one `bn-block` task per block, merged `split_every` at a time into one `Moments`."""
    from dask.delayed import delayed

    run = uuid.uuid4().hex[:12]  # tasks of concurrent fits on one cluster must not share keys
    level = [
        delayed(reduce_zarr_block if isinstance(block, ZarrBlock) else reduce_block, pure=False)(
            block, axis, sample_shape, dask_key_name=f"bn-block-{run}-{i}"
        )
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


def reduce_zarr_block(block: ZarrBlock, axis: int, sample_shape: tuple[int, ...]) -> Moments:
    """Runs on a worker: open the Zarr array, read samples start:stop whole, reduce them to partial moments.

    `sample_shape` is unused (the block carries the array's whole shape); it keeps one signature for both
    kinds of block in `moments_graph`. The chunks are checked for presence first (see the module
    docstring); a chunk that fails to decode is found by decoding the block's chunks one by one, so the
    error names it.
    """
    array, _ = _open_zarr(Path(block.store), block.array)
    name = block.name
    if tuple(array.shape) != block.shape or np.dtype(array.dtype).str != block.dtype:
        raise DataError(
            f"{name}: shape {tuple(array.shape)} and dtype {np.dtype(array.dtype)} on this worker, expected "
            f"{block.shape} and {np.dtype(block.dtype)} (is the array different here, or did it change "
            "during the fit?)"
        )
    if not block.fill_missing:
        _require_chunks(array, Path(block.store), block)
    data = _ZarrSamples(array, name).read(block.start, block.stop)
    try:
        return Moments.from_batch(data, axis)
    except InvalidInputError as exc:  # NaN/Inf or overflow: say where, not only what
        raise DataError(f"{name}: samples {block.start}..{block.stop - 1}: {exc}") from exc


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


class _ZarrSamples:
    """A Zarr array seen as a run of samples, for `Dataset.fingerprint` and the block tasks.

    Reads decode whole chunk rows (batch axis) and keep the last one, so ascending reads inside one row,
    as the fingerprint makes, decode it once. A read that fails to decode raises `DataError` naming the
    chunk.
    """

    def __init__(self, array: ZarrArray, name: str) -> None:
        self.array = array
        self.name = name
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.dtype: np.dtype[Any] = np.dtype(array.dtype)
        self._rows = _storage_chunks(array)[0]
        self._cached: tuple[int, int, NDArray[Any]] | None = None

    def read(self, start: int, stop: int) -> NDArray[Any]:
        if self._cached is None or not self._cached[0] <= start <= stop <= self._cached[1]:
            lo = start // self._rows * self._rows
            hi = min(-(-stop // self._rows) * self._rows, self.shape[0])
            self._cached = (lo, hi, self._decode(lo, hi))
        lo = self._cached[0]
        return self._cached[2][start - lo : stop - lo]

    def _decode(self, start: int, stop: int) -> NDArray[Any]:
        try:
            return np.asarray(self.array[start:stop])
        except MemoryError:
            raise
        except Exception as exc:  # codecs fail in their own ways (RuntimeError, ValueError, OSError, ...)
            where = _failing_chunk(self.array, start, stop)
            raise DataError(
                f"{self.name}: {where or f'samples {start}..{stop - 1}'} cannot be read: {exc}"
            ) from exc


def _zarr_name(store: str, array_path: str) -> str:
    """The array as error messages name it: the store directory, and the array inside a group."""
    return f"{store}/{array_path}" if array_path else store


def _open_zarr(store: Path, array_path: str | None) -> tuple[ZarrArray, str]:
    """The Zarr array at `store` (or at `array_path` inside it) and its path there ("" for the root).

    `array_path=None` takes the root if it is an array, else the group's array named `data`.
    """
    try:
        import zarr
    except ImportError as exc:
        raise MissingDependencyError(
            "reading a Zarr array needs zarr>=3: pip install 'frozen-bn[dask]'"
        ) from exc
    if not store.is_dir():
        raise DataError(f"{store}: no Zarr directory store here (no such directory)")
    try:
        node = zarr.open(store=str(store), path=array_path or "", mode="r")
    except (OSError, ValueError, KeyError, TypeError) as exc:  # zarr's errors derive from ValueError
        raise DataError(f"{store}: not a readable Zarr array: {exc}") from exc
    if isinstance(node, zarr.Group):
        if array_path is None and isinstance(node.get(ZARR_GROUP_ARRAY), zarr.Array):
            return _open_zarr(store, ZARR_GROUP_ARRAY)
        members = ", ".join(sorted(node.keys())) or "nothing"
        raise DataError(
            f"{store}: a Zarr group without an array named {ZARR_GROUP_ARRAY!r} (it holds {members}); "
            "give the array's own directory"
        )
    path = array_path or ""
    # zarr 3.1 already refuses a pickle filter on a float array; this keeps the guarantee whatever the
    # version or codec registry (the codecs live under these keys in formats 2 and 3; attributes are not).
    metadata = node.metadata.to_dict()
    codecs = _codec_names([metadata.get(key) for key in ("codecs", "filters", "compressor")])
    if any(codec.rpartition(".")[2] == "pickle" for codec in codecs):
        raise DataError(
            f"{_zarr_name(str(store), path)}: the array's codecs include pickle, which would run "
            "code from the file when decoded; store the samples as plain floats"
        )
    return node, path


def _codec_names(metadata: Any) -> list[str]:
    """Every codec named in Zarr array metadata: `id` (format 2) or `name` (format 3), nested ones too."""
    if isinstance(metadata, dict):
        found = [
            str(value) for key, value in metadata.items() if key in ("id", "name") and isinstance(value, str)
        ]
        return found + [name for value in metadata.values() for name in _codec_names(value)]
    if isinstance(metadata, (list, tuple)):
        return [name for value in metadata for name in _codec_names(value)]
    return []


def _storage_chunks(array: ZarrArray) -> tuple[int, ...]:
    """The shape of one object in the store: the shard with sharding, else the chunk."""
    return tuple(array.shards or array.chunks)


def _chunk_coords(array: ZarrArray, start: int, stop: int) -> Iterator[tuple[int, ...]]:
    """Grid coordinates of the stored chunks holding samples start:stop, in storage order."""
    chunks = _storage_chunks(array)
    rows = range(start // chunks[0], -(-stop // chunks[0]))
    others = [range(-(-size // chunk)) for size, chunk in zip(array.shape[1:], chunks[1:], strict=True)]
    return itertools.product(rows, *others)


def _chunk_key(array: ZarrArray, coords: tuple[int, ...]) -> str:
    key: str = array.metadata.encode_chunk_key(coords)
    return key


def _require_chunks(array: ZarrArray, store: Path, block: ZarrBlock) -> None:
    """Raise `DataError` naming the first chunk of the block's samples that the store does not hold."""
    for coords in _chunk_coords(array, block.start, block.stop):
        key = _chunk_key(array, coords)
        if not (store / block.array / key).is_file():
            raise DataError(
                f"{block.name}: chunk {key} (grid position {coords}) is missing from the store: either "
                "it was never written (an interrupted write or copy) or the writer skipped it because every "
                f"value in it equals the fill value {array.fill_value} (zarr's write_empty_chunks=False). If "
                "the latter, fit with --zarr-missing-chunks fill (missing_chunks='fill')"
            )


def _failing_chunk(array: ZarrArray, start: int, stop: int) -> str | None:
    """`chunk KEY (samples a..b)` for the first chunk of samples start:stop that fails to decode, if any."""
    chunks = _storage_chunks(array)
    for coords in _chunk_coords(array, start, stop):
        region = tuple(
            slice(c * size, min((c + 1) * size, extent))
            for c, size, extent in zip(coords, chunks, array.shape, strict=True)
        )
        try:
            array[region]
        except MemoryError:
            raise
        except Exception:  # the codec's own error was reported by the caller; this one only locates it
            return f"chunk {_chunk_key(array, coords)} (samples {region[0].start}..{region[0].stop - 1})"
    return None


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
