"""Throughput of `bn-serve --workers N` on W1 (1x64 FP32 JSON), for a machine with cores to spare.

    python benchmarks/serve_workers.py [--workers 1,2,4,8] [--load-cpus 4] [--connections-per-worker 16]
                                       [--duration 10] [--repeats 1] [--out PATH]

The server with N workers is pinned to cores 0..N-1; the load, `--connections-per-worker` keep-alive
connections per worker (16), comes from up to `--load-cpus` one-thread wrk processes pinned to the last
cores of the machine, so that the load generator never shares a core with a worker. Each N runs
`--repeats` times (best kept, by throughput). Prints successful requests/s (a 503 from the server's
bounded queues counts as an error, not as throughput), p99 (the worst wrk process's), errors and the
speed-up over one worker measured in the same run, and writes the figures as JSON under
benchmarks/results/. The script refuses to run where the server's and the load's cores would overlap
(benchmarks/README.md, "Several workers").
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serving import load, servers, workloads
from benchmarks.serving.harness import machine, post
from benchmarks.serving.models import benchmark_models, write_repository

# Keep-alive connections per server worker: the load grows with the server, so each N is measured near
# its capacity without crossing it (with a fixed 192 connections, one worker spends itself answering
# 503s from its bounded queue, which would flatter every ratio to it).
CONNECTIONS_PER_WORKER = 16


def _measure(
    wrk: str,
    url: str,
    request: workloads.RequestFiles,
    load_cpus: list[int],
    connections: int,
    duration_s: float,
) -> dict[str, float]:
    loaders = load_cpus[: max(1, min(len(load_cpus), connections))]
    shares = [connections // len(loaders) + (i < connections % len(loaders)) for i in range(len(loaders))]
    with concurrent.futures.ThreadPoolExecutor(len(loaders)) as pool:
        runs = list(
            pool.map(
                lambda job: load.run_wrk(wrk, url, request, job[1], duration_s, job[0]),
                zip(loaders, shares, strict=True),
            )
        )
    # Over its limits the server answers 503 at once (bounded queues): those answers are not throughput.
    return {
        "requests_per_s": sum((r.requests - r.errors_status) / r.duration_s for r in runs),
        "answers_per_s": sum(r.requests_per_s for r in runs),
        "p50_ms": max(r.p50_ms for r in runs),
        "p99_ms": max(r.p99_ms for r in runs),
        "errors": sum(r.errors for r in runs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument("--load-cpus", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--connections-per-worker", type=int, default=CONNECTIONS_PER_WORKER)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    counts = [int(n) for n in args.workers.split(",")]
    cpus = sorted(os.sched_getaffinity(0))
    if max(counts) + args.load_cpus > len(cpus):
        raise SystemExit(
            f"needs {max(counts)} cores for the server and {args.load_cpus} for the load; "
            f"this process may use {len(cpus)}"
        )
    load_cpus = cpus[-args.load_cpus :]
    wrk = load.ensure_wrk()
    bn_serve = shutil.which("bn-serve", path=str(Path(sys.executable).parent)) or shutil.which("bn-serve")
    if bn_serve is None:
        raise SystemExit("bn-serve is not installed in this environment")
    (workload,) = workloads.select_workloads("W1-c32")
    models = {m.name: m for m in benchmark_models()}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        work = Path(tmp)
        write_repository(work / "models", tuple(models.values()))
        requests, _ = workloads.write_bodies(work / "bodies", (workload,), models)
        request = requests[workload.name]
        model = models[workload.model]
        expected = model.reference(workloads.sample_input(model, workload.batch))
        for count in counts:
            port = servers.free_port()
            spec = servers.ServerSpec(
                f"bn-serve-{count}",
                "subject",
                (
                    bn_serve,
                    "--model-repository",
                    str(work / "models"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--workers",
                    str(count),
                ),
                port,
                True,
            )
            server_cpus = ",".join(str(c) for c in cpus[:count])
            with servers.running(spec, work / f"{spec.name}.log", server_cpus) as process:  # type: ignore[arg-type]
                url = spec.url(spec.infer_path.format(model=workload.model))
                # Every worker must answer right before it is measured: warm each with a few requests.
                for _ in range(8 * count):
                    workloads.check_response(*_post(url, request), expected)
                connections = args.connections_per_worker * count
                best = max(
                    (
                        _measure(wrk, url, request, load_cpus, connections, args.duration)
                        for _ in range(args.repeats)
                    ),
                    key=lambda r: r["requests_per_s"],
                )
                _, pss = servers.resident_memory(process.pid)
            rows.append({"workers": count, "connections": connections, "pss_mib": pss, **best})
            print(
                f"{count} worker(s): {best['requests_per_s']:,.0f} req/s, p99 {best['p99_ms']:.2f} ms, "
                f"{best['errors']:.0f} errors",
                flush=True,
            )
    base = rows[0]["requests_per_s"]
    print(
        f"\nW1 (1x64 FP32 JSON), {args.connections_per_worker} connections per worker over up to "
        f"{args.load_cpus} wrk processes, "
        f"{args.duration:.0f} s, best of {args.repeats}; {len(cpus)} CPUs, {machine()['cpu']}"
    )
    print(f"{'workers':>8}{'req/s':>12}{'x 1 worker':>12}{'p99 ms':>9}{'errors':>8}{'PSS MiB':>9}")
    for row in rows:
        print(
            f"{row['workers']:>8}{row['requests_per_s']:>12,.0f}{row['requests_per_s'] / base:>12.2f}"
            f"{row['p99_ms']:>9.2f}{row['errors']:>8.0f}{row['pss_mib']:>9.0f}"
        )
    results = {
        "benchmark": "serve_workers",
        "command": " ".join(["python", "benchmarks/serve_workers.py", *sys.argv[1:]]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "load_cpus": load_cpus,
        "rows": rows,
    }
    out = args.out or Path(__file__).parent / "results" / f"serve-workers-{int(time.time())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def _post(url: str, request: workloads.RequestFiles) -> tuple[int, dict[str, str], bytes]:
    return post(url, request.body.read_bytes(), request.headers())


if __name__ == "__main__":
    raise SystemExit(main())
