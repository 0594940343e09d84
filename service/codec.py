"""Wire <-> numpy: V2 JSON bodies and Triton's binary tensor extension, with no HTTP in it.

A binary request is `JSON header || tensor bytes`: the `Inference-Header-Content-Length` header gives the
JSON header's length, and each input sent in binary carries `parameters.binary_data_size`; their raw
little-endian row-major bytes follow the header in the order of `inputs`. Responses mirror it: outputs asked
for in binary (`outputs[i].parameters.binary_data`, defaulting to the request's `binary_data_output`) carry
`parameters.binary_data_size` and their bytes follow the JSON header.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray
from pydantic import ValidationError

from service import large_json
from service.datatypes import (
    NUMPY_TO_V2,
    PLAIN_FLOAT_DATATYPES,
    convert_lossless,
    numpy_dtype,
    v2_datatype,
)
from service.errors import InvalidInput
from service.inference import InferRequest, InferResponse
from service.protocol import MAX_RANK, InferenceRequest, RequestInput

# The JSON element kinds each V2 datatype accepts: numbers for floats, integers for integer types, booleans
# for BOOL. Anything else (strings, null, ragged nesting -> object arrays) is a client mistake.
_JSON_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
# JSON headers above this size are decoded at most `MAX_LARGE_JSON_DECODES` at a time (`_large_json_decodes`):
# about 40,000 numbers, whose Python floats take a few MB.
LARGE_JSON_BYTES = 1024 * 1024
# Two keep one core busy while the other builds its arrays, and bound the peak to ~150 MB for W3 bodies.
MAX_LARGE_JSON_DECODES = 2
# The largest product of dimensions numpy reshapes to for an 8-byte element type: bytes must fit its intp.
_MAX_SHAPE_PRODUCT = np.iinfo(np.intp).max // 8


@dataclass(frozen=True)
class ResponseFormat:
    """How the client asked for outputs: by name in `binary` or `json_only`, else `binary_default`."""

    binary: frozenset[str] = frozenset()
    json_only: frozenset[str] = frozenset()
    binary_default: bool = False

    def is_binary(self, name: str) -> bool:
        return name in self.binary or (self.binary_default and name not in self.json_only)


@dataclass(slots=True)  # made per response: not frozen, whose __init__ costs four times as much
class EncodedResponse:
    """A response body in `parts`, to be sent in order: the JSON header, then each binary output's bytes
    (views of the output arrays, not copies); `header_length` is set when binary outputs follow the header."""

    parts: tuple[bytes | memoryview, ...]
    header_length: int | None

    @property
    def length(self) -> int:
        """The body's length in bytes (its Content-Length)."""
        parts = self.parts
        return len(parts[0]) if len(parts) == 1 else sum(map(len, parts))

    @property
    def body(self) -> bytes:
        """The whole body as one `bytes` (a copy of the binary outputs: for callers that need one object)."""
        first = self.parts[0]
        return first if len(self.parts) == 1 and isinstance(first, bytes) else b"".join(self.parts)


