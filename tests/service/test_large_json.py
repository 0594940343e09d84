"""service.large_json: large plain JSON requests decoded by simdjson are exactly what the plain path of
service.codec decodes, and everything else is left to it."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from service import codec, large_json
from service.inference import InferRequest
from tests.service.conftest import validated_decode

_values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-(2**60), max_value=2**60),
    st.booleans(),
    st.none(),
)


def _plain(body: bytes) -> InferRequest | None:
    return codec._decode_plain(codec.json_object(memoryview(body)), memoryview(body))


def _assert_same(got: InferRequest, want: InferRequest) -> None:
    assert got.id == want.id
    assert got.outputs == want.outputs
    assert [name for name, _ in got.inputs] == [name for name, _ in want.inputs]
    for (_, a), (_, b) in zip(got.inputs, want.inputs, strict=True):
        assert a.dtype == b.dtype
        assert a.shape == b.shape
        assert a.tobytes() == b.tobytes()  # bitwise: signed zeros, rounding, overflow to inf


def _big_integer_literal(data: list[Any]) -> bool:
    return any(type(v) is int and abs(v) > 2**53 for v in data)


@settings(max_examples=400, deadline=None)
@given(
    shape=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    datatype=st.sampled_from(["FP16", "FP32", "FP64", "INT32"]),
    values=st.data(),
    request_id=st.one_of(st.none(), st.text(max_size=5), st.integers()),
    nested=st.booleans(),
    extra=st.booleans(),
    tensors=st.integers(1, 2),
)
def test_what_simdjson_decodes_is_what_the_plain_path_decodes_and_it_takes_the_same_requests(
    shape: list[int],
    datatype: str,
    values: Any,
    request_id: Any,
    nested: bool,
    extra: bool,
    tensors: int,
) -> None:
    count = int(np.prod(shape)) if shape else 1
    document: dict[str, Any] = {"inputs": []}
    all_data: list[Any] = []
    for index in range(tensors):
        data = values.draw(st.lists(_values, min_size=count, max_size=count))
        all_data += data
        tensor: dict[str, Any] = {"name": f"x{index}", "shape": shape, "datatype": datatype, "data": data}
        if nested and shape:
            tensor["data"] = np.asarray(data, dtype=object).reshape(shape).tolist()
        if extra:
            tensor["parameters"] = {}
        document["inputs"].append(tensor)
    if request_id is not None:
        document["id"] = request_id
    body = json.dumps(document).encode()  # orjson refuses integers past 64 bits; clients may send them
    large = large_json.decode_plain(body)
    try:
        plain = _plain(body)
    except Exception:  # invalid for orjson (an integer past 64 bits): never taken here
        assert large is None
        return
    if large is not None:
        # What it takes, the validating path decodes to the same arrays (the plain path too, unless the
        # text holds `true` or `false`, in the id say: it leaves those to the validating path).
        _assert_same(large, validated_decode(body)[0])
        if plain is not None:
            _assert_same(large, plain)
    elif plain is not None:
        # The plain requests left to the usual path: an integer literal a double does not hold exactly, or
        # a bracket in the id.
        assert _big_integer_literal(all_data) or "[" in str(request_id)


def test_a_large_request_is_decoded_by_simdjson_as_orjson_decodes_it() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 64, 64)).astype(np.float32)
    x.reshape(-1)[:4] = [0.0, -0.0, 3.4e38, 1e-45]
    body = orjson.dumps({"id": "r1", "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                                  "data": x.reshape(-1).tolist()}]})  # fmt: skip
    assert len(body) > codec.LARGE_JSON_BYTES
    large = large_json.decode_plain(body)
    plain = _plain(body)
    assert large is not None
    assert plain is not None
    _assert_same(large, plain)
    assert large.inputs[0][1].tobytes() == x.tobytes()
    decoded, fmt = codec.decode_request(body)
    _assert_same(decoded, plain)
    assert fmt == codec.ResponseFormat()


def test_a_repeated_key_is_left_to_orjson_which_keeps_the_last() -> None:
    body = (
        b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}],'
        b' "inputs": [{"name": "y", "shape": [1], "datatype": "FP32", "data": [3]}]}'
    )
    assert large_json.decode_plain(body) is None
    plain = _plain(body)
    assert plain is not None
    assert plain.inputs[0][0] == "y"
    tensor = b'{"name": "x", "name": "z", "shape": [1], "datatype": "FP32", "data": [3]}'
    assert large_json.decode_plain(b'{"inputs": [' + tensor + b"]}") is None


def test_bodies_that_are_not_the_plain_form_are_left_to_the_usual_path() -> None:
    good = b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2.5]}]}'
    assert large_json.decode_plain(good) is not None
    for body in (
        good + b" x",  # trailing bytes
        good[:-1],  # truncated
        b"[1, 2]",  # not an object
        b"3",
        b'{"inputs": []}',
        b'{"inputs": [{"name": "\xff", "shape": [1], "datatype": "FP32", "data": [1]}]}',  # not UTF-8
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1e400]}]}',  # past a double
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [NaN]}]}',
        b'{"inputs": [{"name": "x", "shape": [1.0], "datatype": "FP32", "data": [1]}]}',
        b'{"inputs": [{"name": "x", "shape": [true], "datatype": "FP32", "data": [1]}]}',
        b'{"inputs": [{"name": "x", "shape": [2], "datatype": "INT8", "data": [1, 2]}]}',
        b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [[1], [2]]}]}',
        b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, true]}]}',
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [9007199254740993]}]}',
        b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}], "outputs": []}',
    ):
        assert large_json.decode_plain(body) is None, body
