"""What bn-serve's work off the request path costs under load: the drift thread's CPU share and memory.

    python benchmarks/serve_costs.py [--workloads W1-c32,W3-binary,W3-json] [--duration 10]
                                     [--env BN_SERVE_DRIFT_MAX_FRACTION=1.0 ...]

Starts `bn-serve` (the one on PATH beside this Python, `--intra-op-threads 1`) on the benchmark's model
repository, pinned with `taskset` to CPU 0, and drives each workload with `wrk -t1` pinned to CPU 1 for
`--duration` seconds, as `benchmarks/serve.py` does. Per workload it reports:

- req/s and p50/p99 (wrk);
- the server's CPU time per request (utime + stime of every thread, `/proc/<pid>/task/*/stat`): run once
  more with `--env BN_SERVE_DRIFT=false` and the difference is what drift costs per request;
- the drift coverage from `GET /v2/models/<model>/stats`: requests covered and skipped;
- resident memory: idle after start, right after the run, `SETTLE_S` later (once the periodic heap trim has
  run: what the run left resident for good), and the process's high-water mark (`VmHWM`).

`--env` passes settings to the server (e.g. `BN_SERVE_DRIFT_MAX_FRACTION=1000` lifts the budget).
`VmHWM` includes loading: verifying a model runs it on probe batches, which can set the high-water mark.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serving import load, models, workloads

SERVER_CPU, LOAD_CPU = 0, 1
# Longer than the server's periodic heap trim (once a second), so that freed heap is back with the OS.
SETTLE_S = 2.5
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of process `pid` so far, all its threads, finished ones included."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of `pid` in MiB."""
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"bn-serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("bn-serve did not get ready")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", default="W1-c32,W3-binary,W3-json")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--port", type=int, default=18123)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    bn_serve = shutil.which("bn-serve", path=str(Path(sys.executable).parent)) or shutil.which("bn-serve")
    if bn_serve is None:
        raise SystemExit("bn-serve is not installed")
    wrk = load.ensure_wrk()
    chosen = workloads.select_workloads(args.workloads)
    with tempfile.TemporaryDirectory(prefix="bn-serve-costs-") as tmp:
        root = Path(tmp)
        pair = models.benchmark_models()
        models.write_repository(root / "models", pair)
        requests, _ = workloads.write_bodies(root / "bodies", chosen, {m.name: m for m in pair})
        env = {**os.environ, **dict(item.split("=", 1) for item in args.env)}
        argv = ["taskset", "-c", str(SERVER_CPU), bn_serve, "--model-repository", str(root / "models")]
        argv += ["--port", str(args.port), "--intra-op-threads", "1", "--log-level", "warning"]
        base = f"http://127.0.0.1:{args.port}"
        process = subprocess.Popen(argv, env=env)
        try:
            wait_ready(f"{base}/v2/health/ready", process)
            idle_rss, _ = memory_mib(process.pid)
            print(f"idle RSS {idle_rss:.0f} MiB; settings {args.env or 'defaults'}")
            print(
                "| workload | req/s | p50 / p99 ms | CPU ms/req | covered / skipped "
                f"| RSS / {SETTLE_S:g} s later / HWM MiB |"
            )
            print("|---|---:|---:|---:|---:|---:|")
            for workload in chosen:
                stats_url = f"{base}/v2/models/{workload.model}/stats"
                before_cov = get_json(stats_url).get("coverage") or {}
                before = cpu_seconds(process.pid)
                url = f"{base}/v2/models/{workload.model}/infer"
                result = load.run_wrk(
                    wrk, url, requests[workload.name], workload.connections, args.duration, LOAD_CPU
                )
                spent = cpu_seconds(process.pid) - before
                after_cov = get_json(stats_url).get("coverage") or {}
                rss, _ = memory_mib(process.pid)
                time.sleep(SETTLE_S)
                settled, hwm = memory_mib(process.pid)
                per_request = spent / max(1.0, result.requests_per_s * args.duration) * 1e3

                def moved(outcome: str, a: dict[str, Any] = after_cov, b: dict[str, Any] = before_cov) -> int:
                    return int(a.get(outcome, {}).get("requests", 0) - b.get(outcome, {}).get("requests", 0))

                coverage = f"{moved('covered'):,} / {moved('skipped'):,}" if after_cov else "-"
                print(
                    f"| {workload.name} | {result.requests_per_s:,.1f} | {result.p50_ms:.2f} / "
                    f"{result.p99_ms:.2f} | {per_request:.3f} | {coverage} "
                    f"| {rss:.0f} / {settled:.0f} / {hwm:.0f} |",
                    flush=True,
                )
        finally:
            process.terminate()
            process.wait(timeout=60)


if __name__ == "__main__":
    main()
