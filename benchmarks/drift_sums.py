"""CPU per served batch of the drift sums, `bn_export.moments.shifted_moments`, against `Moments.from_batch`.

    python benchmarks/drift_sums.py [--calls 100] [--gap-ms 2]

Each method runs in a fresh process (so one's BLAS threads cannot bill the other) on the W3 batch,
8x3x224x224 float32, `--calls` times with `--gap-ms` of sleep between calls, as requests arrive at a
server; prints the CPU time of the whole process (every thread: OpenBLAS's spin after each call, too) and
the wall time per call. Run it once more with `OPENBLAS_NUM_THREADS=1` to see what BLAS threading costs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np

SHAPE = (8, 3, 224, 224)


def measure(method: str, calls: int, gap_s: float) -> None:
    from bn_export.moments import Moments, shifted_moments

    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    shift = np.zeros(SHAPE[1])
    if method == "from_batch":

        def run() -> object:
            return Moments.from_batch(x, 1, workers=1)
    else:

        def run() -> object:
            return shifted_moments(x, 1, shift)

    for _ in range(5):
        run()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        run()
        time.sleep(gap_s)
    cpu_ms = (time.process_time() - cpu) / calls * 1e3
    wall_ms = ((time.perf_counter() - wall) - calls * gap_s) / calls * 1e3
    print(f"| {method} | {cpu_ms:.2f} | {wall_ms:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--gap-ms", type=float, default=2.0)
    parser.add_argument("--method", choices=["from_batch", "shifted_moments"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method is not None:
        measure(args.method, args.calls, args.gap_ms / 1e3)
        return
    print(f"{SHAPE} float32, {args.calls} calls {args.gap_ms:g} ms apart, each method in its own process")
    print("| method | CPU ms per call (all threads) | wall ms per call |\n|---|---:|---:|")
    for method in ("shifted_moments", "from_batch"):
        argv = [sys.executable, __file__, "--method", method, "--calls", str(args.calls)]
        subprocess.run([*argv, "--gap-ms", str(args.gap_ms)], check=True)


if __name__ == "__main__":
    main()
