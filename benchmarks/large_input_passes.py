"""What each pass over a W3 input (8x3x224x224 float32, 4.8 MB) costs the server's thread, one at a time.

    taskset -c 0 python benchmarks/large_input_passes.py [--calls 60]

A W3-binary request's user time above the kernel's socket copies is a few passes over its input, each
bound by memory: onnxruntime's run (the benchmark's BatchNormalization graph, one intra-op thread and no
CPU arena, as `bn-serve` runs it), the finite check (`service.datatypes.all_finite`), and, for an input the
drift budget covers, the drift sums (`bn_export.moments.shifted_sums`, whose floor is the float32 ->
float64 conversion). A plain copy gives the memory's speed; the finite check over L2-sized parts (one
socket read's worth, each part read again at once, as a check made on each read would find it) gives what
a check on the data while it is still in the cache would cost. Printed: the median CPU time of the calling
thread per call, in milliseconds, after a call to warm up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serving.models import INPUT_NAME, OUTPUT_NAME, benchmark_models, build_graph
from bn_export.moments import shifted_sums
from service.datatypes import all_finite

SHAPE = (8, 3, 224, 224)
# Values per socket read at W3-binary: 4.8 MB in 14-16 reads (`benchmarks/serve_cpu.py`'s reads/req).
READ_VALUES = 82_000


def median_cpu_ms(call: Callable[[], Any], calls: int) -> float:
    call()
    spent = []
    for _ in range(calls):
        started = time.thread_time()
        call()
        spent.append(time.thread_time() - started)
    return statistics.median(spent) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=60)
    args = parser.parse_args()

    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    flat = x.reshape(-1)
    part = flat[:READ_VALUES].copy()
    parts = -(-flat.size // READ_VALUES)
    out = np.empty_like(x)
    shift = np.zeros(SHAPE[1])
    channel_rows = x.reshape(-1, SHAPE[2] * SHAPE[3])

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = False
    images = benchmark_models()[1]
    session = ort.InferenceSession(
        build_graph(images).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )

    rows: list[tuple[str, Callable[[], Any]]] = [
        ("copy of the input (np.copyto)", lambda: np.copyto(out, x)),
        ("onnxruntime run", lambda: session.run([OUTPUT_NAME], {INPUT_NAME: x})),
        ("finite check, whole input", lambda: all_finite(x)),
        (f"finite check, {parts} parts in cache", lambda: [all_finite(part) for _ in range(parts)]),
        ("float32 -> float64 sums per row", lambda: np.add.reduce(channel_rows, axis=1, dtype=np.float64)),
        ("drift sums (shifted_sums)", lambda: shifted_sums(x, 1, shift)),
    ]
    print(f"{SHAPE} float32, {x.nbytes / 1e6:.1f} MB, median of {args.calls} calls, this thread's CPU")
    print("| pass | ms |")
    print("|---|---:|")
    for name, call in rows:
        print(f"| {name} | {median_cpu_ms(call, args.calls):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