def dumps(value: Any) -> bytes:
    """JSON bytes of `value` (numpy arrays serialized natively; NaN and infinities become null)."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


def decode_request(
    body: bytes | memoryview, header_length: int | None = None
) -> tuple[InferRequest, ResponseFormat]:
    """Parse an infer body: all JSON when `header_length` is None, else a binary-extension body.

    Returns the core's request (each input in its stated datatype and shape) and the requested output format.
    Binary inputs are views of `body`, not copies.
    """
    view = memoryview(body)
    if header_length is None:
        header, binary = view, view[:0]
    else:
        if not 0 <= header_length <= len(view):
            raise InvalidInput(
                f"Inference-Header-Content-Length is {header_length} but the body has {len(view)} bytes"
            )
        # Slicing the view, not the bytes: a slice of `bytes` copies the tensors' megabytes.
        header, binary = view[:header_length], view[header_length:]
    if len(header) <= LARGE_JSON_BYTES:
        return _decode(header, binary)
    with _large_json_decodes():
        return _decode(header, binary)


def _decode(header: memoryview, binary: memoryview) -> tuple[InferRequest, ResponseFormat]:
    if not binary:
        # A large body of the plain form goes into arrays without a Python float per number.
        large = large_json.decode_plain(header) if len(header) > LARGE_JSON_BYTES else None
        if large is not None:
            return large, _JSON_FORMAT
        document = json_object(header)
        plain = _decode_plain(document, header)
        if plain is not None:
            return plain, _JSON_FORMAT
        request = _validated(document)
    else:
        request = _parse_header(header)
    # A JSON boolean can only be where the text has `true` or `false`: most bodies skip the per-element check.
    may_hold_booleans = _has_boolean_literal(header)
    inputs = _decode_inputs(request.inputs, binary, may_hold_booleans=may_hold_booleans)
    return _to_core(request, inputs)


@functools.cache
def _large_json_decodes() -> threading.BoundedSemaphore:
    """The places for decoding large JSON at once (one per process, made on first use).

    Decoding JSON holds ~3x the body's size in Python floats (24 bytes each) and their list until the arrays
    are built: an 8x3x224x224 body of 24 MB peaks at ~75 MB. Each inference thread may decode one, so
    without a bound the peak grows with the thread count; past `MAX_LARGE_JSON_DECODES` they wait their
    turn, holding only their body. Binary bodies are not bounded: their tensors are views of the body.
    """
    return threading.BoundedSemaphore(MAX_LARGE_JSON_DECODES)


def json_object(raw: bytes | memoryview) -> dict[str, Any]:
    """`raw` parsed as one JSON object; raises `InvalidInput` for invalid JSON or any other JSON value."""
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidInput(f"request body must be a JSON object, got {type(document).__name__}")
    return document


def _parse_header(header: memoryview) -> InferenceRequest:
    return _validated(json_object(header))


def _validated(document: dict[str, Any]) -> InferenceRequest:
    try:
        return InferenceRequest.model_validate(document)
    except ValidationError as exc:
        raise InvalidInput(f"request does not follow the V2 inference schema: {describe(exc)}") from None


# The common JSON request: `inputs` only (and maybe `id`), each a float tensor's name, shape, datatype and
# flat `data`, nothing else; outputs all in JSON.
_PLAIN_REQUEST_KEYS = (frozenset({"inputs"}), frozenset({"inputs", "id"}))
_PLAIN_TENSOR_KEYS = frozenset({"name", "shape", "datatype", "data"})
_JSON_FORMAT = ResponseFormat()


def _decode_plain(document: dict[str, Any], header: memoryview) -> InferRequest | None:
    """The common request decoded without the schema's validation, or None for anything else (which the
    full path then validates and decodes, with its messages). What this takes, the full path would decode
    to the same arrays: every check it skips holds for these documents (`test_codec.py` compares them)."""
    if document.keys() not in _PLAIN_REQUEST_KEYS:
        return None
    request_id = document.get("id")
    inputs = document["inputs"]
    if (request_id is not None and type(request_id) is not str) or type(inputs) is not list or not inputs:
        return None
    if _has_boolean_literal(header):
        return None  # booleans among numbers are refused by the full path
    decoded = []
    for tensor in inputs:
        if type(tensor) is not dict or tensor.keys() != _PLAIN_TENSOR_KEYS:
            return None
        name, shape, data = tensor["name"], tensor["shape"], tensor["data"]
        dtype = PLAIN_FLOAT_DATATYPES.get(tensor["datatype"])
        if dtype is None or type(name) is not str or type(shape) is not list or type(data) is not list:
            return None
        if not shape or len(shape) > MAX_RANK or set(map(type, shape)) != {int} or min(shape) < 1:
            return None
        try:
            array = np.asarray(data)
        except ValueError:  # ragged nesting: the full path says so
            return None
        if array.ndim != 1 or array.dtype.kind not in "if" or array.size != math.prod(shape):
            return None
        # As the full path: a decimal stated as a float type is rounded to it; overflow becomes inf (refused
        # or kept downstream by the non-finite policy).
        with np.errstate(over="ignore"):
            array = array.astype(dtype)
        decoded.append((name, array.reshape(shape)))
    return InferRequest(id=request_id, inputs=decoded, outputs=None)


@dataclass(frozen=True, slots=True)
class PlainForm:
    """What a model's request must say to be read by `plain_rows`: its one input's name and datatype, and
    the input's shape past the batch axis (all fixed)."""

    input_name: str
    datatype: str
    sample_shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype[Any]:
        return PLAIN_FLOAT_DATATYPES[self.datatype]


