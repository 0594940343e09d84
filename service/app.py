"""The HTTP layer: `create_app(settings)` builds the FastAPI app whose routes only translate.

request -> codec -> one call into `InferenceCore` (in a thread pool, off the event loop) -> codec -> response.
Every error is a `ServiceError` mapped to a status by the one table `STATUS`; framework errors (unknown
route, wrong method, request validation) are rewritten to the same V2 body `{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import orjson
from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from bn_export import __version__
from service import codec
from service.admission import AdmissionGate, admission_control
from service.auth import Authenticator, load_api_keys
from service.batching import INLINE_MAX_ELEMENTS, Batcher, BatchPolicy
from service.errors import (
    ConfigurationError,
    Forbidden,
    InferenceFailed,
    InvalidInput,
    LoadRefused,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServerNotReady,
    ServiceError,
    Unauthorized,
    UnsupportedMediaType,
)
from service.inference import InferenceCore, PreparedRequest
from service.lifecycle import ModelLifecycle
from service.log import RequestContext, configure_logging
from service.observability import Observability
from service.protocol import ServerMetadata
from service.repository import ModelRepository, ModelState
from service.runtime import resolve_providers
from service.settings import Settings

log = logging.getLogger("bn_serve")

SERVER_NAME = "frozen-bn"
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "inference-header-content-length"
JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
INLINE_BODY_BYTES = 64 * 1024  # about 3,000 JSON floats: well under a millisecond to parse

STATUS: dict[type[ServiceError], int] = {
    InvalidInput: 400,
    LoadRefused: 400,
    Unauthorized: 401,
    Forbidden: 403,
    ModelNotFound: 404,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    InferenceFailed: 500,
    ConfigurationError: 500,
    ModelNotReady: 503,
    ModelLoadError: 503,
    ServerNotReady: 503,
    Overloaded: 503,
    RequestTimeout: 504,
}

T = TypeVar("T")


def status_for(exc: ServiceError) -> int:
    """The HTTP status of `exc`: the table entry of its nearest class (500 for one the table lacks)."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def json_response(content: Any, status_code: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(codec.dumps(content), status_code=status_code, media_type=JSON, headers=headers)


def build_core(settings: Settings, observability: Observability | None = None) -> InferenceCore:
    """The core for `settings`: providers resolved (raises `ConfigurationError`), models found, not loaded."""
    if settings.model_repository is not None:
        repository = ModelRepository.scan(settings.model_repository)
    elif settings.model is not None:
        repository = ModelRepository.single(settings.model)
    else:  # Settings already refuses this; kept so the type checker and a hand-built Settings agree
        raise ConfigurationError("no model repository or model file given")
    return InferenceCore(
        repository,
        providers=resolve_providers(settings.device),
        intra_op_threads=settings.resolved_intra_op_threads(),
        allow_non_finite=settings.allow_non_finite,
        warmup=settings.warmup,
        max_request_elements=settings.max_request_elements,
        observability=observability,
    )


