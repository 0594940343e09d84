"""Graceful shutdown of a real `bn-serve` under load: after SIGTERM every accepted request is answered, new
connections are refused, and the process exits 0 within `graceful_shutdown_s`."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from typing import Any

import httpx
import orjson
import pytest

from tests.service.conftest import start_server, stop_server

pytestmark = pytest.mark.slow

PAYLOAD = orjson.dumps(
    {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": [0.5] * 8}]}
)


def _stalled(host_port: str) -> socket.socket:
    """A connection whose request is in flight: headers and part of the body sent, the rest held back."""
    host, port = host_port.split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (
        f"POST /v2/models/frozen/infer HTTP/1.1\r\nHost: {host_port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(PAYLOAD)}\r\n\r\n"
    )
    sock.sendall(head.encode() + PAYLOAD[:10])
    return sock


def _finish(sock: socket.socket) -> bytes:
    with sock:
        sock.sendall(PAYLOAD[10:])
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    return response


def test_sigterm_under_load_answers_every_accepted_request_refuses_new_ones_and_exits_0(
    repository: Any,
) -> None:
    server = start_server("--model-repository", str(repository.root), "--device", "cpu")
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            while not stop.is_set():
                try:
                    response = http.post("/v2/models/frozen/infer", content=PAYLOAD)
                except httpx.ConnectError:
                    errors["refused"] += 1
                    time.sleep(0.01)
                    continue
                except httpx.HTTPError as exc:  # a keep-alive connection closed between two requests
                    errors[type(exc).__name__] += 1
                    continue
                statuses[response.status_code] += 1

    try:
        in_flight = [_stalled(server.host_port) for _ in range(4)]
        clients = [threading.Thread(target=client) for _ in range(6)]
        for thread in clients:
            thread.start()
        time.sleep(1.0)
        server.process.terminate()
        sent_term = time.monotonic()
        time.sleep(0.5)
        assert server.process.poll() is None, "the server exited with requests in flight"
        host, port = server.host_port.split(":")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=5).close()
        answers = [_finish(sock) for sock in in_flight]
        server.process.wait(30)
        elapsed = time.monotonic() - sent_term
    finally:
        stop.set()
        for thread in clients:
            thread.join(30)
        code = stop_server(server)
    assert code == 0
    assert elapsed < 10
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert b'"model_name":"frozen"' in answer
    assert statuses[200] > 0
    assert set(statuses) == {200}, statuses  # nothing accepted was answered with an error
    # Errors are only failures to connect, or the close of an idle keep-alive connection.
    assert set(errors) <= {"refused", "RemoteProtocolError", "ReadError"}, errors


def test_a_request_that_never_finishes_does_not_hold_shutdown_past_the_grace_period(repository: Any) -> None:
    server = start_server(
        "--model-repository", str(repository.root), "--device", "cpu",
        env={"BN_SERVE_GRACEFUL_SHUTDOWN_S": "1"},
    )  # fmt: skip
    try:
        hung = _stalled(server.host_port)  # its body never completes
        time.sleep(0.3)
        server.process.terminate()
        started = time.monotonic()
        server.process.wait(20)
        elapsed = time.monotonic() - started
        hung.close()
    finally:
        code = stop_server(server)
    assert elapsed < 6, elapsed
    assert code == 0


@pytest.mark.parametrize("route", ["/v2/models/frozen/infer", "/v2/repository/index"])
def test_a_request_cut_short_by_shutdown_is_answered_503_with_a_v2_body(repository: Any, route: str) -> None:
    server = start_server(
        "--model-repository", str(repository.root), "--device", "cpu",
        env={"BN_SERVE_GRACEFUL_SHUTDOWN_S": "1", "BN_SERVE_REQUEST_TIMEOUT_S": "60"},
    )  # fmt: skip
    try:
        host, port = server.host_port.split(":")
        hung = socket.create_connection((host, int(port)), timeout=30)
        head = (
            f"POST {route} HTTP/1.1\r\nHost: {server.host_port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(PAYLOAD)}\r\n\r\n"
        )
        hung.sendall(head.encode() + PAYLOAD[:10])  # the rest never comes
        time.sleep(0.3)
        server.process.terminate()
        response = b""
        with hung:
            while chunk := hung.recv(65536):
                response += chunk
        server.process.wait(20)
        output = server.output()
    finally:
        stop_server(server)
    head_bytes, _, body = response.partition(b"\r\n\r\n")
    assert head_bytes.startswith(b"HTTP/1.1 503"), response[:300]
    assert b"application/json" in head_bytes
    assert set(orjson.loads(body)) == {"error"}
    assert "Traceback" not in output
