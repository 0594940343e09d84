"""What one drift update of small requests costs: the GIL hold of `Observability.flush` over N 1x64 inputs.

    python benchmarks/drift_update.py [--inputs 400,3400] [--updates 50]

Per update of `--inputs` requests of one 1x64 float32 row (W1's), copied into their watch's block as the
server copies them (`Observability.sample`), the table gives the median wall time of: summing the rows
with each input's sums apart, checked for NaN and totalled (`shifted_sums_by_part`: what every update did
before), summing them in one pass and checking the totals (`shifted_sums`: what an update does unless NaN
shows), and the whole update
(`flush`: the sums, the merge into the monitor, its figures, the gauges); and the per-request cost of
`sample`. 400 inputs are 100 ms of W1-c1 (one update per 100 ms, as before), 1,000 about the most a
block holds (1,024 rows), 3,400 one second of W1-c1 (one update per second: three full blocks are summed
by `sample` on the way, the update sums the rest).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bn_export.moments import shifted_sums, shifted_sums_by_part
from service.drift import DriftMonitor
from service.observability import DriftWatch, Observability

CHANNELS = 64


def median_us(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of `run()` over `repeats` calls, in microseconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def measure(inputs: int, updates: int) -> tuple[float, float, float, float]:
    rng = np.random.default_rng(0)
    mean, var = rng.standard_normal(CHANNELS), rng.uniform(0.5, 2.0, CHANNELS)
    observability = Observability(max_cpu_fraction=1.0)
    monitor = DriftMonitor(mean, var, 1e-5, axis=1, name="bench", log_events=False)
    watch = DriftWatch(monitor, "input", "bench", "1")
    rows = [rng.standard_normal((1, CHANNELS)).astype(np.float32) for _ in range(inputs)]
    stacked = np.concatenate(rows)
    shift = np.asarray(mean, dtype=np.float64)
    starts = list(range(inputs))

    def apart() -> object:  # what an update did before: each input's sums, checked, then totalled
        s1, s2 = shifted_sums_by_part(stacked, shift, starts)
        return np.isfinite(s2).all(axis=1).all(), s1.sum(axis=0), s2.sum(axis=0)

    def together() -> object:  # what it does now (each input apart only when NaN shows in the totals)
        _, s1, s2 = shifted_sums(stacked, 1, shift)
        return np.isfinite(s2).all(), s1, s2

    by_part, one_pass = median_us(apart, updates), median_us(together, updates)
    flushes, samples = [], []
    for _ in range(updates + 3):
        started = time.perf_counter()
        for x in rows:
            observability.sample(watch, x)
        samples.append((time.perf_counter() - started) / inputs)
        started = time.perf_counter()
        observability.flush()
        flushes.append(time.perf_counter() - started)
    return by_part, one_pass, statistics.median(flushes[3:]) * 1e6, statistics.median(samples[3:]) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--inputs", default="400,1000,3400")
    parser.add_argument("--updates", type=int, default=50)
    args = parser.parse_args()
    print("| inputs per update | sums, each input apart, us | sums in one pass, us | whole update, us "
          "| sample, us per request |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|")
    for inputs in (int(n) for n in args.inputs.split(",")):
        by_part, one_pass, update, sample = measure(inputs, args.updates)
        print(f"| {inputs:,} | {by_part:.0f} | {one_pass:.0f} | {update:.0f} | {sample:.2f} |", flush=True)


if __name__ == "__main__":
    main()
