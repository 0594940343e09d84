"""CPU per small JSON infer request through the whole ASGI app, in-process: no network, no load generator.

    python benchmarks/hot_path.py [--tree PATH] [--requests 3000] [--rounds 5]

The app of `--tree` (a checkout of this repository; default this one) serves a 1x4 float32 request to a
frozen model again and again; printed: the process CPU time per request in each round (all threads: the
drift worker's included), and the Python and C function calls one request makes on the event loop's
thread (counted with a profile hook: exact, whatever else the machine runs). Comparing two checkouts on
one machine isolates the cost of the request path's code from the network and the load generator, which
dominate `serve.py` on a busy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import orjson


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree))
    from service.app import create_app
    from tests.service.conftest import frozen_model, frozen_params, test_settings

    root = Path(tempfile.mkdtemp())
    (root / "m" / "1").mkdir(parents=True)
    onnx.save(frozen_model(frozen_params(1)), root / "m" / "1" / "model.onnx")
    logging.disable(logging.CRITICAL)  # the access records would measure the terminal
    app = create_app(test_settings(root))
    x = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
    tensor = {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": x.ravel().tolist()}
    body = orjson.dumps({"inputs": [tensor]})
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v2/models/m/infer",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 1),
    }

    async def run() -> tuple[list[float], float, float]:
        async with app.router.lifespan_context(app):
            while app.state.core.unready_reason() is not None:
                await asyncio.sleep(0.01)
            statuses: set[int] = set()

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    statuses.add(message["status"])

            for _ in range(500):  # warm-up
                await app(dict(scope), receive, send)
            rounds = []
            for _ in range(args.rounds):
                started = time.process_time()
                for _ in range(args.requests):
                    await app(dict(scope), receive, send)
                rounds.append((time.process_time() - started) / args.requests * 1e6)
            calls = {"call": 0, "c_call": 0}

            def count(frame: Any, event: str, arg: Any) -> None:
                if event in calls:
                    calls[event] += 1

            counted = 200
            sys.setprofile(count)
            for _ in range(counted):
                await app(dict(scope), receive, send)
            sys.setprofile(None)
            if statuses != {200}:
                raise RuntimeError(f"requests answered {sorted(statuses)}, not only 200")
            return rounds, calls["call"] / counted, calls["c_call"] / counted

    rounds, python_calls, c_calls = asyncio.run(run())
    figures = " ".join(f"{r:.1f}" for r in rounds)
    print(f"{args.tree}: µs of CPU per request: {figures}; min {min(rounds):.1f}")
    print(f"{args.tree}: calls per request: {python_calls:.0f} Python, {c_calls:.0f} C")


if __name__ == "__main__":
    main()
