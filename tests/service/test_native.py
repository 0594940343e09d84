"""OS thread names (`service.native`): each thread of a real bn-serve process shows under its own name."""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.batching import INLINE_MAX_ELEMENTS
from service.native import libc_function, name_this_thread
from tests.service.conftest import CHANNELS, Repository, binary_infer_body, start_server, stop_server

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="thread names are read from /proc (Linux)")


def os_thread_name(pid: int | str, thread_id: int | str) -> str:
    return Path(f"/proc/{pid}/task/{thread_id}/comm").read_text().rstrip("\n")


def named_in_thread(python_name: str) -> str:
    """The OS name a thread called `python_name` has after `name_this_thread()`."""
    seen: list[str] = []

    def run() -> None:
        name_this_thread()
        seen.append(os_thread_name("self", threading.get_native_id()))

    thread = threading.Thread(target=run, name=python_name)
    thread.start()
    thread.join()
    return seen[0]


@linux_only
@pytest.mark.parametrize(
    ("python_name", "os_name"),
    [
        ("bn-serve-drift", "bn-serve-drift"),
        ("bn-serve-pool_3", "bn-serve-pool_3"),
        ("bn-serve-metrics", "bn-serve-metric"),  # Linux keeps 15 bytes
        ("drift-é", "drift-?"),
    ],
)
def test_the_os_thread_takes_its_python_name(python_name: str, os_name: str) -> None:
    assert named_in_thread(python_name) == os_name


@linux_only
def test_naming_a_thread_leaves_the_others_named_as_before() -> None:
    before = os_thread_name("self", threading.get_native_id())
    assert named_in_thread("bn-serve-other") == "bn-serve-other"
    assert os_thread_name("self", threading.get_native_id()) == before


def test_a_function_the_c_library_lacks_is_none() -> None:
    assert libc_function("no_such_function_in_libc", [], ctypes.c_int) is None


@linux_only
def test_a_serving_process_names_its_threads(repository: Repository) -> None:
    server = start_server(
        "--model-repository", str(repository.root), "--device", "cpu", "--intra-op-threads", "1", "--no-grpc"
    )
    try:
        # A request too large to run on the event loop goes through the pool.
        rows = INLINE_MAX_ELEMENTS // CHANNELS + 1
        body, header_length = binary_infer_body(np.ones((rows, CHANNELS), np.float32))
        response = httpx.post(
            f"{server.url}/v2/models/frozen/infer",
            content=body,
            headers={"Inference-Header-Content-Length": str(header_length)},
        )
        assert response.status_code == 200, response.text
        pid = server.process.pid
        wanted = {"bn-serve-drift", "bn-serve-metric", "bn-serve-pool_0"}
        deadline = time.monotonic() + 10
        while True:
            names = {os_thread_name(pid, task.name) for task in Path(f"/proc/{pid}/task").iterdir()}
            if {
                "bn-serve-drift",
                "bn-serve-metric",
                "bn-serve-pool_0",
            } <= names or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert wanted <= names, names
    finally:
        stop_server(server)
