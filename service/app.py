"""The HTTP layer: `create_app(settings)` builds the app whose routes only translate.

request -> codec -> one call into `InferenceCore` -> codec -> response. Every request enters through
`service.front.Front`, the middleware around the app (request id, authentication, access record), which
answers infer requests itself (the one infer route) and hands the rest to the FastAPI routes below. Every
error is a `ServiceError` mapped to a status by the one table in `service.http_errors`; framework errors
(unknown route, wrong method, request validation) are rewritten to the same V2 body `{"error": "..."}`.
Work leaves the event loop through one helper, `service.offload.offload`, which carries the request's
context (its id in the logs) into the thread.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from bn_export import __version__
from service import codec
from service.admission import Admission, AdmissionGate
from service.auth import Authenticator, load_api_keys
from service.batching import INLINE_MAX_ELEMENTS, Batcher, BatchPolicy
from service.direct_infer import DirectInfer
from service.errors import ConfigurationError, InvalidInput, ServiceError
from service.front import Front, ServingApp
from service.http_errors import error_answer
from service.http_request import read_body, request_headers
from service.infer_route import INLINE_BODY_BYTES, InferRoute
from service.inference import InferenceCore
from service.lifecycle import ModelLifecycle
from service.log import configure_logging
from service.native import name_this_thread
from service.observability import Observability
from service.offload import offload
from service.protocol import ServerMetadata
from service.repository import ModelRepository, ModelState
from service.responses import ResponseBudget
from service.runtime import resolve_providers
from service.settings import Settings

log = logging.getLogger("bn_serve")

SERVER_NAME = "frozen-bn"
EXTENSIONS = ["binary_tensor_data"]
JSON = "application/json"
__all__ = ["INLINE_BODY_BYTES", "app_from_environment", "create_app"]


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
        default_policy=BatchPolicy(settings.max_batch_size, settings.max_batch_delay_us),
        verify_budget_s=settings.verify_budget_s,
        follow_symlinks=settings.follow_symlinks,
    )


def create_app(settings: Settings) -> FastAPI:
    """The V2 REST app. Models load in the background once it starts; `/v2/health/ready` turns 200 after."""
    observability = Observability(
        drift=settings.drift,
        drift_threshold=settings.drift_threshold,
        drift_window=settings.drift_window,
        rows_interval_s=settings.drift_update_interval_s,
        max_cpu_fraction=settings.drift_max_fraction,
        worker_nice=settings.drift_worker_nice,
    )
    core = build_core(settings, observability)
    executor = ThreadPoolExecutor(
        settings.resolved_inference_threads(),
        thread_name_prefix="bn-serve-pool",
        initializer=name_this_thread,
    )
    batcher = Batcher(core, executor, max_batch_elements=settings.max_batch_elements)

    authenticator = Authenticator(load_api_keys(settings.api_key, settings.api_keys_file))
    lifecycle = ModelLifecycle(core)
    # Places for the runs in the pool plus those queued behind them; past that, 503 with Retry-After.
    gate = AdmissionGate(settings.resolved_inference_threads() + settings.max_queued_requests)

    uploads = AdmissionGate(settings.max_uploading_requests, what="requests still sending their body")
    admission = Admission(gate, settings.request_timeout_s, uploads)
    route = InferRoute(
        core,
        batcher,
        executor,
        observability,
        admission,
        settings.max_request_bytes,
        settings.trim_after_json_bytes,
    )
    grpc_server = None
    if settings.grpc_port:
        # Imported only when served: grpcio costs ~7.5 MiB of resident memory that REST alone never uses.
        from service.grpc_server import GrpcHealth, GrpcInference, GrpcServer

        metadata = ServerMetadata(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)
        grpc_inference = GrpcInference(
            core, lifecycle, batcher, executor, observability, admission, authenticator, metadata
        )
        grpc_server = GrpcServer(
            grpc_inference,
            GrpcHealth(core),
            host=settings.host,
            port=settings.grpc_port,
            max_receive_bytes=settings.max_request_bytes,
            share_port=settings.workers > 1,
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Loading runs beside the server so that liveness answers while models load and warm up.
        observability.start()
        loading = asyncio.ensure_future(offload(None, core.load_all))
        loading.add_done_callback(_freeze_heap)
        try:
            if grpc_server is not None:
                await grpc_server.start()
            yield
        finally:
            if grpc_server is not None:  # after HTTP has drained: its calls in flight get the same grace
                await grpc_server.stop(settings.graceful_shutdown_s)
            await loading
            observability.close()
            executor.shutdown(wait=True)
            # Access records kept for their next write (log_flush_interval_s) go out now, whatever way the
            # process ends after this.
            for handler in logging.getLogger().handlers:
                handler.flush()

    responses = ResponseBudget(settings.max_pending_response_bytes, observability.metrics.registry)
    observability.metrics.on_flush(responses.export)
    app = ServingApp(title="frozen-bn", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.front = Front(
        app.framework,
        route=route,
        authenticator=authenticator,
        metrics=observability.metrics,
        request_timeout_s=settings.request_timeout_s,
        max_other_body_bytes=REPOSITORY_BODY_LIMIT,
        responses=responses,
    )
    if settings.direct_infer:
        app.direct_infer = DirectInfer(
            core,
            batcher,
            admission,
            authenticator,
            app.front.ids,
            observability.metrics,
            app.front.responses,
            max_request_bytes=settings.max_request_bytes,
            max_batch_elements=settings.max_batch_elements,
            inline_max_elements=INLINE_MAX_ELEMENTS,
        )
    app.openapi = lambda: _openapi_with_infer(app)  # type: ignore[method-assign]
    app.state.lifecycle = lifecycle
    app.state.core = core
    app.state.batcher = batcher
    app.state.observability = observability
    app.state.grpc_server = grpc_server

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        status, headers, body = error_answer(exc, request.method, request.url.path)
        return Response(body, status_code=status, media_type=JSON, headers=headers)

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
        body, content_type = await offload(None, observability.render)
        return Response(body, media_type=content_type)

    @app.get("/v2/models/{model_name}/stats")
    @app.get("/v2/models/{model_name}/versions/{model_version}/stats")
    async def model_stats(model_name: str, model_version: str | None = None) -> Response:
        entry = core.model(model_name, model_version)
        await offload(None, observability.flush)
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
        # On the default pool, not the inference pool: a reload must not take its threads.
        await offload(None, lifecycle.load, model_name)
        return json_response({})

    @app.post("/v2/repository/models/{model_name}/unload")
    async def repository_unload(request: Request, model_name: str) -> Response:
        await _repository_body(request)
        await offload(None, lifecycle.unload, model_name)
        return json_response({})

    return app


def _openapi_with_infer(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the infer operations, which the front serves (their bodies are read raw)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)

        def parameter(name: str) -> dict[str, Any]:
            title = name.replace("_", " ").title()
            return {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {"type": "string", "title": title},
            }

        for path, names in (
            ("/v2/models/{model_name}/infer", ["model_name"]),
            ("/v2/models/{model_name}/versions/{model_version}/infer", ["model_name", "model_version"]),
        ):
            schema["paths"][path] = {
                "post": {
                    "summary": "Infer",
                    "operationId": "infer_" + "_".join(names),
                    "parameters": [parameter(name) for name in names],
                    "responses": {"200": {"description": "The V2 inference response"}},
                }
            }
        app.openapi_schema = schema
    return app.openapi_schema


REPOSITORY_BODY_LIMIT = 64 * 1024


async def _repository_body(request: Request) -> dict[str, Any]:
    """The optional JSON object body of a repository request ({} when empty)."""
    raw = bytes(await read_body(request.receive, request_headers(request.scope), REPOSITORY_BODY_LIMIT))
    return codec.json_object(raw) if raw.strip() else {}


def _freeze_heap(_: object) -> None:
    """Put every object alive once the models are loaded (modules, routes, schemas, sessions: some 70,000)
    out of the garbage collector's reach.

    Each full collection otherwise walks all of them while requests wait, which shows in the tail latency
    and the CPU per request (measured in benchmarks/README.md, "Serving performance"). Garbage is collected
    first so none is kept for good; objects made later (requests, reloaded models) are collected as usual.
    """
    gc.collect()
    gc.freeze()


def app_from_environment() -> FastAPI:
    """The app for settings read from `BN_SERVE_*` variables: uvicorn's factory when it spawns workers."""
    settings = Settings()
    configure_logging(
        settings.log_level, settings.log_flush_interval_s
    )  # a spawned worker starts with logging unconfigured
    return create_app(settings)
