"""A request's head is bounded in size, header count and time, before the app (or authentication) sees it:
against a real `bn-serve` process on 127.0.0.1, over raw sockets."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.service.conftest import Server, start_server, stop_server

INFER = "/v2/models/frozen/infer"
BODY = orjson.dumps(
    {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
)
KEY = "k-123"


@pytest.fixture(scope="module", params=["open", "with_api_key"])
def limited_server(request: Any, repository: Any) -> Iterator[Server]:
    """A server with a 16 KiB head limit and a 2 s deadline, open or behind an API key (whose check must
    come after the head limits: a client without the key is cut off just the same)."""
    env = {
        "BN_SERVE_REQUEST_TIMEOUT_S": "2",
        "BN_SERVE_MAX_HEADER_BYTES": "16384",
        "BN_SERVE_LOG_LEVEL": "error",
    }
    if request.param == "with_api_key":
        env["BN_SERVE_API_KEY"] = KEY
    running = start_server("--model-repository", str(repository.root), "--device", "cpu", env=env)
    try:
        yield running
    finally:
        stop_server(running)


def _auth(server: Server) -> dict[str, str]:
    """The key, for a server that needs one: a 401 would also answer, but says nothing about serving."""
    return {"Authorization": f"Bearer {KEY}"}


def _connect(server: Server) -> socket.socket:
    host, port = server.host_port.split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _answer(sock: socket.socket) -> bytes:
    response = b""
    try:
        while chunk := sock.recv(65536):
            response += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return response


def _v2_error(response: bytes, status: int) -> str:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d" % status), response[:300]
    document = orjson.loads(body)
    assert set(document) == {"error"}, document
    return str(document["error"])


def _normal_request_is_answered(server: Server) -> None:
    response = httpx.post(f"{server.url}{INFER}", content=BODY, headers=_auth(server), timeout=10)
    assert response.status_code == 200, response.text


def _head(server: Server, extra: str) -> bytes:
    return (
        f"POST {INFER} HTTP/1.1\r\nHost: {server.host_port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n{extra}"
    ).encode()


def test_headers_past_max_header_bytes_get_431_with_a_v2_body(limited_server: Server) -> None:
    with _connect(limited_server) as sock:
        sock.sendall(_head(limited_server, "X-Junk: " + "a" * 20_000 + "\r\n\r\n") + BODY)
        assert "max_header_bytes" in _v2_error(_answer(sock), 431)
    _normal_request_is_answered(limited_server)


def test_more_headers_than_max_header_count_get_431(limited_server: Server) -> None:
    extra = "".join(f"X-H{i}: {i}\r\n" for i in range(101))
    with _connect(limited_server) as sock:
        sock.sendall(_head(limited_server, extra + "\r\n") + BODY)
        assert "max_header_count" in _v2_error(_answer(sock), 431)
    _normal_request_is_answered(limited_server)


def test_a_64_mib_header_is_cut_off_at_once_and_others_are_answered_meanwhile(limited_server: Server) -> None:
    latencies: list[float] = []
    stop = threading.Event()

    def normal_requests() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            _normal_request_is_answered(limited_server)
            latencies.append(time.perf_counter() - started)

    prober = threading.Thread(target=normal_requests)
    prober.start()
    sent = 0
    started = time.perf_counter()
    try:
        with _connect(limited_server) as sock:
            sock.sendall(_head(limited_server, "X-Junk: "))
            chunk = b"a" * (1 << 20)
            try:
                for _ in range(64):
                    sock.sendall(chunk)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            response = _answer(sock)
    finally:
        stop.set()
        prober.join()
    elapsed = time.perf_counter() - started
    # The server stops reading past the limit: the send fails long before 64 MiB (socket buffers aside).
    assert sent < 16 << 20, sent
    assert elapsed < 5, elapsed
    assert response == b"" or response.startswith(b"HTTP/1.1 431"), response[:200]
    assert latencies
    assert max(latencies) < 1.0, latencies


def test_a_head_that_trickles_in_gets_408_after_the_request_timeout(limited_server: Server) -> None:
    with _connect(limited_server) as sock:
        started = time.monotonic()
        sock.sendall(_head(limited_server, ""))
        # One more header byte a second, never the blank line that ends the head.
        response = b""
        sock.settimeout(0.5)
        for byte in b"X-Slow: " + b"a" * 20:
            try:
                sock.sendall(bytes([byte]))
                response = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if response:
                break
        elapsed = time.monotonic() - started
    assert 1.5 < elapsed < 6, elapsed
    _v2_error(response, 408)
    _normal_request_is_answered(limited_server)
