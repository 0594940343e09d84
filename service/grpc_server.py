"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService` and `grpc.health.v1.Health`.

A `grpc.aio` server on the event loop that serves REST, started and stopped by the app's lifespan. Its calls
only translate, as the REST routes do: message -> `service.grpc_codec` -> the same `InferenceCore`,
`Batcher` (requests of both transports merge into one run), admission gate and deadline, metrics (labelled
`protocol="grpc"`) and drift -> message. Errors are `ServiceError`s mapped to status codes by the one table
in `service.grpc_errors`, with REST's messages.

The handlers are registered here by name with bytes in and out, rather than through protoc's servicer
class: a message that does not parse is then the client's INVALID_ARGUMENT (grpc's own deserializer would
answer INTERNAL), and the code stays typed. Authentication takes the same bearer keys as REST, in the
`authorization` metadata; ServerLive, ServerReady and the health service are open, as REST's health routes.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import grpc_codec
from service.admission import Admission, Deadline
from service.auth import Authenticator
from service.batching import Batcher
from service.errors import ConfigurationError, InvalidInput, ServiceError
from service.grpc_errors import INTERNAL_ERROR, error_status
from service.http_errors import status_for
from service.inference import InferenceCore, PreparedRequest
from service.lifecycle import ModelLifecycle
from service.observability import Observability
from service.proto import grpc_service_pb2 as pb
from service.protocol import ServerMetadata
from service.repository import ModelState

log = logging.getLogger("bn_serve")

SERVICE = "inference.GRPCInferenceService"
# Messages up to this size are decoded and encoded on the event loop: a trip to the pool costs them more.
INLINE_MESSAGE_BYTES = 64 * 1024
# `grpc.health.v1` service names: "" and the inference service follow readiness; "live" answers SERVING
# while the process runs, for a liveness probe.
LIVE_SERVICE = "live"
READY_SERVICES = ("", SERVICE)
HEALTH_POLL_S = 1.0

T = TypeVar("T")
M = TypeVar("M", bound=Message)
Context = grpc.aio.ServicerContext[Any, Any]


