"""Decoding a large V2 JSON body: the codec's path against parsing the `"data"` span with numpy's text parser.

    python benchmarks/json_decode.py [--repeats 5]

Builds the W3 request of `benchmarks/serve.py` (8x3x224x224 FP32, standard normal values, as orjson writes
them) and times, best of `--repeats` on one thread:

- `codec.decode_request`: `orjson.loads` (a Python float per value) and `np.asarray` + a float32 cast;
- its two steps alone;
- the candidate fast path: `np.fromstring(span, sep=",")` on the bytes between the data's brackets (to
  float64 then float32, as the codec rounds, or to float32 directly), plus `orjson.loads` of the body with
  the span cut out;
- the cheapest byte checks such a path needs to stay as strict as JSON (`bytes.translate` to find bytes
  outside digits, signs, '.', 'e', 'E', ',' and JSON whitespace).

Prints milliseconds per body and checks the fast path's values are bitwise those of the codec.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from service import codec

SHAPE = (8, 3, 224, 224)
JSON_NUMBER_BYTES = b"0123456789+-.eE, \t\n\r"


def best_ms(function: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    body = orjson.dumps(
        {"inputs": [{"name": "input", "shape": list(SHAPE), "datatype": "FP32", "data": x.ravel().tolist()}]}
    )
    start = body.index(b"[", body.index(b'"data"')) + 1
    stop = body.index(b"]", start)
    span, rest = body[start:stop], body[:start] + body[stop:]
    document = orjson.loads(body)
    data = document["inputs"][0]["data"]

    decoded = codec.decode_request(body)[0].inputs[0][1].ravel()
    fast = np.fromstring(span, dtype=np.float64, sep=",").astype(np.float32)
    if not np.array_equal(decoded.view(np.uint32), fast.view(np.uint32)):
        raise SystemExit("the fast path's values differ from the codec's")

    rows = [
        ("codec.decode_request (orjson + numpy)", lambda: codec.decode_request(body)),
        ("  orjson.loads", lambda: orjson.loads(body)),
        ("  np.asarray(list).astype(float32)", lambda: np.asarray(data).astype(np.float32)),
        (
            "np.fromstring(span, float64) -> float32 + orjson.loads(rest)",
            lambda: (np.fromstring(span, dtype=np.float64, sep=",").astype(np.float32), orjson.loads(rest)),
        ),
        ("  np.fromstring(span, float64)", lambda: np.fromstring(span, dtype=np.float64, sep=",")),
        ("  np.fromstring(span, float32)", lambda: np.fromstring(span, dtype=np.float32, sep=",")),
        ("  span.translate (allowed-bytes check)", lambda: span.translate(None, JSON_NUMBER_BYTES)),
    ]
    print(f"W3 JSON body: {len(body) / 1e6:.1f} MB, {x.size:,} values")
    print("| step | ms per body |\n|---|---:|")
    for name, function in rows:
        print(f"| {name} | {best_ms(function, args.repeats):.1f} |")


if __name__ == "__main__":
    main()
