"""`POST /v2/models/{name}[/versions/{v}]/infer`, transport-free below the ASGI messages it reads.

framing -> body (size limit) -> codec -> `InferenceCore.prepare` -> `Batcher` -> codec, inside a place of
the admission gate and the request's deadline, counted in the request metrics by model, version and status.
`service.front` serves it straight from ASGI messages: this is the one infer route.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import Executor

from starlette.requests import ClientDisconnect
from starlette.types import Receive

from service import codec
from service.admission import Admission, Deadline
from service.batching import INLINE_MAX_ELEMENTS, Batcher
from service.errors import ServiceError
from service.http_errors import status_for
from service.http_request import JSON, OCTET_STREAM, Headers, framing, read_body
from service.inference import InferenceCore, PreparedRequest
from service.memory import TRIM_AFTER_JSON_BYTES, release_free_memory
from service.observability import Observability
from service.offload import offload

INLINE_BODY_BYTES = 64 * 1024  # about 3,000 JSON floats: well under a millisecond to parse


def response_headers(encoded: codec.EncodedResponse) -> list[tuple[bytes, bytes]]:
    """Content-Type, and the JSON header's length when binary outputs follow it, as ASGI header pairs."""
    if encoded.header_length is None:
        return [(b"content-type", JSON.encode())]
    return [
        (b"content-type", OCTET_STREAM.encode()),
        (b"inference-header-content-length", str(encoded.header_length).encode()),
    ]


class _HandedBody:
    """A large body on its way to its decoding in the pool, held by nothing else: a JSON body of tens of
    megabytes is then freed once decoded, before the run and the encoding allocate as much again (binary
    inputs are views of it and keep it as long as they need it)."""

    __slots__ = ("_body", "nbytes")

    def __init__(self, body: bytes | memoryview) -> None:
        self._body: bytes | memoryview | None = body
        self.nbytes = len(body)

    def take(self) -> bytes | memoryview:
        body, self._body = self._body, None
        if body is None:
            raise RuntimeError("the body was taken already")
        return body


