"""Small JSON infer requests answered from the HTTP protocol's own callbacks: no ASGI task, merged per turn.

Why. Under uvicorn every request costs a `RequestResponseCycle`, a task, the ASGI `receive`/`send`
coroutines and the middleware chain: on one core that is more than bn-serve's own work for a 1x64 sample
(benchmarks/README.md, "The direct path"). The common request, a small JSON body for a model whose runs
merge exactly, needs none of it: its body is complete in the protocol's `on_message_complete`, its answer
one `transport.write`.

How. `service.http_limits.BoundedHttpToolsProtocol` asks `DirectInfer.takes` when a request's head is
complete (a POST to the infer route with a Content-Length of at most `INLINE_BODY_BYTES`, no binary
framing, no content coding, no `Expect`), and hands it to `submit` once its body is in. `submit` does what
the ASGI route does before a run (request id, authentication, decoding, `InferenceCore.prepare`, a place
in the admission gate) and queues the request for the end of this turn of the event loop: requests that
arrive in the same turn (at high concurrency, one read of many connections) share one onnxruntime run,
as the `Batcher` merges them, and every one is answered in the next turn, alone or merged. The commonest
request, a plain one (`codec.plain_rows`: one float input of the model's own name, datatype and sample
shape, flat data), is only parsed and checked at `submit`: its numbers are converted with those of every
plain request of its turn for the same model, as one array (`codec.merged_rows`, exactly what decoding
each alone gives), of which each request's feed is a slice; what that conversion does not take is
decoded and prepared alone, as any other request, and a request holding a non-finite value the server
refuses goes the ASGI way for its error answer. Each request still gets its access record, its request
metrics, its run metrics and drift sums (one per run), its deadline (checked before its run) and a place
in the response budget.

What it does not take goes the ASGI way unchanged, its body already read: any other route or framing, a
request that any check before the run refuses (so every error answer, log record and metric of a refused
request is the ASGI path's own), a model whose policy waits for batches to fill (`max_batch_delay_us`), a
run past `INLINE_MAX_ELEMENTS` (the pool's), and a request whose run fails (the ASGI path runs it alone and
answers its error). `direct_infer=false` (`BN_SERVE_DIRECT_INFER`) sends everything the ASGI way.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from service import codec
from service.admission import Admission, Deadline
from service.auth import Authenticator
from service.batching import Batcher, BatchPolicy, input_elements, merge_key, split_outputs
from service.datatypes import all_finite
from service.errors import Overloaded, ServiceError
from service.front import INFER_PATH
from service.http_errors import error_answer
from service.infer_route import INLINE_BODY_BYTES, response_headers
from service.inference import InferenceCore, PreparedRequest
from service.log import RequestIds, batch_request_ids, request_id, write_access_records
from service.metrics import ServiceMetrics
from service.model import LoadedModel
from service.responses import ResponseBudget

log = logging.getLogger("bn_serve")

# Headers that send a request the ASGI way: a framing or coding the direct path does not read.
_ASGI_HEADERS = frozenset(
    (b"expect", b"transfer-encoding", b"content-encoding", b"inference-header-content-length")
)
_JSON_TYPES = frozenset((b"", b"application/json"))
_JSON = codec.ResponseFormat()  # every output in JSON: what a plain request asks for


@dataclass(slots=True)
class DirectHead:
    """What `takes` read from a request's head, for `submit`."""

    model_name: str
    model_version: str | None
    length: int
    request_id: str | None
    authorization: str | None


class DirectConnection(Protocol):
    """The connection a direct request came on (`BoundedHttpToolsProtocol`); `exchange` is its request's
    own token (uvicorn's cycle), handed back as it was given."""

    def direct_answer(
        self,
        exchange: Any,
        status: int,
        headers: Sequence[tuple[bytes, bytes]],
        parts: Sequence[bytes | memoryview],
    ) -> bool:
        """Write a whole response; False when the client is gone (nothing written)."""

    def direct_fall_back(self, exchange: Any) -> None:
        """Send the request, body read, the ASGI way."""


@dataclass(slots=True)
class _Waiting:
    """A request queued for this turn's runs: `prepared`, or for a plain one (`codec.plain_rows`) its model
    and rows, prepared with the others of its turn (`_prepare_plain`)."""

    connection: DirectConnection
    exchange: Any
    prepared: PreparedRequest | None
    fmt: codec.ResponseFormat
    rid: str
    path: str
    started: float
    samples: int
    elements: int
    model: LoadedModel
    plain: codec.PlainRows | None = None
    body: bytes = b""
    # A plain request once converted: its rows are `rows[start:end]` of the turn's one array, `merged`.
    merged: NDArray[Any] | None = None
    start: int = 0
    end: int = 0


