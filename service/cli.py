"""`bn-serve`: parse argv into `Settings` (flags over `BN_SERVE_*` variables), build the app, run uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any, cast

import uvicorn
from pydantic import ValidationError

from bn_export import __version__
from service.app import create_app
from service.codec import describe
from service.errors import ServiceError
from service.http_direct import serving_protocol
from service.log import configure_logging
from service.memory import use_one_heap_arena
from service.runtime import resolve_providers
from service.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bn-serve",
        description="Serve frozen-statistics ONNX models with the KServe V2 / Open Inference Protocol. "
        "Every option can also be set as an environment variable BN_SERVE_<OPTION>, e.g. BN_SERVE_PORT; "
        "options given here win.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model-repository", metavar="DIR", help="models laid out as DIR/<name>/<version>/model.onnx"
    )
    source.add_argument("--model", metavar="PATH", help="one .onnx file, served under the name of its stem")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (default 8000)")
    grpc = parser.add_mutually_exclusive_group()
    grpc.add_argument(
        "--grpc-port", type=int, help="port of the gRPC inference service (default 8001; 0 turns it off)"
    )
    grpc.add_argument(
        "--no-grpc", dest="grpc_port", action="store_const", const=0, help="serve REST only (--grpc-port 0)"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="execution device (default auto)")
    parser.add_argument("--workers", type=int, help="server processes (default 1)")
    parser.add_argument(
        "--intra-op-threads", type=int, help="onnxruntime threads per run (default cores // workers)"
    )
    parser.add_argument(
        "--inference-threads", type=int, help="runs in flight per process (default cores // workers)"
    )
    parser.add_argument(
        "--max-request-bytes", type=int, help="largest request body accepted (default 64 MiB)"
    )
    parser.add_argument(
        "--allow-non-finite",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="accept NaN and infinities in inputs (default: refused with 400)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        help="samples of concurrent requests merged into one run (default 64; 1 turns batching off)",
    )
    parser.add_argument(
        "--max-batch-delay-us",
        type=int,
        help="longest wait for a batch to fill once requests queue (default 0: never wait)",
    )
    parser.add_argument(
        "--max-batch-elements",
        type=int,
        help="input tensor elements merged into one run (default 16 Mi, the per-request limit)",
    )
    parser.add_argument(
        "--verify-budget-s",
        type=float,
        help="seconds the empirical frozen-statistics checks may take per model at load (default 20)",
    )
    parser.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument(
        "--log-flush-interval-s",
        type=float,
        help="write access records out together at most this long after they are made (default 0.05; "
        "0 writes each at once)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGINT/SIGTERM (in-flight requests finish first); 2 for a configuration error."""
    args = build_parser().parse_args(argv)
    given: dict[str, Any] = {key: value for key, value in vars(args).items() if value is not None}
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        print(f"bn-serve: error: invalid settings: {describe(exc)}", file=sys.stderr)
        return 2
    use_one_heap_arena()  # before any thread starts (service.memory)
    configure_logging(settings.log_level, settings.log_flush_interval_s)
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": settings.graceful_shutdown_s,
        # Our JSON handler (configure_logging) formats uvicorn's records too; the app writes its own
        # access records, with the request id, so uvicorn's are off.
        "log_config": None,
        "access_log": False,
        # httptools, as uvicorn[standard] would pick, with the head's size, count and deadline bounded, and
        # small JSON infer requests answered without an ASGI task (service.http_direct).
        "http": cast(
            "type[asyncio.Protocol]",
            serving_protocol(
                settings.max_header_bytes,
                settings.max_header_count,
                head_timeout_s=settings.request_timeout_s,
                send_timeout_s=settings.send_timeout_s,
            ),
        ),
    }
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler found at start; a
    # no-op handler there makes the end of a graceful shutdown exit 0, as orchestrators expect.
    signal.signal(signal.SIGTERM, _shut_down)
    try:
        if settings.workers == 1:
            uvicorn.run(create_app(settings), **common)
        else:
            # Worker processes build their own app from the environment, so the settings travel there.
            resolve_providers(settings.device)  # refuse an unusable --device cuda before spawning workers
            os.environ.update(_environment(settings))
            uvicorn.run("service.app:app_from_environment", factory=True, workers=settings.workers, **common)
    except ServiceError as exc:
        print(f"bn-serve: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _shut_down(signum: int, frame: FrameType | None) -> None:
    """SIGTERM after uvicorn's graceful shutdown: nothing left to do."""


def _environment(settings: Settings) -> dict[str, str]:
    """`settings` as the `BN_SERVE_*` variables that rebuild them."""
    prefix = settings.model_config.get("env_prefix", "")
    return {
        f"{prefix}{name.upper()}": str(value)
        for name, value in settings.model_dump().items()
        if value is not None
    }


if __name__ == "__main__":
    sys.exit(main())
