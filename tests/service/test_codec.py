"""Wire <-> numpy: round trips of every numeric datatype, the lossless rule, the demo request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service.codec import ResponseFormat, decode_request, encode_response
from service.datatypes import NUMPY_TO_V2, V2_TO_NUMPY, convert_lossless
from service.errors import InvalidInput
from service.inference import InferResponse

DEMO_REQUEST = Path(__file__).parents[2] / "bn_export" / "demo_data" / "request.json"


def test_the_datatype_table_and_its_inverse_agree() -> None:
    assert {NUMPY_TO_V2[dtype] for dtype in V2_TO_NUMPY.values()} == set(V2_TO_NUMPY)


FINITE = {"allow_nan": False, "allow_infinity": False}  # JSON has neither NaN nor infinities
arrays = st.sampled_from(sorted(V2_TO_NUMPY)).flatmap(
    lambda datatype: hnp.arrays(
        V2_TO_NUMPY[datatype],
        hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
        elements=FINITE if V2_TO_NUMPY[datatype].kind == "f" else None,
    ).map(lambda a: (datatype, a))
)


@settings(max_examples=60, deadline=None)
@given(arrays, st.booleans())
def test_request_round_trips_json_and_binary(case: tuple[str, Any], binary: bool) -> None:
    datatype, array = case
    entry: dict[str, Any] = {"name": "x", "shape": list(array.shape), "datatype": datatype}
    if binary:
        entry["parameters"] = {"binary_data_size": array.nbytes}
        header = orjson.dumps({"inputs": [entry]})
        request, _ = decode_request(header + array.tobytes(), len(header))
    else:
        data = array.astype(np.float32) if array.dtype == np.float16 else array
        entry["data"] = data.reshape(-1)
        request, _ = decode_request(orjson.dumps({"inputs": [entry]}, option=orjson.OPT_SERIALIZE_NUMPY))
    ((name, decoded),) = request.inputs
    assert name == "x"
    assert decoded.dtype == array.dtype
    assert decoded.shape == array.shape
    assert decoded.tobytes() == array.tobytes()


@settings(max_examples=60, deadline=None)
@given(arrays)
def test_binary_response_round_trips(case: tuple[str, Any]) -> None:
    datatype, array = case
    encoded = encode_response(
        InferResponse("m", "1", None, [("y", array)]), ResponseFormat(binary_default=True)
    )
    assert encoded.header_length is not None
    (output,) = orjson.loads(encoded.body[: encoded.header_length])["outputs"]
    assert output["datatype"] == datatype
    raw = encoded.body[encoded.header_length :]
    assert np.frombuffer(raw, V2_TO_NUMPY[datatype]).reshape(output["shape"]).tobytes() == array.tobytes()


@settings(max_examples=100, deadline=None)
@given(st.integers(-(2**31), 2**31 - 1))
def test_int32_converts_to_fp32_exactly_when_the_value_is_representable(value: int) -> None:
    array = np.array([value], dtype=np.int32)
    exact = int(np.float32(value)) == value
    if exact:
        assert int(convert_lossless(array, np.dtype(np.float32), name="x")[0]) == value
    else:
        with pytest.raises(InvalidInput, match="not exactly representable as FP32"):
            convert_lossless(array, np.dtype(np.float32), name="x")


def test_lossless_rule_at_the_edges() -> None:
    f32 = np.dtype(np.float32)
    assert convert_lossless(np.array([2**24], np.int32), f32, name="x")[0] == 2**24
    assert convert_lossless(np.array([2**25], np.int64), f32, name="x")[0] == 2**25
    assert convert_lossless(np.array([0.5], np.float64), f32, name="x")[0] == 0.5
    for bad in (np.array([2**24 + 1], np.int32), np.array([0.1]), np.array([2**64 - 1], np.uint64)):
        with pytest.raises(InvalidInput):
            convert_lossless(bad, f32, name="x")


def test_demo_request_is_one_digits_row_as_v2_json() -> None:
    request, _ = decode_request(DEMO_REQUEST.read_bytes())
    ((name, array),) = request.inputs
    digits = np.load(Path(__file__).parents[2] / "bn_export" / "demo_data" / "digits.npz", allow_pickle=False)
    assert name == "input"
    assert array.dtype == np.float32
    assert array.shape == (1, 64)
    np.testing.assert_array_equal(array[0], digits["data"][0])
