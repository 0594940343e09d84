"""`service.grpc_codec`: messages <-> the core's requests, against numpy's own view of the same elements."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service.datatypes import V2_TO_NUMPY
from service.errors import InvalidInput
from service.grpc_codec import CONTENTS_FIELD, decode_request, encode_response
from service.inference import InferResponse
from service.proto import grpc_service_pb2 as pb

shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4)


def arrays(datatype: str) -> st.SearchStrategy[Any]:
    return hnp.arrays(
        V2_TO_NUMPY[datatype], shapes, elements={"allow_nan": False} if datatype[0] == "F" else None
    )


@given(st.sampled_from(sorted(CONTENTS_FIELD)).flatmap(lambda d: st.tuples(st.just(d), arrays(d))))
def test_typed_contents_decode_to_the_array_sent(case: tuple[str, Any]) -> None:
    datatype, array = case
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="x", datatype=datatype, shape=list(array.shape))
    getattr(tensor.contents, CONTENTS_FIELD[datatype][0]).extend(array.reshape(-1).tolist())
    decoded, raw = decode_request(pb.ModelInferRequest.FromString(request.SerializeToString()))
    ((name, got),) = decoded.inputs
    assert not raw
    assert name == "x"
    assert got.dtype == array.dtype
    assert got.tobytes() == array.tobytes()


@given(st.sampled_from(sorted(V2_TO_NUMPY)).flatmap(lambda d: st.tuples(st.just(d), arrays(d))))
def test_raw_contents_decode_to_the_array_sent_and_encode_back(case: tuple[str, Any]) -> None:
    datatype, array = case
    request = pb.ModelInferRequest(raw_input_contents=[array.astype(array.dtype.newbyteorder("<")).tobytes()])
    request.inputs.add(name="x", datatype=datatype, shape=list(array.shape))
    decoded, raw = decode_request(request)
    ((_, got),) = decoded.inputs
    assert raw
    assert got.dtype == array.dtype
    assert got.tobytes() == array.tobytes()
    answer = encode_response(InferResponse("m", "1", None, [("y", got)]), raw=True)
    assert answer.raw_output_contents[0] == array.tobytes()
    assert list(answer.outputs[0].shape) == list(array.shape)


@given(
    st.sampled_from(sorted(V2_TO_NUMPY)).flatmap(lambda d: arrays(d)),
    st.sampled_from(["<", ">", "="]),
    st.booleans(),
)
def test_raw_outputs_are_little_endian_row_major_whatever_the_arrays_byte_order_and_strides(
    array: Any, byteorder: str, transposed: bool
) -> None:
    # Outputs may come in either byte order and any strides (a transposed view): the bytes sent are the
    # elements in row-major order, little-endian, as numpy writes them for an explicit "<" dtype.
    output = array.astype(array.dtype.newbyteorder(byteorder))
    if transposed:
        output = output.T
    answer = encode_response(InferResponse("m", "1", None, [("y", output)]), raw=True)
    want = np.ascontiguousarray(output).astype(output.dtype.newbyteorder("<")).tobytes()
    assert answer.raw_output_contents[0] == want
    assert list(answer.outputs[0].shape) == list(output.shape)


def test_fp16_outputs_of_a_typed_request_come_back_raw() -> None:
    half = np.array([[0.5, -1.25]], np.float16)
    answer = encode_response(InferResponse("m", "1", None, [("y", half)]), raw=False)
    assert answer.raw_output_contents[0] == half.tobytes()
    assert answer.outputs[0].datatype == "FP16"


@pytest.mark.parametrize(
    ("datatype", "value"), [("INT8", 128), ("INT8", -129), ("UINT8", 256), ("INT16", 2**15)]
)
def test_narrow_integers_out_of_range_are_refused_not_wrapped(datatype: str, value: int) -> None:
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[2])
    getattr(tensor.contents, CONTENTS_FIELD[datatype][0]).extend([0, value])
    with pytest.raises(InvalidInput, match=f"{datatype} element {value} at flat index 1 is outside"):
        decode_request(request)
