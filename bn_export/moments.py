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
import itertools
import math
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bn_export.errors import InvalidInputError
from bn_export.layer import check_input, require_finite

# Values per block: a block's float64 copy (1 MiB) stays in a core's L2 cache.
_BLOCK_VALUES = 1 << 17
# Channel rows shorter than this are transposed to channels-last blocks, where BLAS works across rows.
_MIN_ROW = 64
# Batches from this many values on are split over threads, at most this many: past two, the Python
# between kernels (which holds the GIL) costs more than the extra cores give (measured on a 16-core Xeon).
_PARALLEL_VALUES = 1 << 22
_MAX_WORKERS = 2
# Unshifted sums while Σx² <= this × M2 (at most 6 bits lost to cancellation, ~1e-14 relative).
_CANCELLATION = 64.0


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

    Each cache-sized block is copied to float64 and summed with BLAS (`Σd`, `Σd²`); the blocks merge
    pairwise. Centred data is summed as it is; once `Σx²` dwarfs `M2` (cancellation in
    `M2 = Σd² - (Σd)²/n`), blocks are first shifted by one of their own values per channel `k` (for
    float32 data `x - k` is exact in float64, and a shift inside the data's range keeps the cancellation
    small). Large batches are split over `workers` threads (numpy releases the GIL in these kernels).
    """
    C = data.shape[channel]
    A = math.prod(data.shape[:channel])
    B = math.prod(data.shape[channel + 1 :])
    view = data.reshape(A, C, B)
    if workers is None:
        workers = _MAX_WORKERS if data.size >= _PARALLEL_VALUES else 1
    workers = max(1, min(int(workers), A, _available_cpus()))
    if workers == 1:
        parts = [_moments_of_rows(view)]
    else:
        bounds = np.linspace(0, A, workers + 1).astype(int)
        chunks = [view[lo:hi] for lo, hi in itertools.pairwise(bounds) if hi > lo]
        parts = list(_thread_pool().map(_moments_of_rows, chunks))
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


def _moments_of_rows(
    view: NDArray[np.floating[Any]],
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Per-block `(counts (P,), means (P, C), m2s (P, C))` of an (A, C, B) array, blocks over A (and B)."""
    # NaN/Inf in the data make the sums non-finite, which the caller turns into an error; no warnings.
    with np.errstate(invalid="ignore", over="ignore"):
        return _moments_of_rows_unchecked(view)


def _moments_of_rows_unchecked(
    view: NDArray[np.floating[Any]],
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    _, C, B = view.shape
    counts: list[int] = []
    sums: list[tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]] = []
    layout = _RowBlocks(view) if B >= _MIN_ROW else _ChannelsLastBlocks(view)
    # Unshifted sums are exact enough while Σx² stays within a factor `_CANCELLATION` of M2 (it loses
    # log2 of that factor in bits); past it, this block and the rest shift by one of their own values.
    shifting = False
    zero = np.zeros(C)
    for block, d in layout.blocks():
        n = d.size // C
        np.copyto(d, block)
        shift = zero
        if shifting:
            shift = layout.shift(block, d)
        s1, s2 = layout.sums(d)
        if not shifting and np.any(s2 > _CANCELLATION * (s2 - s1 * s1 / n)):
            shifting = True
            shift = layout.shift(block, d)
            s1, s2 = layout.sums(d)
        counts.append(n)
        sums.append((shift, s1, s2))
    n_blocks = np.array(counts, dtype=np.float64)[:, None]
    shifts, s1s, s2s = (np.stack(column) for column in zip(*sums, strict=True))
    # Rounding can push a constant channel's M2 just below 0.
    m2 = np.maximum(s2s - s1s * s1s / n_blocks, 0.0)
    return n_blocks[:, 0], shifts + s1s / n_blocks, m2


class _RowBlocks:
    """(A, C, B) with long channel rows (B >= _MIN_ROW): blocks (r, C, w); sums are row dot products."""

    def __init__(self, view: NDArray[np.floating[Any]]) -> None:
        _, C, B = view.shape
        self.view = view
        self.cols = min(B, max(_MIN_ROW, _BLOCK_VALUES // C))
        self.rows = max(1, _BLOCK_VALUES // (C * self.cols))
        self.buffer = np.empty((self.rows, C, self.cols))
        self.ones = np.ones(self.cols)

    def blocks(self) -> Iterator[tuple[NDArray[np.floating[Any]], NDArray[np.float64]]]:
        A, _, B = self.view.shape
        for a in range(0, A, self.rows):
            for b in range(0, B, self.cols):
                block = self.view[a : a + self.rows, :, b : b + self.cols]
                yield block, self.buffer[: block.shape[0], :, : block.shape[2]]

    def shift(self, block: NDArray[np.floating[Any]], d: NDArray[np.float64]) -> NDArray[np.float64]:
        shift = block[0, :, 0].astype(np.float64)
        d -= shift[:, None]
        return shift

    def sums(self, d: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        r, C, w = d.shape
        flat = d.reshape(r * C, w)
        s1 = (flat @ self.ones[:w]).reshape(r, C).sum(axis=0)
        s2 = (flat[:, None, :] @ flat[:, :, None]).reshape(r, C).sum(axis=0)
        return s1, s2


class _ChannelsLastBlocks:
    """(A, C, B) with short rows: blocks copied to (r, B, C), channel innermost; sums run down columns."""

    def __init__(self, view: NDArray[np.floating[Any]]) -> None:
        _, C, B = view.shape
        self.view = view
        self.rows = max(1, _BLOCK_VALUES // (C * B))
        self.buffer = np.empty((self.rows, B, C))
        self.ones = np.ones(self.rows * B)

    def blocks(self) -> Iterator[tuple[NDArray[np.floating[Any]], NDArray[np.float64]]]:
        for a in range(0, self.view.shape[0], self.rows):
            block = self.view[a : a + self.rows].transpose(0, 2, 1)
            yield block, self.buffer[: block.shape[0]]

    def shift(self, block: NDArray[np.floating[Any]], d: NDArray[np.float64]) -> NDArray[np.float64]:
        shift = block[0, 0, :].astype(np.float64)
        d -= shift
        return shift

    def sums(self, d: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        flat = d.reshape(-1, d.shape[2])
        return self.ones[: flat.shape[0]] @ flat, np.einsum("ac,ac->c", flat, flat)


@functools.cache
def _thread_pool() -> ThreadPoolExecutor:
    """One pool for the process, made on first use (never at import)."""
    return ThreadPoolExecutor(max_workers=_MAX_WORKERS, thread_name_prefix="bn-moments")


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
