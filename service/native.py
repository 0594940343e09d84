"""The few C library calls the server makes through ctypes: a typed loader, and naming the OS thread.

Python's thread names stay inside the interpreter (before Python 3.14): `top -H`, `ps -L`, `perf` and
`/proc/PID/task/*/comm` show every thread by the process's name. Each of bn-serve's threads gives its OS
thread its Python name at its start (`bn-serve-drift`, `bn-serve-pool_0`, ...), so that what each thread
costs can be read off the OS (`benchmarks/serve_cpu.py --threads`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
import threading
from typing import Any

# prctl's option that sets the calling thread's name (linux/prctl.h); the kernel keeps 15 bytes of it.
_PR_SET_NAME = 15
_MAX_THREAD_NAME = 15


def libc_function(name: str, argtypes: list[type], restype: type) -> Any:
    """The C library's function `name`, typed, or None where the C library lacks it (musl, macOS)."""
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        function = getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = restype
    return function


@functools.cache
def _prctl() -> Any:
    if sys.platform != "linux":
        return None
    return libc_function("prctl", [ctypes.c_int, ctypes.c_char_p], ctypes.c_int)


def name_this_thread() -> None:
    """Give the calling OS thread its Python thread's name (the first 15 bytes, as Linux keeps them; a
    non-ASCII character becomes `?`). Never raises: a thread left unnamed costs nothing but the name."""
    prctl = _prctl()
    if prctl is not None:
        name = threading.current_thread().name
        prctl(_PR_SET_NAME, name.encode("ascii", "replace")[:_MAX_THREAD_NAME])
