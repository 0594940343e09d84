"""bn-serve's own cost per request, without the network: its ASGI app driven in-process, with a profile.

    python benchmarks/serve_inprocess.py [--workload W1-c1] [--requests 20000] [--repeats 5]
                                         [--variant NAME:KEY=VALUE[,KEY=VALUE...]]... [--profile]

Builds the app as `bn-serve` does (`Settings`, `configure_logging`, `create_app`; the access log goes to a
file, as under a process manager), runs its lifespan, waits until it is ready, then sends it the workload's
request (byte-identical to `benchmarks/serve.py`'s) straight as ASGI messages, on uvloop, the whole process
pinned to CPU 0: `connections` coroutines each awaiting one request after another. What is measured is the
app alone, from scope to the last `send`: no sockets, no HTTP parsing, no uvicorn. The first answer is
checked against the closed-form reference.

Per row: process CPU time (every thread: the loop, the inference pool, drift) and wall time per request,
the best of `--repeats` runs. The `asgi-floor` row is `benchmarks/serving/asgi_floor.py`'s canned app driven
the same way: the driver's own cost. Noise on a shared machine only adds time, so the minimum is the
estimate.

`--variant` adds a row with settings changed (`KEY` a `Settings` field, e.g. `drift=false`,
`log_level=warning`, `max_batch_size=1`); the difference to `bn-serve` is what the feature costs. `--profile`
runs the default settings once more under cProfile (the event loop's thread only; cProfile inflates small
functions, so read the ranking, not the absolute figures) and prints the top functions by own time and by
cumulative time, in microseconds per request.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import math
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvloop

from benchmarks.serving import asgi_floor, workloads
from benchmarks.serving.models import benchmark_models, write_repository

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


class Answer:
    """What the app sent for one request."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = bytearray()

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")


def http_scope(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8000"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def request(
    app: App, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes
) -> Answer:
    answer = Answer()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    await app(http_scope(method, path, headers), receive, answer.send)
    return answer


