"""The transport-free core: load, verify and warm up every model, then validate and run requests.

The HTTP layer calls one method per request; nothing here knows about HTTP, JSON or threads of the server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.batching import BatchPolicy
from service.datatypes import all_finite, convert_lossless
from service.errors import InferenceFailed, InvalidInput, ModelNotReady, PayloadTooLarge
from service.model import LoadedModel, LoadOptions, timed_load
from service.observability import Observability
from service.protocol import MetadataTensor, ModelMetadata
from service.repository import ModelRepository, ModelState, ModelVersion
from service.runtime import Session, TensorSpec, is_invalid_argument

PLATFORM = "onnxruntime_onnx"


# The request-path records below are made per request and never changed after: plain slotted dataclasses,
# as a frozen one's __init__ (one `object.__setattr__` per field) costs four times as much.
@dataclass(slots=True)
class InferRequest:
    """A decoded request: each input in the datatype and shape the client stated, in the order sent.

    `outputs` names the outputs asked for, in order; None asks for every output of the model.
    """

    id: str | None
    inputs: list[tuple[str, NDArray[Any]]]
    outputs: list[str] | None = None


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str | None
    outputs: list[tuple[str, NDArray[Any]]]


@dataclass(slots=True)
class PreparedRequest:
    """A request validated against one loaded version of its model, ready to run alone or merged.

    `model` is the one validated against: a reload that swaps the model does not change what this runs on.
    """

    model: LoadedModel
    id: str | None
    feeds: dict[str, NDArray[Any]]
    output_names: list[str]

    @property
    def session(self) -> Session:
        return self.model.session

    def response(self, outputs: list[NDArray[Any]]) -> InferResponse:
        """The response carrying `outputs`, one per name in `output_names`."""
        return InferResponse(
            model_name=self.model.name,
            model_version=self.model.labels[1],
            id=self.id,
            outputs=list(zip(self.output_names, outputs, strict=True)),
        )


class InferenceCore:
    """Serves the models of `repository` on `providers`.

    Loading (`load_all`) builds each version's `LoadedModel` (verified, warmed up, its `config.json` read);
    a version that fails is marked UNAVAILABLE with the reason and the others carry on. Every version of a
    model is swapped in at once (`commit`), and only then do its metrics change. The server is ready once
    every model has finished loading and at least one of them serves.
    """

    def __init__(
        self,
        repository: ModelRepository,
        *,
        providers: Sequence[str],
        intra_op_threads: int,
        allow_non_finite: bool = False,
        warmup: bool = True,
        observability: Observability | None = None,
        max_request_elements: int | None = None,
        default_policy: BatchPolicy | None = None,
        verify_budget_s: float | None = None,
        follow_symlinks: bool = False,
    ) -> None:
        self.repository = repository
        self.follow_symlinks = follow_symlinks
        self.max_request_elements = max_request_elements
        self.providers = list(providers)
        self.intra_op_threads = intra_op_threads
        self.allow_non_finite = allow_non_finite
        self.observability = observability
        self.options = LoadOptions(
            providers=self.providers,
            intra_op_threads=intra_op_threads,
            warmup=warmup,
            default_policy=default_policy or BatchPolicy(),
            verify_budget_s=verify_budget_s,
            follow_symlinks=follow_symlinks,
            observability=observability,
        )
        self._loaded = threading.Event()

    @property
    def loaded(self) -> bool:
        """Whether the initial load of every model has finished, whatever its outcome."""
        return self._loaded.is_set()

    @property
    def ready(self) -> bool:
        """Whether the server can serve: see `unready_reason`."""
        return self.unready_reason() is None

    def unready_reason(self) -> str | None:
        """Why the server is not ready, or None once every model has finished loading and one serves.

        A refused model does not make the server unready while another one serves (it must not take the
        others down); a server none of whose models serves is unready, so that a load balancer's readiness
        probe sends no traffic to a replica that could only answer 503.
        """
        if not self.loaded:
            return "models are still loading"
        entries = list(self.repository)
        if any(entry.state is ModelState.READY for entry in entries):
            return None
        if not entries:
            return "the model repository holds no model"
        refused = "; ".join(f"{e.name} version {e.version}: {e.reason}" for e in entries)
        return f"no model is ready ({refused})"

    def load_all(self) -> None:
        """Load every version of every model, one model at a time; never raises for one model's failure."""
        for name in self.repository.names():
            self.commit(name, [self.build(entry) for entry in self.repository.held(name)])
        self._loaded.set()

    def build(self, entry: ModelVersion) -> ModelVersion:
        """`entry` loaded: READY with its `LoadedModel`, or UNAVAILABLE with the reason. Changes nothing else:
        the caller swaps it in with `commit`."""
        model, reason, seconds = timed_load(
            entry.name, entry.version, entry.path, entry.model_directory, self.options
        )
        state = ModelState.READY if model is not None else ModelState.UNAVAILABLE
        return replace(entry, state=state, reason=reason, model=model, load_seconds=seconds)

    def commit(self, name: str, versions: list[ModelVersion], *, unloaded: bool = False) -> None:
        """Serve `versions` as every version of model `name` from now on, in one swap; then update its
        metrics (for an unload, `unloaded`: remove them). Callers serialize commits of one model."""
        old = self.repository.held(name)
        self.repository.replace(name, versions)
        if self.observability is not None:
            self.observability.swapped(old, versions, export=not unloaded)

    def metadata(self, name: str, version: str | None = None) -> ModelMetadata:
        """The V2 model metadata; `parameters` carries state, reason, providers and the verification."""
        entry = self.repository.get(name, version)
        session = entry.session
        parameters: dict[str, Any] = {
            "version": str(entry.version),
            "state": entry.state.value,
            "reason": entry.reason,
            "providers": session.providers if session else self.providers,
            "intra_op_threads": self.intra_op_threads,
            "frozen_statistics_verified": entry.verification is not None,
        }
        if entry.model is not None:
            policy = entry.model.policy
            parameters["batching"] = {
                "max_batch_size": policy.max_batch_size,
                "max_batch_delay_us": policy.max_batch_delay_us,
                "note": entry.model.batching_note,
            }
        if entry.verification is not None:
            parameters["verification"] = entry.verification

        def tensors(specs: list[TensorSpec]) -> list[MetadataTensor]:
            return [MetadataTensor(name=s.name, datatype=s.datatype, shape=s.metadata_shape()) for s in specs]

        return ModelMetadata(
            name=entry.name,
            versions=[str(v) for v in self.repository.versions(name)],
            platform=PLATFORM,
            inputs=tensors(session.inputs) if session else [],
            outputs=tensors(session.outputs) if session else [],
            parameters=parameters,
        )

    def model(self, name: str, version: str | None = None) -> ModelVersion:
        """The model version addressed (raises `ModelNotFound`), whatever its state."""
        return self.repository.get(name, version)

    def infer(self, name: str, version: str | None, request: InferRequest) -> InferResponse:
        """Validate `request` against the model's inputs, convert losslessly, run it; blocking.

        Raises `InvalidInput` for anything the client can fix, `ModelNotReady` (with the load's reason),
        `ModelNotFound`, and `InferenceFailed` only for a runtime fault on a valid request.
        """
        prepared = self.prepare(name, version, request)
        return prepared.response(self.run(prepared.model, prepared.output_names, prepared.feeds))

    def prepare(self, name: str, version: str | None, request: InferRequest) -> PreparedRequest:
        """Everything of `infer` short of running: the model resolved, the inputs validated and converted.

        Raises as `infer` does, so a request that fails here never reaches a run (nor a merged batch).
        """
        entry = self.repository.get(name, version)
        model = entry.model
        if model is None:
            detail = entry.reason or "it is still loading"
            raise ModelNotReady(f"model {entry.name!r} version {entry.version} is not ready: {detail}")
        self._check_size(request.inputs)
        feeds = self._feeds(model.session, request.inputs)
        output_names = self._output_names(model.session, request.outputs)
        return PreparedRequest(model, request.id, feeds, output_names)

    def run(
        self,
        model: LoadedModel,
        output_names: list[str],
        feeds: dict[str, NDArray[Any]],
        requests: int = 1,
    ) -> list[NDArray[Any]]:
        """One onnxruntime run of validated `feeds` (one request's, or `requests` merged); blocking.

        Raises `InvalidInput` when onnxruntime refuses the inputs, `InferenceFailed` for any other fault;
        both name the model and version.
        """
        started = time.perf_counter()
        try:
            results = model.session.run(output_names, feeds)
        except Exception as exc:  # onnxruntime's own exception types; classified below
            what = f"model {model.name!r} version {model.version}"
            if is_invalid_argument(exc):
                raise InvalidInput(f"{what} rejected the inputs: {exc}") from None
            raise InferenceFailed(f"{what} failed to run: {exc}") from None
        observability = self.observability
        if observability is not None:
            seconds = time.perf_counter() - started
            if model.metrics is not None:
                model.metrics.observe_inference(seconds, _batch_size(feeds))
            else:  # a model built without the observability's series
                observability.ran(*model.labels, seconds, _batch_size(feeds))
            watch = model.drift
            if watch is not None:
                array = feeds.get(watch.input_name)
                if array is not None:
                    observability.sample(watch, array, requests)
            elif model.layer_drift is not None:
                observability.sample_layers(model.layer_drift, feeds, requests)
        return results

    def _check_size(self, inputs: list[tuple[str, NDArray[Any]]]) -> None:
        """Refuse requests over `max_request_elements` before any conversion allocates for them."""
        if self.max_request_elements is None:
            return
        total = 0
        for _, array in inputs:
            total += array.size
        if total > self.max_request_elements:
            raise PayloadTooLarge(
                f"the request holds {total} tensor elements, the limit is {self.max_request_elements} "
                "(max_request_elements); split it into smaller requests"
            )

    def _feeds(self, session: Session, inputs: list[tuple[str, NDArray[Any]]]) -> dict[str, NDArray[Any]]:
        specs, dtypes = session.input_specs, session.input_dtypes
        feeds: dict[str, NDArray[Any]] = {}
        for name, array in inputs:
            if name in feeds:
                raise InvalidInput(f"input {name!r} appears more than once")
            spec = specs.get(name)
            if spec is None:
                raise InvalidInput(f"unknown input {name!r}; the model's inputs are {', '.join(specs)}")
            feeds[name] = self._validate(spec, dtypes[name], array)
        if len(feeds) != len(specs):
            missing = [name for name in specs if name not in feeds]
            raise InvalidInput(f"missing input(s) {', '.join(missing)}; the model needs {', '.join(specs)}")
        return feeds

    def _validate(self, spec: TensorSpec, dtype: np.dtype[Any], array: NDArray[Any]) -> NDArray[Any]:
        shape = spec.shape
        # The usual model's only dynamic dimension is the batch: its other dimensions compare in one go.
        if array.ndim != len(shape) or spec.sample_shape is None or array.shape[1:] != spec.sample_shape:
            self._check_shape(spec, array)
        if array.dtype != dtype:
            array = convert_lossless(array, dtype, name=spec.name)
        if not self.allow_non_finite and array.dtype.kind == "f" and not all_finite(array):
            finite = np.isfinite(array)
            if not finite.all():
                index = [int(i) for i in np.argwhere(~finite)[0]]
                raise InvalidInput(
                    f"input {spec.name!r} holds {array[tuple(index)].item()} at index {index}; non-finite "
                    "values are refused (the server's allow_non_finite setting accepts them)"
                )
        return array

    @staticmethod
    def _check_shape(spec: TensorSpec, array: NDArray[Any]) -> None:
        """Raise `InvalidInput` unless `array` has `spec`'s rank and size on each of its fixed dimensions."""
        shape = spec.shape
        if array.ndim != len(shape):
            raise InvalidInput(
                f"input {spec.name!r} has shape {list(array.shape)}, "
                f"expected rank {len(shape)} {spec.metadata_shape()}"
            )
        for axis, (got, want) in enumerate(zip(array.shape, shape, strict=True)):
            if want is not None and got != want:
                what = "channels" if axis == 1 else "elements"
                raise InvalidInput(
                    f"input {spec.name!r} has {got} {what} on axis {axis}, the model expects {want} "
                    f"(shape {spec.metadata_shape()}, -1 is any)"
                )

    @staticmethod
    def _output_names(session: Session, requested: list[str] | None) -> list[str]:
        available = session.output_names
        if requested is None:
            return available  # the session's own list: never changed by a request
        for name in requested:
            if name not in available:
                raise InvalidInput(f"unknown output {name!r}; the model's outputs are {', '.join(available)}")
        if len(set(requested)) != len(requested):
            raise InvalidInput("an output is requested more than once")
        return requested


def _batch_size(feeds: dict[str, NDArray[Any]]) -> int:
    """Samples in a run: the leading (batch) dimension of its inputs, 1 for scalar inputs."""
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1
