"""The gRPC serving benchmark: W1 and W3 over gRPC with raw tensor contents, against a canned-response server.

    python benchmarks/serve.py --grpc [--duration 10] [--workloads W1-c1,W1-c32,W3-raw]
        [--servers canned,bn-serve,kserve,mlserver] [--venv-cache DIR]

`kserve` and `mlserver` are the peers' V2 gRPC servers, started as the REST runs start them (`servers.py`,
`peers/`, their own virtual environments under `--venv-cache`) with their gRPC port on; a peer that cannot
start is skipped with the reason printed. Each server runs alone, pinned to CPU 0; the load generator
(`grpc_load.py`, a fixed number of calls in flight) runs pinned to CPU 1. `canned` answers every call with
the right pre-serialized response without decoding anything: the request's bytes cross loopback through
gRPC's HTTP/2 transport and the response's bytes come back, nothing else. Its row is the gRPC loopback
transfer floor for this load generator on this machine (the gRPC counterpart of `wire_server.py`), the
floor the W3 target is measured against. Before each workload one answer is checked against the closed-form
reference, so a fast wrong answer cannot enter the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from benchmarks.serving import venvs
from benchmarks.serving.grpc_load import CHANNEL_OPTIONS, METHOD, GrpcLoadResult
from benchmarks.serving.models import (
    INPUT_NAME,
    OUTPUT_NAME,
    BatchNormModel,
    benchmark_models,
    write_repository,
)
from benchmarks.serving.servers import ServerStartError, free_port, peer_servers, stop
from benchmarks.serving.workloads import ATOL, RTOL, sample_input
from service.proto import grpc_service_pb2 as pb

SERVING = Path(__file__).resolve().parent
ROOT = SERVING.parents[1]
PEERS = ("kserve", "mlserver")
SERVER_CPU, LOAD_CPU = 0, 1


@dataclass(frozen=True)
class GrpcWorkload:
    name: str
    model: str
    batch: int
    in_flight: int


WORKLOADS = (
    GrpcWorkload("W1-c1", "bn_features", batch=1, in_flight=1),
    GrpcWorkload("W1-c32", "bn_features", batch=1, in_flight=32),
    GrpcWorkload("W3-raw", "bn_images", batch=8, in_flight=1),
)


def infer_request(model: BatchNormModel, x: np.ndarray) -> bytes:
    """The `ModelInferRequest` for `x` with raw contents, as tritonclient.grpc sends it."""
    request = pb.ModelInferRequest(model_name=model.name, raw_input_contents=[x.astype("<f4").tobytes()])
    request.inputs.add(name=INPUT_NAME, datatype="FP32", shape=list(x.shape))
    serialized: bytes = request.SerializeToString()
    return serialized


def infer_response(model: BatchNormModel, y: np.ndarray) -> bytes:
    response = pb.ModelInferResponse(model_name=model.name, model_version="1")
    response.outputs.add(name=OUTPUT_NAME, datatype="FP32", shape=list(y.shape))
    response.raw_output_contents.append(y.astype("<f4").tobytes())
    serialized: bytes = response.SerializeToString()
    return serialized


def check(target: str, request: bytes, expected: np.ndarray) -> None:
    """One call; raises `AssertionError` when the answer is not `expected` within the harness's tolerance."""
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        answer = pb.ModelInferResponse.FromString(channel.unary_unary(METHOD)(request, timeout=60))
    index = [o.name for o in answer.outputs].index(OUTPUT_NAME)
    shape = list(answer.outputs[index].shape)
    if answer.raw_output_contents:
        got = np.frombuffer(answer.raw_output_contents[index], "<f4").reshape(shape)
    else:  # MLServer answers with typed contents
        got = np.asarray(answer.outputs[index].contents.fp32_contents, dtype=np.float32).reshape(shape)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


