"""Slow and hostile clients cost bounded memory and cannot starve the others: against a real `bn-serve` on
127.0.0.1, with clients that never read their responses and clients that trickle their bodies in. Bounded
in count and time."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from tests.service.conftest import Server, start_server, stop_server

pytestmark = pytest.mark.slow

INFER = "/v2/models/frozen/infer"
SMALL = orjson.dumps(
    {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
)
GIB = 1 << 30


def _rss(server: Server) -> int:
    with open(f"/proc/{server.process.pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _metric(server: Server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and (line[len(name)] in " {")
    )


def _connect(server: Server, *, small_window: bool = True) -> socket.socket:
    host, port = server.host_port.split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    if small_window:  # the kernel absorbs little of an answer never read
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


def _answered_quickly(server: Server) -> float:
    started = time.perf_counter()
    response = httpx.post(f"{server.url}{INFER}", content=SMALL, timeout=10)
    assert response.status_code == 200, response.text
    return time.perf_counter() - started


@pytest.fixture
def serve(repository: Any) -> Iterator[Any]:
    started: list[Server] = []

    def run(**env: str) -> Server:
        started.append(
            start_server(
                "--model-repository",
                str(repository.root),
                "--device",
                "cpu",
                env={"BN_SERVE_LOG_LEVEL": "warning", **env},
            )
        )
        return started[-1]

    yield run
    for server in started:
        stop_server(server)


def test_twenty_clients_that_never_read_16_mib_answers_grow_the_server_by_under_1_gib(serve: Any) -> None:
    server = serve(BN_SERVE_SEND_TIMEOUT_S="120")
    x = np.random.default_rng(0).standard_normal((1 << 20, 4)).astype(np.float32)  # 16 MiB
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ]
        }
    )  # fmt: skip  (no binary_data_output: the outputs come back as JSON, ~80 MB each)
    head = (
        f"POST {INFER} HTTP/1.1\r\nHost: {server.host_port}\r\nContent-Type: application/octet-stream\r\n"
        f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {len(header) + x.nbytes}\r\n\r\n"
    ).encode()
    for _ in range(3):
        _answered_quickly(server)
    before = _rss(server)
    answered_before = _metric(server, "bn_serve_requests_total")
    sockets = []
    peak = before
    try:
        for _ in range(20):
            sock = _connect(server)
            sock.sendall(head + header + x.tobytes())
            sockets.append(sock)
            peak = max(peak, _rss(server))
        deadline = time.monotonic() + 120
        while _metric(server, "bn_serve_requests_total") < answered_before + 20:
            assert time.monotonic() < deadline, "the server did not answer the 20 requests"
            peak = max(peak, _rss(server))
            time.sleep(0.2)
        for _ in range(10):
            peak = max(peak, _rss(server))
            time.sleep(0.2)
        assert _answered_quickly(server) < 5
        pending = _metric(server, "bn_serve_pending_response_bytes")
        refused = _metric(server, "bn_serve_responses_refused_total")
    finally:
        for sock in sockets:
            sock.close()
    growth = peak - before
    print(f"RSS {before / 2**20:.0f} MiB -> peak {peak / 2**20:.0f} MiB; pending {pending / 2**20:.0f} MiB; "
          f"refused {refused:.0f}")  # fmt: skip
    assert growth < GIB, growth
    assert pending <= 256 << 20
    assert refused > 0  # 20 answers of ~80 MB do not fit in 256 MiB: the excess was refused and counted
    deadline = time.monotonic() + 30
    while _metric(server, "bn_serve_pending_response_bytes") > 0:  # the closed clients' bytes are freed
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_a_client_that_stops_reading_is_cut_off_after_send_timeout_s(serve: Any) -> None:
    server = serve(BN_SERVE_SEND_TIMEOUT_S="1")
    x = np.ones((1 << 18, 4), np.float32)
    body = orjson.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "data": x.ravel().tolist()}]})  # fmt: skip
    with _connect(server, small_window=False) as sock:
        sock.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        time.sleep(4)  # never reading: the server gives up after 1 s without progress
        received = b""
        with contextlib.suppress(ConnectionResetError):  # the abort may reset the connection
            while chunk := sock.recv(1 << 20):
                received += chunk
    head, _, answer = received.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    assert length > 10 << 20
    assert len(answer) < length  # the connection ended before the answer did
    deadline = time.monotonic() + 10
    while _metric(server, "bn_serve_pending_response_bytes") > 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert _answered_quickly(server) < 1


def test_200_connections_trickling_their_bodies_leave_normal_clients_answered_within_a_second(
    serve: Any,
) -> None:
    server = serve()
    head = (
        f"POST {INFER} HTTP/1.1\r\nHost: {server.host_port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(SMALL)}\r\n\r\n"
    ).encode()
    sockets = []
    stop = threading.Event()
    try:
        for _ in range(200):
            sock = _connect(server)
            sock.sendall(head + SMALL[:1])
            sockets.append(sock)

        def trickle() -> None:
            sent = 1
            while not stop.is_set() and sent < len(SMALL) - 1:
                for sock in sockets:
                    sock.sendall(SMALL[sent : sent + 1])
                sent += 1
                stop.wait(0.5)

        trickler = threading.Thread(target=trickle)
        trickler.start()
        latencies = []
        for _ in range(20):
            time.sleep(0.2)
            latencies.append(_answered_quickly(server))
        stop.set()
        trickler.join()
    finally:
        for sock in sockets:
            sock.close()
    assert max(latencies) < 1.0, latencies
