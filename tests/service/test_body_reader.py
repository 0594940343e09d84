"""The rest of a large body read by the socket straight into its buffer (`service.http_direct._BodyReader`):
the request is answered as when the parser reads all of it, the reader never takes a byte past the body
(a request that follows is the HTTP protocol's), and a body answered before it was read is dropped."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import numpy as np
import orjson

from tests.service.conftest import (
    ONE_MODEL_SEED,
    CollectingTransport,
    binary_infer_body,
    frozen_params,
    protocol_answers,
)

HEAD_READ = 100_000  # the first read: the head and the body's first bytes


def binary_request(
    x: np.ndarray, content_type: bytes = b"application/octet-stream", rid: bytes = b"r"
) -> bytes:
    body, header_length = binary_infer_body(x)
    head = (
        b"POST /v2/models/m/infer HTTP/1.1\r\nHost: h\r\nContent-Type: " + content_type + b"\r\n"
        b"Inference-Header-Content-Length: %d\r\nX-Request-ID: %s\r\nContent-Length: %d\r\n\r\n"
        % (header_length, rid, len(body))
    )
    return head + body


def small_request() -> bytes:
    body = orjson.dumps(
        {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    )
    head = (
        b"POST /v2/models/m/infer HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
        b"X-Request-ID: small\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    return head + body


def responses(written: bytes) -> list[tuple[bytes, bytes]]:
    """Each response's (status line and headers but `date`, body), in order."""
    found = []
    while written:
        head, _, rest = written.partition(b"\r\n\r\n")
        length = int(re.search(rb"\r\ncontent-length: (\d+)", head, re.IGNORECASE)[1])  # type: ignore[index]
        lines = [line for line in head.split(b"\r\n") if not line.startswith(b"date:")]
        found.append((b"\r\n".join(lines), rest[:length]))
        written = rest[length:]
    return found


def readers(transport: CollectingTransport) -> list[asyncio.BufferedProtocol]:
    return [p for p in transport.protocols if isinstance(p, asyncio.BufferedProtocol)]


def test_the_rest_of_a_large_body_read_into_its_buffer_is_answered_as_the_parser_reads_it(
    model_root: Path,
) -> None:
    x = np.random.default_rng(1).standard_normal((20_000, 4)).astype(np.float32)  # 320 KB
    request = binary_request(x)
    pieces = [request[i : i + 50_000] for i in range(HEAD_READ, len(request), 50_000)]
    (whole, whole_transport, _), (read, read_transport, protocol), (pieced, pieced_transport, _) = (
        protocol_answers(
            model_root,
            [
                [request],  # whole in one read: the parser has it all
                [request[:HEAD_READ], request[HEAD_READ:]],
                [request[:HEAD_READ], *pieces],
            ],
        )
    )
    assert not readers(whole_transport)
    assert len(readers(read_transport)) == len(readers(pieced_transport)) == 1
    assert read_transport.protocol is protocol  # given back with the body's last byte
    ((head, body),) = responses(whole)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert responses(read) == responses(pieced) == [(head, body)]
    header_length = int(re.search(rb"inference-header-content-length: (\d+)", head)[1])  # type: ignore[index]
    output = np.frombuffer(body[header_length : header_length + x.nbytes], "<f4").reshape(x.shape)
    np.testing.assert_allclose(output, frozen_params(ONE_MODEL_SEED).output(x), rtol=1e-5, atol=1e-5)


def test_the_reader_stops_at_the_bodys_end_and_leaves_what_follows_to_the_http_protocol(
    model_root: Path,
) -> None:
    x = np.random.default_rng(2).standard_normal((20_000, 4)).astype(np.float32)
    first, second = binary_request(x, rid=b"one"), binary_request(x[::-1].copy(), rid=b"two")
    alone = protocol_answers(model_root, [[first], [second], [small_request()]])
    expected = [responses(written)[0] for written, _, _ in alone]
    # The rest of the first body arrives in one read with all that follows it.
    together = first + second + small_request()
    ((written, transport, _),) = protocol_answers(
        model_root, [[together[:HEAD_READ], together[HEAD_READ:]]], responses=3
    )
    assert readers(transport)
    assert responses(written) == expected


def test_a_large_body_answered_from_its_head_is_dropped_and_the_connection_goes_on(
    model_root: Path,
) -> None:
    x = np.ones((20_000, 4), dtype=np.float32)
    refused = binary_request(x, content_type=b"text/plain")
    (reference, _, _), (small, _, _) = protocol_answers(model_root, [[refused], [small_request()]])
    together = refused + small_request()
    ((written, transport, _),) = protocol_answers(
        model_root, [[together[:HEAD_READ], together[HEAD_READ:]]], responses=2
    )
    assert readers(transport)
    got = responses(written)
    assert got[0][0].startswith(b"HTTP/1.1 415"), got[0]
    assert got == [responses(reference)[0], responses(small)[0]]
