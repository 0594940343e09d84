"""Decoding a large JSON infer body: the usual path against `service.large_json`, and what a body the
latter leaves to the usual path costs it first.

    python benchmarks/large_json.py [--repeats 5]

One 8x3x224x224 FP32 body (W3-json's tensor, as orjson writes it), decoded in this process: by
`service.codec`'s plain path on orjson's document, by `service.large_json.decode_plain`; and the same body
with an `outputs` field, which `decode_plain` leaves to the usual path (the cost it adds to such a body),
and that body as `decode_request` decodes it. Median milliseconds of `--repeats` runs each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import orjson

from service import codec, large_json


def median_ms(run: Callable[[], object], repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    x = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel()}
    plain = memoryview(orjson.dumps({"inputs": [tensor]}, option=orjson.OPT_SERIALIZE_NUMPY))
    other = memoryview(
        orjson.dumps({"inputs": [tensor], "outputs": [{"name": "y"}]}, option=orjson.OPT_SERIALIZE_NUMPY)
    )
    assert large_json.decode_plain(plain) is not None
    assert large_json.decode_plain(other) is None
    runs: list[tuple[str, Callable[[], object]]] = [
        ("usual plain path (orjson)", lambda: codec._decode_plain(codec.json_object(plain), plain)),
        ("service.large_json", lambda: large_json.decode_plain(plain)),
        ("service.large_json leaving a body with `outputs`", lambda: large_json.decode_plain(other)),
        ("that body as decode_request decodes it (both)", lambda: codec._decode(other, other[:0])),
    ]
    rows = [(name, median_ms(run, args.repeats)) for name, run in runs]
    print(f"body {len(plain) / 1e6:.1f} MB")
    print("| decoding | ms |")
    print("|---|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
