"""wrk against the sequential client at one connection: the same server process, measured by both in turn.

    python benchmarks/one_connection_tail.py [--servers asgi-floor,baseline,bn-serve] [--rounds 2]
                                             [--duration 10]

Each server runs alone pinned to CPU 0 (as in `benchmarks/serve.py`); against the one process, W1-c1 is
measured `--rounds` times by wrk (`lua/post_body.lua`) and by `benchmarks/serving/sequential.py` in turn,
both on CPU 1. A tail that one of them shows and the other does not, on the same server within the same
minute, is the client's: the reason `benchmarks/serve.py` takes one-connection latency from the sequential
client (benchmarks/README.md, "The one-connection tail").
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serving import load, servers, workloads
from benchmarks.serving.models import benchmark_models, write_repository

SERVER_CPU, LOAD_CPU = 0, 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", default="asgi-floor,baseline,bn-serve")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    wrk = load.ensure_wrk()
    (workload,) = workloads.select_workloads("W1-c1")
    wanted = [name.strip() for name in args.servers.split(",")]
    bn_serve = shutil.which("bn-serve", path=str(Path(sys.executable).parent)) or shutil.which("bn-serve")
    print("| server | round | client | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="bench-tail-") as tmp:
        work = Path(tmp)
        models = {m.name: m for m in benchmark_models()}
        write_repository(work / "models", tuple(models.values()))
        requests, canned = workloads.write_bodies(work / "bodies", (workload,), models)
        specs = {s.name: s for s in servers.own_servers(work / "models", canned, bn_serve)}
        unknown = sorted(set(wanted) - set(specs))
        if unknown:
            raise SystemExit(f"unknown servers {unknown}; known: {sorted(specs)}")
        request = requests[workload.name]
        for name in wanted:
            spec = specs[name]
            url = spec.url(spec.infer_path.format(model=workload.model))
            with servers.running(spec, work / f"{name}.log", SERVER_CPU):
                for round_ in range(1, args.rounds + 1):
                    results = {
                        "wrk": load.run_wrk(wrk, url, request, 1, args.duration, LOAD_CPU),
                        "sequential": load.run_sequential(url, request, args.duration, LOAD_CPU),
                    }
                    for client, result in results.items():
                        print(
                            f"| {name} | {round_} | {client} | {result.requests_per_s:,.0f} "
                            f"| {result.p50_ms:.2f} | {result.p90_ms:.2f} | {result.p99_ms:.2f} "
                            f"| {result.p999_ms:.2f} |",
                            flush=True,
                        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
