"""The serving benchmark, end to end: models, request bodies, each server in turn under wrk, the report.

Each server runs alone, pinned to CPU 0, while wrk runs pinned to CPU 1; before each workload the harness
checks one response against the closed-form reference, so a fast wrong answer cannot enter the table. A
one-connection workload's latency comes from a second run, of the sequential client
(`benchmarks/serving/sequential.py`: every request timed; wrk's p99 there is a tail wrk adds itself); its
req/s stays wrk's.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import http.client
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

from benchmarks.serving import load, report, servers, triton_peer, venvs, workloads
from benchmarks.serving.models import BatchNormModel, benchmark_models, write_repository

BENCHMARKS = Path(__file__).resolve().parents[1]
SERVER_CPU, LOAD_CPU = 0, 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/serve.py",
        description="Benchmark bn-serve against a naive baseline, the framework's floor, loopback and "
        "(--peers) Seldon MLServer, the KServe Python server and Triton Inference Server, under wrk.",
    )
    parser.add_argument(
        "--peers", action="store_true", help="also run MLServer, KServe and Triton (own venvs)"
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds of load per workload (default 10)"
    )
    parser.add_argument(
        "--workloads", default="W1,W2,W3", help="comma-separated groups or names (W1, W1-c32, W3-binary...)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per workload, the best by req/s is kept (default 1)"
    )
    parser.add_argument("--servers", default=None, help="only these servers, comma-separated (default: all)")
    parser.add_argument(
        "--out", type=Path, default=None, help="results JSON (default benchmarks/results/...)"
    )
    parser.add_argument(
        "--venv-cache", type=Path, default=BENCHMARKS.parent / ".cache" / "bench-venvs", help="peers' venvs"
    )
    return parser


def machine() -> dict[str, str | int]:
    """What produced the numbers: CPU model, core counts, OS, Python."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    return {
        "cpu": model,
        "nproc": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """One POST to a loopback URL: (status, headers, body)."""
    host_port = url.removeprefix("http://").split("/", 1)[0]
    connection = http.client.HTTPConnection(host_port, timeout=120)
    try:
        connection.request("POST", url[len("http://") + len(host_port) :], body=body, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> int:
    selected = workloads.select_workloads(args.workloads)
    if not {SERVER_CPU, LOAD_CPU} <= os.sched_getaffinity(0):
        raise SystemExit(
            f"needs CPUs {SERVER_CPU} and {LOAD_CPU}; this process may use {os.sched_getaffinity(0)}"
        )
    wrk = load.ensure_wrk()
    signal.signal(signal.SIGTERM, _interrupt)
    models = {m.name: m for m in benchmark_models()}
    rows: list[report.Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        repository = work / "models"
        write_repository(repository, tuple(models.values()))
        requests, canned = workloads.write_bodies(work / "bodies", selected, models)
        bn_serve = shutil.which("bn-serve", path=str(Path(sys.executable).parent)) or shutil.which("bn-serve")
        wanted = {s.strip() for s in args.servers.split(",")} if args.servers else None
        specs = servers.own_servers(repository, canned, bn_serve)
        # A peer's environment is only built (minutes, first use) when the peer runs.
        if args.peers and (wanted is None or wanted & {"mlserver", "kserve"}):
            mlserver = venvs.ensure_venv(
                args.venv_cache, "mlserver", BENCHMARKS / "requirements-mlserver.txt"
            )
            kserve = venvs.ensure_venv(args.venv_cache, "kserve", BENCHMARKS / "requirements-kserve.txt")
            specs += servers.peer_servers(repository, mlserver, kserve, work)
        if args.peers and (wanted is None or "triton" in wanted):
            specs += _triton(args.venv_cache, repository, work)
        if wanted is not None:
            specs = [s for s in specs if s.name in wanted]
        for spec in specs:
            rows.extend(_bench_server(spec, selected, requests, models, wrk, args, work))
    report.add_ratios(rows)
    print()
    print(report.table(rows))
    meta = {
        "command": " ".join(["python", "benchmarks/serve.py", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": args.duration,
        "repeats": args.repeats,
        "server_cpu": SERVER_CPU,
        "load_cpu": LOAD_CPU,
        "machine": machine(),
    }
    result = report.document(rows, meta)
    print()
    for target in result["targets"]:
        verdict = {True: "MET", False: "MISSED", None: "n/a"}[target["met"]]
        print(f"{verdict:7} {target['target']}: {target['detail']}")
    out = args.out or BENCHMARKS / "results" / f"serve-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nresults written to {out}")
    return 0


def _triton(venv_cache: Path, repository: Path, work: Path) -> list[servers.ServerSpec]:
    """The Triton row, or none (with the reason printed) where its wheel cannot be installed or run here."""
    try:
        python = venvs.ensure_venv(venv_cache, "triton", BENCHMARKS / "requirements-triton.txt")
        return [triton_peer.server_spec(triton_peer.TritonInstall.locate(python), repository, work)]
    except (subprocess.CalledProcessError, OSError, triton_peer.TritonUnavailableError) as exc:
        print(f"[triton] skipped: {exc}", flush=True)
        return []


def _bench_server(
    spec: servers.ServerSpec,
    selected: Sequence[workloads.Workload],
    requests: dict[str, workloads.RequestFiles],
    models: Mapping[str, BatchNormModel],
    wrk: str,
    args: argparse.Namespace,
    work: Path,
) -> list[report.Row]:
    rows: list[report.Row] = []
    print(f"[{spec.name}] starting", flush=True)
    try:
        with servers.running(spec, work / f"{spec.name}.log", SERVER_CPU) as process:
            for workload in selected:
                rows.append(
                    _bench_workload(spec, workload, requests[workload.name], models, wrk, args, process.pid)
                )
    except servers.ServerStartError as exc:
        print(f"[{spec.name}] did not start: {exc}", flush=True)
        done = {r.workload for r in rows}
        rows += [
            report.Row(spec.name, spec.role, w.name, "failed", str(exc).splitlines()[0])
            for w in selected
            if w.name not in done
        ]
    return rows


def _bench_workload(
    spec: servers.ServerSpec,
    workload: workloads.Workload,
    request: workloads.RequestFiles,
    models: Mapping[str, BatchNormModel],
    wrk: str,
    args: argparse.Namespace,
    pid: int,
) -> report.Row:
    if workload.binary and not spec.binary:
        return report.Row(spec.name, spec.role, workload.name, "skipped", "no binary tensor extension")
    model = models[workload.model]
    expected = model.reference(workloads.sample_input(model, workload.batch))
    url = spec.url(spec.infer_path.format(model=workload.model))
    try:
        workloads.check_response(*post(url, request.body.read_bytes(), request.headers()), expected)
    except (workloads.ResponseMismatchError, OSError, http.client.HTTPException) as exc:
        print(f"[{spec.name}] {workload.name}: wrong or no answer, not measured: {exc}", flush=True)
        return report.Row(spec.name, spec.role, workload.name, "failed", f"wrong answer: {exc}")
    try:
        # Best of --repeats by throughput: the other tenants of a shared machine only ever slow a run down.
        runs = [
            load.run_wrk(wrk, url, request, workload.connections, args.duration, LOAD_CPU)
            for _ in range(max(1, args.repeats))
        ]
        result = max(runs, key=lambda r: r.requests_per_s)
        if workload.connections == 1:
            timed = load.run_sequential(url, request, args.duration, LOAD_CPU)
            result = dataclasses.replace(
                result,
                p50_ms=timed.p50_ms,
                p90_ms=timed.p90_ms,
                p99_ms=timed.p99_ms,
                mean_ms=timed.mean_ms,
                max_ms=timed.max_ms,
            )
    except load.LoadGeneratorError as exc:
        return report.Row(spec.name, spec.role, workload.name, "failed", str(exc))
    rss, pss = servers.resident_memory(pid)
    print(
        f"[{spec.name}] {workload.name}: {result.requests_per_s:,.1f} req/s, p50 {result.p50_ms:.2f} ms, "
        f"p99 {result.p99_ms:.2f} ms, {result.errors} errors, RSS {rss:.0f} MiB",
        flush=True,
    )
    return report.Row(
        spec.name,
        spec.role,
        workload.name,
        "ok",
        requests_per_s=result.requests_per_s,
        p50_ms=result.p50_ms,
        p90_ms=result.p90_ms,
        p99_ms=result.p99_ms,
        errors=result.errors,
        rss_mib=rss,
        pss_mib=pss,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted: every server has been stopped", file=sys.stderr)
        return 130
