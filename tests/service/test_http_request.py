"""`read_body` against raw ASGI messages: the body back byte for byte however it is split, its first tensor
aligned, and the limits and disconnects answered as before."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.requests import ClientDisconnect
from starlette.types import Message

from service.codec import ResponseFormat, decode_request, encode_response
from service.errors import PayloadTooLarge
from service.http_request import TENSOR_ALIGNMENT, read_body
from service.inference import InferResponse


def _receive(messages: list[Message]) -> Any:
    queue = list(messages)

    async def receive() -> Message:
        return queue.pop(0)

    return receive


def _split(body: bytes, cuts: list[int]) -> list[Message]:
    points = sorted({min(c, len(body)) for c in cuts})
    edges = [0, *points, len(body)]
    parts = [body[a:b] for a, b in itertools.pairwise(edges)]
    return [
        {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
        for i, part in enumerate(parts)
    ]


def _read(
    messages: list[Message], length: int | None, limit: int = 1 << 20, align_at: int | None = None
) -> Any:
    headers = {} if length is None else {b"content-length": str(length).encode()}
    return asyncio.run(read_body(_receive(messages), headers, limit, align_at=align_at))


@settings(max_examples=50, deadline=None)
@given(
    body=st.binary(min_size=0, max_size=300),
    cuts=st.lists(st.integers(0, 300), max_size=6),
    declared=st.booleans(),
    align_at=st.integers(0, 300),
)
def test_read_body_returns_the_body_byte_for_byte_however_it_is_split(
    body: bytes, cuts: list[int], declared: bool, align_at: int
) -> None:
    got = _read(_split(body, cuts), len(body) if declared else None, align_at=min(align_at, len(body)))
    assert bytes(got) == body


def test_read_body_puts_the_first_tensor_of_a_split_body_on_an_aligned_address() -> None:
    for header_length in (0, 1, 7, 61, 100):
        body = b"h" * header_length + np.arange(64, dtype=np.float32).tobytes()
        got = _read(_split(body, [5, 50]), len(body), align_at=header_length)
        tensor = np.frombuffer(got[header_length:], dtype=np.float32)
        assert tensor.ctypes.data % TENSOR_ALIGNMENT == 0
        assert tensor.flags.aligned
        assert tensor.flags.c_contiguous
        np.testing.assert_array_equal(tensor, np.arange(64, dtype=np.float32))


def test_read_body_accepts_a_body_longer_than_its_content_length_within_the_limit() -> None:
    body = bytes(range(100))
    assert bytes(_read(_split(body, [30, 60]), 40)) == body


def test_read_body_refuses_a_body_past_the_limit_whatever_its_content_length_says() -> None:
    body = bytes(200)
    with pytest.raises(PayloadTooLarge):
        _read(_split(body, [30, 60]), 40, limit=100)
    with pytest.raises(PayloadTooLarge):
        _read(_split(body, [30, 60]), None, limit=100)
    with pytest.raises(PayloadTooLarge):
        _read(_split(body, []), None, limit=100)
    with pytest.raises(PayloadTooLarge, match="the body has 200 bytes"):
        _read([], 200, limit=100)


def test_read_body_raises_client_disconnect_when_the_client_leaves_midway() -> None:
    messages = [*_split(bytes(100), [30])[:1], {"type": "http.disconnect"}]
    with pytest.raises(ClientDisconnect):
        _read(messages, 100)
    with pytest.raises(ClientDisconnect):
        _read(list(messages), None)


def test_encoded_binary_outputs_are_views_of_the_output_arrays_and_join_to_the_body() -> None:
    output = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    response = InferResponse(model_name="m", model_version="1", id=None, outputs=[("y", output)])
    encoded = encode_response(response, ResponseFormat(binary_default=True))
    header, raw = encoded.parts
    assert isinstance(raw, memoryview)
    assert np.shares_memory(np.frombuffer(raw, dtype=np.float32), output)
    assert encoded.length == len(encoded.body) == len(header) + output.nbytes
    assert bytes(raw) == output.astype("<f4").tobytes()


def test_decoded_binary_inputs_are_views_of_the_body_buffer() -> None:
    array = np.arange(12, dtype=np.float32)
    header = b'{"inputs":[{"name":"x","shape":[3,4],"datatype":"FP32","parameters":{"binary_data_size":48}}]}'
    body = bytearray(header + array.tobytes())
    request, _ = decode_request(memoryview(body), len(header))
    decoded = request.inputs[0][1]
    body[len(header) : len(header) + 4] = np.float32(99).tobytes()
    assert decoded[0, 0] == 99  # the same memory, not a copy
