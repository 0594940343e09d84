"""The V2 datatype <-> numpy dtype table, its inverse, and the lossless conversion rule.

Lossless, precisely: a tensor sent as datatype S is converted to the model input's dtype D when every
element converts to D and back to S unchanged (NaN counts as equal to NaN). So the rule looks at values, not
only at types: INT32 16777216 (2^24) into FP32 is accepted and 16777217 is refused; FP64 0.5 into FP32 is
accepted and 0.1 is refused; FP16 and BOOL, and the integer types numpy casts "safely" (INT16, UINT8, ...),
always convert into FP32.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.errors import InvalidInput

# Written once; the inverse below is derived. Little-endian: the binary extension's byte order.
V2_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
NUMPY_TO_V2: dict[np.dtype[Any], str] = {dtype: name for name, dtype in V2_TO_NUMPY.items()}
# The float datatypes a JSON request's shortcuts decode (`service.codec`'s plain path, `service.large_json`).
PLAIN_FLOAT_DATATYPES: dict[str, np.dtype[Any]] = {
    name: V2_TO_NUMPY[name] for name in ("FP16", "FP32", "FP64")
}

# onnxruntime reports types as "tensor(float)"; the element names follow ONNX's TensorProto.
_ORT_TO_V2 = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of a numeric V2 datatype; raises `InvalidInput` for BYTES and unknown names."""
    try:
        return V2_TO_NUMPY[datatype]
    except KeyError:
        if datatype == "BYTES":
            raise InvalidInput("datatype BYTES is not supported: these models take numeric tensors") from None
        raise InvalidInput(
            f"unknown datatype {datatype!r}, expected one of {', '.join(V2_TO_NUMPY)}"
        ) from None


def v2_datatype(dtype: np.dtype[Any]) -> str:
    """The V2 datatype of a numpy dtype (byte order ignored); raises `ValueError` for types V2 lacks."""
    try:
        return NUMPY_TO_V2[dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no V2 datatype") from None


def datatype_from_ort(ort_type: str) -> str:
    """The V2 datatype of an onnxruntime type string such as "tensor(float)"."""
    try:
        return _ORT_TO_V2[ort_type]
    except KeyError:
        raise ValueError(f"onnxruntime type {ort_type} has no numeric V2 datatype") from None


def convert_lossless(array: NDArray[Any], dtype: np.dtype[Any], *, name: str) -> NDArray[Any]:
    """`array` as `dtype` when every element survives the round trip (see the module docstring).

    Raises `InvalidInput` naming the tensor, both datatypes and the first element that would change.
    """
    if array.dtype == dtype:
        return array
    if np.can_cast(array.dtype, dtype, casting="safe"):
        return array.astype(dtype)
    # Out-of-range and NaN casts are detected by the round trip below; numpy's warnings about them are noise.
    with np.errstate(over="ignore", invalid="ignore"):
        converted = array.astype(dtype)
        back = converted.astype(array.dtype)
    same = back == array
    if array.dtype.kind in "iu" and dtype.kind in "iu":
        # Between integers of one width the cast wraps and wraps back (2**63 as int64 is -2**63): the sign
        # tells the two apart.
        same &= (converted < 0) == (array < 0)
    if array.dtype.kind == "f":
        same |= np.isnan(array) & np.isnan(back)
    if not same.all():
        index = tuple(int(i) for i in np.argwhere(~same)[0])
        raise InvalidInput(
            f"input {name!r}: {v2_datatype(array.dtype)} value {array[index].item()!r} "
            f"at index {list(index)} is not exactly representable as {v2_datatype(dtype)}, "
            f"the model's datatype; send {v2_datatype(dtype)} or values it represents exactly"
        )
    return converted


def all_finite(array: NDArray[Any]) -> bool:
    """Whether float `array` holds no NaN or infinity. For a large array the usual answer, yes, comes from
    one BLAS dot product of the array with itself (NaN and infinities carry into it; one pass, no mask of
    the array's size); a non-finite product (a NaN, or squares too large to sum) is settled element by
    element, as a small array is."""
    if array.size >= _DOT_CHECK_ELEMENTS and array.dtype in _BLAS_FLOATS and array.flags.c_contiguous:
        flat = array.reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):
            product = float(np.dot(flat, flat))
        if math.isfinite(product):
            return True
    return bool(np.isfinite(array).all())


_BLAS_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
# Below this, the mask costs less than the floating-point state `errstate` sets around the product.
_DOT_CHECK_ELEMENTS = 4096