def create_app(settings: Settings) -> FastAPI:
    """The V2 REST app. Models load in the background once it starts; `/v2/health/ready` turns 200 after."""
    observability = Observability(
        drift=settings.drift,
        drift_threshold=settings.drift_threshold,
        drift_window=settings.drift_window,
        max_cpu_fraction=settings.drift_max_fraction,
    )
    metrics = observability.metrics
    core = build_core(settings, observability)
    executor = ThreadPoolExecutor(settings.resolved_inference_threads(), thread_name_prefix="bn-serve")
    batcher = Batcher(core, executor, BatchPolicy(settings.max_batch_size, settings.max_batch_delay_us))

    authenticator = Authenticator(load_api_keys(settings.api_key, settings.api_keys_file))
    lifecycle = ModelLifecycle(core)
    # Places for the runs in the pool plus those queued behind them; past that, 503 with Retry-After.
    gate = AdmissionGate(settings.resolved_inference_threads() + settings.max_queued_requests)

    async def in_pool(function: Callable[..., T], *args: Any) -> T:
        # The context travels into the thread, so that records logged there carry the request id.
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(executor, context.run, function, *args)

    async def authenticate(request: Request) -> None:
        authenticator.check(request.url.path, request.headers.get("authorization"))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Loading runs beside the server so that liveness answers while models load and warm up.
        observability.start()
        loading = asyncio.get_running_loop().run_in_executor(None, core.load_all)
        try:
            yield
        finally:
            await loading
            observability.close()
            executor.shutdown(wait=True)

    app = FastAPI(
        title="frozen-bn",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        dependencies=[Depends(authenticate)],
    )
    app.state.lifecycle = lifecycle
    app.add_middleware(RequestContext)
    app.state.core = core
    app.state.observability = observability

    def observed(route: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
        """Count each request by model, version and status, time it, and hold it as in flight meanwhile.

        Labels come from the repository, never from the URL: an unknown model or version counts as
        `UNKNOWN_MODEL`. A request whose client went away before the answer counts as 499.
        """

        @functools.wraps(route)
        async def counted(*args: Any, **kwargs: Any) -> Response:
            started = time.perf_counter()
            status = 500
            with metrics.track_in_flight():
                try:
                    response = await route(*args, **kwargs)
                    status = response.status_code
                    return response
                except ServiceError as exc:
                    status = status_for(exc)
                    raise
                except asyncio.CancelledError:
                    status = 499
                    raise
                finally:
                    model, version = observability.labels(
                        core.repository, kwargs["model_name"], kwargs.get("model_version")
                    )
                    metrics.observe_request(model, version, status, time.perf_counter() - started)

        return counted

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        status = status_for(exc)
        if status >= 500 and not isinstance(exc, (Overloaded, RequestTimeout)):
            log.error("%s %s: %s", request.method, request.url.path, exc)
        headers = {}
        if isinstance(exc, Unauthorized):
            headers["WWW-Authenticate"] = 'Bearer realm="bn-serve"'
        if isinstance(exc, Overloaded):
            headers["Retry-After"] = str(exc.retry_after_s)
        return json_response({"error": str(exc)}, status, headers=headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # Nobody is left to read an answer; 499 (nginx's "client closed request") marks it in the access log.
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> Response:
        # A bug, not a client's mistake: logged with its traceback, answered with a V2 body, no details.
        log.error("%s %s: unexpected error", request.method, request.url.path, exc_info=exc)
        return json_response({"error": "internal server error; the server log has the details"}, 500)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return json_response({"error": message}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        parts = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        return json_response({"error": "; ".join(parts)}, 400)

    @app.get("/v2")
    async def server_metadata() -> Response:
        return json_response(
            ServerMetadata(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS).model_dump()
        )

    @app.get("/v2/health/live")
    async def live() -> Response:
        return json_response({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        reason = core.unready_reason()
        if reason is None:
            return json_response({"ready": True})
        return json_response({"ready": False, "reason": reason}, 503)

    @app.get("/v2/models/{model_name}")
    @app.get("/v2/models/{model_name}/versions/{model_version}")
    async def model_metadata(model_name: str, model_version: str | None = None) -> Response:
        return json_response(core.metadata(model_name, model_version).model_dump())

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        # Queued drift inputs are applied first, so a scrape sees every request answered before it.
        body, content_type = await asyncio.to_thread(_flushed_render, observability)
        return Response(body, media_type=content_type)

    @app.get("/v2/models/{model_name}/stats")
    @app.get("/v2/models/{model_name}/versions/{model_version}/stats")
    async def model_stats(model_name: str, model_version: str | None = None) -> Response:
        entry = core.model(model_name, model_version)
        await asyncio.to_thread(observability.flush)
        return json_response(observability.drift_stats(entry))

    @app.get("/v2/models/{model_name}/ready")
    @app.get("/v2/models/{model_name}/versions/{model_version}/ready")
    async def model_ready(model_name: str, model_version: str | None = None) -> Response:
        entry = core.model(model_name, model_version)
        body: dict[str, Any] = {"name": entry.name, "version": str(entry.version)}
        if entry.state is ModelState.READY:
            return json_response({**body, "ready": True})
        reason = entry.reason or "it is still loading"
        return json_response({**body, "ready": False, "reason": reason}, 503)

    @app.post("/v2/models/{model_name}/infer")
    @app.post("/v2/models/{model_name}/versions/{model_version}/infer")
    @observed
    @admission_control(gate, settings.request_timeout_s)
    async def infer(request: Request, model_name: str, model_version: str | None = None) -> Response:
        header_length = _framing(request)
        body = await read_body(request, settings.max_request_bytes)

        def prepare() -> tuple[PreparedRequest, codec.ResponseFormat]:
            decoded, fmt = codec.decode_request(body, header_length)
            return core.prepare(model_name, model_version, decoded), fmt

        # Small bodies are decoded and encoded on the event loop: a trip to the pool costs them more.
        prepared, fmt = prepare() if len(body) <= INLINE_BODY_BYTES else await in_pool(prepare)
        result = await batcher.infer(prepared)
        if sum(array.size for _, array in result.outputs) <= INLINE_MAX_ELEMENTS:
            encoded = codec.encode_response(result, fmt)
        else:
            encoded = await in_pool(codec.encode_response, result, fmt)
        if encoded.header_length is None:
            return Response(encoded.body, media_type=JSON)
        headers = {"Inference-Header-Content-Length": str(encoded.header_length)}
        return Response(encoded.body, media_type=OCTET_STREAM, headers=headers)

    @app.post("/v2/repository/index")
    async def repository_index(request: Request) -> Response:
        document = await _repository_body(request)
        ready = document.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInput(f"'ready' must be true or false, got {ready!r}")
        return json_response(lifecycle.index(ready_only=ready))

    @app.post("/v2/repository/models/{model_name}/load")
    async def repository_load(request: Request, model_name: str) -> Response:
        if (await _repository_body(request)).get("parameters"):
            raise InvalidInput("load parameters (config overrides, model files) are not supported")
        await _in_thread(lifecycle.load, model_name)
        return json_response({})

    @app.post("/v2/repository/models/{model_name}/unload")
    async def repository_unload(request: Request, model_name: str) -> Response:
        await _repository_body(request)
        await _in_thread(lifecycle.unload, model_name)
        return json_response({})

    return app


async def _in_thread(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` on the default pool (not the inference pool: a reload must not take its threads)."""
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(None, context.run, function, *args)


REPOSITORY_BODY_LIMIT = 64 * 1024


async def _repository_body(request: Request) -> dict[str, Any]:
    """The optional JSON object body of a repository request ({} when empty)."""
    raw = await read_body(request, REPOSITORY_BODY_LIMIT)
    if not raw.strip():
        return {}
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidInput(f"request body must be a JSON object, got {type(document).__name__}")
    return document


def _flushed_render(observability: Observability) -> tuple[bytes, str]:
    observability.flush()
    return observability.metrics.render()


def app_from_environment() -> FastAPI:
    """The app for settings read from `BN_SERVE_*` variables: uvicorn's factory when it spawns workers."""
    settings = Settings()
    configure_logging(settings.log_level)  # a spawned worker starts with logging unconfigured
    return create_app(settings)


def _framing(request: Request) -> int | None:
    """The JSON header's length for a binary-extension body, None for a JSON body; checks the media type.

    Clients may omit Content-Type (Triton's does): the header-length header alone then marks a binary body.
    """
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported; send the body uncompressed"
        )
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw_length = request.headers.get(HEADER_LENGTH)
    if raw_length is None:
        if media_type in ("", JSON):
            return None
        if media_type == OCTET_STREAM:
            raise InvalidInput(f"a {OCTET_STREAM} body needs the Inference-Header-Content-Length header")
        raise UnsupportedMediaType(
            f"Content-Type {media_type!r} is not supported; send {JSON} or {OCTET_STREAM}"
        )
    if media_type not in ("", OCTET_STREAM):
        raise UnsupportedMediaType(
            f"Content-Type {media_type!r} with Inference-Header-Content-Length: "
            f"a binary body is {OCTET_STREAM}"
        )
    if not raw_length.strip().isdigit():
        raise InvalidInput(
            f"Inference-Header-Content-Length must be a non-negative integer, got {raw_length!r}"
        )
    return int(raw_length)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with `PayloadTooLarge` beyond `limit` bytes: by Content-Length before reading
    anything, and while streaming for bodies without one (chunked) or that lie about it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise InvalidInput(f"Content-Length must be a non-negative integer, got {declared!r}")
        if int(declared) > limit:
            raise PayloadTooLarge(
                f"the body has {int(declared)} bytes, the limit is {limit} (max_request_bytes)"
            )
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes (max_request_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)
