"""Compiled block sums for `Moments.from_batch`: one pass that reads the data in its own dtype.

The NumPy path copies each block to float64 and then sums it (two passes over the block, the cast alone as
slow as a float32 reduction over the same data). These kernels convert each value to float64 as they
read it and add `d = x - shift` and `d²` into per-channel float64 partials in the same pass, so a fit
reads its data once at about the speed of `np.add.reduce` (benchmarks/README.md, "Fitting").

The sums are float64 like the NumPy path's, over the same blocks, so every exactness argument of
`bn_export.moments` holds; only the order of additions within a block differs (the compiler may reorder
them to use SIMD lanes), which moves a result by float64 rounding, not more. `fold_kernel` runs
`BatchNorm.fold_batches`' loop (the EMA over a group of small batches) compiled without fastmath, so it
gives the same bits as the NumPy loop.

numba is the optional extra `fast` (`pip install 'frozen-bn[fast]'`). Without it, or with
`BN_EXPORT_KERNELS=numpy`, `block_sums` is None and the NumPy path runs. Compiled code is cached on
disk (numba's `cache=True`: beside this file, or in the user's cache directory where that is read-only),
so only the first fit on a machine pays for compiling, about a second; importing numba costs about 0.3 s
per process, which is why small batches never load it.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bn_export.errors import InvalidInputError, MissingDependencyError

log = logging.getLogger("bn_export")

# Batches smaller than this (values) use the NumPy path: importing numba would cost more than it saves.
MIN_VALUES = 1 << 20
ENV_VAR = "BN_EXPORT_KERNELS"
_CHOICES = ("auto", "numba", "numpy")

# Reassociation lets the compiler keep several partial sums in SIMD lanes; nothing else is relaxed
# (no reciprocal or fused-contraction liberties that would change what is summed).
_FASTMATH = {"reassoc", "nsz"}

BlockSums = Callable[
    [NDArray[Any], NDArray[np.float64], int, int, NDArray[np.float64], NDArray[np.float64]], None
]


def _rows_kernel(
    x: Any, shift: Any, rows: int, cols: int, out1: Any, out2: Any
) -> None:  # pragma: no cover - compiled
    """Blocks of `rows` x all channels x `cols` of `x: (A, C, B)`, numbered row-block-major like
    `_RowBlocks.starts`; block p's `Σ(x - shift)` and `Σ(x - shift)²` per channel go to `out1[p]`,
    `out2[p]` (added to what is there)."""
    A, C, B = x.shape
    col_blocks = (B + cols - 1) // cols
    for p0 in range(0, A, rows):
        for q in range(col_blocks):
            p = (p0 // rows) * col_blocks + q
            for a in range(p0, min(p0 + rows, A)):
                for c in range(C):
                    k = shift[c]
                    t1 = 0.0
                    t2 = 0.0
                    # A slice, not range(b0, b1) over x: only then does the loop vectorise (8x here).
                    row = x[a, c, q * cols : (q + 1) * cols]
                    for b in range(row.shape[0]):
                        d = np.float64(row[b]) - k
                        t1 += d
                        t2 += d * d
                    out1[p, c] += t1
                    out2[p, c] += t2


def _channels_last_kernel(
    x: Any, shift: Any, rows: int, cols: int, out1: Any, out2: Any
) -> None:  # pragma: no cover - compiled
    """`x: (A, C, 1)`, channel innermost: each row adds into every channel's partial, which the compiler
    vectorises across channels. `cols` is 1."""
    A, C, _ = x.shape
    for p0 in range(0, A, rows):
        p = p0 // rows
        for a in range(p0, min(p0 + rows, A)):
            for c in range(C):
                d = np.float64(x[a, c, 0]) - shift[c]
                out1[p, c] += d
                out2[p, c] += d * d


def _fold_kernel(
    old_mean: Any,
    old_var: Any,
    means: Any,
    variances: Any,
    momentum: float,
    first_batch: int,
    out_mean: Any,
    out_var: Any,
) -> None:  # pragma: no cover - compiled
    """`BatchNorm.update_statistics` for each row of `means`, `variances` (the EMA terms `stat *
    (1 - momentum)` when `momentum >= 0`; the raw statistics for the cumulative average, `momentum < 0`,
    whose batch count starts at `first_batch`), each result stored in `out_*`'s dtype and read back from
    it, as the layer does. Compiled without fastmath: the same operations in the same order, so the same
    bits as NumPy's loop."""
    G, C = means.shape
    for g in range(G):
        for c in range(C):
            if momentum < 0.0:
                factor = 1.0 / (first_batch + g)
                mean = old_mean[c] + (means[g, c] - old_mean[c]) * factor
                var = old_var[c] + (variances[g, c] - old_var[c]) * factor
            else:
                mean = old_mean[c] * momentum + means[g, c]
                var = old_var[c] * momentum + variances[g, c]
            out_mean[g, c] = mean
            out_var[g, c] = var
            old_mean[c] = np.float64(out_mean[g, c])
            old_var[c] = np.float64(out_var[g, c])


FoldKernel = Callable[
    [
        NDArray[np.float64],
        NDArray[np.float64],
        NDArray[np.float64],
        NDArray[np.float64],
        float,
        int,
        NDArray[Any],
        NDArray[Any],
    ],
    None,
]


def fold_kernel() -> FoldKernel | None:
    """The compiled EMA fold, or None where the choice is NumPy's or numba is missing. Callers ask only
    where the block sums already loaded numba (a group of small batches summed by `block_sums`)."""
    if kernels_choice() == "numpy":
        return None
    compiled = _compiled()
    return None if compiled is None else compiled[2]


def kernels_choice() -> str:
    """`BN_EXPORT_KERNELS`: `auto` (numba where installed), `numba` (required) or `numpy`."""
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise InvalidInputError(f"{ENV_VAR} must be one of {', '.join(_CHOICES)}, got {choice!r}")
    return choice


def block_sums(values: int, dtype: np.dtype[Any], channels_last: bool) -> BlockSums | None:
    """The compiled kernel for a batch of `values` values of `dtype`, or None where the NumPy path runs
    (NumPy's choice, a small batch, numba missing, or a dtype the kernels do not take: float16 and
    non-native byte orders)."""
    choice = kernels_choice()
    if choice == "numpy" or (choice == "auto" and values < MIN_VALUES):
        return None
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)) or not dtype.isnative:
        return None
    compiled = _compiled()
    if compiled is None:
        if choice == "numba":
            raise MissingDependencyError(
                f"{ENV_VAR}=numba but numba is not installed (install the 'fast' extra: frozen-bn[fast])"
            )
        return None
    return compiled[1] if channels_last else compiled[0]


@functools.cache
def _compiled() -> tuple[BlockSums, BlockSums, FoldKernel] | None:
    try:
        import numba  # optional, and 0.3 s to import: only when a large batch needs it
    except ImportError:
        return None
    kernels: list[Any] = []
    for function, fastmath in (
        (_rows_kernel, _FASTMATH),
        (_channels_last_kernel, _FASTMATH),
        (_fold_kernel, False),
    ):
        options: dict[str, Any] = {"nogil": True, "fastmath": fastmath, "boundscheck": False}
        try:
            kernels.append(numba.njit(cache=True, **options)(function))
        except RuntimeError as error:  # no writable cache location: compile on each process instead
            log.debug("numba cannot cache %s (%s); compiling without a cache", function.__name__, error)
            kernels.append(numba.njit(cache=False, **options)(function))
    return kernels[0], kernels[1], kernels[2]
