"""What the server reports about itself: Prometheus metrics and, per model, the drift of its served inputs.

`Observability` belongs to one app. The core tells it when a model's state changes and what each run
served; the HTTP layer counts requests and serves `/metrics` and `/v2/models/{name}/stats` from it.

Drift stays off the request's critical path: a request only appends a reference to its input array to a
bounded queue (about a microsecond); a background thread wakes every `interval_s`, concatenates what
arrived per model and adds it to the model's `DriftMonitor` in one update. Coalescing matters more than the
thread: an update of a 1x64 batch costs ~60 µs of Python, as much as a tenth of a small request, but one
update of a few hundred queued rows costs about the same. When the queue holds more than `max_pending_bytes`
(the worker is starved of CPU), new inputs are dropped from the drift figures, never delayed, and counted.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray

from bn_export.errors import InvalidInputError
from service.drift import DEFAULT_THRESHOLD, DriftMonitor, DriftSnapshot
from service.errors import ModelNotFound
from service.metrics import UNKNOWN_MODEL, ServiceMetrics
from service.repository import ModelRepository, ModelState, ModelVersion

log = logging.getLogger("bn_serve")

DEFAULT_INTERVAL_S = 0.1
DEFAULT_MAX_PENDING_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class DriftWatch:
    """A model version's drift monitor and the graph input it watches (the one feeding its BatchNorm)."""

    monitor: DriftMonitor
    input_name: str


def drift_watch(
    path: Any, name: str, *, threshold: float, window: int | None
) -> tuple[DriftWatch | None, str | None]:
    """The drift watch of the model at `path`, or None and why not (no frozen statistics, no single input).

    The statistics come from `bn_export.verify.find_statistics`, the one reader of frozen graphs: the
    BatchNormalization node's constants, or the folded form's `metadata_props`, with the channel axis of the
    graph input (`perm[1]` when a Transpose feeds the node).
    """
    from bn_export.verify import FrozenStatistics, find_statistics  # loads onnx's checker: only with models

    model = onnx.load(str(path))
    statistics = find_statistics(model)
    if not isinstance(statistics, FrozenStatistics):
        return None, statistics
    input_name = _watched_input(model.graph)
    if input_name is None:
        return None, "cannot tell which graph input feeds the BatchNormalization node"
    try:
        monitor = DriftMonitor(
            statistics.mean,
            statistics.var,
            statistics.eps,
            axis=statistics.axis,
            name=name,
            threshold=threshold,
            window=window,
        )
    except InvalidInputError as exc:  # statistics the monitor cannot compare with
        return None, f"the frozen statistics cannot be monitored: {exc}"
    return DriftWatch(monitor, input_name), None


def _watched_input(graph: onnx.GraphProto) -> str | None:
    """The graph input that feeds the BatchNormalization node, directly or through one Transpose."""
    constants = {init.name for init in graph.initializer}
    inputs = [str(value.name) for value in graph.input if value.name not in constants]
    if len(inputs) == 1:
        return inputs[0]
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            source = node.input[0]
            producer = producers.get(source)
            if producer is not None and producer.op_type == "Transpose":
                source = producer.input[0]
            return str(source) if source in inputs else None
    return None