def plain_form(input_name: str, datatype: str, sample_shape: tuple[int, ...] | None) -> PlainForm | None:
    """The plain form of a model with this one input, or None when its requests cannot take it (a datatype
    JSON numbers are not read as directly, or a dynamic dimension past the batch axis)."""
    if sample_shape is None or datatype not in PLAIN_FLOAT_DATATYPES:
        return None
    return PlainForm(input_name, datatype, sample_shape)


@dataclass(slots=True)
class PlainRows:
    """A request read by `plain_rows`: its `id`, and its input's `samples` rows as flat JSON numbers."""

    id: str | None
    data: list[Any]
    samples: int


def plain_rows(body: bytes, form: PlainForm, max_elements: int) -> PlainRows | None:
    """`body` read when it is the common request for a model of `form` (`_decode_plain`'s document, with
    one input of the model's own name, datatype and sample shape, its data flat, at most `max_elements`
    numbers), else None. Its numbers are not converted here: `merged_rows` converts many requests' at once,
    as `_decode_plain` converts each, and refuses what `_decode_plain` would not take."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(document) is not dict or document.keys() not in _PLAIN_REQUEST_KEYS:
        return None
    request_id = document.get("id")
    inputs = document["inputs"]
    if (
        (request_id is not None and type(request_id) is not str)
        or type(inputs) is not list
        or len(inputs) != 1
    ):
        return None
    tensor = inputs[0]
    if type(tensor) is not dict or tensor.keys() != _PLAIN_TENSOR_KEYS:
        return None
    shape, data = tensor["shape"], tensor["data"]
    if tensor["name"] != form.input_name or tensor["datatype"] != form.datatype or type(shape) is not list:
        return None
    if len(shape) != len(form.sample_shape) + 1 or tuple(shape[1:]) != form.sample_shape:
        return None
    samples = shape[0]
    if set(map(type, shape)) != {int} or samples < 1 or type(data) is not list:
        return None
    if len(data) != samples * math.prod(form.sample_shape) or len(data) > max_elements:
        return None
    if _has_boolean_literal(body):
        return None
    return PlainRows(request_id, data, samples)


def merged_rows(rows: list[PlainRows], form: PlainForm) -> NDArray[Any] | None:
    """The inputs of `rows` (requests read by `plain_rows` for `form`) as one array, in order, batch axis
    first: each request's rows exactly as `decode_request` would give them. None when any of them holds
    something other than plain numbers, or when one array could convert them differently from one array
    each (a magnitude past 2**53: integers there, alone, would convert through int64, not float64); those
    are for `decode_request`, one by one."""
    flat = rows[0].data if len(rows) == 1 else list(itertools.chain.from_iterable(row.data for row in rows))
    try:
        array = np.asarray(flat)
    except ValueError:
        return None
    if array.ndim != 1 or array.dtype.kind not in "if":
        return None
    if len(rows) > 1 and array.dtype.kind == "f" and array.size and float(np.max(np.abs(array))) >= 2.0**53:
        return None  # maybe a request of integers past float64's exact ones, which alone would be int64
    with np.errstate(over="ignore"):
        array = array.astype(form.dtype)
    return array.reshape(-1, *form.sample_shape)


def describe(exc: ValidationError) -> str:
    """A one-line account of pydantic's errors: `inputs.0.shape: Input should be a valid list; ...`."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        location = ".".join(str(part) for part in error["loc"]) or "body"
        parts.append(f"{location}: {error['msg']}")
    return "; ".join(parts)


