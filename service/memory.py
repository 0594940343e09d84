"""Giving freed heap memory back to the operating system (glibc's `malloc_trim`).

A large request frees tens of MB at once (an 8x3x224x224 JSON body: ~24 MB of text, ~40 MB of Python
floats, its arrays), but glibc keeps freed heap memory for reuse: it raises its mmap threshold after big
frees, so later buffers of that size come from the heap, and every thread's arena holds its own free
space. The resident size then stays near the high-water mark of past requests. `malloc_trim(0)` returns
the free pages of every arena; it costs well under a millisecond on an idle heap, so the server calls it
at most once a second from a background thread (benchmarks/README.md, "Serving costs").

`malloc_trim` shrinks only the main arena's top: each other thread that allocates gets an arena of its
own, whose top keeps what was freed last for good. A pool thread that decoded a large JSON body kept
simdjson's padded copy of it (24 MB for W3) that way, past every trim (`tests/service/test_memory.py`: a
thread's 24 MB block kept without the setting, returned with it). `bn-serve` therefore runs with one arena
(`use_one_heap_arena`, as `MALLOC_ARENA_MAX=1`), which the trim then empties; the threads' mallocs take
turns on its lock, as they take turns on the GIL (benchmarks/README.md, "Large JSON bodies without
Python floats, one heap arena, and runs N-Q").
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Callable

from service.native import libc_function

log = logging.getLogger("bn_serve")

# A JSON body this large leaves tens of MB of freed heap once decoded (its text, its Python floats): the
# infer route hands them back at once rather than at the next periodic trim (benchmarks/README.md, "The
# one-connection tail").
TRIM_AFTER_JSON_BYTES = 8 * 1024 * 1024


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """libc's `malloc_trim`, or None where the C library is not glibc."""
    trim: Callable[[int], int] | None = libc_function("malloc_trim", [ctypes.c_size_t], ctypes.c_int)
    return trim


# glibc's `mallopt` parameter for the most arenas the allocator may create (malloc.h).
_M_ARENA_MAX = -8


@functools.cache
def _mallopt() -> Callable[[int, int], int] | None:
    """libc's `mallopt`, or None where the C library is not glibc."""
    mallopt: Callable[[int, int], int] | None = libc_function(
        "mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int
    )
    return mallopt


def use_one_heap_arena() -> bool:
    """Have every thread of this process, and of the processes it starts, allocate from glibc's main
    arena (module docstring); True if set. Call it before starting threads: an arena a thread has already
    made stays its own. An operator's own `MALLOC_ARENA_MAX` or `glibc.malloc.arena_max` is left as set."""
    if "MALLOC_ARENA_MAX" in os.environ or "glibc.malloc.arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    mallopt = _mallopt()
    if mallopt is None or not mallopt(_M_ARENA_MAX, 1):
        return False
    os.environ["MALLOC_ARENA_MAX"] = "1"  # for worker processes (`--workers`), which glibc sets up anew
    return True


def release_free_memory() -> bool:
    """Return the heap's free pages to the operating system; True if any were released (glibc only)."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