class Observability:
    """The app's metrics and its per-model drift monitors, fed from a bounded queue by one thread.

    Call `start()` before serving and `close()` after; `flush()` applies every input queued so far, so that
    figures read after it include every request answered before.
    """

    def __init__(
        self,
        *,
        drift: bool = True,
        drift_threshold: float = DEFAULT_THRESHOLD,
        drift_window: int | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
    ) -> None:
        self.metrics = ServiceMetrics()
        self.drift = drift
        self.drift_threshold = drift_threshold
        self.drift_window = drift_window
        self.interval_s = interval_s
        self.max_pending_bytes = max_pending_bytes
        self._watches: dict[tuple[str, int], DriftWatch] = {}
        self._no_drift: dict[tuple[str, int], str] = {}
        # The queue: (model key, input array); deque appends and pops are atomic, the byte count needs a lock.
        self._pending: deque[tuple[tuple[str, int], NDArray[Any]]] = deque()
        self._pending_bytes = 0
        self._dropped: dict[tuple[str, int], int] = {}
        self._queue_lock = threading.Lock()
        # Held by whoever drains and applies, so a flush returns only after every earlier input is applied.
        self._apply_lock = threading.Lock()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the drift worker (no-op with drift off or already started)."""
        if self.drift and self._worker is None:
            self._stop.clear()
            self._worker = threading.Thread(target=self._run, name="bn-serve-drift", daemon=True)
            self._worker.start()

    def close(self) -> None:
        """Stop the drift worker after applying what is queued; mark this worker's gauges dead."""
        self._stop.set()
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        self.flush()
        self.metrics.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.flush()
            except Exception:  # a fault here must cost the drift figures only, never the server
                log.exception("the drift worker failed to apply queued inputs")

    # -- models ------------------------------------------------------------------------------------------

    def model_loading(self, entry: ModelVersion) -> None:
        """A (re)load of `entry` starts: not ready until it ends; its old monitor and queued inputs go."""
        self.metrics.set_model_state(entry.name, str(entry.version), ready=False)
        self._watches.pop((entry.name, entry.version), None)

    def model_state(self, entry: ModelVersion, load_seconds: float | None = None) -> None:
        """Record `entry`'s state: the ready gauge, the load time, and a fresh drift monitor once READY."""
        key = (entry.name, entry.version)
        ready = entry.state is ModelState.READY
        self.metrics.set_model_state(entry.name, str(entry.version), ready=ready, load_seconds=load_seconds)
        self._watches.pop(key, None)
        self._no_drift.pop(key, None)
        if not ready:
            return
        if not self.drift:
            self._no_drift[key] = "drift monitoring is off (BN_SERVE_DRIFT=false)"
            return
        try:
            watch, reason = drift_watch(
                entry.path,
                f"model {entry.name!r} version {entry.version}",
                threshold=self.drift_threshold,
                window=self.drift_window,
            )
        except Exception as exc:  # the model serves without drift figures rather than not at all
            watch, reason = None, f"reading the frozen statistics failed: {exc!r}"
        if watch is None:
            self._no_drift[key] = reason or "no frozen statistics"
            log.warning("model %s version %d: no drift monitoring: %s", entry.name, entry.version, reason)
            return
        self._watches[key] = watch
        self.metrics.observe_drift(entry.name, str(entry.version), watch.monitor.snapshot())

    def model_removed(self, entry: ModelVersion) -> None:
        """Forget an unloaded model version: its gauges stop being exported, its monitor is dropped."""
        key = (entry.name, entry.version)
        self._watches.pop(key, None)
        self._no_drift.pop(key, None)
        self.metrics.forget_model(entry.name, str(entry.version))

    @staticmethod
    def labels(repository: ModelRepository, name: str, version: str | None) -> tuple[str, str]:
        """Bounded `(model, version)` label values for a request to `name`/`version` (URL segments).

        A model or version the repository does not hold is `UNKNOWN_MODEL`: the client's strings never
        become label values, so made-up names cannot create series.
        """
        try:
            entry = repository.get(name, version)
        except ModelNotFound:
            try:
                repository.versions(name)
            except ModelNotFound:
                return UNKNOWN_MODEL, UNKNOWN_MODEL
            return name, UNKNOWN_MODEL
        return entry.name, str(entry.version)

    # -- runs --------------------------------------------------------------------------------------------

    def queued(self, entry: ModelVersion, seconds: float) -> None:
        """Record how long one request waited in the batch queue before the run that carried it began."""
        self.metrics.observe_queue(entry.name, str(entry.version), seconds)

    def ran(self, entry: ModelVersion, seconds: float, batch_size: int) -> None:
        """Record one onnxruntime run of `batch_size` samples that took `seconds`."""
        self.metrics.observe_inference(entry.name, str(entry.version), seconds, batch_size)

    def served(self, entry: ModelVersion, feeds: dict[str, NDArray[Any]]) -> None:
        """Queue the watched input of a served request for the drift worker; O(1), never blocks on it.

        The array is kept by reference: callers must not write into it afterwards (decoded request arrays
        are never reused).
        """
        key = (entry.name, entry.version)
        watch = self._watches.get(key)
        if watch is None:
            return
        array = feeds.get(watch.input_name)
        if array is None:
            return
        with self._queue_lock:
            if self._pending_bytes + array.nbytes > self.max_pending_bytes:
                dropped = self._dropped.get(key, 0)
                self._dropped[key] = dropped + 1
                if dropped == 0:
                    log.warning(
                        "drift of model %s version %d: the worker is behind; inputs beyond %d queued bytes "
                        "are left out of the drift figures",
                        entry.name,
                        entry.version,
                        self.max_pending_bytes,
                    )
                return
            self._pending_bytes += array.nbytes
            self._pending.append((key, array))

    def flush(self) -> None:
        """Apply every queued input to its monitor, one concatenated update per model and sample shape."""
        with self._apply_lock:
            with self._queue_lock:
                batches, self._pending = list(self._pending), deque()
                self._pending_bytes = 0
            groups: dict[tuple[tuple[str, int], tuple[int, ...], np.dtype[Any]], list[NDArray[Any]]] = {}
            for key, array in batches:
                groups.setdefault((key, array.shape[1:], array.dtype), []).append(array)
            for (key, _, _), arrays in groups.items():
                watch = self._watches.get(key)
                if watch is None:  # unloaded or reloaded since: these inputs belong to no monitor
                    continue
                batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
                try:
                    snapshot = watch.monitor.update(batch)
                except InvalidInputError as exc:  # e.g. a dynamic channel axis of another size
                    log.warning(
                        "drift of %s: input of shape %s skipped: %s", watch.monitor.name, batch.shape, exc
                    )
                    continue
                self.metrics.observe_drift(key[0], str(key[1]), snapshot)

    def drift_stats(self, entry: ModelVersion) -> dict[str, Any]:
        """The JSON body of `GET /v2/models/{name}[/versions/{v}]/stats` (after a `flush`)."""
        key = (entry.name, entry.version)
        body: dict[str, Any] = {"name": entry.name, "version": str(entry.version), "state": entry.state.value}
        watch = self._watches.get(key)
        if watch is None:
            reason = self._no_drift.get(key) or f"the model is {entry.state.value.lower()}"
            return {**body, "drift": None, "reason": reason}
        snapshot: DriftSnapshot = watch.monitor.snapshot()
        with self._queue_lock:
            dropped = self._dropped.get(key, 0)
        return {
            **body,
            "input": watch.input_name,
            "channel_axis": watch.monitor.axis,
            "dropped_batches": dropped,
            "drift": snapshot.to_json(),
        }