class GrpcInference:
    """The calls of `inference.GRPCInferenceService` for `core`'s models; used from the event loop."""

    def __init__(
        self,
        core: InferenceCore,
        lifecycle: ModelLifecycle,
        batcher: Batcher,
        executor: Executor,
        observability: Observability,
        admission: Admission,
        authenticator: Authenticator,
        server_metadata: ServerMetadata,
    ) -> None:
        self._core = core
        self._lifecycle = lifecycle
        self._batcher = batcher
        self._executor = executor
        self._observability = observability
        self._metrics = observability.metrics
        self._admission = admission
        self._authenticator = authenticator
        self._server_metadata = server_metadata

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's calls by name, bytes in and out (see the module docstring)."""
        unary = {
            "ServerLive": self._unary("ServerLive", pb.ServerLiveRequest.FromString, self.server_live, True),
            "ServerReady": self._unary(
                "ServerReady", pb.ServerReadyRequest.FromString, self.server_ready, True
            ),
            "ModelReady": self._unary("ModelReady", pb.ModelReadyRequest.FromString, self.model_ready),
            "ServerMetadata": self._unary(
                "ServerMetadata", pb.ServerMetadataRequest.FromString, self.server_metadata
            ),
            "ModelMetadata": self._unary(
                "ModelMetadata", pb.ModelMetadataRequest.FromString, self.model_metadata
            ),
            "ModelInfer": self._model_infer_handler(),
            "RepositoryIndex": self._unary(
                "RepositoryIndex", pb.RepositoryIndexRequest.FromString, self.repository_index
            ),
            "RepositoryModelLoad": self._unary(
                "RepositoryModelLoad", pb.RepositoryModelLoadRequest.FromString, self.repository_load
            ),
            "RepositoryModelUnload": self._unary(
                "RepositoryModelUnload", pb.RepositoryModelUnloadRequest.FromString, self.repository_unload
            ),
        }
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            name: grpc.unary_unary_rpc_method_handler(behavior) for name, behavior in unary.items()
        }
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(self._model_stream_infer)
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    # -- the calls -------------------------------------------------------------------------------------------

    async def server_live(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._core.ready)

    async def model_ready(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        entry = self._core.model(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=entry.state is ModelState.READY)

    async def server_metadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        metadata = self._server_metadata
        return pb.ServerMetadataResponse(
            name=metadata.name, version=metadata.version, extensions=metadata.extensions
        )

    async def model_metadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        metadata = self._core.metadata(request.name, request.version or None)

        def tensors(specs: list[Any]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
            return [
                pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape)
                for s in specs
            ]

        return pb.ModelMetadataResponse(
            name=metadata.name,
            versions=metadata.versions,
            platform=metadata.platform,
            inputs=tensors(metadata.inputs),
            outputs=tensors(metadata.outputs),
        )

    async def model_infer(
        self, request: pb.ModelInferRequest, size: int | None = None
    ) -> pb.ModelInferResponse:
        """One inference, inside a place of the admission gate and its deadline, counted as REST's are (by
        model, version and the HTTP status REST would answer) with `protocol="grpc"`. `size` is the
        request's serialized size when the caller knows it (else it is computed).

        Counted in the series of the version that served it (`LoadedModel.metrics`, looked up at its load),
        else (not found, not ready, refused before it was prepared) by labels from the repository: the
        client's strings never become label values. One coroutine from the parsed message to the answer: each
        nested one would cost a frame per call.
        """
        started = time.perf_counter()
        status = 500
        prepared: PreparedRequest | None = None
        in_flight = self._metrics.in_flight
        in_flight.inc()
        try:
            with self._admission.admit():
                inline = (request.ByteSize() if size is None else size) <= INLINE_MESSAGE_BYTES
                if inline:
                    decoded, raw = grpc_codec.decode_request(request)
                    ready = self._core.prepare(request.model_name, request.model_version or None, decoded)
                else:
                    ready, raw = await self._in_pool(self._executor, self._prepare, request)
                prepared = ready  # its version's series count the call
                if time.perf_counter() - started >= self._admission.timeout_s:
                    # Past its deadline before its run: skipped (a run at once awaits nothing the timer
                    # could cancel).
                    raise Deadline(self._admission.timeout_s).error()
                result = await self._batcher.infer(ready)
                if inline or raw:
                    response = grpc_codec.encode_response(result, raw)
                else:
                    response = await self._in_pool(self._executor, grpc_codec.encode_response, result, raw)
            status = 200
            return response
        except ServiceError as exc:
            status = status_for(exc)
            raise
        except asyncio.CancelledError:  # the client went away or its deadline passed
            status = 499
            raise
        finally:
            in_flight.dec()
            seconds = time.perf_counter() - started
            served = None if prepared is None else prepared.model.metrics
            if served is not None:
                served.observe_request(status, seconds, "grpc")
            else:
                model, version = self._observability.labels(
                    self._core.repository, request.model_name, request.model_version or None
                )
                self._metrics.observe_request(model, version, status, seconds, protocol="grpc")

    def _prepare(self, request: pb.ModelInferRequest) -> tuple[PreparedRequest, bool]:
        decoded, raw = grpc_codec.decode_request(request)
        return self._core.prepare(request.model_name, request.model_version or None, decoded), raw

    async def repository_index(self, request: pb.RepositoryIndexRequest) -> pb.RepositoryIndexResponse:
        entries = self._lifecycle.index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=e["name"], version=e.get("version", ""), state=e["state"], reason=e["reason"]
                )
                for e in entries
            ]
        )

    async def repository_load(self, request: pb.RepositoryModelLoadRequest) -> pb.RepositoryModelLoadResponse:
        if request.parameters:
            raise InvalidInput("load parameters (config overrides, model files) are not supported")
        # The default pool, not the inference pool: a reload must not take the runs' threads.
        await self._in_pool(None, self._lifecycle.load, request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def repository_unload(
        self, request: pb.RepositoryModelUnloadRequest
    ) -> pb.RepositoryModelUnloadResponse:
        await self._in_pool(None, self._lifecycle.unload, request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def _model_stream_infer(
        self, requests: AsyncIterator[bytes], context: Context
    ) -> AsyncIterator[bytes]:
        """Each request answered in order on the stream; a failed one is answered by its error message and
        the stream goes on, as Triton's does."""
        method = f"/{SERVICE}/ModelStreamInfer"
        try:
            self._authenticate(context)
        except ServiceError as exc:
            await _abort(context, exc, method)
        async for raw in requests:
            try:
                response = await self.model_infer(_parse(pb.ModelInferRequest.FromString, raw), len(raw))
                answer = pb.ModelStreamInferResponse(infer_response=response)
            except ServiceError as exc:
                answer = pb.ModelStreamInferResponse(error_message=str(exc))
            yield answer.SerializeToString()

    # -- plumbing -------------------------------------------------------------------------------------------

    def _unary(
        self,
        name: str,
        parse: Callable[[bytes], M],
        call: Callable[[M], Awaitable[Message]],
        open_: bool = False,
    ) -> Callable[[bytes, Context], Awaitable[bytes]]:
        """`call` as a handler taking and giving serialized messages, its errors answered by status code;
        `open_` serves it without a token."""
        method = f"/{SERVICE}/{name}"

        async def handle(raw: bytes, context: Context) -> bytes:
            try:
                if not open_:
                    self._authenticate(context)
                response = await call(_parse(parse, raw))
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                await _fail(context, exc, method)
            serialized: bytes = response.SerializeToString()
            return serialized

        return handle

    def _model_infer_handler(self) -> Callable[[bytes, Context], Awaitable[bytes]]:
        """ModelInfer as `_unary` serves a call, handing `model_infer` the size the message came in (which
        decides where it is decoded) rather than having it measured again."""
        method = f"/{SERVICE}/ModelInfer"
        parse = pb.ModelInferRequest.FromString
        guarded = self._authenticator.enabled  # the keys are read once, when the app is built

        async def handle(raw: bytes, context: Context) -> bytes:
            try:
                if guarded:
                    self._authenticate(context)
                response = await self.model_infer(_parse(parse, raw), len(raw))
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                await _fail(context, exc, method)
            serialized: bytes = response.SerializeToString()
            return serialized

        return handle

    def _authenticate(self, context: Context) -> None:
        """Raise `Unauthorized`/`Forbidden` as REST does for a protected route (counted the same way)."""
        if not self._authenticator.enabled:
            return
        authorization = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                authorization = value if isinstance(value, str) else value.decode("latin-1")
        try:
            self._authenticator.check(f"/{SERVICE}", authorization)
        except ServiceError as exc:
            self._metrics.observe_auth_rejected(status_for(exc))
            raise

    @staticmethod
    async def _in_pool(executor: Executor | None, function: Callable[..., T], *args: Any) -> T:
        # The context travels into the thread, so that records logged there carry the request's context.
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(executor, context.run, function, *args)


def _parse(parse: Callable[[bytes], M], raw: bytes) -> M:
    try:
        return parse(raw)
    except DecodeError as exc:
        raise InvalidInput(f"the request is not a valid protobuf message for this call: {exc}") from None


async def _fail(context: Context, exc: Exception, method: str) -> NoReturn:
    """End the call for `exc`: a `ServiceError` with its status; anything else is a bug, not a client's
    mistake: logged with its traceback, answered INTERNAL without details."""
    if isinstance(exc, ServiceError):
        await _abort(context, exc, method)
    log.error("%s: unexpected error", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_ERROR)


async def _abort(context: Context, exc: ServiceError, method: str) -> NoReturn:
    code, message, trailers = error_status(exc, method)
    if trailers:
        context.set_trailing_metadata(trailers)
    await context.abort(code, message)


class GrpcHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # grpc_health ships no types
    """`grpc.health.v1.Health`: "" and the inference service are SERVING once the server is ready (as REST's
    /v2/health/ready), "live" while the process runs (as /v2/health/live); other names are unknown."""

    def __init__(self, core: InferenceCore) -> None:
        self._core = core

    def status(self, service: str) -> int:
        statuses = health_pb2.HealthCheckResponse
        status: int = statuses.SERVICE_UNKNOWN
        if service == LIVE_SERVICE:
            status = statuses.SERVING
        elif service in READY_SERVICES:
            status = statuses.SERVING if self._core.ready else statuses.NOT_SERVING
        return status

    async def Check(  # noqa: N802 (the protocol's method name)
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        status = self.status(request.service)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(  # noqa: N802 (the protocol's method name)
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The status now, then each change (readiness is polled every `HEALTH_POLL_S`)."""
        last = None
        while True:
            status = self.status(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(HEALTH_POLL_S)


class GrpcServer:
    """The gRPC server of one app: `start()` binds and serves, `stop(grace)` drains; on the running loop."""

    def __init__(
        self,
        inference: GrpcInference,
        health: GrpcHealth,
        *,
        host: str,
        port: int,
        max_receive_bytes: int,
        share_port: bool = False,
    ) -> None:
        self._inference = inference
        self._health = health
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._options = [
            # The REST limit: gRPC answers a larger message RESOURCE_EXHAUSTED before it is read whole.
            ("grpc.max_receive_message_length", max_receive_bytes),
            ("grpc.max_send_message_length", -1),
            # Worker processes share the port (the kernel spreads connections between them); a lone server
            # must fail to start when another holds the port, not silently share it.
            ("grpc.so_reuseport", 1 if share_port else 0),
        ]
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None

    async def start(self) -> None:
        """Bind and start serving; raises `ConfigurationError` when the address cannot be bound."""
        server = grpc.aio.server(options=self._options)
        server.add_generic_rpc_handlers((self._inference.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        try:
            self.port = server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise ConfigurationError(
                f"cannot listen for gRPC on {self.address}: {exc} (--grpc-port 0 turns gRPC off)"
            ) from None
        await server.start()
        self._server = server
        log.info("gRPC inference service listening on %s", self.address)

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls and let those in flight finish, for at most `grace_s` seconds."""
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
