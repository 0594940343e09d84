"""CPU per small gRPC ModelInfer call through bn-serve's handler, in-process: no network, no load generator.

    python benchmarks/grpc_hot_path.py [--tree PATH] [--calls 3000] [--rounds 5] [--in-flight 1]
        [--profile]

The app of `--tree` (a checkout of this repository; default this one) is built with gRPC on, and its
`ModelInfer` handler (serialized request in, serialized response out, as grpc.aio calls it) answers W1's
call again and again: one 1x64 FP32 sample with raw contents to the 64-feature frozen BatchNorm model of
`benchmarks/serving/models.py`, `--in-flight` calls at a time (gathered on the loop, so that the batcher
can merge them as it does under W1-c32). Printed: the process CPU time per call in each round (all threads:
the drift worker's included), and the Python and C function calls one call makes (counted with a profile
hook: exact, whatever else the machine runs). `--profile` adds cProfile's functions by own time. Comparing
two checkouts on one machine isolates the handler's cost from gRPC's transport and the load generator,
which dominate `serve.py --grpc` on a busy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import pstats
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any


class _Context:
    """What the handler asks of grpc.aio's servicer context on a call that succeeds (and an abort)."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def set_trailing_metadata(self, trailers: Any) -> None:
        pass

    async def abort(self, code: Any, message: str) -> None:
        raise RuntimeError(f"the call was aborted: {code} {message}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--in-flight", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree))
    import numpy as np

    from benchmarks.serving.grpc_bench import infer_request
    from benchmarks.serving.models import benchmark_models, write_repository
    from service.app import create_app
    from service.proto import grpc_service_pb2 as pb
    from tests.service.conftest import test_settings

    model = benchmark_models()[0]
    root = Path(tempfile.mkdtemp())
    write_repository(root, (model,))
    logging.disable(logging.CRITICAL)  # the access records would measure the terminal
    app = create_app(test_settings(root, grpc_port=_free_port(), host="127.0.0.1"))
    x = np.random.default_rng(0).standard_normal((1, *model.sample_shape)).astype(np.float32)
    request = infer_request(model, x)
    method = "/inference.GRPCInferenceService/ModelInfer"
    context = _Context()

    async def run() -> tuple[list[float], float, float, cProfile.Profile | None]:
        async with app.router.lifespan_context(app):
            while app.state.core.unready_reason() is not None:
                await asyncio.sleep(0.01)
            generic = app.state.grpc_server._inference.handler()
            handle = generic.service(SimpleNamespace(method=method)).unary_unary
            expected = pb.ModelInferResponse.FromString(await handle(request, context))
            y = np.frombuffer(expected.raw_output_contents[0], dtype="<f4").reshape(x.shape)
            np.testing.assert_allclose(y, model.reference(x), rtol=1e-5, atol=1e-5)

            async def calls(n: int) -> None:
                if args.in_flight == 1:
                    for _ in range(n):
                        await handle(request, context)
                    return
                for _ in range(n // args.in_flight):
                    await asyncio.gather(*(handle(request, context) for _ in range(args.in_flight)))

            per_round = args.calls // args.in_flight * args.in_flight
            await calls(500)  # warm-up
            rounds = []
            for _ in range(args.rounds):
                started = time.process_time()
                await calls(per_round)
                rounds.append((time.process_time() - started) / per_round * 1e6)
            counts = {"call": 0, "c_call": 0}

            def count(frame: Any, event: str, arg: Any) -> None:
                if event in counts:
                    counts[event] += 1

            counted = 32 * max(1, 256 // args.in_flight) if args.in_flight > 1 else 256
            sys.setprofile(count)
            await calls(counted)
            sys.setprofile(None)
            profile = None
            if args.profile:
                profile = cProfile.Profile()
                profile.enable()
                await calls(per_round)
                profile.disable()
            return rounds, counts["call"] / counted, counts["c_call"] / counted, profile

    rounds, python_calls, c_calls, profile = asyncio.run(run())
    figures = " ".join(f"{r:.1f}" for r in rounds)
    print(f"{args.tree}: in flight {args.in_flight}: µs of CPU per call: {figures}; min {min(rounds):.1f}")
    print(f"{args.tree}: calls per call: {python_calls:.0f} Python, {c_calls:.0f} C")
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
