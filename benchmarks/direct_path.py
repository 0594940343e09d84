"""CPU and calls per small JSON infer request through bn-serve's HTTP protocol, in-process: no sockets.

    python benchmarks/direct_path.py [--connections 32] [--rounds 300] [--asgi] [--profile]

The app is served by the protocol `bn-serve` gives uvicorn (`service.http_direct`) on `--connections`
in-memory transports; each round every connection delivers one request (the raw HTTP bytes of a 1x4 FP32
JSON body, head and body in one read, as a socket delivers a small request) and the event loop turns until
every answer is written. Printed: process CPU per request (all threads) and the Python and C calls one
request makes on the loop's thread (exact: a profile hook counts them). `--asgi` turns the direct path off
(`direct_infer=False`): every request then goes through uvicorn's ASGI cycle and the app, as before the
direct path. `--profile` adds a cProfile table (cProfile inflates small calls: it ranks, it does not
measure). The transports only collect what is written: what remains of a real server's cost is the
socket system calls, the same for both paths.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import orjson
import uvicorn
import uvloop
from uvicorn.server import ServerState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.app import create_app  # noqa: E402
from service.http_direct import serving_protocol  # noqa: E402
from service.log import configure_logging  # noqa: E402
from tests.service.conftest import (  # noqa: E402
    CollectingTransport,
    frozen_model,
    frozen_params,
    test_settings,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--asgi", action="store_true", help="direct path off: every request through ASGI")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--access-log",
        type=Path,
        help="write the access records (bn-serve's logging) to this file; default off",
    )
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp())
    (root / "m" / "1").mkdir(parents=True)
    onnx.save(frozen_model(frozen_params(1)), root / "m" / "1" / "model.onnx")
    if args.access_log is None:
        logging.disable(logging.CRITICAL)  # access records would measure the terminal
    else:
        sys.stderr = args.access_log.open("w")
        configure_logging("info", 0.05)
    app = create_app(test_settings(root, direct_infer=not args.asgi))
    x = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
    tensor = {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": x.ravel().tolist()}
    body = orjson.dumps({"inputs": [tensor]})
    request = (
        b"POST /v2/models/m/infer HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body

    async def run() -> None:
        config = uvicorn.Config(
            app, http=serving_protocol(32 * 1024, 100, 30.0, 30.0), log_config=None, access_log=False
        )
        config.load()
        state = ServerState()
        async with app.router.lifespan_context(app):
            while app.state.core.unready_reason() is not None:
                await asyncio.sleep(0.01)
            loop = asyncio.get_running_loop()
            connections = []
            for _ in range(args.connections):
                protocol = config.http_protocol_class(
                    config=config, server_state=state, app_state={}, _loop=loop
                )
                transport = CollectingTransport()
                protocol.connection_made(transport)  # type: ignore[arg-type]
                connections.append((protocol, transport))

            async def one_round() -> None:
                before = state.total_requests
                for protocol, _ in connections:
                    protocol.data_received(request)
                while state.total_requests - before < len(connections):
                    await asyncio.sleep(0)
                for _, transport in connections:
                    answer = b"".join(transport.written)
                    if not answer.startswith(b"HTTP/1.1 200"):
                        raise RuntimeError(f"not answered 200: {answer[:200]!r}")
                    transport.written.clear()

            for _ in range(100):  # warm-up
                await one_round()
            started = time.process_time()
            for _ in range(args.rounds):
                await one_round()
            cpu_us = (time.process_time() - started) / (args.rounds * args.connections) * 1e6
            calls = {"call": 0, "c_call": 0}

            def count(frame: Any, event: str, arg: Any) -> None:
                if event in calls:
                    calls[event] += 1

            counted = 20
            sys.setprofile(count)
            for _ in range(counted):
                await one_round()
            sys.setprofile(None)
            per = counted * args.connections
            path = "ASGI" if args.asgi else "direct"
            print(
                f"{path} path, {args.connections} connections: {cpu_us:.1f} us CPU per request; "
                f"{calls['call'] / per:.0f} Python and {calls['c_call'] / per:.0f} C calls per request"
            )
            if args.profile:
                profile = cProfile.Profile()
                profile.enable()
                for _ in range(counted):
                    await one_round()
                profile.disable()
                stats = pstats.Stats(profile)
                stats.sort_stats("tottime").print_stats(30)

    uvloop.run(run())  # as uvicorn runs bn-serve


if __name__ == "__main__":
    main()