class InferRoute:
    """Answers infer requests for `core`'s models; one per app, used from the event loop's thread."""

    def __init__(
        self,
        core: InferenceCore,
        batcher: Batcher,
        executor: Executor,
        observability: Observability,
        admission: Admission,
        max_request_bytes: int,
        trim_after_json_bytes: int = TRIM_AFTER_JSON_BYTES,
    ) -> None:
        self._core = core
        self._batcher = batcher
        self._executor = executor
        self._observability = observability
        self._metrics = observability.metrics
        self._admission = admission
        self._max_request_bytes = max_request_bytes
        self._trim_after_json_bytes = trim_after_json_bytes

    async def answer(
        self, model_name: str, model_version: str | None, headers: Headers, receive: Receive
    ) -> codec.EncodedResponse:
        """The encoded response to the request whose headers and `receive` are given; raises `ServiceError`
        (mapped by `service.http_errors`) or Starlette's `ClientDisconnect`.

        Counted by model, version and status; the labels are those of the version that served it, else come
        from the repository, never from the URL (an unknown model or version counts as `UNKNOWN_MODEL`). A
        request whose client went away, or whose task was cancelled, counts as 499 (nginx's "client closed
        request"). One coroutine from the body to the answer: each nested one would cost a frame per request.
        """
        started = time.perf_counter()
        arrived_at = asyncio.get_running_loop().time()
        status = 500
        prepared: PreparedRequest | None = None
        in_flight = self._metrics.in_flight
        in_flight.inc()
        try:
            header_length = framing(headers)
            # The body arrives holding an upload place, not an inference place (see service.admission).
            with self._admission.receiving(arrived_at) as place:
                body = await read_body(receive, headers, self._max_request_bytes, align_at=header_length)
                place.admit()
                # Small bodies are decoded and encoded on the event loop: a trip to the pool costs them more.
                if len(body) <= INLINE_BODY_BYTES:
                    decoded, fmt = codec.decode_request(body, header_length)
                    ready, answered = self._core.prepare(model_name, model_version, decoded), None
                else:
                    handed = _HandedBody(body)
                    del body  # only the decoding holds it from here (see _HandedBody)
                    ready, fmt, answered = await self._prepare_large(
                        handed, header_length, model_name, model_version, started
                    )
                prepared = ready  # its version's series count the request
                if answered is not None:  # run and encoded in the pool already
                    if isinstance(answered, ServiceError):
                        raise answered
                    encoded = answered
                else:
                    if time.perf_counter() - started >= self._admission.timeout_s:
                        # Past its deadline before its run: skipped. A run at once awaits nothing, so the
                        # deadline's timer would not get a chance to cancel the request first.
                        raise Deadline(self._admission.timeout_s).error()
                    result = await self._batcher.infer(ready)
                    # Binary outputs cost their encoding a view and a length: only JSON ones are worth a
                    # trip to the pool.
                    if (
                        sum(array.size for name, array in result.outputs if not fmt.is_binary(name))
                        <= INLINE_MAX_ELEMENTS
                    ):
                        encoded = codec.encode_response(result, fmt)
                    else:
                        encoded = await offload(self._executor, codec.encode_response, result, fmt)
            status = 200
            return encoded
        except ServiceError as exc:
            status = status_for(exc)
            raise
        except (ClientDisconnect, asyncio.CancelledError):
            status = 499
            raise
        finally:
            in_flight.dec()
            seconds = time.perf_counter() - started
            served = None if prepared is None else prepared.model.metrics
            if served is not None:
                served.observe_request(status, seconds)
            else:
                model, version = self._observability.labels(self._core.repository, model_name, model_version)
                self._metrics.observe_request(model, version, status, seconds)

    async def _prepare_large(
        self,
        body: _HandedBody,
        header_length: int | None,
        model_name: str,
        model_version: str | None,
        started: float,
    ) -> tuple[PreparedRequest, codec.ResponseFormat, codec.EncodedResponse | ServiceError | None]:
        """A large body decoded and prepared in the pool and, when the batcher would run it alone (it
        claimed a lone run for the model, or nothing could join the request), also run and encoded there,
        in the same trip: two thread hand-overs fewer. The third item is then its answer, or the error of
        its run; else None, and the batcher runs it."""
        try:
            model = self._core.model(model_name, model_version).model
        except ServiceError:
            model = None  # refused by `prepare`, in the pool, as any other
        deadline_at = started + self._admission.timeout_s
        claim = self._batcher.running_alone(model) if model is not None else contextlib.nullcontext(False)
        with claim as claimed:
            ready, fmt, answered = await offload(
                self._executor,
                self._serve,
                body,
                header_length,
                model_name,
                model_version,
                claimed,
                deadline_at,
            )
        if answered is not None and not claimed:
            self._batcher.runs += 1
        return ready, fmt, answered

    def _prepare(
        self, body: bytes | memoryview, header_length: int | None, model_name: str, model_version: str | None
    ) -> tuple[PreparedRequest, codec.ResponseFormat]:
        decoded, fmt = codec.decode_request(body, header_length)
        return self._core.prepare(model_name, model_version, decoded), fmt

    def _serve(
        self,
        body: _HandedBody,
        header_length: int | None,
        model_name: str,
        model_version: str | None,
        claimed: bool,
        deadline_at: float,
    ) -> tuple[PreparedRequest, codec.ResponseFormat, codec.EncodedResponse | ServiceError | None]:
        """`_prepare`, then, when `claimed` or nothing could join the request, its run alone and its
        encoding; a fault of the run comes back as a value, so that the request is counted in its version's
        series."""
        ready, fmt = self._prepare(body.take(), header_length, model_name, model_version)
        trim_at = self._trim_after_json_bytes
        if header_length is None and 0 < trim_at <= body.nbytes:
            # The body and its parsed floats are freed: their pages go back now, not up to a second later.
            release_free_memory()
        if not (claimed or self._batcher.runs_alone(ready)):
            return ready, fmt, None
        if time.perf_counter() >= deadline_at:
            return ready, fmt, Deadline(self._admission.timeout_s).error()
        try:
            outputs = self._core.run(ready.model, ready.output_names, ready.feeds)
        except ServiceError as exc:
            return ready, fmt, exc
        return ready, fmt, codec.encode_response(ready.response(outputs), fmt)
