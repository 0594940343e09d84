"""Exact streaming population statistics ("precise BN"): per-channel count, mean and M2, mergeable.

A `Moments` summarises any set of values per channel by `count`, `mean` and `m2 = Σ (x - mean)²`. Two
summaries combine exactly (Chan, Golub & LeVeque 1979, "Updating formulae and a pairwise algorithm for
computing sample variances"):

    n = n_a + n_b,  δ = mean_b - mean_a,  mean = mean_a + δ·n_b/n,  m2 = m2_a + m2_b + δ²·n_a·n_b/n

so population statistics can be built from batches in any order or split (across processes, too) and
agree with a two-pass computation over all the data to float64 rounding. The population variance is
`m2 / count` (biased), the sample variance `m2 / (count - 1)`. Used to freeze BatchNorm with the true
statistics of the data instead of an EMA (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", §3).
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bn_export.errors import InvalidInputError
from bn_export.kernels import BlockSums, block_sums
from bn_export.layer import check_input, require_finite

# Values per block: a block's float64 copy is 2 MiB, twice a Zen 5 core's L2, yet the float32 -> float64
# cast from a memory map runs twice as fast as with 1 MiB blocks (fewer, longer streams), which outweighs
# the sums reading from L3; 4 MiB blocks lose (benchmarks/README.md, "Fitting").
_BLOCK_VALUES = 1 << 18
# Channel rows shorter than this are transposed to channels-last blocks, where BLAS works across rows.
_MIN_ROW = 64
# Batches from this many values on are split over threads, at most this many: past two, the Python
# between kernels (which holds the GIL) costs more than the extra cores give (measured on a 16-core Xeon).
_PARALLEL_VALUES = 1 << 22
_MAX_WORKERS = 2
# Unshifted sums while Σx² <= this × M2 (at most 6 bits lost to cancellation, ~1e-14 relative).
_CANCELLATION = 64.0
# Per-thread scratch arrays (see `_scratch`).
_SCRATCH = threading.local()
# Channels-last blocks with fewer channels sum squares with BLAS instead of einsum.
_EINSUM_CHANNELS = 32
# Leading values per channel whose mean and spread decide a batch's pilot shift.
_PILOT_VALUES = 64


@dataclass(frozen=True)
class Moments:
    """Per-channel `count` (values per channel), `mean: (C,)` and `m2 = Σ (x - mean)²: (C,)`, float64."""

    count: int
    mean: NDArray[np.float64]
    m2: NDArray[np.float64]

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, (int, np.integer)) or self.count < 0:
            raise InvalidInputError(f"count must be a non-negative integer, got {self.count!r}")
        mean, m2 = np.asarray(self.mean), np.asarray(self.m2)
        if mean.ndim != 1 or m2.shape != mean.shape:
            raise InvalidInputError(f"mean and m2 must share one (C,) shape, got {mean.shape} and {m2.shape}")
        # Stored as read-only float64 so a frozen Moments is a value, not a view into someone's buffer.
        for name, value in (("mean", mean), ("m2", m2)):
            array = np.array(value, dtype=np.float64)
            array.flags.writeable = False
            object.__setattr__(self, name, array)
        object.__setattr__(self, "count", int(self.count))

    @property
    def num_channels(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def empty(cls, num_channels: int) -> Moments:
        """The summary of no values: the identity of `merge`."""
        if (
            isinstance(num_channels, bool)
            or not isinstance(num_channels, (int, np.integer))
            or num_channels < 1
        ):
            raise InvalidInputError(f"num_channels must be a positive integer, got {num_channels!r}")
        return cls(0, np.zeros(num_channels), np.zeros(num_channels))

    @classmethod
    def from_batch(cls, x: ArrayLike, axis: int, *, workers: int | None = None) -> Moments:
        """The moments of each channel of `x: (N, *)` (channels at `axis`) over every other axis.

        Exact to float64 rounding whatever the dtype and offset of `x`, without a float64 copy of the
        whole batch: cache-sized blocks are shifted, summed in float64 and merged pairwise.
        `workers` threads share a large batch (default: 2 for batches of 4M values or more, where there
        are two cores; pass 1 where the caller already runs one batch per core).
        """
        data, channel = check_input(x, axis, check_finite=False)  # the sums reveal NaN/Inf for free
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise InvalidInputError(f"workers must be a positive integer or None, got {workers!r}")
        moments = _blocked_moments(data, channel, workers)
        return moments

    def merge(self, other: Moments) -> Moments:
        """The moments of the union of both value sets (Chan et al.); an empty side is the identity."""
        if not isinstance(other, Moments):
            raise InvalidInputError(f"can only merge Moments with Moments, got {type(other).__name__}")
        if other.num_channels != self.num_channels:
            raise InvalidInputError(f"cannot merge {self.num_channels} channels with {other.num_channels}")
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        delta = other.mean - self.mean
        mean = self.mean + delta * (n_b / n)
        m2 = self.m2 + other.m2 + delta * delta * (n_a * n_b / n)
        return Moments(n, mean, m2)

    @staticmethod
    def merge_all(parts: Iterable[Moments]) -> Moments:
        """Merge many `Moments` pairwise; see the module-level `merge_all`."""
        return merge_all(parts)

    def variance(self, ddof: int = 0) -> NDArray[np.float64]:
        """`m2 / (count - ddof)`: ddof=0 is the population (biased) variance, 1 the unbiased sample one."""
        if isinstance(ddof, bool) or not isinstance(ddof, (int, np.integer)) or ddof < 0:
            raise InvalidInputError(f"ddof must be a non-negative integer, got {ddof!r}")
        if self.count <= ddof:
            raise InvalidInputError(
                f"variance with ddof={ddof} needs more than {ddof} values, have {self.count}"
            )
        return self.m2 / (self.count - ddof)


def merge_all(parts: Iterable[Moments]) -> Moments:
    """Merge many `Moments` pairwise (a balanced tree), which keeps the rounding error at O(log n)."""
    level = list(parts)
    if not level:
        raise InvalidInputError("merge_all needs at least one Moments")
    for part in level:
        if not isinstance(part, Moments):
            raise InvalidInputError(f"can only merge Moments, got {type(part).__name__}")
        if part.num_channels != level[0].num_channels:
            raise InvalidInputError(f"cannot merge {level[0].num_channels} channels with {part.num_channels}")
    _, mean, m2 = _tree_merge(
        np.array([p.count for p in level], dtype=np.float64),
        np.stack([p.mean for p in level]),
        np.stack([p.m2 for p in level]),
    )
    return Moments(sum(p.count for p in level), mean, m2)


def merge_rows(counts: ArrayLike, means: ArrayLike, m2s: ArrayLike) -> Moments:
    """`merge_all` of the summaries given as rows: `counts (P,)`, `means (P, C)`, `m2s (P, C)`."""
    counts = np.asarray(counts, dtype=np.float64)
    means, m2s = np.asarray(means, dtype=np.float64), np.asarray(m2s, dtype=np.float64)
    if counts.ndim != 1 or len(counts) < 1 or means.shape != m2s.shape or means.shape[:1] != counts.shape:
        raise InvalidInputError(
            f"expected (P,) counts with (P, C) means and m2s, got {counts.shape}, {means.shape}, {m2s.shape}"
        )
    _, mean, m2 = _tree_merge(counts, means, m2s)
    return Moments(int(counts.sum()), mean, m2)


def _tree_merge(
    counts: NDArray[np.float64], means: NDArray[np.float64], m2s: NDArray[np.float64]
) -> tuple[float, NDArray[np.float64], NDArray[np.float64]]:
    """Chan et al.'s merge of P summaries `counts: (P,)`, `means, m2s: (P, C)`, one tree level per step.

    Neighbours merge pairwise at each level (vectorised over the pairs); an empty side contributes
    nothing because its weight `n_b / n` is 0 (and 0/0 is avoided by the `where`).
    """
    while counts.shape[0] > 1:
        pairs = counts.shape[0] // 2
        n_a, n_b = counts[: 2 * pairs : 2], counts[1 : 2 * pairs : 2]
        delta = means[1 : 2 * pairs : 2] - means[: 2 * pairs : 2]
        n = n_a + n_b
        w_b = np.divide(n_b, n, out=np.zeros_like(n), where=n > 0)[:, None]
        cross = np.divide(n_a * n_b, n, out=np.zeros_like(n), where=n > 0)[:, None]
        merged_mean = means[: 2 * pairs : 2] + delta * w_b
        merged_m2 = m2s[: 2 * pairs : 2] + m2s[1 : 2 * pairs : 2] + delta * delta * cross
        # An odd one out waits for the next level unchanged.
        counts = np.concatenate([n, counts[2 * pairs :]])
        means = np.concatenate([merged_mean, means[2 * pairs :]])
        m2s = np.concatenate([merged_m2, m2s[2 * pairs :]])
    return float(counts[0]), means[0], m2s[0]


def _blocked_moments(data: NDArray[np.floating[Any]], channel: int, workers: int | None) -> Moments:
    """Moments of `data` per channel from its (A, C, B) view: A before the channel axis, B after it.

    Each cache-sized block is copied to float64 and summed with BLAS (`Σd`, `Σd²`), or, for large
    float32/float64 batches where numba is installed, summed by a compiled kernel straight from the data
    in one pass (`bn_export.kernels`); the blocks merge pairwise. Centred data is summed as it is;
    uncentred data (`|mean| > √32·σ` over the first samples) is shifted by that pilot mean `k` as it is
    read, and any block whose `Σd²` still dwarfs its `M2`
    (cancellation in `M2 = Σd² - (Σd)²/n`, e.g. data drifting within the batch) is summed again shifted
    by its own mean. Large batches are split over `workers` threads (numpy and the compiled kernels release
    the GIL) at block boundaries, so the blocks, their merge and the result are the same bits whatever
    `workers` is.
    """
    C = data.shape[channel]
    A = math.prod(data.shape[:channel])
    B = math.prod(data.shape[channel + 1 :])
    view = data.reshape(A, C, B)
    kernel = block_sums(data.size, data.dtype, channels_last=B == 1)
    layout: type[_Blocks] = (
        _KernelBlocks if kernel is not None else _RowBlocks if B >= _MIN_ROW else _ChannelsLastBlocks
    )
    rows = layout.rows_per_block(C, B)
    blocks = -(-A // rows)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf surface in the sums, checked below
        shift = _pilot_shift(view)
    if workers is None:
        workers = _MAX_WORKERS if data.size >= _PARALLEL_VALUES else 1
    workers = max(1, min(int(workers), blocks, _available_cpus()))
    step = -(-blocks // workers) * rows
    chunks = [
        _KernelBlocks(view[lo : lo + step], shift, kernel)
        if kernel is not None
        else layout(view[lo : lo + step], shift)
        for lo in range(0, A, step)
    ]
    single = len(chunks) == 1
    parts = [chunks[0].moments()] if single else list(_thread_pool().map(_Blocks.moments, chunks))
    with np.errstate(invalid="ignore", over="ignore"):
        _, mean, m2 = _tree_merge(
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]),
        )
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(m2))):
        require_finite(data, "input")  # names the NaN/Inf count when there are some
        raise InvalidInputError("the statistics overflow float64; the input values are too large")
    return Moments(A * B, mean, m2)


def per_batch_moments(
    x: ArrayLike, axis: int, batch_samples: int
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]] | None:
    """`(counts (G,), means (G, C), m2s (G, C))` of each run of `batch_samples` samples of `x` (the last
    run may be shorter), in one compiled pass; None where no compiled kernel takes `x` (the caller then
    calls `Moments.from_batch` per batch). Each batch is one block of the kernel path of `from_batch`:
    shifted by the pilot shift of `x`, summed again about its own mean where that cancels, so each row
    equals that batch's `Moments.from_batch` to float64 rounding. NaN/Inf make a row non-finite; the
    caller checks.

    Many small batches (a 64 KiB batch of tabular rows) cost `from_batch` tens of microseconds each in
    Python; here a group of them costs one kernel call.
    """
    data, channel = check_input(x, axis, check_finite=False)
    if isinstance(batch_samples, bool) or not isinstance(batch_samples, int) or batch_samples < 1:
        raise InvalidInputError(f"batch_samples must be a positive integer, got {batch_samples!r}")
    C = data.shape[channel]
    A = math.prod(data.shape[:channel])
    B = math.prod(data.shape[channel + 1 :])
    kernel = block_sums(data.size, data.dtype, channels_last=B == 1)
    if kernel is None:
        return None
    view = data.reshape(A, C, B)
    with np.errstate(invalid="ignore", over="ignore"):
        shift = _pilot_shift(view)
    rows = batch_samples * math.prod(data.shape[1:channel])
    return _KernelBlocks(view, shift, kernel, rows=rows).moments()


def _pilot_shift(view: NDArray[np.floating[Any]]) -> NDArray[np.float64]:
    """Per-channel shift `(C,)`: the mean of about `_PILOT_VALUES` leading values where it exceeds √32·σ.

    Σx² <= 64·M2 (at most 6 bits lost) holds while mean² <= 63·σ²; the factor 32 leaves room for the
    pilot's sampling error. Elsewhere 0, so centred data skips the shift pass.
    """
    B = view.shape[2]
    head = view[: -(-_PILOT_VALUES // B), :, :_PILOT_VALUES].astype(np.float64)
    mean = head.mean(axis=(0, 2))
    spread = head.std(axis=(0, 2))
    return _representable(np.where(np.abs(mean) > math.sqrt(32.0) * spread, mean, 0.0), view.dtype)


def _representable(shift: NDArray[np.float64], dtype: np.dtype[Any]) -> NDArray[np.float64]:
    """`shift` rounded to the data's dtype, so the shifted values stay on the data's grid.

    For float32 (float16) data `x - shift` is then exact in float64 and so are its squares (under 2·24
    bits), which keeps the block sums exact far longer than a shift off that grid would.
    """
    return shift.astype(dtype).astype(np.float64)


class _Blocks:
    """Cache-sized blocks of an (A, C, B) view, `rows` of A each, summed per channel in float64.

    `block(p, shift, out1, out2)` writes block `p`'s `Σ(x - shift)` and `Σ(x - shift)²` as `width`
    partial sums (zero-padded) that `reduce` adds up per channel; `counts` are values per channel.
    """

    rows: int
    width: int
    counts: NDArray[np.float64]
    buffer_size: int
    squares_size = 0
    # Scratch of the thread running `moments`, claimed there: chunks are built on one thread, run on others.
    buffer: NDArray[np.float64]
    squares: NDArray[np.float64]

    def __init__(self, view: NDArray[np.floating[Any]], shift: NDArray[np.float64]) -> None:
        self.view = view
        self.shift = shift

    @staticmethod
    def rows_per_block(C: int, B: int) -> int:
        raise NotImplementedError

    def block(
        self, p: int, shift: NDArray[np.float64], out1: NDArray[np.float64], out2: NDArray[np.float64]
    ) -> None:
        raise NotImplementedError

    def reduce(self, partial: NDArray[np.float64]) -> NDArray[np.float64]:
        return partial

    def fill(self, partial1: NDArray[np.float64], partial2: NDArray[np.float64]) -> None:
        """Every block's partial sums about `self.shift`, into rows of `partial1` and `partial2`."""
        for p in range(len(self.counts)):
            self.block(p, self.shift, partial1[p], partial2[p])

    def moments(self) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        """Per-block `(counts (P,), means (P, C), m2s (P, C))`."""
        # NaN/Inf in the data make the sums non-finite, which the caller turns into an error; no warnings.
        with np.errstate(invalid="ignore", over="ignore"):
            return self._moments()

    def _moments(self) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        P, n = len(self.counts), self.counts[:, None]
        self.buffer = _scratch("buffer", self.buffer_size)
        self.squares = _scratch("squares", self.squares_size)
        partial1, partial2 = np.zeros((P, self.width)), np.zeros((P, self.width))
        self.fill(partial1, partial2)
        s1, s2 = self.reduce(partial1), self.reduce(partial2)
        shifts = np.repeat(self.shift[None, :], P, axis=0)
        # Unshifted (or pilot-shifted) sums are exact enough while Σd² stays within `_CANCELLATION` of
        # M2 (log2 of it is the bits lost); a block past it is summed again about its own mean.
        for bad in np.flatnonzero(np.any(s2 > _CANCELLATION * (s2 - s1 * s1 / n), axis=1)):
            p = int(bad)
            shifts[p] = _representable(self.shift + s1[p] / n[p], self.view.dtype)
            partial1[p], partial2[p] = 0.0, 0.0
            self.block(p, shifts[p], partial1[p], partial2[p])
            s1[p], s2[p] = self.reduce(partial1[p : p + 1])[0], self.reduce(partial2[p : p + 1])[0]
        # Rounding can push a constant channel's M2 just below 0.
        m2 = np.maximum(s2 - s1 * s1 / n, 0.0)
        return self.counts, shifts + s1 / n, m2


