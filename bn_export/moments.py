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

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bn_export.errors import InvalidInputError
from bn_export.layer import check_input

# Values per block for `from_batch`: a block's float64 deviations (8 bytes each) stay in the L2 cache.
_BLOCK_VALUES = 1 << 15


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
    def from_batch(cls, x: ArrayLike, axis: int) -> Moments:
        """The moments of each channel of `x: (N, *)` (channels at `axis`) over every other axis.

        Exact to float64 rounding: the values are taken in blocks small enough to stay in cache, each
        block gets a two-pass mean and M2 in float64, and the blocks merge pairwise.
        """
        data, channel = check_input(x, axis)
        return _blocked_moments(data, channel)

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
    while len(level) > 1:
        paired = [level[i].merge(level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def _blocked_moments(data: NDArray[np.floating], channel: int) -> Moments:
    """Moments of `data` per channel, in cache-sized blocks of the (A, C, B) view of the array."""
    C = data.shape[channel]
    A = int(np.prod(data.shape[:channel]))
    B = int(np.prod(data.shape[channel + 1 :]))
    view = data.reshape(A, C, B)
    parts = []
    rows = max(1, _BLOCK_VALUES // (C * B))
    for start in range(0, A, rows):
        block = view[start : start + rows]
        n = block.shape[0] * B
        mean = np.add.reduce(block, axis=(0, 2), dtype=np.float64) / n
        deviation = np.subtract(block, mean[:, None], dtype=np.float64)
        m2 = np.einsum("acb,acb->c", deviation, deviation)
        parts.append(Moments(n, mean, m2))
    result = merge_all(parts)
    if not (np.all(np.isfinite(result.mean)) and np.all(np.isfinite(result.m2))):
        raise InvalidInputError("the statistics overflow float64; the input values are too large")
    return result
