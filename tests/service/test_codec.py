"""Wire <-> numpy: round trips of every numeric datatype, the lossless rule, the demo request."""

from __future__ import annotations

import json
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
from tests.service.conftest import validated_decode

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


_plain_values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(
    shape=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    datatype=st.sampled_from(["FP16", "FP32", "FP64", "INT32"]),
    values=st.data(),
    request_id=st.one_of(st.none(), st.text(max_size=5), st.integers()),
    nested=st.booleans(),
    extra=st.booleans(),
)
def test_the_plain_request_path_decodes_as_the_validating_path_or_leaves_the_request_to_it(
    shape: list[int], datatype: str, values: Any, request_id: Any, nested: bool, extra: bool
) -> None:
    from service import codec

    count = int(np.prod(shape)) if shape else 1
    data = values.draw(st.lists(_plain_values, min_size=count, max_size=count))
    tensor: dict[str, Any] = {"name": "x", "shape": shape, "datatype": datatype, "data": data}
    if nested and shape:
        tensor["data"] = np.asarray(data, dtype=object).reshape(shape).tolist()
    if extra:
        tensor["parameters"] = {}
    document: dict[str, Any] = {"inputs": [tensor]}
    if request_id is not None:
        document["id"] = request_id
    body = json.dumps(document).encode()  # orjson refuses integers past 64 bits; clients may send them
    plain = codec._decode_plain(codec.json_object(memoryview(body)), memoryview(body))
    try:
        full, fmt = validated_decode(body)
    except InvalidInput:
        assert plain is None  # what the full path refuses, the plain path never takes
        return
    if plain is None:
        return
    assert fmt == ResponseFormat()
    assert plain.id == full.id
    assert plain.outputs == full.outputs
    assert [name for name, _ in plain.inputs] == [name for name, _ in full.inputs]
    for (_, got), (_, want) in zip(plain.inputs, full.inputs, strict=True):
        assert got.dtype == want.dtype
        assert got.shape == want.shape
        assert got.tobytes() == want.tobytes()


def test_the_plain_path_takes_the_common_request() -> None:
    from service import codec

    body = orjson.dumps({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1.5] * 6}]})
    plain = codec._decode_plain(codec.json_object(memoryview(body)), memoryview(body))
    assert plain is not None
    np.testing.assert_array_equal(plain.inputs[0][1], np.full((2, 3), 1.5, dtype=np.float32))


@pytest.mark.parametrize("values", [[2**63, 0], [0, 2**64 - 1], [[2**63], [1]]])
def test_uint64_data_past_int64_beside_other_integers_is_read_exactly(values: list[Any]) -> None:
    expected = np.asarray(values, dtype=np.uint64)
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": list(expected.shape), "datatype": "UINT64", "data": values}]}
    )
    request, _ = decode_request(body.encode())
    ((_, array),) = request.inputs
    assert array.dtype == np.uint64
    assert array.tolist() == expected.tolist()


@pytest.mark.parametrize(
    ("datatype", "values"), [("INT64", [2**63]), ("INT64", [2**63, 0]), ("UINT64", [-1, 2**63])]
)
def test_integers_outside_the_stated_datatype_are_refused_not_wrapped(
    datatype: str, values: list[int]
) -> None:
    tensor = {"name": "x", "shape": [len(values)], "datatype": datatype, "data": values}
    body = json.dumps({"inputs": [tensor]})
    with pytest.raises(InvalidInput):
        decode_request(body.encode())


def test_a_lossless_conversion_between_integers_of_one_width_keeps_the_sign() -> None:
    big = np.array([2**63], dtype=np.uint64)
    with pytest.raises(InvalidInput):
        convert_lossless(big, np.dtype(np.int64), name="x")
    with pytest.raises(InvalidInput):
        convert_lossless(np.array([-1], dtype=np.int64), np.dtype(np.uint64), name="x")
    assert convert_lossless(np.array([5], dtype=np.uint64), np.dtype(np.int64), name="x").tolist() == [5]


_FORM_SAMPLES = [(3,), (2, 2), ()]
# 2**60 + 2**36 + 1 rounds to float32 differently directly (from int64) and through float64.
_DOUBLE_ROUNDED = 2**60 + 2**36 + 1
_large_integers = st.one_of(st.integers(-(2**60), 2**60), st.just(_DOUBLE_ROUNDED))


