"""Population-fit throughput: the Dask engine with 1 and 2 local workers against the single-process fit.

    python benchmarks/fit_dask.py [--shards 16] [--total-mb 256] [--repeats 3] [--out PATH.json]

Writes `--shards` float32 `.npy` shards of (n, 16, 32, 32) samples totalling `--total-mb` into a temporary
directory, reads them once so every engine starts from a warm page cache, then times, best of
`--repeats`: `bn_export.fit.fit(dir, stats="population")` in this process, and `fit_population_dask` on a
`LocalCluster` of 1 and of 2 single-threaded worker processes (cluster start-up reported apart, since a
long-lived cluster pays it once). Prints a table with throughput ratios to the single-process fit and
writes the figures as JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_SHAPE = (16, 32, 32)


def _write_shards(directory: Path, shards: int, total_bytes: int) -> int:
    """Write the shards; returns the bytes written."""
    sample_bytes = int(np.prod(SAMPLE_SHAPE)) * 4
    per_shard = max(1, total_bytes // shards // sample_bytes)
    rng = np.random.default_rng(0)
    for i in range(shards):
        x = rng.normal(3.0, 2.0, size=(per_shard, *SAMPLE_SHAPE)).astype(np.float32)
        np.save(directory / f"shard-{i:03d}.npy", x)
    return shards * per_shard * sample_bytes


def _warm(directory: Path) -> None:
    for path in sorted(directory.glob("*.npy")):
        path.read_bytes()


def _best(run: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--total-mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", default="1,2", help="local worker counts to run (default 1,2)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default benchmarks/results/...)")
    args = parser.parse_args()

    from distributed import Client

    from bn_export.distributed import fit_population_dask, local_cluster
    from bn_export.fit import fit

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fit-dask-") as tmp:
        directory = Path(tmp)
        nbytes = _write_shards(directory, args.shards, args.total_mb * 2**20)
        _warm(directory)

        seconds, local = _best(lambda: fit(directory, stats="population", batch_size=256), args.repeats)
        rows.append({"engine": "local (1 process)", "workers": 0, "startup_s": 0.0, "seconds": seconds})

        for workers in (int(w) for w in args.workers.split(",")):
            started = time.perf_counter()
            with local_cluster(n_workers=workers, threads_per_worker=1) as cluster, Client(cluster) as client:
                startup = time.perf_counter() - started
                seconds, result = _best(
                    lambda c=client: fit_population_dask(directory, client=c), args.repeats
                )
            error = float(np.max(np.abs(result.moving_var / local.moving_var - 1.0)))
            rows.append(
                {
                    "engine": f"dask ({workers} worker{'s' if workers > 1 else ''})",
                    "workers": workers,
                    "startup_s": startup,
                    "seconds": seconds,
                    "partitions": result.extras["partitions"],
                    "max_rel_diff_var_vs_local": error,
                }
            )

    baseline = rows[0]["seconds"]
    for row in rows:
        row["gb_per_s"] = nbytes / row["seconds"] / 1e9
        row["throughput_vs_local"] = baseline / row["seconds"]

    print(f"{args.shards} shards, {nbytes / 2**20:.0f} MiB float32 {SAMPLE_SHAPE}, best of {args.repeats}")
    print(f"{'engine':<20} {'start-up s':>10} {'fit s':>8} {'GB/s':>7} {'vs local':>9}")
    for row in rows:
        print(
            f"{row['engine']:<20} {row['startup_s']:>10.2f} {row['seconds']:>8.3f} "
            f"{row['gb_per_s']:>7.2f} {row['throughput_vs_local']:>8.2f}x"
        )

    out = args.out or Path(__file__).resolve().parent / "results" / "fit_dask.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "shards": args.shards,
        "bytes": nbytes,
        "sample_shape": list(SAMPLE_SHAPE),
        "rows": rows,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