@contextlib.contextmanager
def running(
    argv: Sequence[str], target: str, log: Path, env: Mapping[str, str] | None = None
) -> Iterator[None]:
    """`argv` pinned to the server CPU, yielded once `ServerReady` answers true; stopped on the way out."""
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            ["taskset", "-c", str(SERVER_CPU), *argv],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                if process.poll() is not None:
                    raise ServerStartError(
                        f"{argv[0]} exited with {process.returncode}: {log.read_text()[-2000:]}"
                    )
                with contextlib.suppress(grpc.RpcError), grpc.insecure_channel(target) as channel:
                    ready = channel.unary_unary("/inference.GRPCInferenceService/ServerReady")
                    if pb.ServerReadyResponse.FromString(ready(b"", timeout=2)).ready:
                        break
                if time.monotonic() > deadline:
                    raise ServerStartError(f"{argv[0]} not ready: {log.read_text()[-2000:]}")
                time.sleep(0.2)
            yield
        finally:
            stop(process)


def measure(target: str, request: Path, in_flight: int, duration_s: float) -> GrpcLoadResult:
    """The load generator in its own process, pinned to the load CPU."""
    argv = [
        "taskset", "-c", str(LOAD_CPU), sys.executable, "-m", "benchmarks.serving.grpc_load",
        "--target", target, "--request", str(request), "--in-flight", str(in_flight),
        "--duration", str(duration_s),
    ]  # fmt: skip
    done = subprocess.run(
        argv, capture_output=True, text=True, cwd=ROOT, timeout=duration_s + 120, check=True
    )
    return GrpcLoadResult(**json.loads(done.stdout.strip().splitlines()[-1]))


def server_command(
    server: str, port: int, work: Path, peer_pythons: Mapping[str, Path]
) -> tuple[list[str], dict[str, str]]:
    """The argv and extra environment that start `server` with its V2 gRPC port on `port`."""
    if server == "canned":
        return [sys.executable, str(SERVING / "grpc_canned.py"), "--port", str(port),
                "--response", str(work / "response.pb")], {}  # fmt: skip
    if server == "bn-serve":
        return [sys.executable, "-m", "service.cli", "--model-repository", str(work / "models"),
                "--device", "cpu", "--port", str(free_port()), "--grpc-port", str(port),
                "--log-level", "warning"], {}  # fmt: skip
    if server in PEERS:
        specs = peer_servers(
            work / "models", peer_pythons["mlserver"], peer_pythons["kserve"], work, grpc_port=port
        )
        spec = next(s for s in specs if s.name == server)
        return list(spec.argv), dict(spec.env)
    raise SystemExit(f"unknown server {server!r}: choose from canned, bn-serve, {', '.join(PEERS)}")


