"""Freed heap memory goes back to the OS: resident size read from /proc before and after the trim."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import pytest

from service import infer_route
from service.memory import _malloc_trim, release_free_memory
from service.observability import TRIM_INTERVAL_S, Observability
from tests.service.conftest import CHANNELS, InProcess, binary_infer_body


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _touched_block(size: int) -> bytearray:
    # calloc leaves fresh heap pages untouched (the kernel zeroes them), so a bare bytearray(size) may
    # never become resident; writing one byte per page makes it so.
    block = bytearray(size)
    pages = range(0, size, 4096)
    block[::4096] = b"\x01" * len(pages)
    return block


@pytest.mark.skipif(_malloc_trim() is None or not Path("/proc/self/status").exists(), reason="glibc, Linux")
def test_trimming_returns_the_free_holes_of_a_fragmented_heap() -> None:
    # 100 kB blocks sit under glibc's mmap threshold, so they come from the heap; keeping every tenth
    # alive leaves freed holes (about 170 MiB) that free() alone cannot give back: only the heap's top
    # can shrink. The figure is taken against the peak, not against the resident size after free(),
    # because a server thread left by an earlier in-process test may trim concurrently.
    release_free_memory()  # free heap pages left by earlier tests would be reused, not newly resident
    start = resident_mib()
    blocks = [_touched_block(100_000) for _ in range(2000)]
    peak = resident_mib()
    assert peak > start + 150, "the blocks must be resident for the trim to have work to do"
    kept = blocks[::10]
    del blocks
    release_free_memory()
    assert resident_mib() < peak - 100
    assert len(kept) == 200


@pytest.mark.skipif(_malloc_trim() is None or not Path("/proc/self/status").exists(), reason="glibc, Linux")
def test_the_server_trims_freed_memory_with_drift_turned_off() -> None:
    observability = Observability(drift=False, interval_s=0.05)
    observability.start()
    try:
        assert "bn-serve-trim" in {thread.name for thread in threading.enumerate()}
        release_free_memory()  # free heap pages left by earlier tests would be reused, not newly resident
        start = resident_mib()
        blocks = [_touched_block(100_000) for _ in range(2000)]
        peak = resident_mib()
        assert peak > start + 150
        kept = blocks[::10]
        del blocks
        deadline = time.monotonic() + 5 * TRIM_INTERVAL_S
        while resident_mib() >= peak - 100 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert resident_mib() < peak - 100
        assert len(kept) == 200
    finally:
        observability.close()
    assert "bn-serve-trim" not in {thread.name for thread in threading.enumerate()}


@pytest.mark.parametrize(
    ("threshold", "binary", "trims"),
    [(100_000, False, 1), (100_000, True, 0), (10**9, False, 0), (0, False, 0)],
    ids=["large-json", "binary", "below-threshold", "off"],
)
def test_a_large_json_body_hands_its_freed_memory_back_once_decoded(
    serve_in_process: Callable[..., InProcess],
    monkeypatch: pytest.MonkeyPatch,
    threshold: int,
    binary: bool,
    trims: int,
) -> None:
    # The trim itself is glibc's (tested above); here, which requests ask for it: a JSON body of at least
    # `trim_after_json_bytes` (0: none), never a binary one, whose tensors are views of the body.
    calls: list[int] = []

    def counted() -> bool:
        calls.append(1)
        return release_free_memory()

    monkeypatch.setattr(infer_route, "release_free_memory", counted)
    server = serve_in_process(trim_after_json_bytes=threshold, max_request_bytes=1 << 22)
    try:
        x = np.random.default_rng(3).standard_normal((8_000, CHANNELS)).astype(np.float32)
        if binary:
            body, header_length = binary_infer_body(x)
            headers = {"Inference-Header-Content-Length": str(header_length)}
        else:
            body = orjson.dumps(
                {
                    "inputs": [
                        {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel()}
                    ]
                },
                option=orjson.OPT_SERIALIZE_NUMPY,
            )
            headers = {"Content-Type": "application/json"}
        assert len(body) > 100_000
        response = server.post("/v2/models/frozen/infer", content=body, headers=headers)
        assert response.status_code == 200, response.text
    finally:
        server.close()
    assert len(calls) == trims


_ARENA_SCRIPT = """
import sys, threading
from pathlib import Path
from service.memory import release_free_memory, use_one_heap_arena

def resident_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

if sys.argv[1] == "one":
    assert use_one_heap_arena()
start = resident_mib()

def large_buffers():
    # The first free of a 24 MB block raises glibc's mmap threshold past it: the second comes from the
    # thread's arena, whose top keeps it once freed unless that arena is the main one.
    for _ in range(2):
        block = bytearray(24 << 20)
        block[::4096] = b"\\x01" * len(range(0, 24 << 20, 4096))
        del block

thread = threading.Thread(target=large_buffers)
thread.start()
thread.join()
release_free_memory()
print(resident_mib() - start)
"""


@pytest.mark.skipif(_malloc_trim() is None or not Path("/proc/self/status").exists(), reason="glibc, Linux")
@pytest.mark.parametrize(("arenas", "kept_mib"), [("one", (None, 8)), ("default", (16, None))])
def test_with_one_heap_arena_the_trim_returns_what_a_thread_freed_last(
    arenas: str, kept_mib: tuple[float | None, float | None]
) -> None:
    # A fresh interpreter: the arena limit only holds for threads started after it is set.
    # glibc's own settings left by other tests' libraries (dask sets MALLOC_TRIM_THRESHOLD_, which turns the
    # dynamic mmap threshold off) are not this process's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run(
        [sys.executable, "-c", _ARENA_SCRIPT, arenas],
        capture_output=True, text=True, timeout=60, env=env, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    kept = float(done.stdout)
    low, high = kept_mib
    if low is not None:
        assert kept >= low, kept  # without it, the thread's arena keeps the block: what the setting is for
    if high is not None:
        assert kept < high, kept
