"""The load generator: wrk on its own core, posting a workload's request file through `lua/post_body.lua`."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.serving.servers import SERVING
from benchmarks.serving.workloads import RequestFiles

SCRIPT = SERVING / "lua" / "post_body.lua"
MARKER = "WRK_JSON "
SEQUENTIAL_MARKER = "SEQUENTIAL_JSON "
ROOT = Path(__file__).resolve().parents[2]


class LoadGeneratorError(Exception):
    """wrk is missing, failed, or printed no summary."""


@dataclass(frozen=True)
class LoadResult:
    """What wrk measured: completed requests over the run, latency percentiles, and every kind of error."""

    requests: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    errors_status: int
    errors_socket: int
    p999_ms: float = math.nan

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def errors(self) -> int:
        return self.errors_status + self.errors_socket


def ensure_wrk() -> str:
    """The path of wrk; installs the Debian package when running as root, else says how to."""
    path = shutil.which("wrk")
    if path is not None:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk not found: installing the Debian package", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)
        path = shutil.which("wrk")
    if path is None:
        raise LoadGeneratorError(
            "wrk is not installed: `sudo apt-get install -y wrk` (Debian/Ubuntu), then rerun"
        )
    return path


def run_sequential(url: str, request: RequestFiles, duration_s: float, cpu: int) -> LoadResult:
    """One connection on `cpu`, each request sent once the last is answered, every one timed
    (`benchmarks.serving.sequential`): the latency figures of the one-connection workloads."""
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"load goes to loopback only, got {url}")
    argv = [
        "taskset", "-c", str(cpu), sys.executable, "-m", "benchmarks.serving.sequential",
        url, str(request.body), request.content_type, "--duration", str(duration_s),
    ]  # fmt: skip
    if request.header_length is not None:
        argv += ["--header-length", str(request.header_length)]
    completed = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration_s + 90, check=False, cwd=ROOT
    )
    if completed.returncode != 0:
        lines = completed.stderr.strip().splitlines() or [""]
        raise LoadGeneratorError(f"the sequential client exited with {completed.returncode}: {lines[-1]}")
    return parse_summary(completed.stdout, SEQUENTIAL_MARKER)


def parse_summary(stdout: str, marker: str = MARKER) -> LoadResult:
    """The summary line (`WRK_JSON {...}`, printed by the Lua script's `done`, or the sequential client's
    `SEQUENTIAL_JSON {...}`) as a `LoadResult`."""
    lines = [line for line in stdout.splitlines() if line.startswith(marker)]
    if not lines:
        raise LoadGeneratorError(f"no {marker.strip()} summary line:\n{stdout[-2000:]}")
    raw = json.loads(lines[-1][len(marker) :])
    return LoadResult(
        requests=int(raw["requests"]),
        duration_s=raw["duration_us"] / 1e6,
        p50_ms=raw["latency_p50_us"] / 1e3,
        p90_ms=raw["latency_p90_us"] / 1e3,
        p99_ms=raw["latency_p99_us"] / 1e3,
        mean_ms=raw["latency_mean_us"] / 1e3,
        max_ms=raw["latency_max_us"] / 1e3,
        p999_ms=raw.get("latency_p999_us", math.nan) / 1e3,
        errors_status=int(raw.get("errors_status", 0)),
        errors_socket=sum(
            int(raw.get(k, 0)) for k in ("errors_connect", "errors_read", "errors_write", "errors_timeout")
        ),
    )


def run_wrk(
    wrk: str, url: str, request: RequestFiles, connections: int, duration_s: float, cpu: int
) -> LoadResult:
    """Drive `url` with one wrk thread on `cpu`, `connections` keep-alive connections, for `duration_s`."""
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"load goes to loopback only, got {url}")
    script_args = [str(request.body), request.content_type]
    if request.header_length is not None:
        script_args.append(str(request.header_length))
    argv = [
        "taskset", "-c", str(cpu), wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
        "--timeout", "30s", "--latency", "-s", str(SCRIPT), url, "--", *script_args,
    ]  # fmt: skip
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 90, check=False)
    if completed.returncode != 0:
        raise LoadGeneratorError(f"wrk exited with {completed.returncode}: {completed.stderr[-2000:]}")
    return parse_summary(completed.stdout)