def peer_environments(cache: Path) -> dict[str, Path]:
    """The peers' pythons, from their pinned requirements (built on first use, as for the REST runs)."""
    benchmarks = SERVING.parent
    return {name: venvs.ensure_venv(cache, name, benchmarks / f"requirements-{name}.txt") for name in PEERS}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/serve.py --grpc", description=__doc__.splitlines()[0])
    parser.add_argument("--grpc", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per workload")
    parser.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS))
    parser.add_argument("--servers", default="canned,bn-serve,kserve,mlserver")
    parser.add_argument("--repeats", type=int, default=1, help="runs per workload, the best kept (default 1)")
    parser.add_argument(
        "--venv-cache", type=Path, default=ROOT / ".cache" / "bench-venvs", help="peers' venvs"
    )
    args = parser.parse_args(argv)
    if not {SERVER_CPU, LOAD_CPU} <= os.sched_getaffinity(0):
        raise SystemExit(f"needs CPUs {SERVER_CPU} and {LOAD_CPU}")
    wanted = {w.strip() for w in args.workloads.split(",")}
    selected = [w for w in WORKLOADS if w.name in wanted]
    servers = [s.strip() for s in args.servers.split(",")]
    models = {m.name: m for m in benchmark_models()}
    peer_pythons = peer_environments(args.venv_cache) if set(servers) & set(PEERS) else {}
    rows: list[tuple[str, str, GrpcLoadResult, int]] = []
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-grpc-") as tmp:
        work = Path(tmp)
        write_repository(work / "models", tuple(models.values()))
        for server in servers:
            for workload in selected:
                if server in skipped:
                    break
                model = models[workload.model]
                x = sample_input(model, workload.batch)
                expected = model.reference(x)
                request = infer_request(model, x)
                (work / "request.pb").write_bytes(request)
                (work / "response.pb").write_bytes(infer_response(model, expected))
                port = free_port()
                target = f"127.0.0.1:{port}"
                command, env = server_command(server, port, work, peer_pythons)
                try:
                    with running(command, target, work / f"{server}.log", env):
                        check(target, request, expected)
                        runs = [
                            measure(target, work / "request.pb", workload.in_flight, args.duration)
                            for _ in range(max(1, args.repeats))
                        ]
                        result = max(runs, key=lambda run: run.calls_per_s)
                except ServerStartError as error:
                    skipped[server] = str(error).strip().splitlines()[-1]
                    print(f"[{server}] skipped: {error}", flush=True)
                    break
                except (grpc.RpcError, AssertionError, subprocess.CalledProcessError) as error:
                    # One workload a server fails (a wrong answer, a refused message) is named, not fatal.
                    skipped[f"{server} {workload.name}"] = str(error).strip().splitlines()[0]
                    print(f"[{server}] {workload.name}-grpc failed: {error}", flush=True)
                    continue
                rows.append((server, workload.name, result, len(request)))
                print(
                    f"[{server}] {workload.name}-grpc: {result.calls_per_s:,.1f} calls/s, "
                    f"p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, {result.errors} errors",
                    flush=True,
                )
    print()
    print("| server | workload | calls/s | p50 ms | p99 ms | request MB/s | errors |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for server, name, result, size in rows:
        print(
            f"| {server} | {name}-grpc | {result.calls_per_s:,.1f} | {result.p50_ms:.2f} "
            f"| {result.p99_ms:.2f} | {result.calls_per_s * size / 1e6:,.1f} | {result.errors} |"
        )
    for server, reason in skipped.items():
        print(f"skipped {server}: {reason}")
    print()
    for line in target_lines({(server, name): result for server, name, result, _ in rows}):
        print(line)
    return 0


def target_lines(results: Mapping[tuple[str, str], GrpcLoadResult]) -> list[str]:
    """The issue's two gRPC targets, MET or MISSED, from one run's results (ratios only)."""
    lines = []
    ours = results.get(("bn-serve", "W1-c32"))
    peers = [(s, r) for (s, w), r in results.items() if w == "W1-c32" and s in PEERS]
    if ours is None or not peers:
        lines.append("n/a     W1-c32 >= 1.5x the best peer: needs bn-serve and a peer on W1-c32")
    else:
        best, peer = max(peers, key=lambda item: item[1].calls_per_s)
        ratio = ours.calls_per_s / peer.calls_per_s
        verdict = "MET" if ratio >= 1.5 else "MISSED"
        lines.append(f"{verdict:<7} W1-c32 >= 1.5x the best peer: {ratio:.2f}x {best}")
    ours, floor = results.get(("bn-serve", "W3-raw")), results.get(("canned", "W3-raw"))
    if ours is None or floor is None:
        lines.append("n/a     W3-raw within 2x the loopback transfer floor: needs bn-serve and canned")
    else:
        slower = floor.calls_per_s / ours.calls_per_s
        p50 = ours.p50_ms / floor.p50_ms
        verdict = "MET" if slower <= 2 and p50 <= 2 else "MISSED"
        lines.append(
            f"{verdict:<7} W3-raw within 2x the loopback transfer floor: "
            f"{slower:.2f}x its time per call, p50 {p50:.2f}x"
        )
    return lines
