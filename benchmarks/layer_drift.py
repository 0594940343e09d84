"""The cost of drift at every BatchNormalization layer: W1-style small JSON requests to a real network,
per-layer drift on against off, in one run, in-process.

    python benchmarks/layer_drift.py [--network mlp_bn1d] [--requests 2000] [--rounds 10]

Two apps serve the same fixture network (tests/data/networks/NETWORK.onnx), one with drift on (its layer
probe run by the drift worker under the default CPU budget), one with `drift=False`; rounds alternate
between them. Each round sends `--requests` one-sample JSON requests one after another through the whole
ASGI app (no sockets: the loop, the front, the codec, the thread pool, onnxruntime, the sampler) and
records the wall-clock and the process CPU time per request (all threads: the drift worker's probe runs
included). Printed: each round, the median per app, and on/off ratios; the drift-on app's coverage (the
requests its probe ran on) shows the work was done, not skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", default="mlp_bn1d")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from service.app import create_app
    from tests.fixtures.make_networks import NETWORKS, OUT, example_inputs
    from tests.service.conftest import test_settings

    root = Path(tempfile.mkdtemp())
    (root / "net" / "1").mkdir(parents=True)
    shutil.copy(OUT / f"{args.network}.onnx", root / "net" / "1" / "model.onnx")
    logging.disable(logging.CRITICAL)  # the access records would measure the terminal
    apps = {"on": create_app(test_settings(root)), "off": create_app(test_settings(root, drift=False))}
    feeds = example_inputs(NETWORKS[args.network], 1, seed=0)
    datatypes = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    tensors = [
        {"name": k, "shape": list(v.shape), "datatype": datatypes[v.dtype], "data": v.ravel().tolist()}
        for k, v in feeds.items()
    ]
    body = orjson.dumps({"inputs": tensors})
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v2/models/net/infer",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 1),
    }

    async def run() -> tuple[dict[str, list[tuple[float, float]]], dict[str, Any]]:
        statuses: set[int] = set()

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.add(message["status"])

        results: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
        async with (
            apps["on"].router.lifespan_context(apps["on"]),
            apps["off"].router.lifespan_context(apps["off"]),
        ):
            for app in apps.values():
                while app.state.core.unready_reason() is not None:
                    await asyncio.sleep(0.01)
                for _ in range(300):  # warm-up
                    await app(dict(scope), receive, send)
            for round_ in range(args.rounds):
                order = ["on", "off"] if round_ % 2 == 0 else ["off", "on"]
                for key in order:
                    app = apps[key]
                    wall, cpu = time.perf_counter(), time.process_time()
                    for _ in range(args.requests):
                        await app(dict(scope), receive, send)
                    results[key].append(
                        (
                            (time.perf_counter() - wall) / args.requests * 1e6,
                            (time.process_time() - cpu) / args.requests * 1e6,
                        )
                    )
            on = apps["on"].state
            on.observability.flush()
            entry = on.core.repository.get("net", None)
            stats = on.observability.drift_stats(entry)
        if statuses != {200}:
            raise RuntimeError(f"requests answered {sorted(statuses)}, not only 200")
        return results, stats

    results, stats = asyncio.run(run())
    print(f"{args.network}: {args.rounds} rounds x {args.requests} one-sample JSON requests per app")
    print("| round | drift on: µs wall / CPU per request | drift off: µs wall / CPU per request |")
    print("|---:|---:|---:|")
    for i, (on, off) in enumerate(zip(results["on"], results["off"], strict=True)):
        print(f"| {i + 1} | {on[0]:.1f} / {on[1]:.1f} | {off[0]:.1f} / {off[1]:.1f} |")
    median = {k: [statistics.median(r[i] for r in v) for i in (0, 1)] for k, v in results.items()}
    print(
        f"median: on {median['on'][0]:.1f} / {median['on'][1]:.1f}, off {median['off'][0]:.1f} / "
        f"{median['off'][1]:.1f}; on/off wall {median['on'][0] / median['off'][0]:.3f}, "
        f"CPU {median['on'][1] / median['off'][1]:.3f}"
    )
    coverage = stats.get("coverage", {})
    layers = [entry["layer"] for entry in stats.get("layers", [])]
    print(f"drift on: {len(layers)} layers watched; coverage {orjson.dumps(coverage).decode()}")


if __name__ == "__main__":
    main()
