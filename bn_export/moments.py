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
from collections.abc import Iterable
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
# Batches from this many values on are split over threads, at most this many.
_PARALLEL_VALUES = 1 << 22
_MAX_WORKERS = 8


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
        `workers` threads share a large batch (default: up to 8 for batches of 4M values or more;
        pass 1 where the caller already runs one batch per core).
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

    Each cache-sized block is copied to float64, shifted by one of its own values per channel `k` (for
    float32 data `x - k` is exact in float64, and a shift inside the data's range keeps
    `M2 = Σd² - (Σd)²/n` free of cancellation), summed with BLAS, and the blocks merge pairwise. Large
    batches are split over `workers` threads (numpy releases the GIL in these kernels).
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
    A, C, B = view.shape
    counts: list[int] = []
    sums: list[tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]] = []
    if B >= _MIN_ROW:
        # Channel rows of B contiguous values: the sums are row dot products (BLAS).
        cols = min(B, max(_MIN_ROW, _BLOCK_VALUES // C))
        rows = max(1, _BLOCK_VALUES // (C * cols))
        buffer = np.empty((rows, C, cols))
        ones = np.ones(cols)
        for a in range(0, A, rows):
            for b in range(0, B, cols):
                block = view[a : a + rows, :, b : b + cols]
                r, _, w = block.shape
                shift = block[0, :, 0].astype(np.float64)
                d = buffer[:r, :, :w]
                np.copyto(d, block)
                d -= shift[:, None]
                flat = d.reshape(r * C, w)
                s1 = (flat @ ones[:w]).reshape(r, C).sum(axis=0)
                s2 = (flat[:, None, :] @ flat[:, :, None]).reshape(r, C).sum(axis=0)
                counts.append(r * w)
                sums.append((shift, s1, s2))
    else:
        # Channels last (or few values after them): (rows, C) blocks with the channel innermost.
        a_rows = max(1, _BLOCK_VALUES // (C * B))
        buffer = np.empty((a_rows, B, C))
        ones = np.ones(a_rows * B)
        for a in range(0, A, a_rows):
            block = view[a : a + a_rows].transpose(0, 2, 1)
            r = block.shape[0]
            shift = block[0, 0, :].astype(np.float64)
            d = buffer[:r]
            np.copyto(d, block)
            d -= shift
            flat = d.reshape(r * B, C)
            s1 = ones[: r * B] @ flat
            s2 = np.einsum("ac,ac->c", flat, flat)
            counts.append(r * B)
            sums.append((shift, s1, s2))
    n = np.array(counts, dtype=np.float64)
    shift, s1, s2 = (np.stack(column) for column in zip(*sums, strict=True))
    # Rounding can push a constant channel's M2 just below 0.
    m2 = np.maximum(s2 - s1 * s1 / n[:, None], 0.0)
    return n, shift + s1 / n[:, None], m2


@functools.cache
def _thread_pool() -> ThreadPoolExecutor:
    """One pool for the process, made on first use (never at import)."""
    return ThreadPoolExecutor(max_workers=_MAX_WORKERS, thread_name_prefix="bn-moments")


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
