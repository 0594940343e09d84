"""A gRPC server that answers every `ModelInfer` with the same pre-serialized response, and `ServerReady`.

    python benchmarks/serving/grpc_canned.py --port 8001 --response FILE

It does no decoding and no inference: what the load generator measures against it is the ceiling of the
load generator and of grpc.aio itself on this machine, the gRPC counterpart of `wire_server.py`.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import grpc

SERVICE = "inference.GRPCInferenceService"
READY = b"\x08\x01"  # ServerReadyResponse(ready=True): field 1, varint, 1


async def serve(port: int, response: bytes) -> None:
    async def infer(request: bytes, context: Any) -> bytes:
        return response

    async def ready(request: bytes, context: Any) -> bytes:
        return READY

    handlers = {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
        "ServerReady": grpc.unary_unary_rpc_method_handler(ready),
    }
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", -1), ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--response", type=Path, required=True, help="a serialized ModelInferResponse")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.response.read_bytes()))


if __name__ == "__main__":
    main()
