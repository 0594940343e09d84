"""The common large JSON infer request decoded straight into arrays, without a Python float per number.

`orjson` builds the whole document as Python objects: an 8x3x224x224 FP32 request (24 MB of text) becomes
1.2 million Python floats and their list, ~38 MB held at once, before numpy copies them into an array.
simdjson (pysimdjson) parses the text into its own tape and hands each tensor's `data` over as one buffer
of doubles: W3-json went from 7.0 to 12.2 req/s (benchmarks/README.md, "Large JSON bodies without Python
floats, one heap arena, and runs N-Q").

Only the form of `service.codec`'s plain path is taken (`inputs` and maybe `id`; each tensor exactly
`name`, `shape`, `datatype` in FP16/FP32/FP64 and a flat `data` of numbers), and only where the result is
the same array the plain path builds: anything else (a duplicate key, which orjson resolves to the last and
simdjson to the first; nested or ragged `data`; booleans, strings or nulls among the numbers; an integer
beyond 2**53, which the plain path converts from int64 in one rounding and this one through a double;
a number outside the double range; invalid JSON or UTF-8) returns None, and `service.codec` decodes the
body as before, with its own messages.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import simdjson
from numpy.typing import NDArray

from service.datatypes import PLAIN_FLOAT_DATATYPES
from service.inference import InferRequest
from service.protocol import MAX_RANK

_REQUEST_KEYS = (frozenset({"inputs"}), frozenset({"inputs", "id"}))
_TENSOR_KEYS = frozenset({"name", "shape", "datatype", "data"})
# Every integer up to 2**53 is exact as a double, so converting it through one rounds only once; a double
# this large may come from a larger integer literal.
_EXACT_INTEGERS = float(2**53)
_BRACKET = ord("[")
_SCAN_BYTES = 1 << 20


def decode_plain(text: bytes | memoryview) -> InferRequest | None:
    """`text`, a whole JSON request body, as the core's request when it has the plain form (module
    docstring), else None (nothing raised: the caller decodes it the usual way)."""
    # `as_buffer` flattens nested arrays, ragged ones too, which the usual path refuses: the plain form has
    # one bracket for `inputs` and one each for a tensor's `shape` and `data`, and no other (a bracket in a
    # name or the id only sends the body the usual way). Counted first, an even count (an `outputs` list,
    # say) leaves the body to the usual path without parsing it twice.
    brackets = _opening_brackets(text)
    if brackets < 3 or brackets % 2 == 0:
        return None
    try:
        # A parser per body: its tape is as large as the body's numbers and should not outlive them.
        document = simdjson.Parser().parse(text)
        return _request(document, brackets)
    except Exception:
        # Whatever simdjson refuses (ValueError, TypeError, RuntimeError for an integer past 64 bits,
        # UnicodeDecodeError...) is decoded the usual way, which gives the client its message.
        return None


def _request(document: object, brackets: int) -> InferRequest | None:
    if not isinstance(document, simdjson.Object) or not _has_keys(document, _REQUEST_KEYS):
        return None
    request_id = document.get("id")
    inputs = document["inputs"]
    if (request_id is not None and type(request_id) is not str) or not isinstance(inputs, simdjson.Array):
        return None
    if brackets != 1 + 2 * len(inputs):
        return None
    decoded = []
    for tensor in inputs:
        named = _tensor(tensor)
        if named is None:
            return None
        decoded.append(named)
    return InferRequest(id=request_id, inputs=decoded, outputs=None) if decoded else None


def _tensor(tensor: object) -> tuple[str, NDArray[Any]] | None:
    if not isinstance(tensor, simdjson.Object) or not _has_keys(tensor, (_TENSOR_KEYS,)):
        return None
    name, datatype, shape, data = tensor["name"], tensor["datatype"], tensor["shape"], tensor["data"]
    dtype = PLAIN_FLOAT_DATATYPES.get(datatype) if type(datatype) is str else None
    if dtype is None or type(name) is not str or not isinstance(data, simdjson.Array):
        return None
    if not isinstance(shape, simdjson.Array) or not 1 <= len(shape) <= MAX_RANK:
        return None
    dims = [d for d in shape if type(d) is int]
    if len(dims) != len(shape) or min(dims) < 1:
        return None
    values = np.frombuffer(data.as_buffer(of_type="d"), dtype=np.float64)
    if values.size != math.prod(dims):
        return None
    if max(values.max(), -values.min()) >= _EXACT_INTEGERS and _holds_inexact_integer(data):
        return None
    # As the plain path: a decimal stated as a float type is rounded to it; overflow becomes inf (refused
    # or kept downstream by the non-finite policy).
    with np.errstate(over="ignore"):
        return name, values.astype(dtype).reshape(dims)


def _opening_brackets(text: bytes | memoryview) -> int:
    """How many `[` bytes `text` holds, counted a slice at a time (no mask of the body's size)."""
    raw = np.frombuffer(text, dtype=np.uint8)
    return sum(
        int(np.count_nonzero(raw[i : i + _SCAN_BYTES] == _BRACKET)) for i in range(0, raw.size, _SCAN_BYTES)
    )


def _has_keys(document: simdjson.Object, allowed: tuple[frozenset[str], ...]) -> bool:
    """Whether `document`'s keys are one of the `allowed` sets, none repeated."""
    keys = list(document.keys())
    return len(keys) == len(set(keys)) and frozenset(keys) in allowed


def _holds_inexact_integer(data: simdjson.Array) -> bool:
    """Whether `data` holds an integer literal past 2**53 (rarely asked: only when a value is that large)."""
    return any(type(value) is int and abs(value) > 2**53 for value in data)