class _RowBlocks(_Blocks):
    """(A, C, B) with long channel rows (B >= _MIN_ROW): blocks (r, C, w); sums are row dot products."""

    def __init__(self, view: NDArray[np.floating[Any]], shift: NDArray[np.float64]) -> None:
        super().__init__(view, shift)
        A, C, B = view.shape
        self.cols = min(B, max(_MIN_ROW, _BLOCK_VALUES // C))
        self.rows = self.rows_per_block(C, B)
        self.width = self.rows * C
        self.starts = [(a, b) for a in range(0, A, self.rows) for b in range(0, B, self.cols)]
        self.counts = np.array(
            [min(self.rows, A - a) * min(self.cols, B - b) for a, b in self.starts], dtype=np.float64
        )
        self.buffer_size = self.rows * C * self.cols
        self.ones = np.ones(self.cols)

    @staticmethod
    def rows_per_block(C: int, B: int) -> int:
        return max(1, _BLOCK_VALUES // (C * min(B, max(_MIN_ROW, _BLOCK_VALUES // C))))

    def block(
        self, p: int, shift: NDArray[np.float64], out1: NDArray[np.float64], out2: NDArray[np.float64]
    ) -> None:
        a, b = self.starts[p]
        block = self.view[a : a + self.rows, :, b : b + self.cols]
        r, C, w = block.shape
        # A contiguous prefix of the buffer, so the (r·C, w) rows below are a view, not a copy.
        d = self.buffer[: r * C * w].reshape(r, C, w)
        if shift.any():
            np.subtract(block, shift[:, None], out=d)
        else:
            np.copyto(d, block)
        flat = d.reshape(r * C, w)
        np.matmul(flat, self.ones[:w], out=out1[: r * C])
        np.matmul(flat[:, None, :], flat[:, :, None], out=out2[: r * C, None, None])

    def reduce(self, partial: NDArray[np.float64]) -> NDArray[np.float64]:
        summed: NDArray[np.float64] = partial.reshape(partial.shape[0], self.rows, -1).sum(axis=1)
        return summed


class _ChannelsLastBlocks(_Blocks):
    """(A, C, B) with short rows: blocks copied to (r, B, C), channel innermost; sums run down columns."""

    def __init__(self, view: NDArray[np.floating[Any]], shift: NDArray[np.float64]) -> None:
        super().__init__(view, shift)
        A, C, B = view.shape
        self.rows = self.rows_per_block(C, B)
        self.width = C
        self.starts = list(range(0, A, self.rows))
        self.counts = np.array([min(self.rows, A - a) * B for a in self.starts], dtype=np.float64)
        self.buffer_size = self.rows * B * C
        self.ones = np.ones(self.rows * B)
        # einsum sums each channel's column one value after another: with few channels those columns are
        # long (2^18 / C values) and its rounding grows past 1e-12, and it is slower than BLAS on squares.
        self.squares_size = self.buffer_size if C < _EINSUM_CHANNELS else 0

    @staticmethod
    def rows_per_block(C: int, B: int) -> int:
        return max(1, _BLOCK_VALUES // (C * B))

    def block(
        self, p: int, shift: NDArray[np.float64], out1: NDArray[np.float64], out2: NDArray[np.float64]
    ) -> None:
        a = self.starts[p]
        block = self.view[a : a + self.rows].transpose(0, 2, 1)
        r, B, C = block.shape
        d = self.buffer[: r * B * C].reshape(r, B, C)
        if shift.any():
            np.subtract(block, shift, out=d)
        else:
            np.copyto(d, block)
        flat = d.reshape(r * B, C)
        np.matmul(self.ones[: r * B], flat, out=out1)
        if not self.squares_size:
            np.einsum("ac,ac->c", flat, flat, out=out2)
        else:
            squares = self.squares[: r * B * C].reshape(r * B, C)
            np.matmul(self.ones[: r * B], np.multiply(flat, flat, out=squares), out=out2)


class _KernelBlocks(_Blocks):
    """The blocks of `_RowBlocks` (one row of values per block where channels are innermost), summed by a
    compiled kernel straight from the data: no float64 copy (`bn_export.kernels`)."""

    def __init__(
        self,
        view: NDArray[np.floating[Any]],
        shift: NDArray[np.float64],
        kernel: BlockSums,
        rows: int | None = None,
    ) -> None:
        super().__init__(view, shift)
        A, C, B = view.shape
        self.kernel = kernel
        # `rows` given: one block per run of that many rows, whole rows (`per_batch_moments`).
        self.cols = self.cols_per_block(C, B) if rows is None else B
        self.rows = self.rows_per_block(C, B) if rows is None else rows
        self.width = C
        self.starts = [(a, b) for a in range(0, A, self.rows) for b in range(0, B, self.cols)]
        self.counts = np.array(
            [min(self.rows, A - a) * min(self.cols, B - b) for a, b in self.starts], dtype=np.float64
        )
        self.buffer_size = 0

    @staticmethod
    def cols_per_block(C: int, B: int) -> int:
        return min(B, max(_MIN_ROW, _BLOCK_VALUES // C))

    @staticmethod
    def rows_per_block(C: int, B: int) -> int:
        return max(1, _BLOCK_VALUES // (C * _KernelBlocks.cols_per_block(C, B)))

    def fill(self, partial1: NDArray[np.float64], partial2: NDArray[np.float64]) -> None:
        self.kernel(self.view, self.shift, self.rows, self.cols, partial1, partial2)

    def block(
        self, p: int, shift: NDArray[np.float64], out1: NDArray[np.float64], out2: NDArray[np.float64]
    ) -> None:
        a, b = self.starts[p]
        block = self.view[a : a + self.rows, :, b : b + self.cols]
        self.kernel(block, shift, self.rows, self.cols, out1[None, :], out2[None, :])


def _scratch(name: str, size: int) -> NDArray[np.float64]:
    """This thread's float64 scratch array `name` of at least `size` values, allocated once and reused.

    A fresh multi-MiB array per batch costs a page fault per 4 KiB page (and an unmap) each time; the
    block loop of one thread never uses the same name twice at once, so one array per thread suffices.
    """
    arrays: dict[str, NDArray[np.float64]] = _SCRATCH.__dict__.setdefault("arrays", {})
    array = arrays.get(name)
    if array is None or array.size < size:
        array = arrays[name] = np.empty(size)
    return array[:size]


@functools.cache
def _thread_pool() -> ThreadPoolExecutor:
    """One pool for the process, made on first use (never at import)."""
    return ThreadPoolExecutor(max_workers=_MAX_WORKERS, thread_name_prefix="bn-moments")


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# -- sums about a shift: the streaming form the server's drift monitor keeps ------------------------------

# Sums about a shift are kept while Σ(x-k)² <= this × M2 (at most 6 bits lost to cancellation).
CANCELLATION = _CANCELLATION


def on_grid(shift: NDArray[np.float64], dtype: np.dtype[Any]) -> NDArray[np.float64]:
    """`shift` rounded to float data's dtype, or 0 where that is not finite (a float16 grid is small);
    unchanged for integer data. On the grid, `x - shift` is exact in float64."""
    if dtype.kind != "f":
        return shift
    rounded = shift.astype(dtype).astype(np.float64)
    return np.where(np.isfinite(rounded), rounded, 0.0)


def shifted_sums(
    x: NDArray[Any], axis: int, k: NDArray[np.float64]
) -> tuple[int, NDArray[np.float64], NDArray[np.float64]]:
    """`(n, Σ(x-k), Σ(x-k)²)` per channel of `x: (..., C at axis, ...)`, float64, `k: (C,)` on x's grid.

    Small inputs take one pass; larger ones go through a per-thread float64 scratch of `_BLOCK_VALUES`
    values, block by block, without BLAS (whose threads spin after each call). NaN/±Inf show in the sums.
    """
    C = x.shape[axis]
    view = x.reshape(math.prod(x.shape[:axis]), C, math.prod(x.shape[axis + 1 :]))
    A, _, B = view.shape
    column = k[:, None]
    with np.errstate(invalid="ignore", over="ignore"):
        if view.size <= _BLOCK_VALUES:
            d = view - column
            return A * B, np.add.reduce(d, axis=(0, 2)), np.einsum("acb,acb->c", d, d)
        cols = min(B, max(1, _BLOCK_VALUES // C))
        rows = max(1, _BLOCK_VALUES // (C * cols))
        scratch = _scratch("shifted", rows * C * cols)
        s1, s2 = np.zeros(C), np.zeros(C)
        for a in range(0, A, rows):
            for b in range(0, B, cols):
                block = view[a : a + rows, :, b : b + cols]
                r, _, w = block.shape
                d = scratch[: r * C * w].reshape(r, C, w)
                np.subtract(block, column, out=d)
                s1 += np.add.reduce(d, axis=(0, 2))
                s2 += np.einsum("rcw,rcw->c", d, d)
    return A * B, s1, s2


def shifted_sums_by_part(
    rows: NDArray[Any], k: NDArray[np.float64], starts: Sequence[int]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """`Σ(x-k)`, `Σ(x-k)²` per channel of each part of `rows: (R, C)` (channels last), cut at `starts`.

    `starts` are the parts' first rows, increasing, the first 0, every part at least one row. Returns two
    `(len(starts), C)` float64 arrays, `k: (C,)` on the rows' grid. One pass over the rows for every part:
    many small inputs stacked into one array, each input's own sums still apart (to leave out one holding
    NaN/±Inf and keep the others).
    """
    with np.errstate(invalid="ignore", over="ignore"):
        d = rows - k
        d2 = d * d
        if len(starts) == len(rows):  # one row per part: the rows are the parts
            return d, d2
        return np.add.reduceat(d, starts, axis=0), np.add.reduceat(d2, starts, axis=0)


def shifted_moments(x: NDArray[Any], axis: int, shift: NDArray[np.float64]) -> Moments | None:
    """Per-channel moments of `x: (..., C at axis, ...)` over every other axis, or None when x holds NaN/±Inf.

    With `d = x - k`, `k` = `shift: (C,)` on the data's grid (`on_grid`, so `d` is exact in float64):

        n = values per channel,  mean = k + Σd/n,  M2 = Σd² - (Σd)²/n

    Channels where `Σd² > 64·M2` (k far from the batch mean) are summed again about their own mean, so the
    result agrees with a two-pass float64 computation to rounding, like `Moments.from_batch`.
    """
    C = x.shape[axis]
    if x.size == 0:
        return Moments.empty(C)
    k = on_grid(shift, x.dtype)
    n, s1, s2 = shifted_sums(x, axis, k)
    if not (np.isfinite(s1).all() and np.isfinite(s2).all()):
        return None
    if np.any(s2 > CANCELLATION * (s2 - s1 * s1 / n)):
        k = on_grid(k + s1 / n, x.dtype)
        n, s1, s2 = shifted_sums(x, axis, k)
    return _about(n, k, s1, s2)


def _about(n: int, k: NDArray[np.float64], s1: NDArray[np.float64], s2: NDArray[np.float64]) -> Moments:
    """The moments of `n` values per channel whose sums about `k` are `s1`, `s2`."""
    # Rounding can push a constant channel's M2 just below 0.
    return Moments(n, k + s1 / n, np.maximum(s2 - s1 * s1 / n, 0.0))


class ShiftedSums:
    """Running per-channel float64 sums `n`, `s1 = Σ(x-k)`, `s2 = Σ(x-k)²` of many small inputs of one
    dtype about a shift `k: (C,)` on that dtype's grid (`start` at first, e.g. a frozen moving mean):

        mean = k + s1/n,  M2 = s2 - s1²/n

    Unlike `shifted_moments`, the inputs are gone when `s2 > 64·M2` (they sit over 8 of their std from k)
    shows: that `take`'s M2 keeps ~2^-53·s2/M2 relative error (1e-13 at 30 std), and `take` moves k to their
    mean for the sums that follow; sums made about the old k meanwhile are re-centred as they are added.
    Not thread-safe: the caller holds a lock.
    """

    __slots__ = ("dtype", "n", "s1", "s2", "shift")

    def __init__(self, start: NDArray[np.float64], dtype: np.dtype[Any]) -> None:
        self.dtype = dtype
        self.shift = on_grid(np.asarray(start, dtype=np.float64), dtype)
        self.n = 0
        self.s1 = np.zeros(self.shift.shape[0])
        self.s2 = np.zeros(self.shift.shape[0])

    def add(
        self, n: int, shift: NDArray[np.float64], s1: NDArray[np.float64], s2: NDArray[np.float64]
    ) -> None:
        """Add sums over `n` values per channel made about `shift` (this object's, or one `take` moved)."""
        if shift is not self.shift:
            delta = shift - self.shift
            s2 = s2 + 2.0 * delta * s1 + n * delta * delta
            s1 = s1 + n * delta
        self.n += n
        self.s1 += s1
        self.s2 += s2

    def take(self) -> Moments | None:
        """The moments summed so far (None without any); starts afresh, re-centred when they call for it."""
        if self.n == 0:
            return None
        moments = _about(self.n, self.shift, self.s1, self.s2)
        if np.any(self.s2 > CANCELLATION * moments.m2):
            self.shift = on_grid(np.asarray(moments.mean, dtype=np.float64), self.dtype)
        self.n, self.s1, self.s2 = 0, np.zeros_like(self.s1), np.zeros_like(self.s2)
        return moments
