"""gRPC messages <-> the core's requests: `ModelInferRequest` -> `InferRequest`, `InferResponse` ->
`ModelInferResponse`, with no gRPC server in it.

An input's elements come either typed, in the `contents` field of its datatype (`CONTENTS_FIELD`), or raw,
as one entry of `raw_input_contents` per input holding its little-endian row-major bytes; a request uses
one form for all its inputs. Outputs are answered in the form the inputs came in, as Triton and KServe do:
raw for raw requests (what `tritonclient.grpc` sends), typed otherwise, and raw whenever an output's
datatype has no typed field (FP16). Datatypes, their dtypes and the lossless conversion are
`service.datatypes`'s, shared with REST.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.datatypes import numpy_dtype, v2_datatype
from service.errors import InvalidInput
from service.inference import InferRequest, InferResponse
from service.proto import grpc_service_pb2 as pb

# The typed field of each datatype and the dtype protobuf holds its values in; FP16 and BYTES have none.
CONTENTS_FIELD: dict[str, tuple[str, np.dtype[Any]]] = {
    "BOOL": ("bool_contents", np.dtype(np.bool_)),
    "INT8": ("int_contents", np.dtype(np.int32)),
    "INT16": ("int_contents", np.dtype(np.int32)),
    "INT32": ("int_contents", np.dtype(np.int32)),
    "INT64": ("int64_contents", np.dtype(np.int64)),
    "UINT8": ("uint_contents", np.dtype(np.uint32)),
    "UINT16": ("uint_contents", np.dtype(np.uint32)),
    "UINT32": ("uint_contents", np.dtype(np.uint32)),
    "UINT64": ("uint64_contents", np.dtype(np.uint64)),
    "FP32": ("fp32_contents", np.dtype(np.float32)),
    "FP64": ("fp64_contents", np.dtype(np.float64)),
}
_FIELDS = sorted({field for field, _ in CONTENTS_FIELD.values()} | {"bytes_contents"})
_LITTLE_ENDIAN = sys.byteorder == "little"
# The largest product of dimensions numpy reshapes to for an 8-byte element type: bytes must fit its intp.
_MAX_SHAPE_PRODUCT = np.iinfo(np.intp).max // 8


def decode_request(request: pb.ModelInferRequest) -> tuple[InferRequest, bool]:
    """The core's request for `request`, and whether its outputs are to be answered raw.

    Raw inputs are views of the message's bytes, not copies. Raises `InvalidInput` for anything malformed:
    a count of raw entries other than one per input, raw bytes that disagree with the shape, typed
    contents in another datatype's field or of the wrong length, a negative or overflowing shape.
    """
    raw = request.raw_input_contents
    tensors = request.inputs
    if raw and len(raw) != len(tensors):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(tensors)} inputs; send one per input"
        )
    inputs = []
    for index, tensor in enumerate(tensors):
        name, datatype = tensor.name, tensor.datatype
        shape = _shape(name, list(tensor.shape))
        dtype = numpy_dtype(datatype)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"input {name!r} has contents while the request sends raw_input_contents; "
                    "send all inputs one way"
                )
            array = _from_raw(name, datatype, shape, dtype, raw[index])
        else:
            array = _from_contents(tensor, shape, dtype)
        inputs.append((name, array))
    outputs = [output.name for output in request.outputs] if request.outputs else None
    return InferRequest(request.id or None, inputs, outputs), bool(raw)


def _shape(name: str, shape: list[int]) -> list[int]:
    if shape and min(shape) < 0:
        raise InvalidInput(f"input {name!r}: shape {shape} has a negative dimension")
    # numpy refuses any shape whose non-zero dimensions multiply past its index range, even one holding a
    # zero, so such shapes are the client's mistake, said before numpy sees them.
    size = math.prod(shape)
    if size > _MAX_SHAPE_PRODUCT or (size == 0 and math.prod(max(d, 1) for d in shape) > _MAX_SHAPE_PRODUCT):
        raise InvalidInput(f"input {name!r}: shape {shape} is larger than any array can be")
    return shape


def _from_raw(name: str, datatype: str, shape: list[int], dtype: np.dtype[Any], raw: bytes) -> NDArray[Any]:
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(
            f"input {name!r}: shape {shape} of {datatype} needs {expected} bytes, "
            f"its raw_input_contents entry has {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _from_contents(
    tensor: pb.ModelInferRequest.InferInputTensor, shape: list[int], dtype: np.dtype[Any]
) -> NDArray[Any]:
    typed = CONTENTS_FIELD.get(tensor.datatype)
    if typed is None:
        raise InvalidInput(
            f"input {tensor.name!r}: {tensor.datatype} has no typed contents field; send it in "
            "raw_input_contents"
        )
    field, wire = typed
    stray = [other for other in _FIELDS if other != field and len(getattr(tensor.contents, other))]
    if stray:
        raise InvalidInput(
            f"input {tensor.name!r}: {tensor.datatype} elements go in contents.{field}, "
            f"got {', '.join(stray)}"
        )
    values = getattr(tensor.contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(
            f"input {tensor.name!r}: shape {shape} holds {count} elements but contents.{field} has "
            f"{len(values)}"
        )
    array = np.array(values, dtype=wire)
    if (
        wire != dtype
    ):  # INT8, INT16, UINT8, UINT16 travel in a wider field: out of range is refused, not wrapped
        info = np.iinfo(dtype)
        outside = (array < info.min) | (array > info.max)
        if outside.any():
            index = int(np.argmax(outside))
            raise InvalidInput(
                f"input {tensor.name!r}: {tensor.datatype} element {array[index]} at flat index {index} is "
                f"outside {tensor.datatype}'s range [{info.min}, {info.max}]"
            )
        array = array.astype(dtype)
    return array.reshape(shape)


def encode_response(response: InferResponse, raw: bool) -> pb.ModelInferResponse:
    """The message answering `response`: raw contents when `raw` or when an output has no typed field."""
    message = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id or ""
    )
    datatypes = [v2_datatype(array.dtype) for _, array in response.outputs]
    raw = raw or any(datatype not in CONTENTS_FIELD for datatype in datatypes)
    for (name, array), datatype in zip(response.outputs, datatypes, strict=True):
        output = message.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if raw:
            message.raw_output_contents.append(_little_endian_bytes(array))
        else:
            field, wire = CONTENTS_FIELD[datatype]
            getattr(output.contents, field).extend(array.reshape(-1).astype(wire, copy=False).tolist())
    return message


def _little_endian_bytes(array: NDArray[Any]) -> bytes:
    """`array`'s elements in row-major order, little-endian (`tobytes` writes row-major whatever the
    array's strides)."""
    if not (_LITTLE_ENDIAN and array.dtype.isnative):
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.tobytes()