def _decode_inputs(
    inputs: list[RequestInput], binary: memoryview, *, may_hold_booleans: bool = True
) -> list[tuple[str, NDArray[Any]]]:
    decoded = []
    offset = 0
    for tensor in inputs:
        shape = tensor.shape
        if shape and min(shape) < 0:
            raise InvalidInput(f"input {tensor.name!r}: shape {tensor.shape} has a negative dimension")
        # numpy refuses (ValueError) any shape whose non-zero dimensions multiply past its index range, even
        # one holding a zero, so such shapes are the client's mistake, said before numpy sees them.
        nonzero = [d for d in shape if d] if 0 in shape else shape
        if math.prod(nonzero) > _MAX_SHAPE_PRODUCT:
            raise InvalidInput(f"input {tensor.name!r}: shape {tensor.shape} is larger than any array can be")
        dtype = numpy_dtype(tensor.datatype)
        size = _binary_size(tensor)
        if size is None:
            array = _array_from_json(tensor, dtype, may_hold_booleans=may_hold_booleans)
        else:
            if tensor.data is not None:
                raise InvalidInput(f"input {tensor.name!r} has both data and binary_data_size; send one")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"input {tensor.name!r}: binary_data_size {size} runs past the body's binary part "
                    f"({len(binary) - offset} bytes left)"
                )
            array = _array_from_bytes(tensor, dtype, binary[offset : offset + size])
            offset += size
        decoded.append((tensor.name, array))
    if offset != len(binary):
        raise InvalidInput(
            f"the body has {len(binary) - offset} bytes after the tensors that binary_data_size accounts for"
        )
    return decoded


def _binary_size(tensor: RequestInput) -> int | None:
    value = (tensor.parameters or {}).get("binary_data_size")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"input {tensor.name!r}: binary_data_size must be a non-negative integer")
    return value


