"""Fitting throughput of `bn-export fit` in GB/s against a memory-bandwidth floor measured in the same run.

    python benchmarks/fit.py [--total-mb 256] [--batch-size 256] [--sample-shape 16,32,32] [--repeats 3]
                             [--out PATH.json]

Writes a float32 array of (n, *sample_shape) samples, channels on axis 1 (NCHW by default; `64` for
tabular rows of 64 features), totalling `--total-mb` to a temporary `.npy`, reads
it once so the page cache is warm, then times, best of `--repeats`:

- the floor: one `np.add.reduce` over the whole array held in memory (a single read pass, no statistics);
- `fit(path, stats="population")`: exact float64 moments in one pass over the memory-mapped file;
- `fit(path, stats="ema")`: one shuffled pass of per-batch moments folded into the moving averages.

Each fit runs on both paths of `Moments.from_batch` where numba (the 'fast' extra) is installed: the
compiled one-pass kernels and the NumPy blocks (`BN_EXPORT_KERNELS=numba|numpy`); the first fit of each
path, which imports numba and loads (or compiles) its kernels, is timed on its own.

The floor uses one thread; the fits use two: one sums each batch, the other reads the next batch ahead
(`bn_export.data.prefetched`). The EMA depends on the batch size, so the figures name the one used.

Prints GB/s and the ratio to the floor (targets: population >= 0.5x, EMA >= 0.4x) and writes the figures
as JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from bn_export.fit import fit
from bn_export.kernels import ENV_VAR

SAMPLE_SHAPE = (16, 32, 32)
TARGETS = {"population": 0.5, "ema": 0.4}
#: Threads a fit uses on these batches: one summing, one reading ahead (the floor uses one).
FIT_THREADS = 2


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _kernel_paths() -> list[str]:
    """Both paths of `Moments.from_batch` where numba is installed (the 'fast' extra), else NumPy's."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return ["numpy"]
    return ["numba", "numpy"]


def _best(run: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--total-mb", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--sample-shape", default=",".join(map(str, SAMPLE_SHAPE)))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    sample_shape = tuple(int(d) for d in args.sample_shape.split(","))
    sample_bytes = int(np.prod(sample_shape)) * 4
    n = args.total_mb * (1 << 20) // sample_bytes
    rows = []
    first: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.npy"
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, *sample_shape))
        rng = np.random.default_rng(0)
        step = max(1, (16 << 20) // sample_bytes)
        for start in range(0, n, step):
            stop = min(n, start + step)
            array[start:stop] = rng.normal(3.0, 2.0, size=(stop - start, *sample_shape))
        array.flush()
        del array
        in_memory = np.load(path)  # also warms the page cache for the memory-mapped fits
        nbytes = in_memory.nbytes
        floor = _best(lambda a=in_memory: np.add.reduce(a, axis=None), args.repeats)
        rows.append(("floor: np.add.reduce in memory", nbytes / floor / 1e9, 1.0, None))
        for kernels in _kernel_paths():
            os.environ[ENV_VAR] = kernels
            started = time.perf_counter()
            fit(path, stats="population", batch_size=args.batch_size)
            first[kernels] = time.perf_counter() - started
            for stats in ("population", "ema"):
                seconds = _best(lambda s=stats: fit(path, stats=s, batch_size=args.batch_size), args.repeats)  # type: ignore[misc]
                name = f"fit --stats {stats} ({kernels})"
                rows.append((name, nbytes / seconds / 1e9, floor / seconds, TARGETS[stats]))
        os.environ.pop(ENV_VAR, None)
        del in_memory

    load = os.getloadavg()[0]
    print(
        f"{n} samples of {sample_shape} float32, {nbytes / 2**20:.0f} MiB, batch {args.batch_size}, "
        f"best of {args.repeats}; fits on {FIT_THREADS} threads, floor on 1; {os.cpu_count()} CPUs, "
        f"{_cpu_model()}, load average {load:.1f}"
    )
    for kernels, seconds in first.items():
        print(f"first population fit in this process, {kernels} path: {seconds:.3f} s")
    print(f"{'run':<40}{'GB/s':>8}{'x floor':>10}{'target':>9}")
    for name, rate, ratio, target in rows:
        mark = "" if target is None else f">={target}x {'ok' if ratio >= target else 'MISS'}"
        print(f"{name:<40}{rate:>8.2f}{ratio:>10.2f}{mark:>9}")

    results = {
        "benchmark": "fit",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"nproc": os.cpu_count(), "cpu": _cpu_model(), "python": platform.python_version()},
        "numpy": np.__version__,
        "bytes": nbytes,
        "batch_size": args.batch_size,
        "sample_shape": list(sample_shape),
        "fit_threads": FIT_THREADS,
        "load_average": load,
        "repeats": args.repeats,
        "first_fit_seconds": first,
        "rows": [{"run": r[0], "gb_per_s": r[1], "ratio_to_floor": r[2], "target": r[3]} for r in rows],
    }
    out = args.out or Path(__file__).parent / "results" / f"fit-{int(time.time())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
