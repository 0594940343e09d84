"""Every route has a deadline and a body limit, the repository routes included: against a real process."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.service.conftest import Server, start_server, stop_server


@pytest.fixture(scope="module")
def quick_server(repository: Any) -> Iterator[Server]:
    running = start_server(
        "--model-repository", str(repository.root), "--device", "cpu",
        env={"BN_SERVE_REQUEST_TIMEOUT_S": "1.5", "BN_SERVE_LOG_LEVEL": "error"},
    )  # fmt: skip
    try:
        yield running
    finally:
        stop_server(running)


@pytest.mark.parametrize("route", ["/v2/repository/index", "/v2/repository/models/frozen/load"])
def test_a_stalled_repository_body_is_answered_504_once_the_deadline_passes(
    quick_server: Server, route: str
) -> None:
    host, port = quick_server.host_port.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        started = time.monotonic()
        sock.sendall(
            f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: 100\r\n\r\n{{".encode()
        )
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
        elapsed = time.monotonic() - started
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 504"), response[:300]
    assert "request_timeout_s" in orjson.loads(body)["error"]
    assert 1.4 < elapsed < 5, elapsed


@pytest.mark.parametrize(
    ("method", "route"),
    [("POST", "/v2/repository/index"), ("POST", "/v2/repository/models/frozen/unload"), ("GET", "/v2")],
)
def test_a_body_past_the_route_limit_is_refused_with_413_unread(
    quick_server: Server, method: str, route: str
) -> None:
    response = httpx.request(method, f"{quick_server.url}{route}", content=b" " * (1 << 20), timeout=10)
    assert response.status_code == 413
    assert set(response.json()) == {"error"}
    assert httpx.get(f"{quick_server.url}/v2/models/frozen/ready", timeout=10).status_code == 200