def _array_from_bytes(tensor: RequestInput, dtype: np.dtype[Any], raw: memoryview) -> NDArray[Any]:
    count = math.prod(tensor.shape)
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(
            f"input {tensor.name!r}: shape {tensor.shape} of {tensor.datatype} needs "
            f"{count * dtype.itemsize} bytes, binary_data_size is {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(tensor.shape)


def _array_from_json(
    tensor: RequestInput, dtype: np.dtype[Any], *, may_hold_booleans: bool = True
) -> NDArray[Any]:
    if tensor.data is None:
        raise InvalidInput(f"input {tensor.name!r} has neither data nor parameters.binary_data_size")
    try:
        array = np.asarray(tensor.data)
    except ValueError:
        raise InvalidInput(
            f"input {tensor.name!r}: data is ragged; send a flat list or lists nested as shape {tensor.shape}"
        ) from None
    if (
        dtype.kind in "iu"
        and array.dtype.kind == "f"
        and array.size
        and _holds_only(int, tensor.data, array.ndim)
    ):
        # numpy reads integers past int64 beside other integers as float64, rounding them: read as uint64,
        # they stay exact (and are converted, or refused, below like any other integers).
        try:
            array = np.asarray(tensor.data, dtype=np.uint64)
        except OverflowError:
            raise InvalidInput(
                f"input {tensor.name!r}: {tensor.datatype} data holds integers outside its range"
            ) from None
    if array.size == 0:
        array = array.astype(dtype)
    elif array.dtype.kind not in _JSON_KINDS[dtype.kind]:
        expected = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers"}[dtype.kind]
        raise InvalidInput(f"input {tensor.name!r}: {tensor.datatype} data must be {expected}")
    elif dtype.kind != "b" and may_hold_booleans and _holds_booleans(tensor.data, array.ndim):
        # numpy reads `[1.5, true]` as numbers (true -> 1.0): a boolean among numbers is refused here.
        raise InvalidInput(f"input {tensor.name!r}: {tensor.datatype} data must be numbers, not booleans")
    elif dtype.kind == "f":
        # A decimal stated as FP32 is meant to be rounded to FP32; out-of-range values become inf and are
        # refused (or kept) by the non-finite policy downstream.
        with np.errstate(over="ignore"):
            array = array.astype(dtype)
    else:
        array = convert_lossless(array, dtype, name=tensor.name)
    count = math.prod(tensor.shape)
    if array.shape != tuple(tensor.shape):
        if array.ndim != 1 or array.size != count:
            raise InvalidInput(
                f"input {tensor.name!r}: shape {tensor.shape} holds {count} elements but data has "
                f"{array.size} (as {list(array.shape)}); send them flat or nested as the shape"
            )
        array = array.reshape(tensor.shape)
    return array


def _has_boolean_literal(text: bytes | memoryview, chunk: int = 1 << 20) -> bool:
    """Whether JSON `text` has `true` or `false` in it; a view is scanned in overlapping copies of `chunk`
    bytes, as `bytes.find` (memchr-fast, unlike `re` on a memoryview) needs `bytes` and a whole copy costs
    the body."""
    if isinstance(text, bytes) or len(text) <= chunk:  # the usual small body: at most one copy, no loop
        piece = text if isinstance(text, bytes) else text.tobytes()
        # `true` has an `r` and `false` an `l`, letters no number and no key of the common request holds:
        # a body without either (memchr-fast to find) holds no boolean, without the slower substring search.
        if b"r" not in piece and b"l" not in piece:
            return False
        return b"true" in piece or b"false" in piece
    for start in range(0, len(text), chunk):
        piece = bytes(text[start : start + chunk + 4])
        if b"true" in piece or b"false" in piece:
            return True
    return False


def _holds_only(kind: type, data: Any, depth: int) -> bool:
    """Whether nested lists `data`, `depth` levels deep, hold only values of type `kind` (exactly: a bool
    is not an int here)."""
    elements: Any = data if isinstance(data, list) else [data]
    for _ in range(depth - 1):
        elements = itertools.chain.from_iterable(elements)
    return set(map(type, elements)) == {kind}


def _holds_booleans(data: Any, depth: int) -> bool:
    """Whether nested lists `data`, `depth` levels deep, hold a JSON boolean (C-speed iteration: no loop
    in Python per element)."""
    elements: Any = data if isinstance(data, list) else [data]
    for _ in range(depth - 1):
        elements = itertools.chain.from_iterable(elements)
    return bool in set(map(type, elements))


def _to_core(
    request: InferenceRequest, inputs: list[tuple[str, NDArray[Any]]]
) -> tuple[InferRequest, ResponseFormat]:
    default = _flag((request.parameters or {}).get("binary_data_output"), "binary_data_output")
    binary: set[str] = set()
    json_only: set[str] = set()
    names = None
    if request.outputs is not None:
        names = [output.name for output in request.outputs]
        for output in request.outputs:
            flag = (output.parameters or {}).get("binary_data")
            if flag is not None:
                (binary if _flag(flag, f"output {output.name!r} binary_data") else json_only).add(output.name)
    core = InferRequest(id=request.id, inputs=inputs, outputs=names)
    return core, ResponseFormat(
        binary=frozenset(binary), binary_default=default, json_only=frozenset(json_only)
    )


def _flag(value: Any, what: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidInput(f"parameter {what} must be true or false, got {value!r}")
    return value


def encode_response(response: InferResponse, fmt: ResponseFormat) -> EncodedResponse:
    """The V2 response body: JSON, with binary outputs' bytes after the header when any were asked for."""
    outputs = []
    chunks: list[memoryview] = []
    any_binary = fmt.binary_default or bool(fmt.binary)
    for name, array in response.outputs:
        dtype = array.dtype
        entry: dict[str, Any] = {
            "name": name,
            "datatype": NUMPY_TO_V2.get(dtype) or v2_datatype(dtype),  # the table holds the native dtypes
            "shape": list(array.shape),
        }
        if any_binary and fmt.is_binary(name):
            raw = _raw_bytes(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            flat = (array if array.flags.c_contiguous else np.ascontiguousarray(array)).reshape(-1)
            # orjson serializes no float16; float32 holds every float16 exactly.
            entry["data"] = flat.astype(np.float32) if dtype == _FLOAT16 else flat
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id is not None:
        document["id"] = response.id
    document["outputs"] = outputs
    header = dumps(document)
    if not chunks:
        return EncodedResponse(parts=(header,), header_length=None)
    return EncodedResponse(parts=(header, *chunks), header_length=len(header))


_FLOAT16 = np.dtype(np.float16)


def _raw_bytes(array: NDArray[Any]) -> memoryview:
    """`array`'s little-endian row-major bytes as a flat byte view: no copy when it is already so laid out
    (the usual case: onnxruntime's outputs and their row slices), one otherwise."""
    raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return raw.reshape(-1).view(np.uint8).data