@dataclass(frozen=True, slots=True)
class _PlainKey:
    """The group of a turn's plain requests for one loaded model (held, so its id is not reused)."""

    model: LoadedModel
    form: codec.PlainForm

    def __hash__(self) -> int:
        return id(self.model)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _PlainKey) and other.model is self.model


def _prepared(item: _Waiting) -> PreparedRequest:
    """`item`'s prepared request: every request has one by the time it runs."""
    if item.prepared is None:
        raise RuntimeError("a direct request ran before it was prepared")
    return item.prepared


def _merged_feeds(live: list[_Waiting]) -> dict[str, NDArray[Any]]:
    """The inputs of `live`'s requests, merged in order: one slice of their turn's array when they are
    consecutive rows of it (plain requests, the usual case), else joined."""
    merged = live[0].merged
    if merged is not None and all(
        item.merged is merged and item.start == before.end for before, item in itertools.pairwise(live)
    ):
        (name,) = _prepared(live[0]).feeds
        return {name: merged[live[0].start : live[-1].end]}
    first = _prepared(live[0])
    return {name: np.concatenate([_prepared(w).feeds[name] for w in live]) for name in first.feeds}


class DirectInfer:
    """The direct path of the module docstring; one per app, used from the event loop's thread."""

    def __init__(
        self,
        core: InferenceCore,
        batcher: Batcher,
        admission: Admission,
        authenticator: Authenticator,
        ids: RequestIds,
        metrics: ServiceMetrics,
        responses: ResponseBudget | None,
        max_request_bytes: int,
        max_batch_elements: int | None,
        inline_max_elements: int,
    ) -> None:
        self._core = core
        self._batcher = batcher
        self._admission = admission
        self._authenticator = authenticator
        self._ids = ids
        self._metrics = metrics
        self._responses = responses
        self.max_request_bytes = max_request_bytes
        self._max_body = min(INLINE_BODY_BYTES, max_request_bytes)
        self._max_batch_elements = max_batch_elements
        self._inline_max_elements = inline_max_elements
        self._waiting: dict[Hashable, list[_Waiting]] = {}
        self._plain_keys: dict[int, tuple[LoadedModel, _PlainKey | None]] = {}
        self._access_records: list[tuple[str, int, float, str]] = []
        self._scheduled = False
        self.requests = 0  # answered here: the rest went the ASGI way

    def takes(
        self, method: str, path: str, root_path: str, headers: Iterable[tuple[bytes, bytes]]
    ) -> DirectHead | None:
        """The head's fields when the request may go the direct way (see the module docstring), else None.
        `headers` are as uvicorn gives them: names in lower case, in the order received."""
        if method != "POST" or root_path:
            return None
        match = INFER_PATH.fullmatch(path)
        if match is None:
            return None
        length = None
        rid = authorization = None
        media = b""
        for name, value in headers:
            if name == b"content-length":
                if length is not None or not value.isdigit():
                    return None
                length = int(value)
            elif name == b"content-type":
                media = value.split(b";", 1)[0].strip().lower()
            elif name == b"x-request-id":
                if rid is None:
                    rid = value.decode("latin-1")
            elif name == b"authorization":
                if authorization is None:
                    authorization = value.decode("latin-1")
            elif name in _ASGI_HEADERS:
                return None
        if length is None or length > self._max_body or media not in _JSON_TYPES:
            return None
        return DirectHead(match[1], match[2], length, rid, authorization)

    def submit(
        self, head: DirectHead, path: str, body: bytes, connection: DirectConnection, exchange: Any
    ) -> bool:
        """Queue the request for this turn's runs; False (nothing done, nothing counted) when it must go the
        ASGI way. Its answer, or its hand-over to the ASGI way, goes through `connection`."""
        started = time.perf_counter()
        try:
            self._authenticator.check(path, head.authorization)
        except ServiceError:
            return False
        plain = self._plain(head, body)
        if plain is not None:
            plain_key, rows = plain
            if not self._enter():
                return False
            rid = self._ids.incoming(head.request_id)
            elements = len(rows.data)
            waiting = _Waiting(
                connection, exchange, None, _JSON, rid, path, started, rows.samples, elements,
                plain_key.model, rows, body,
            )  # fmt: skip
            self._queue(plain_key, waiting)
            return True
        try:
            decoded, fmt = codec.decode_request(body)
            prepared = self._core.prepare(head.model_name, head.model_version, decoded)
        except ServiceError:
            return False
        model = prepared.model
        policy = self._batcher.policy_of(model)
        elements = input_elements(prepared)
        if policy.max_batch_delay_us or elements > self._inline_max_elements:
            return False
        key = merge_key(prepared) if policy.enabled else None
        if not self._enter():
            return False
        samples = int(next(iter(prepared.feeds.values())).shape[0]) if key is not None else 0
        rid = self._ids.incoming(head.request_id)
        waiting = _Waiting(connection, exchange, prepared, fmt, rid, path, started, samples, elements, model)
        self._queue(key if key is not None else waiting, waiting)
        return True

    def _enter(self) -> bool:
        """A place in the admission gate, counted in flight; False when there is none."""
        try:
            self._admission.gate.enter()
        except Overloaded:
            return False
        self._metrics.in_flight.inc()
        return True

    def _queue(self, key: Hashable, waiting: _Waiting) -> None:
        group = self._waiting.get(key)
        if group is None:
            self._waiting[key] = [waiting]
        else:
            group.append(waiting)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _plain(self, head: DirectHead, body: bytes) -> tuple[_PlainKey, codec.PlainRows] | None:
        """The request's model and rows when it is a plain request (`codec.plain_rows`) for a served model
        whose runs merge without waiting, within the inline limits; else None (nothing counted)."""
        try:
            model = self._core.repository.get(head.model_name, head.model_version).model
        except ServiceError:
            return None
        if model is None:
            return None
        known = self._plain_keys.get(id(model))
        key = known[1] if known is not None and known[0] is model else self._plain_key(model)
        if key is None:
            return None
        policy = self._batcher.policy_of(model)
        if not policy.enabled or policy.max_batch_delay_us:
            return None
        limit = self._inline_max_elements
        if self._core.max_request_elements is not None:
            limit = min(limit, self._core.max_request_elements)
        rows = codec.plain_rows(body, key.form, limit)
        return None if rows is None else (key, rows)

    def _plain_key(self, model: LoadedModel) -> _PlainKey | None:
        """`model`'s group key for plain requests, None when its requests cannot be plain; kept per model."""
        session = model.session
        form = None
        if len(session.inputs) == 1 and session.batchable:
            spec = session.inputs[0]
            form = codec.plain_form(spec.name, spec.datatype, spec.sample_shape)
        key = None if form is None else _PlainKey(model, form)
        if len(self._plain_keys) > 64:  # models come and go: keep the lookup small
            self._plain_keys.clear()
        self._plain_keys[id(model)] = (model, key)
        return key

    def _flush(self) -> None:
        """Run and answer everything queued in the last turn: merged per key, within the policy's limits."""
        self._scheduled = False
        waiting, self._waiting = self._waiting, {}
        try:
            for key, group in waiting.items():
                if type(key) is _PlainKey:
                    group = self._prepare_plain(key, group)
                    if not group:
                        continue
                model = _prepared(group[0]).model
                policy = self._batcher.policy_of(model)
                for chunk in self._chunks(group, policy):
                    self._run(chunk)
        finally:
            # The turn's access records go out together: one timestamp, one hold of the log's lock.
            records, self._access_records = self._access_records, []
            write_access_records("POST", records)

    def _prepare_plain(self, key: _PlainKey, group: list[_Waiting]) -> list[_Waiting]:
        """`group`'s plain requests prepared at once: their rows converted as one array, each request a
        slice of it. Requests the one conversion does not take are decoded and prepared each alone, as
        `submit` does for any other; one refused there, or holding a non-finite value the server refuses,
        goes the ASGI way for its error answer."""
        model, form = key.model, key.form
        merged = codec.merged_rows([item.plain for item in group if item.plain is not None], form)
        if merged is None:
            return [item for item in group if self._prepare_alone(item)]
        # Non-finite values are rare: one check of the whole array, each request's rows only when it fails.
        check = not self._core.allow_non_finite and merged.dtype.kind == "f" and not all_finite(merged)
        output_names = model.session.output_names
        prepared_group = []
        end = 0
        for item in group:
            start, end = end, end + item.samples
            feed = merged[start:end]
            if check and not np.isfinite(feed).all():
                self._fall_back(item)
                continue
            request_id = item.plain.id if item.plain is not None else None
            item.prepared = PreparedRequest(model, request_id, {form.input_name: feed}, output_names)
            item.plain = None
            item.merged, item.start, item.end = merged, start, end
            prepared_group.append(item)
        return prepared_group

    def _prepare_alone(self, item: _Waiting) -> bool:
        """Decode and prepare `item` alone (see `_prepare_plain`); False once it went the ASGI way."""
        model = item.model
        try:
            decoded, _ = codec.decode_request(item.body)
            prepared = self._core.prepare(model.name, str(model.version), decoded)
        except ServiceError:
            self._fall_back(item)
            return False
        if prepared.model is not model:  # reloaded since: not to be merged with this turn's others
            self._fall_back(item)
            return False
        item.prepared = prepared
        item.plain = None
        return True

    def _chunks(self, group: list[_Waiting], policy: BatchPolicy) -> list[list[_Waiting]]:
        """`group` cut, in arrival order, into runs of at most `max_batch_size` samples and at most
        `inline_max_elements` (and `max_batch_elements`) input elements."""
        if len(group) == 1:
            return [group]
        limit = self._inline_max_elements
        if self._max_batch_elements is not None:
            limit = min(limit, self._max_batch_elements)
        chunks: list[list[_Waiting]] = []
        chunk: list[_Waiting] = []
        samples = elements = 0
        for item in group:
            if chunk and (samples + item.samples > policy.max_batch_size or elements + item.elements > limit):
                chunks.append(chunk)
                chunk, samples, elements = [], 0, 0
            chunk.append(item)
            samples += item.samples
            elements += item.elements
        chunks.append(chunk)
        return chunks

    def _run(self, chunk: list[_Waiting]) -> None:
        timeout_s = self._admission.timeout_s
        now = time.perf_counter()
        live = []
        for item in chunk:
            if now - item.started >= timeout_s:
                # Past its deadline before its run: answered as the ASGI path answers it, not computed.
                self._finish_error(item, Deadline(timeout_s).error())
            else:
                live.append(item)
        if not live:
            return
        first = _prepared(live[0])
        core = self._core
        if len(live) == 1:
            token = request_id.set(live[0].rid)
            try:
                outputs = core.run(first.model, first.output_names, first.feeds)
            except Exception:
                self._fall_back(live[0])
                return
            finally:
                request_id.reset(token)
            self._batcher.runs += 1
            self._finish(live[0], outputs)
            return
        feeds = _merged_feeds(live)
        token = request_id.set(live[0].rid)
        ids_token = batch_request_ids.set(tuple(w.rid for w in live))
        try:
            merged = core.run(first.model, first.output_names, feeds, len(live))
            parts = split_outputs(merged, [w.samples for w in live])
        except Exception as exc:  # each request is then run alone, the ASGI way, for its own answer
            log.warning("a merged run of %d requests failed (%s); running each alone", len(live), exc)
            for item in live:
                self._fall_back(item)
            return
        finally:
            batch_request_ids.reset(ids_token)
            request_id.reset(token)
        self._batcher.runs += 1
        for item, part in zip(live, parts, strict=True):
            self._finish(item, part)

    def _finish(self, item: _Waiting, outputs: list[NDArray[Any]]) -> None:
        try:
            encoded = codec.encode_response(_prepared(item).response(outputs), item.fmt)
        except ServiceError as exc:
            self._finish_error(item, exc)
            return
        budget = self._responses
        if budget is not None:
            # Written to the transport at once: nothing waits here, only a refusal can apply.
            try:
                budget.check(encoded.length)
            except Overloaded as exc:
                self._finish_error(item, exc)
                return
        headers = [*response_headers(encoded), (b"x-request-id", item.rid.encode())]
        answered = item.connection.direct_answer(item.exchange, 200, headers, encoded.parts)
        self.requests += 1
        self._record(item, 200 if answered else 499)

    def _finish_error(self, item: _Waiting, exc: ServiceError) -> None:
        status, extra, body = error_answer(exc, "POST", item.path)
        headers = [(b"content-type", b"application/json")]
        headers.extend((k.lower().encode(), v.encode("latin-1")) for k, v in extra.items())
        headers.append((b"x-request-id", item.rid.encode()))
        answered = item.connection.direct_answer(item.exchange, status, headers, (body,))
        self._record(item, status if answered else 499)

    def _fall_back(self, item: _Waiting) -> None:
        """Hand the request to the ASGI path: its place and its in-flight count are given back first."""
        self._admission.gate.leave()
        self._metrics.in_flight.dec()
        item.connection.direct_fall_back(item.exchange)

    def _record(self, item: _Waiting, status: int) -> None:
        self._admission.gate.leave()
        self._metrics.in_flight.dec()
        seconds = time.perf_counter() - item.started
        served = item.model.metrics
        if served is not None:
            served.observe_request(status, seconds)
        self._access_records.append((item.path, status, seconds, item.rid))