class Lifespan:
    """The app's lifespan protocol, as uvicorn speaks it: startup now, shutdown on `stop`."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.started = asyncio.Event()
        self.stopping = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "lifespan.startup"}
            await self.stopping.wait()
            return {"type": "lifespan.shutdown"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "lifespan.startup.complete":
                self.started.set()
            elif message["type"].endswith(".failed"):
                raise RuntimeError(f"lifespan failed: {message}")

        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self.task = asyncio.create_task(self.app(scope, receive, send))
        await self.started.wait()

    async def stop(self) -> None:
        self.stopping.set()
        if self.task is not None:
            await self.task


async def measure(
    app: App, path: str, headers: list[tuple[bytes, bytes]], body: bytes, connections: int, count: int
) -> tuple[float, float]:
    """(CPU us, wall us) per request for `count` requests over `connections` concurrent senders."""

    async def sender(share: int) -> None:
        for _ in range(share):
            answer = await request(app, "POST", path, headers, body)
            if answer.status != 200:
                raise RuntimeError(f"status {answer.status}: {bytes(answer.body[:200])!r}")

    shares = [count // connections + (i < count % connections) for i in range(connections)]
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(sender(s) for s in shares))
    return (time.process_time() - cpu) / count * 1e6, (time.perf_counter() - wall) / count * 1e6


def bn_serve_app(repository: Path, overrides: dict[str, str], log: IO[str]) -> App:
    """The app `bn-serve` runs with these settings, its JSON log lines going to `log`."""
    from service.app import create_app
    from service.log import configure_logging
    from service.settings import Settings

    # No gRPC port unless asked for: the app is driven in-process, and a port another server holds would
    # fail its start.
    settings = Settings(model_repository=repository, **{"grpc_port": "0", **overrides})
    configure_logging(settings.log_level, settings.log_flush_interval_s)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(log)
    return create_app(settings)  # type: ignore[return-value]


async def run_rows(
    rows: list[tuple[str, App]],
    workload: workloads.Workload,
    files: workloads.RequestFiles,
    args: argparse.Namespace,
) -> None:
    """Start every app, check its first answer, then measure them in turn `--repeats` times, interleaved so
    that the machine's other tenants slow every row alike; print each row's best."""
    body = files.body.read_bytes()
    headers = [(k.lower().encode(), v.encode()) for k, v in files.headers().items()]
    headers.append((b"content-length", str(len(body)).encode()))
    path = f"/v2/models/{workload.model}/infer"
    model = {m.name: m for m in benchmark_models()}[workload.model]
    expected = model.reference(workloads.sample_input(model, workload.batch))
    lifespans = [Lifespan(app) for _, app in rows]
    try:
        for (name, app), lifespan in zip(rows, lifespans, strict=True):
            await lifespan.start()
            deadline = time.monotonic() + 120
            while (await request(app, "GET", "/v2/health/ready", [], b"")).status != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not ready after 120 s")
                await asyncio.sleep(0.1)
            first = await request(app, "POST", path, headers, body)
            workloads.check_response(first.status, first.headers, bytes(first.body), expected)
            await measure(app, path, headers, body, workload.connections, args.requests // 10)  # warm up
        best = {name: (math.inf, math.inf) for name, _ in rows}
        for _ in range(args.repeats):
            for name, app in rows:
                cpu, wall = await measure(app, path, headers, body, workload.connections, args.requests)
                best[name] = (min(best[name][0], cpu), min(best[name][1], wall))
        for name, (cpu, wall) in best.items():
            print(f"| {name} | {workload.name} | {cpu:.1f} | {wall:.1f} |", flush=True)
        if args.profile:
            name, app = next(row for row in rows if row[0] == "bn-serve")
            profiler = cProfile.Profile()
            profiler.enable()
            await measure(app, path, headers, body, workload.connections, args.requests)
            profiler.disable()
            _print_profile(profiler, args.requests)
    finally:
        for lifespan in lifespans:
            await lifespan.stop()


def _print_profile(profiler: cProfile.Profile, count: int, top: int = 30) -> None:
    stats = pstats.Stats(profiler)
    entries = stats.stats  # type: ignore[attr-defined]
    for key, label in ((2, "own time"), (3, "cumulative time")):
        print(f"\ncProfile, top {top} by {label}, us per request (own / cumulative):")
        ranked = sorted(entries.items(), key=lambda item: item[1][key], reverse=True)[:top]
        for (filename, line, function), (_, calls, own, cumulative, _) in ranked:
            where = f"{Path(filename).parent.name}/{Path(filename).name}:{line}" if line else filename
            print(
                f"  {own / count * 1e6:7.1f} {cumulative / count * 1e6:7.1f}  "
                f"{calls / count:5.1f} calls/req  {function} ({where})"
            )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", default="W1-c1")
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    (workload,) = workloads.select_workloads(args.workload)
    if 0 in os.sched_getaffinity(0):
        os.sched_setaffinity(0, {0})
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| app | workload | CPU us/req | wall us/req |")
    print("|---|---|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="bench-inprocess-") as tmp:
        work = Path(tmp)
        models = {m.name: m for m in benchmark_models()}
        write_repository(work / "models", tuple(models.values()))
        requests, canned = workloads.write_bodies(work / "bodies", (workload,), models)
        # The JSON log lines (access records included) go to a file, as under a process manager.
        log = (work / "server.log").open("w")
        rows: list[tuple[str, App]] = [
            ("asgi-floor", asgi_floor.CannedApp(asgi_floor.load_canned(canned))),  # type: ignore[list-item]
        ]
        for variant in ["bn-serve:", *args.variant]:
            name, _, assignments = variant.partition(":")
            overrides = dict(a.split("=", 1) for a in assignments.split(",") if a)
            label = name if name == "bn-serve" else f"bn-serve {name}"
            rows.append((label, bn_serve_app(work / "models", overrides, log)))
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run_rows(rows, workload, requests[workload.name], args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
