"""The gRPC load generator: a fixed number of `ModelInfer` calls in flight over one grpc.aio channel.

    python -m benchmarks.serving.grpc_load --target 127.0.0.1:8001 --request FILE --in-flight 32 --duration 10

`FILE` holds one serialized `ModelInferRequest`, sent as is (no serialization on the load side); each of the
`--in-flight` workers sends the next call as soon as its last one is answered (a closed loop, as wrk's
connections are). Prints one JSON line: calls completed, errors, seconds, latency percentiles in ms.
`perf_analyzer` would be Triton's tool for this; it is not installable from PyPI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np

METHOD = "/inference.GRPCInferenceService/ModelInfer"
# Large enough for W3's 4.8 MB requests; grpc's default receive limit is 4 MiB.
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


@dataclass(frozen=True)
class GrpcLoadResult:
    calls: int
    errors: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.duration_s if self.duration_s > 0 else 0.0


async def drive(target: str, request: bytes, in_flight: int, duration_s: float) -> GrpcLoadResult:
    """`in_flight` closed-loop callers of `ModelInfer` on `target` for `duration_s` seconds."""
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        await call(request, timeout=60)  # connect and warm up outside the measured window
        started = time.perf_counter()
        end = started + duration_s

        async def caller() -> None:
            nonlocal errors
            while time.perf_counter() < end:
                sent = time.perf_counter()
                try:
                    await call(request, timeout=60)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(caller() for _ in range(in_flight)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies or [0.0]) * 1e3
    p50, p90, p99 = (float(np.percentile(ms, q)) for q in (50, 90, 99))
    return GrpcLoadResult(len(latencies), errors, elapsed, p50, p90, p99)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", required=True, help="host:port of the gRPC server")
    parser.add_argument("--request", type=Path, required=True, help="a serialized ModelInferRequest")
    parser.add_argument("--in-flight", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    result = asyncio.run(drive(args.target, args.request.read_bytes(), args.in_flight, args.duration))
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