@st.composite
def _plain_bodies(draw: st.DrawFn, datatype: str, sample: tuple[int, ...]) -> bytes:
    """A request body for a model of one input `x` of `datatype` and sample shape `sample`, mostly in the
    plain form, sometimes not (another name, datatype or shape; nested data; booleans among numbers)."""
    samples = draw(st.integers(1, 3))
    shape = [samples, *sample]
    if draw(st.integers(0, 9)) == 0:
        shape = draw(st.sampled_from([[samples], [samples, 1, 3], [samples, 3.0], [True, *sample]]))
    count = samples * int(np.prod(sample))
    values = draw(
        st.one_of(
            st.lists(
                st.floats(allow_nan=False, allow_infinity=False, width=64), min_size=count, max_size=count
            ),
            st.lists(_large_integers, min_size=count, max_size=count),
            st.lists(_plain_values, min_size=count, max_size=count),
        )
    )
    data: Any = values
    if draw(st.integers(0, 9)) == 0:
        data = [values] if values else [[]]
    name = draw(st.sampled_from(["x", "x", "x", "y"]))
    stated = draw(st.sampled_from([datatype, datatype, datatype, "INT32"]))
    document: dict[str, Any] = {"inputs": [{"name": name, "shape": shape, "datatype": stated, "data": data}]}
    if draw(st.booleans()):
        document["id"] = draw(st.text(max_size=4))
    return json.dumps(document).encode()


@settings(max_examples=300, deadline=None)
@given(
    form_index=st.integers(0, len(_FORM_SAMPLES) - 1),
    datatype=st.sampled_from(["FP16", "FP32", "FP64"]),
    data=st.data(),
)
def test_plain_requests_converted_together_are_each_what_decoding_it_alone_gives(
    form_index: int, datatype: str, data: Any
) -> None:
    from service import codec

    sample = _FORM_SAMPLES[form_index]
    form = codec.plain_form("x", datatype, sample)
    assert form is not None
    bodies = data.draw(st.lists(_plain_bodies(datatype, sample), min_size=1, max_size=4))
    rows = [codec.plain_rows(body, form, 1000) for body in bodies]
    taken = [(body, row) for body, row in zip(bodies, rows, strict=True) if row is not None]
    if not taken:
        return
    merged = codec.merged_rows([row for _, row in taken], form)
    if merged is None:
        return  # each is then decoded alone
    assert merged.dtype == form.dtype
    start = 0
    for body, row in taken:
        request, fmt = decode_request(body)  # must not raise: what is merged, decoding takes
        ((name, want),) = request.inputs
        got = merged[start : start + row.samples]
        start += row.samples
        assert (name, request.id, fmt) == ("x", row.id, ResponseFormat())
        assert got.shape == want.shape
        assert got.tobytes() == want.tobytes()
    assert start == len(merged)


def test_plain_requests_of_floats_and_of_small_integers_convert_together() -> None:
    from service import codec

    form = codec.plain_form("x", "FP32", (2,))
    assert form is not None
    bodies = [
        orjson.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": data}]})
        for data in ([0.1, 2.5], [3, -4], [2**40, 1])
    ]
    rows = [codec.plain_rows(body, form, 100) for body in bodies]
    assert all(row is not None for row in rows)
    merged = codec.merged_rows(rows, form)  # type: ignore[arg-type]
    assert merged is not None
    np.testing.assert_array_equal(merged, np.array([[0.1, 2.5], [3, -4], [2**40, 1]], dtype=np.float32))
    past = codec.plain_rows(
        orjson.dumps(
            {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [2**53 + 1, 1]}]}
        ),
        form,
        100,
    )
    assert past is not None
    assert codec.merged_rows([rows[0], past], form) is None  # type: ignore[list-item]


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(st.floats(width=32), min_size=0, max_size=40),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    transposed=st.booleans(),
)
def test_all_finite_agrees_with_numpy_on_every_float_array(
    values: list[float], dtype: Any, transposed: bool
) -> None:
    from service.datatypes import all_finite

    with np.errstate(over="ignore"):
        array = np.asarray(values, dtype=np.float64).astype(dtype)
    if transposed and array.size % 2 == 0 and array.size:
        array = array.reshape(2, -1).T  # not C-contiguous
    assert all_finite(array) == bool(np.isfinite(array).all())


def test_all_finite_is_not_fooled_by_squares_past_the_float_range() -> None:
    from service.datatypes import all_finite

    assert all_finite(np.full(5000, 3e38, dtype=np.float32))  # the dot product overflows; the values do not
    for bad in (np.inf, -np.inf, np.nan):
        array = np.ones(5000, dtype=np.float32)
        array[1234] = bad
        assert not all_finite(array)
        assert not all_finite(array[1230:1240])
