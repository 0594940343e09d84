"""The direct path (`service.direct_infer`, `service.http_direct`) against real bn-serve processes: small JSON
infer requests answered from the HTTP protocol give what the ASGI path gives, bit for bit, merged or alone,
on every framing a client may use; whatever it does not take is answered the ASGI way."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator

import httpx
import numpy as np
import orjson
import pytest

from tests.service.conftest import Repository, Server, binary_infer_body, start_server, stop_server

INFER = "/v2/models/frozen/versions/1/infer"
HEADERS = {"Content-Type": "application/json"}


def body_of(x: np.ndarray) -> bytes:
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return orjson.dumps({"inputs": [tensor]})


def output_of(content: bytes) -> np.ndarray:
    output = orjson.loads(content)["outputs"][0]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def servers(repository: Repository) -> Iterator[dict[str, Server]]:
    """The same repository served with the direct path (the default) and without it."""
    common = ("--model-repository", str(repository.root), "--device", "cpu", "--intra-op-threads", "1")
    direct = start_server(*common)
    try:
        asgi = start_server(*common, env={"BN_SERVE_DIRECT_INFER": "false"})
    except BaseException:
        stop_server(direct)
        raise
    try:
        yield {"direct": direct, "asgi": asgi}
    finally:
        stop_server(direct)
        stop_server(asgi)


def raw_exchange(server: Server, payload: bytes, responses: int = 1, timeout: float = 10.0) -> bytes:
    """Send `payload` on one connection and read until `responses` whole responses (or the close) came."""
    host, port = server.host_port.split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(payload)
        received = b""
        while len(split_responses(received)) < responses:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


def split_responses(data: bytes) -> list[tuple[bytes, bytes]]:
    """Whole (head, body) pairs in `data`, by their Content-Length."""
    found = []
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return found
        length = re.search(rb"\r\ncontent-length: (\d+)", head, re.IGNORECASE)
        size = int(length[1]) if length else 0
        if len(rest) < size:
            return found
        found.append((head, rest[:size]))
        data = rest[size:]


def request_bytes(
    server: Server, body: bytes, extra: str = "", version: str = "1.1", content_type: str = "application/json"
) -> bytes:
    head = (
        f"POST {INFER} HTTP/{version}\r\nHost: {server.host_port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


def test_direct_answers_equal_the_asgi_paths_bit_for_bit_with_the_same_headers(
    servers: dict[str, Server], repository: Repository
) -> None:
    rng = np.random.default_rng(0)
    for rows in (1, 3, 17):
        x = rng.standard_normal((rows, 4)).astype(np.float32)
        answers = {}
        for name, server in servers.items():
            response = httpx.post(
                server.url + INFER, content=body_of(x), headers={**HEADERS, "X-Request-ID": "r-1"}
            )
            assert response.status_code == 200, response.text
            answers[name] = response
        assert answers["direct"].content == answers["asgi"].content
        for name in ("content-type", "x-request-id", "content-length", "server"):
            assert answers["direct"].headers[name] == answers["asgi"].headers[name], name
        np.testing.assert_allclose(
            output_of(answers["direct"].content), repository.params[1].output(x), rtol=1e-5, atol=1e-5
        )


def test_concurrent_requests_merge_and_each_gets_its_own_rows_bitwise(
    servers: dict[str, Server],
) -> None:
    server = servers["direct"]
    rng = np.random.default_rng(1)
    samples = [rng.standard_normal((1, 4)).astype(np.float32) for _ in range(64)]
    alone = [httpx.post(server.url + INFER, content=body_of(x), headers=HEADERS).content for x in samples[:8]]
    before = httpx.get(server.url + "/metrics").text
    results: dict[int, bytes] = {}
    barrier = threading.Barrier(32)

    def client(index: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            barrier.wait()
            for i in range(index, len(samples), 32):
                for _ in range(10):
                    response = http.post(INFER, content=body_of(samples[i]), headers=HEADERS)
                    assert response.status_code == 200, response.text
                    results.setdefault(i, response.content)
                    assert response.content == results[i]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == len(samples)
    for i, content in enumerate(alone):
        assert results[i] == content  # merged or not, the same bytes as alone
    after = httpx.get(server.url + "/metrics").text
    runs = metric(after, "bn_serve_batch_size_samples_count") - metric(
        before, "bn_serve_batch_size_samples_count"
    )
    merged = metric(after, "bn_serve_batch_size_samples_sum") - metric(
        before, "bn_serve_batch_size_samples_sum"
    )
    assert merged == 640  # every sample counted once in the runs' batch sizes
    assert runs < 640  # and some runs held several requests
    requests = metric(after, "bn_serve_requests_total", model="frozen", status="200") - metric(
        before, "bn_serve_requests_total", model="frozen", status="200"
    )
    assert requests == 640


def test_pipelined_requests_are_answered_in_order(servers: dict[str, Server]) -> None:
    server = servers["direct"]
    xs = [np.full((1, 4), value, dtype=np.float32) for value in (1.0, 2.0, 3.0)]
    payload = b"".join(request_bytes(server, body_of(x)) for x in xs)
    answers = split_responses(raw_exchange(server, payload, responses=3))
    assert len(answers) == 3
    expected = [httpx.post(server.url + INFER, content=body_of(x), headers=HEADERS).content for x in xs]
    for (head, body), want in zip(answers, expected, strict=True):
        assert head.startswith(b"HTTP/1.1 200"), head
        assert body == want


def test_connection_close_and_http_1_0_are_answered_then_closed(servers: dict[str, Server]) -> None:
    server = servers["direct"]
    x = np.ones((1, 4), dtype=np.float32)
    for payload in (
        request_bytes(server, body_of(x), extra="Connection: close\r\n"),
        request_bytes(server, body_of(x), version="1.0"),
    ):
        data = raw_exchange(server, payload + payload, responses=2)  # the second is never read
        answers = split_responses(data)
        assert len(answers) == 1, data
        head, body = answers[0]
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"connection: close" in head.lower()
        assert output_of(body).shape == (1, 4)


def test_a_body_sent_after_its_head_is_answered_the_same(servers: dict[str, Server]) -> None:
    server = servers["direct"]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    payload = request_bytes(server, body_of(x))
    cut = payload.index(b"\r\n\r\n") + 4 + 7
    host, port = server.host_port.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(payload[:cut])
        threading.Event().wait(0.2)
        sock.sendall(payload[cut:])
        data = b""
        while not split_responses(data):
            data += sock.recv(65536)
    ((head, body),) = split_responses(data)
    assert head.startswith(b"HTTP/1.1 200")
    assert body == httpx.post(server.url + INFER, content=body_of(x), headers=HEADERS).content


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b"{not json", HEADERS, 400),
        (b'{"inputs": []}', {"Content-Type": "text/plain"}, 415),
        (body_of(np.ones((1, 5), dtype=np.float32)), HEADERS, 400),
    ],
)
def test_what_the_direct_path_refuses_is_answered_as_the_asgi_path_answers_it(
    servers: dict[str, Server], body: bytes, headers: dict[str, str], status: int
) -> None:
    answers = {
        name: httpx.post(server.url + INFER, content=body, headers={**headers, "X-Request-ID": "same"})
        for name, server in servers.items()
    }
    assert answers["direct"].status_code == answers["asgi"].status_code == status
    assert answers["direct"].content == answers["asgi"].content
    assert set(orjson.loads(answers["direct"].content)) == {"error"}


def test_unknown_models_and_versions_are_404_on_both_paths(servers: dict[str, Server]) -> None:
    body = body_of(np.ones((1, 4), dtype=np.float32))
    for path in ("/v2/models/nope/infer", "/v2/models/frozen/versions/9/infer"):
        answers = [httpx.post(s.url + path, content=body, headers=HEADERS) for s in servers.values()]
        assert [a.status_code for a in answers] == [404, 404]
        assert answers[0].content == answers[1].content


def test_every_direct_request_has_its_access_record_with_its_id(servers: dict[str, Server]) -> None:
    server = servers["direct"]
    body = body_of(np.ones((1, 4), dtype=np.float32))
    ids = [f"direct-record-{i}" for i in range(5)]
    for rid in ids:
        assert (
            httpx.post(server.url + INFER, content=body, headers={**HEADERS, "X-Request-ID": rid}).status_code
            == 200
        )
    deadline = threading.Event()
    for _ in range(50):  # access records are written at most log_flush_interval_s after they are made
        records = [orjson.loads(line) for line in server.output().splitlines() if line.startswith("{")]
        found = {r.get("request_id") for r in records if r.get("logger") == "bn_serve.access"}
        if set(ids) <= found:
            break
        deadline.wait(0.05)
    access = [r for r in records if r.get("request_id") in ids]
    assert sorted(r["request_id"] for r in access) == ids
    assert {(r["method"], r["path"], r["status"]) for r in access} == {("POST", INFER, 200)}


def test_a_protected_server_takes_keys_on_the_direct_path_and_refuses_without(repository: Repository) -> None:
    server = start_server(
        "--model-repository", str(repository.root), "--device", "cpu", env={"BN_SERVE_API_KEY": "s3cret-key"}
    )
    try:
        body = body_of(np.ones((1, 4), dtype=np.float32))
        refused = httpx.post(server.url + INFER, content=body, headers=HEADERS)
        wrong = httpx.post(
            server.url + INFER, content=body, headers={**HEADERS, "Authorization": "Bearer no"}
        )
        allowed = httpx.post(
            server.url + INFER, content=body, headers={**HEADERS, "Authorization": "Bearer s3cret-key"}
        )
    finally:
        stop_server(server)
    assert refused.status_code == 401
    assert set(orjson.loads(refused.content)) == {"error"}
    assert wrong.status_code == 403
    assert allowed.status_code == 200


def test_settings_turn_the_direct_path_off(repository: Repository) -> None:
    from service.app import create_app
    from tests.service.conftest import test_settings

    assert create_app(test_settings(repository.root)).direct_infer is not None
    assert create_app(test_settings(repository.root, direct_infer=False)).direct_infer is None


def test_plain_requests_sent_together_are_each_answered_as_the_asgi_path_answers_them(
    servers: dict[str, Server],
) -> None:
    def body(data: object, shape: list[int], **extra: object) -> bytes:
        tensor = {"name": "input", "shape": shape, "datatype": "FP32", "data": data}
        return orjson.dumps({"inputs": [tensor], **extra})

    bodies = [
        body([0.5, -1.25, 3.0, 4.5], [1, 4], id="floats"),
        body([1, 2, -3, 4], [1, 4]),  # integers, converted as alone
        body([1e39, 0.0, 0.0, 0.0], [1, 4]),  # past FP32: inf, refused as non-finite
        body([[1.0, 2.0, 3.0, 4.0]], [1, 4]),  # nested: decoded alone
        body([2**60 + 2**36 + 1, 0, 0, 0], [1, 4]),  # an integer float64 would round twice
        body(["1.0", 2.0, 3.0, 4.0], [1, 4]),  # a string: refused
        body(np.linspace(-2, 2, 8).tolist(), [2, 4]),
    ]
    expected = [
        httpx.post(servers["asgi"].url + INFER, content=b, headers={**HEADERS, "X-Request-ID": "r"})
        for b in bodies
    ]
    assert [e.status_code for e in expected] == [200, 200, 400, 200, 200, 400, 200]
    server = servers["direct"]
    host, port = server.host_port.split(":")
    for _ in range(3):
        sockets = [socket.create_connection((host, int(port)), timeout=10) for _ in bodies]
        try:
            for sock, b in zip(sockets, bodies, strict=True):  # sent back to back: mostly one turn
                sock.sendall(request_bytes(server, b, extra="X-Request-ID: r\r\n"))
            for sock, want in zip(sockets, expected, strict=True):
                data = b""
                while not split_responses(data):
                    chunk = sock.recv(65536)
                    assert chunk, "closed before an answer"
                    data += chunk
                ((head, got),) = split_responses(data)
                assert head.startswith(b"HTTP/1.1 %d" % want.status_code), head
                assert got == want.content
        finally:
            for sock in sockets:
                sock.close()


def binary_request(server: Server, x: np.ndarray) -> bytes:
    body, header_length = binary_infer_body(x)
    extra = f"Inference-Header-Content-Length: {header_length}\r\n"
    return request_bytes(server, body, extra=extra, content_type="application/octet-stream")


def test_large_bodies_gathered_into_one_buffer_are_answered_as_uvicorn_reads_them(
    servers: dict[str, Server], repository: Repository
) -> None:
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((rows, 4)).astype(np.float32) for rows in (20_000, 33_333)]  # 320 and 533 KB
    answers = {}
    for name, server in servers.items():
        whole = [raw_exchange(server, binary_request(server, x)) for x in xs]
        pipelined = split_responses(raw_exchange(server, b"".join(binary_request(server, x) for x in xs), 2))
        host, port = server.host_port.split(":")
        payload = binary_request(server, xs[1])
        with socket.create_connection((host, int(port)), timeout=10) as sock:  # slowly, in pieces
            for start in range(0, len(payload), 150_000):
                sock.sendall(payload[start : start + 150_000])
                threading.Event().wait(0.05)
            data = b""
            while not split_responses(data):
                data += sock.recv(1 << 20)
        answers[name] = (
            [split_responses(w)[0][1] for w in whole],
            [body for _, body in pipelined],
            split_responses(data)[0][1],
        )
    assert answers["direct"] == answers["asgi"]
    head, body = split_responses(raw_exchange(servers["direct"], binary_request(servers["direct"], xs[0])))[0]
    header_length = int(re.search(rb"inference-header-content-length: (\d+)", head, re.IGNORECASE)[1])  # type: ignore[index]
    outputs = orjson.loads(body[:header_length])["outputs"]
    assert outputs[0]["name"] == "output"
    size = outputs[0]["parameters"]["binary_data_size"]
    output = np.frombuffer(body[header_length : header_length + size], "<f4").reshape(xs[0].shape)
    np.testing.assert_allclose(output, repository.params[1].output(xs[0]), rtol=1e-5, atol=1e-5)


def test_a_client_gone_halfway_through_a_large_body_leaves_the_server_serving(
    servers: dict[str, Server],
) -> None:
    server = servers["direct"]
    payload = binary_request(server, np.ones((20_000, 4), dtype=np.float32))
    host, port = server.host_port.split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(payload[: len(payload) // 2])
    x = np.ones((1, 4), dtype=np.float32)
    assert httpx.post(server.url + INFER, content=body_of(x), headers=HEADERS).status_code == 200
    assert split_responses(raw_exchange(server, payload))[0][0].startswith(b"HTTP/1.1 200")
