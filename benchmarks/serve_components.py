"""What each step of a small request costs in bn-serve, timed one step at a time, and the whole request.

    python benchmarks/serve_components.py [--workload W1-c1] [--number 2000] [--repeats 7] [--setting K=V]...

Builds the app as `bn-serve` does, with default settings or those given (see `serve_inprocess.py`),
then times, in microseconds per call, each step the hot path takes for the workload's request, called
directly on the app's own objects: the best of `--repeats` rounds of `--number` calls (a shared machine's
other tenants only ever add time, so the minimum is the estimate). The `whole request` row drives the app
with ASGI messages, one request after another, and takes the 10th percentile of single requests: comparing
it with the sum of the steps shows what the steps leave out (the event loop's scheduling, the batcher's
futures and tasks).

It reaches into the service's objects (`app.state`, `app.front.route`), so it follows their present layout;
`serve_inprocess.py` measures the same app through its public surface only.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvloop

from benchmarks.serve_inprocess import Lifespan, bn_serve_app, http_scope, request
from benchmarks.serving import workloads
from benchmarks.serving.models import benchmark_models, write_repository


def best_us(function: Callable[[], Any], number: int, repeats: int) -> float:
    return min(timeit.repeat(function, number=number, repeat=repeats)) / number * 1e6


async def components(
    app: Any, files: workloads.RequestFiles, model_name: str, args: argparse.Namespace
) -> None:
    from service import codec
    from service.http_request import aligned_buffer, request_headers
    from service.log import write_access_record

    body = files.body.read_bytes()
    headers = [(k.lower().encode(), v.encode()) for k, v in files.headers().items()]
    headers.append((b"content-length", str(len(body)).encode()))
    # A binary-extension body (W3-binary) is read with its JSON header's length, as the route reads it.
    header_length = next((int(v) for k, v in headers if k == b"inference-header-content-length"), None)
    path = f"/v2/models/{model_name}/infer"
    scope = http_scope("POST", path, headers)
    core, observability = app.state.core, app.state.observability
    route, front = app.front.route, app.front
    metrics = observability.metrics
    if header_length is not None:  # the server reads such a body into a buffer aligning its tensors
        aligned = aligned_buffer(len(body), header_length)
        aligned[:] = body
        body = aligned  # type: ignore[assignment]
    decoded, fmt = codec.decode_request(body, header_length)
    prepared = core.prepare(model_name, None, decoded)
    model, session, feeds, outputs = prepared.model, prepared.session, prepared.feeds, prepared.output_names
    result = prepared.response(core.run(model, outputs, feeds))
    watch = model.drift
    name, version = model.labels
    n, r = args.number, args.repeats

    def admitted() -> None:
        with route._admission.admit():
            pass

    async def batched(count: int) -> None:
        for _ in range(count):
            await route._batcher.infer(prepared)

    steps: list[tuple[str, Callable[[], Any]]] = [
        (
            "headers: request_headers + request id",
            lambda: front.ids.incoming(None) and request_headers(scope),
        ),
        ("decode: codec.decode_request (orjson + arrays)", lambda: codec.decode_request(body, header_length)),
        (
            "prepare: InferenceCore.prepare (resolve, validate)",
            lambda: core.prepare(model_name, None, decoded),
        ),
        ("onnxruntime: session.run alone", lambda: session.run(outputs, feeds)),
        (
            "run: InferenceCore.run (session + metrics + drift)",
            lambda: core.run(model, outputs, feeds),
        ),
        (
            "drift: Observability.sample (inline sums)",
            lambda: watch is not None and observability.sample(watch, feeds[watch.input_name]),
        ),
        ("run metrics: Observability.ran (2 histograms)", lambda: observability.ran(name, version, 1e-4, 1)),
        ("encode: codec.encode_response (orjson)", lambda: codec.encode_response(result, fmt)),
        (
            "request metrics: labels + observe_request",
            lambda: metrics.observe_request(
                *observability.labels(core.repository, model_name, None), 200, 1e-4
            ),
        ),
        (
            "request metrics: the version's own series (ModelMetrics.observe_request)",
            lambda: model.metrics is not None and model.metrics.observe_request(200, 1e-4),
        ),
        (
            "run metrics: the version's own series (ModelMetrics.observe_inference)",
            lambda: model.metrics is not None and model.metrics.observe_inference(1e-4, 1),
        ),
        ("in-flight gauge: inc + dec", lambda: (metrics.in_flight.inc(), metrics.in_flight.dec())),
        ("admission: admit() enter + exit", admitted),
        (
            "access log: write_access_record (as configured: log_flush_interval_s)",
            lambda: write_access_record("POST", path, 200, 1e-4, "rid"),
        ),
    ]
    print("| step | us per call |")
    print("|---|---:|")
    for name, function in steps:
        print(f"| {name} | {best_us(function, n, r):.1f} |", flush=True)
    batcher_runs = []
    for _ in range(r):
        started = time.perf_counter()
        await batched(n)
        batcher_runs.append((time.perf_counter() - started) / n * 1e6)
    print(f"| batcher: Batcher.infer one at a time (run, drift, metrics inside) | {min(batcher_runs):.1f} |")
    singles = []
    for _ in range(n * 2):
        started = time.perf_counter()
        answer = await request(app, "POST", path, headers, body)
        singles.append((time.perf_counter() - started) * 1e6)
        if answer.status != 200:
            raise RuntimeError(f"status {answer.status}")
    p10, p50 = statistics.quantiles(singles, n=10)[0], statistics.median(singles)
    print(f"| whole request through the app (p10 / p50 of {len(singles)}) | {p10:.1f} / {p50:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", default="W1-c1")
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--setting", action="append", default=[], metavar="KEY=VALUE", help="a Settings field"
    )
    args = parser.parse_args()
    (workload,) = workloads.select_workloads(args.workload)
    if 0 in os.sched_getaffinity(0):
        os.sched_setaffinity(0, {0})
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average: {load}; settings {args.setting or 'defaults'}")
    with tempfile.TemporaryDirectory(prefix="bench-components-") as tmp:
        work = Path(tmp)
        models = {m.name: m for m in benchmark_models()}
        write_repository(work / "models", tuple(models.values()))
        requests, _ = workloads.write_bodies(work / "bodies", (workload,), models)
        log = (work / "server.log").open("w")
        app = bn_serve_app(work / "models", dict(a.split("=", 1) for a in args.setting), log)

        async def run() -> None:
            lifespan = Lifespan(app)
            await lifespan.start()
            try:
                while (await request(app, "GET", "/v2/health/ready", [], b"")).status != 200:
                    await asyncio.sleep(0.1)
                await components(app, requests[workload.name], workload.model, args)
            finally:
                await lifespan.stop()

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run())
        logging.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
