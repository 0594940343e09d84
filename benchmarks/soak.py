"""Soak test: N connections for T seconds of mixed valid and invalid requests against bn-serve.

    python benchmarks/soak.py [--connections 8] [--duration 600] [--warmup 5] [--rate 0] [--url URL]
                              [--slow-senders 2] [--slow-readers 2] [--token KEY] [--out results.json]

Without `--url` it writes a small frozen BatchNorm model (64 features) to a temporary repository and starts
its own `bn-serve` on a free loopback port, so it can read the server's resident memory (RSS of the process
tree, after the warm-up and at the end). Each connection loops over a fixed mix of requests, each with the
status it must get: valid JSON and binary inferences (200), and malformed JSON, a wrong shape, NaN, an
unknown model, a wrong method, a lying binary header (400/404/405). Any other status, or a transport error,
is unexpected. Beside them run slow clients, each on its own raw connection: slow senders trickle a valid
request in 64-byte pieces every 50 ms (about 2 s a request), slow readers send a 1 MiB request and read
its ~3 MB JSON answer 64 KiB every 20 ms; both must get 200 and complete answers. Prints a table
(requests, statuses, slow clients' requests, unexpected, p50/p99 latency of the mix, RSS start/end/growth)
and exits 1 when something unexpected happened.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

if __name__ == "__main__":
    # Run as a script, the repository root is not on the path; put it there so `benchmarks.serving` imports.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serving.models import make_model, write_repository
from benchmarks.serving.servers import free_port, resident_memory

MODEL = "soak"
FEATURES = 64


@dataclass(frozen=True)
class Probe:
    """One request of the mix and the status it must get."""

    kind: str
    method: str
    path: str
    body: bytes
    headers: dict[str, str]
    expected: int


def request_mix(rng: np.random.Generator) -> list[Probe]:
    """Valid requests (two thirds) and invalid ones, each with its expected status."""
    infer = f"/v2/models/{MODEL}/infer"
    x = rng.standard_normal((4, FEATURES)).astype(np.float32)
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    json_body = orjson.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]})
    header = orjson.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
            "parameters": {"binary_data_output": True},
        }
    )
    binary = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
    json_type = {"Content-Type": "application/json"}
    nan = json_body.replace(b"[", b"[NaN,", 1)
    wrong_shape = orjson.dumps({"inputs": [{**tensor, "shape": [4, FEATURES + 1], "data": [0.0] * 4 * 65}]})
    lying = {**binary, "Inference-Header-Content-Length": str(len(header) + x.nbytes + 10)}
    return [
        Probe("json", "POST", infer, json_body, json_type, 200),
        Probe("binary", "POST", infer, header + x.tobytes(), binary, 200),
        Probe("json", "POST", infer, json_body, json_type, 200),
        Probe("binary", "POST", infer, header + x.tobytes(), binary, 200),
        Probe("truncated_json", "POST", infer, json_body[: len(json_body) // 2], json_type, 400),
        Probe("wrong_shape", "POST", infer, wrong_shape, json_type, 400),
        Probe("json", "POST", infer, json_body, json_type, 200),
        Probe("binary", "POST", infer, header + x.tobytes(), binary, 200),
        Probe("nan_literal", "POST", infer, nan, json_type, 400),
        Probe("unknown_model", "POST", "/v2/models/no_such_model/infer", json_body, json_type, 404),
        Probe("wrong_method", "GET", infer, b"", {}, 405),
        Probe("lying_header", "POST", infer, header + x.tobytes(), lying, 400),
    ]


@dataclass
class SoakReport:
    url: str
    connections: int
    duration_s: float
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    unexpected: dict[str, int] = field(default_factory=dict)
    transport_errors: dict[str, int] = field(default_factory=dict)
    slow_requests: dict[str, int] = field(default_factory=dict)
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    rss_start_mib: float | None = None
    rss_end_mib: float | None = None

    @property
    def rss_growth(self) -> float | None:
        if self.rss_start_mib is None or self.rss_end_mib is None:
            return None
        return self.rss_end_mib / self.rss_start_mib - 1

    @property
    def ok(self) -> bool:
        return not self.unexpected and not self.transport_errors

    def table(self) -> str:
        growth = self.rss_growth
        rows = [
            ("url", self.url),
            ("connections", str(self.connections)),
            ("duration (s)", f"{self.duration_s:.1f}"),
            ("requests", str(self.requests)),
            ("requests/s", f"{self.requests / self.duration_s:.0f}" if self.duration_s else "-"),
            (
                "slow clients' requests",
                ", ".join(f"{k}: {v}" for k, v in sorted(self.slow_requests.items())) or "-",
            ),
            ("statuses", ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items())) or "-"),
            ("unexpected", ", ".join(f"{k}: {v}" for k, v in sorted(self.unexpected.items())) or "none"),
            ("transport errors", ", ".join(f"{k}: {v}" for k, v in self.transport_errors.items()) or "none"),
            ("latency p50 / p99 (ms)", f"{self.p50_ms:.2f} / {self.p99_ms:.2f}"),
            ("RSS after warm-up (MiB)", "-" if self.rss_start_mib is None else f"{self.rss_start_mib:.1f}"),
            ("RSS at end (MiB)", "-" if self.rss_end_mib is None else f"{self.rss_end_mib:.1f}"),
            ("RSS growth", "-" if growth is None else f"{growth:+.2%}"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


async def _connection(
    client: httpx.AsyncClient,
    mix: list[Probe],
    start: int,
    stop_at: float,
    interval_s: float,
    token: str | None,
    latencies: list[float],
    statuses: Counter[str],
    unexpected: Counter[str],
    errors: Counter[str],
) -> None:
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    i = start
    next_at = time.monotonic()
    while time.monotonic() < stop_at:
        probe = mix[i % len(mix)]
        i += 1
        began = time.perf_counter()
        try:
            response = await client.request(
                probe.method, probe.path, content=probe.body or None, headers={**probe.headers, **auth}
            )
        except httpx.HTTPError as exc:
            errors[type(exc).__name__] += 1
            continue
        latencies.append(time.perf_counter() - began)
        statuses[str(response.status_code)] += 1
        if response.status_code != probe.expected:
            unexpected[f"{probe.kind}->{response.status_code}"] += 1
        if interval_s:
            next_at += interval_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


SLOW_PIECE_BYTES = 64
SLOW_PIECE_INTERVAL_S = 0.05
SLOW_READ_BYTES = 64 * 1024
SLOW_READ_INTERVAL_S = 0.02
SLOW_READER_ROWS = 4096  # 1 MiB of FP32 in, ~3 MB of JSON out


def _raw_request(url: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[str, int, bytes]:
    """(host, port, the request's bytes) for a raw-socket client of `url`."""
    host, _, port = url.removeprefix("http://").partition(":")
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return host, int(port), ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_answer(reader: asyncio.StreamReader, paced: bool) -> tuple[int, bool]:
    """The status of the answer on `reader` and whether its whole body arrived, read slowly if `paced`."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    received = 0
    while received < length:
        chunk = await reader.read(min(SLOW_READ_BYTES, length - received))
        if not chunk:
            return status, False
        received += len(chunk)
        if paced:
            await asyncio.sleep(SLOW_READ_INTERVAL_S)
    return status, True


async def _slow_client(
    url: str,
    kind: str,
    stop_at: float,
    token: str | None,
    seed: int,
    counts: Counter[str],
    unexpected: Counter[str],
    errors: Counter[str],
) -> None:
    """A slow sender or slow reader (`kind`), one request at a time on its own connection until `stop_at`."""
    rng = np.random.default_rng(seed)
    rows = SLOW_READER_ROWS if kind == "slow_reader" else 4
    x = rng.standard_normal((rows, FEATURES)).astype(np.float32)
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    if kind == "slow_reader":
        body = orjson.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}]})
        headers = {
            "Inference-Header-Content-Length": str(len(body)),
            "Content-Type": "application/octet-stream",
        }
        body += x.tobytes()
    else:
        body = orjson.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]})
        headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    host, port, raw = _raw_request(url, f"/v2/models/{MODEL}/infer", body, headers)
    while time.monotonic() < stop_at:
        try:
            reader, writer = await asyncio.open_connection(host, port)
            try:
                if kind == "slow_sender":
                    for start in range(0, len(raw), SLOW_PIECE_BYTES):
                        writer.write(raw[start : start + SLOW_PIECE_BYTES])
                        await writer.drain()
                        await asyncio.sleep(SLOW_PIECE_INTERVAL_S)
                else:
                    writer.write(raw)
                    await writer.drain()
                status, complete = await asyncio.wait_for(
                    _read_answer(reader, paced=kind == "slow_reader"), 60
                )
            finally:
                writer.close()
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            errors[f"{kind}:{type(exc).__name__}"] += 1
            continue
        counts[f"{kind}:{status}"] += 1
        if status != 200 or not complete:
            unexpected[f"{kind}->{status}{'' if complete else ' (cut short)'}"] += 1


async def _load(
    url: str,
    connections: int,
    duration_s: float,
    rate: float,
    token: str | None,
    seed: int,
    slow_senders: int = 0,
    slow_readers: int = 0,
) -> tuple[list[float], Counter[str], Counter[str], Counter[str], Counter[str]]:
    mix = request_mix(np.random.default_rng(seed))
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    slow: Counter[str] = Counter()
    interval = connections / rate if rate > 0 else 0.0
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    kinds = ["slow_sender"] * slow_senders + ["slow_reader"] * slow_readers
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        stop_at = time.monotonic() + duration_s
        await asyncio.gather(
            *(
                _connection(client, mix, c, stop_at, interval, token, latencies, statuses, unexpected, errors)
                for c in range(connections)
            ),
            *(
                _slow_client(url, kind, stop_at, token, seed + i, slow, unexpected, errors)
                for i, kind in enumerate(kinds)
            ),
        )
    return latencies, statuses, unexpected, errors, slow


def soak(
    url: str,
    *,
    connections: int,
    duration_s: float,
    warmup_s: float = 2.0,
    rate: float = 0.0,
    token: str | None = None,
    server_pid: int | None = None,
    seed: int = 0,
    slow_senders: int = 2,
    slow_readers: int = 2,
) -> SoakReport:
    """Warm up for `warmup_s`, read the RSS, load for `duration_s`, read it again; the report.

    rate: requests per second over all connections (0: as fast as the server answers); the slow clients
    run beside them, unpaced.
    """
    report = SoakReport(url=url, connections=connections, duration_s=duration_s)
    slow = {"slow_senders": slow_senders, "slow_readers": slow_readers}
    if warmup_s > 0:
        asyncio.run(_load(url, connections, warmup_s, rate, token, seed, **slow))
    if server_pid is not None:
        report.rss_start_mib = resident_memory(server_pid)[0]
    started = time.monotonic()
    latencies, statuses, unexpected, errors, slow_counts = asyncio.run(
        _load(url, connections, duration_s, rate, token, seed, **slow)
    )
    report.duration_s = time.monotonic() - started
    if server_pid is not None:
        report.rss_end_mib = resident_memory(server_pid)[0]
    report.requests = len(latencies)
    report.statuses = dict(statuses)
    report.unexpected = dict(unexpected)
    report.transport_errors = dict(errors)
    report.slow_requests = dict(slow_counts)
    if latencies:
        p50, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 99])
        report.p50_ms, report.p99_ms = float(p50), float(p99)
    return report


@contextmanager
def own_server(extra_env: dict[str, str] | None = None, timeout_s: float = 60.0) -> Iterator[tuple[str, int]]:
    """A `bn-serve` on a free loopback port serving the soak model: (url, pid); stopped with SIGTERM."""
    with tempfile.TemporaryDirectory(prefix="bn-soak-") as tmp:
        write_repository(Path(tmp), (make_model(MODEL, (FEATURES,), seed=0),))
        port = free_port()
        command = [sys.executable, "-m", "service.cli", "--model-repository", tmp, "--device", "cpu"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-grpc"]
        env = {**os.environ, **(extra_env or {})}
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"bn-serve exited with {process.returncode} before it was ready")
                try:
                    if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("bn-serve did not become ready")
                time.sleep(0.1)
            yield url, process.pid
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of measured load")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before the first RSS")
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s over all connections; 0: max")
    parser.add_argument("--slow-senders", type=int, default=2, help="clients trickling their requests in")
    parser.add_argument("--slow-readers", type=int, default=2, help="clients reading their answers slowly")
    parser.add_argument("--url", help="a running server (no RSS unless --pid is given)")
    parser.add_argument("--pid", type=int, help="the running server's process id, for RSS")
    parser.add_argument("--token", default=os.environ.get("BN_SERVE_API_KEY"), help="bearer token to send")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options: dict[str, Any] = {
        "connections": args.connections,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "rate": args.rate,
        "token": args.token,
        "slow_senders": args.slow_senders,
        "slow_readers": args.slow_readers,
    }
    if args.url:
        report = soak(args.url.rstrip("/"), server_pid=args.pid, **options)
    else:
        with own_server() as (url, pid):
            report = soak(url, server_pid=pid, **options)
    print(report.table())
    if args.out:
        document = {
            **asdict(report),
            "rss_growth": report.rss_growth,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        }
        args.out.write_text(json.dumps(document, indent=2) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
