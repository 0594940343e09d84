"""What the server reports about itself: Prometheus metrics and, per model, the drift of its served inputs.

`Observability` belongs to one app. The core tells it when a model's state changes and what each run
served; the HTTP layer counts requests and serves `/metrics` and `/v2/models/{name}/stats` from it.

Drift stays off the request's critical path. A small input (at most `inline_values` values, e.g. one 1x64
row) is summed where it is served: its per-channel float64 `Σ(x-k)`, `Σ(x-k)²` about the frozen mean `k`
(~3 µs for 1x64) are added to its model version's running sums under a lock, O(C), and the next flush hands
them to the monitor as one `Moments`. Queuing such inputs for the worker instead made the requests that
arrived while it summed them wait for the GIL. A larger input only appends a reference to its array to a
bounded queue (about a microsecond); a background thread wakes every `interval_s`, sums what arrived one
chunk at a time (up to 16 KiB of small inputs stacked once: 64 1x64 rows in ~60 µs, or one large input),
sleeping briefly between chunks so that the GIL goes to the event loop whenever a request is waiting, and
adds each model's sums to its `DriftMonitor` in one merge. Holding the GIL for a whole flush (~1 ms for
the ~700 requests of a tenth of a second at 7,000 req/s) made the requests arriving meanwhile wait for it.

Its cost is bounded twice, and whatever is left out is counted, per model version, in the stats body and
the `bn_serve_drift_requests_total` / `bn_serve_drift_request_samples_total` counters:

- CPU: the drift work may take `max_cpu_fraction` of one core, measured with the applying thread's own CPU
  time (`time.thread_time`). A `CpuBudget` refills at that rate; while it is spent, whole runs (each one
  request, or several merged by adaptive batching) are `skipped`, never part of one, so the figures stay
  exact over the requests `covered`;
- memory: past `max_pending_bytes` queued (the worker is starved of CPU), inputs are `dropped`.

Inputs holding NaN/±Inf (served with `allow_non_finite`) or of a shape the monitor cannot read are
`unusable`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray

from bn_export.errors import InvalidInputError
from bn_export.moments import Moments, merge_all
from service.drift import (
    CANCELLATION,
    DEFAULT_MAX_CPU_FRACTION,
    DEFAULT_THRESHOLD,
    DriftMonitor,
    DriftSnapshot,
    on_grid,
)
from service.errors import ModelNotFound
from service.memory import release_free_memory
from service.metrics import DRIFT_OUTCOMES, UNKNOWN_MODEL, DriftOutcome, ServiceMetrics
from service.repository import ModelRepository, ModelState, ModelVersion

log = logging.getLogger("bn_serve")

DEFAULT_INTERVAL_S = 0.1
TRIM_INTERVAL_S = 1.0
# Three 8x3x224x224 FP32 requests: the queue only has to bridge one interval of a worker within budget.
DEFAULT_MAX_PENDING_BYTES = 16 * 1024 * 1024
# The drift sums hold the GIL one chunk at a time: inputs up to this many bytes together (each no larger
# is stacked with the others of its model and sample shape: one pass for many), or one larger input.
# 16 KiB of 1x64 float32 requests (64 of them) take ~60 us.
_CHUNK_BYTES = 16 * 1024
# The pause between chunks: a real sleep, so that a thread waiting for the GIL gets it (`sleep(0)` lets
# this thread take it straight back).
_YIELD_S = 50e-6
# Inputs of at most this many values are summed where they are served (O(C) numpy calls, ~3 µs for 1x64);
# larger ones are queued for the worker, whose chunked sums cost less per value.
DEFAULT_INLINE_VALUES = 4096


class CpuBudget:
    """A token bucket of CPU seconds: refills at `fraction` per second of `clock`, holds `burst_s` of it.

    `admit(nbytes)` says whether work on `nbytes` more bytes fits and, if so, charges an estimate from the
    cost per byte measured so far; `settle` replaces the estimates of the work done by what it cost and
    learns the cost per byte. The work admitted while the bucket still held credit may overdraw it; later
    work waits until the refill has paid that back, so the long-run share of CPU stays at `fraction`.
    Not thread-safe: the caller holds a lock.
    """

    def __init__(
        self, fraction: float, *, burst_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not fraction > 0:
            raise ValueError(f"the CPU fraction must be > 0, got {fraction}")
        self.fraction = fraction
        self.capacity = fraction * burst_s
        self.credit = self.capacity
        self.cost_per_byte = 0.0
        self._clock = clock
        self._refilled_at = clock()

    def admit(self, nbytes: int) -> float | None:
        """The estimate charged for `nbytes` of work, or None (nothing charged) while the credit is spent."""
        now = self._clock()
        self.credit = min(self.capacity, self.credit + (now - self._refilled_at) * self.fraction)
        self._refilled_at = now
        if self.credit <= 0:
            return None
        estimate = nbytes * self.cost_per_byte
        self.credit -= estimate
        return estimate

    def settle(self, nbytes: int, estimated: float, spent: float) -> None:
        """Work on `nbytes` bytes, charged `estimated` when admitted, took `spent` CPU seconds."""
        self.credit += estimated - spent
        if nbytes > 0:
            measured = spent / nbytes
            self.cost_per_byte = (
                measured if self.cost_per_byte == 0 else 0.5 * (self.cost_per_byte + measured)
            )


@dataclass
class Coverage:
    """Requests served and their samples, by what the drift monitor did with them (`DRIFT_OUTCOMES`)."""

    requests: dict[DriftOutcome, int] = field(default_factory=lambda: dict.fromkeys(DRIFT_OUTCOMES, 0))
    samples: dict[DriftOutcome, int] = field(default_factory=lambda: dict.fromkeys(DRIFT_OUTCOMES, 0))

    def to_json(self) -> dict[str, dict[str, int]]:
        return {o: {"requests": self.requests[o], "samples": self.samples[o]} for o in DRIFT_OUTCOMES}


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
        max_cpu_fraction: float = DEFAULT_MAX_CPU_FRACTION,
        inline_values: int = DEFAULT_INLINE_VALUES,
    ) -> None:
        self.metrics = ServiceMetrics()
        self.drift = drift
        self.drift_threshold = drift_threshold
        self.drift_window = drift_window
        self.interval_s = interval_s
        self.max_pending_bytes = max_pending_bytes
        self.inline_values = inline_values
        self._watches: dict[tuple[str, int], DriftWatch] = {}
        self._no_drift: dict[tuple[str, int], str] = {}
        # The queue of inputs to sum; the queue, its byte count and the budget need the lock.
        self._pending: deque[_Queued] = deque()
        self._pending_bytes = 0
        self._budget = CpuBudget(max_cpu_fraction)
        self._coverage: dict[tuple[str, int], Coverage] = {}
        # The running sums of small inputs, per model version and dtype; they need the lock too.
        self._inline: dict[tuple[str, int], dict[str, _Sums]] = {}
        self._queue_lock = threading.Lock()
        # Held by whoever drains and applies, so a flush returns only after every earlier input is applied.
        self._apply_lock = threading.Lock()
        self._stop = threading.Event()
        # Set once half of `max_pending_bytes` is queued: the worker then flushes before its interval ends,
        # so large inputs are left out by the CPU budget (`skipped`) rather than by a full queue (`dropped`).
        self._wake = threading.Event()
        self._worker: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background worker (no-op when already started). With drift off it still runs: it is
        also what hands freed heap back to the OS once a second."""
        if self._worker is None:
            self._stop.clear()
            name = "bn-serve-drift" if self.drift else "bn-serve-trim"
            self._worker = threading.Thread(target=self._run, name=name, daemon=True)
            self._worker.start()

    def close(self) -> None:
        """Stop the drift worker after applying what is queued; mark this worker's gauges dead."""
        self._stop.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        self.flush()
        self.metrics.close()

    def _run(self) -> None:
        trimmed_at = time.monotonic()
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if self.drift:
                    self.flush()
            except Exception:  # a fault here must cost the drift figures only, never the server
                log.exception("the drift worker failed to apply queued inputs")
            # The process's one periodic thread also hands freed heap back to the OS (see service.memory).
            if time.monotonic() - trimmed_at >= TRIM_INTERVAL_S:
                release_free_memory()
                trimmed_at = time.monotonic()

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
        with self._queue_lock:  # the stats' coverage is that of the loaded version's monitor
            self._coverage.pop(key, None)
            self._inline.pop(key, None)
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
        with self._queue_lock:
            self._coverage.pop(key, None)
            self._inline.pop(key, None)
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

    def served(self, entry: ModelVersion, feeds: dict[str, NDArray[Any]], requests: int = 1) -> None:
        """Sum the watched input of a run of `requests` served requests into its model's running sums when
        small (O(C)), else queue it for the drift worker (O(1)); never blocks on the worker. Left out (and
        counted) while the CPU budget is spent or the queue is full.

        A queued array is kept by reference: callers must not write into it afterwards (decoded request
        arrays are never reused).
        """
        key = (entry.name, entry.version)
        watch = self._watches.get(key)
        if watch is None:
            return
        array = feeds.get(watch.input_name)
        if array is None:
            return
        samples = int(array.shape[0]) if array.ndim else 1
        monitor = watch.monitor
        if (
            array.size <= self.inline_values
            and array.ndim > monitor.axis
            and array.shape[monitor.axis] == monitor.num_channels
            and array.dtype.kind in "fiu"
        ):
            self._sum_inline(entry, monitor, array, requests, samples)
            return
        with self._queue_lock:
            if self._pending_bytes + array.nbytes > self.max_pending_bytes:
                outcome: DriftOutcome = "dropped"
                if self._coverage_locked(key).requests["dropped"] == 0:
                    log.warning(
                        "drift of model %s version %d: the worker is behind; inputs beyond %d queued bytes "
                        "are left out of the drift figures",
                        entry.name,
                        entry.version,
                        self.max_pending_bytes,
                    )
            else:
                estimate = self._budget.admit(array.nbytes)
                if estimate is not None:
                    self._pending_bytes += array.nbytes
                    self._pending.append((key, array, requests, estimate))
                    if 2 * self._pending_bytes > self.max_pending_bytes:
                        self._wake.set()
                    return
                outcome = "skipped"
            self._count_locked(key, outcome, requests, samples)
        self.metrics.observe_drift_coverage(entry.name, str(entry.version), outcome, requests, samples)

    def _sum_inline(
        self, entry: ModelVersion, monitor: DriftMonitor, x: NDArray[Any], requests: int, samples: int
    ) -> None:
        """Add the per-channel sums of a small `x: (N, ..., C at axis, ...)` to its model's running sums,
        charging the CPU they took (this thread's own) to the budget like the worker's."""
        key = (entry.name, entry.version)
        with self._queue_lock:
            estimate = self._budget.admit(x.nbytes)
            if estimate is not None:
                by_dtype = self._inline.setdefault(key, {})
                sums = by_dtype.get(x.dtype.str)
                if sums is None:
                    sums = by_dtype[x.dtype.str] = _Sums(monitor, x.dtype)
                shift = sums.shift
            else:
                self._count_locked(key, "skipped", requests, samples)
                sums = None
        if estimate is None or sums is None:
            self.metrics.observe_drift_coverage(entry.name, str(entry.version), "skipped", requests, samples)
            return
        started = time.thread_time()
        axis = monitor.axis
        view = x.reshape(math.prod(x.shape[:axis]), x.shape[axis], math.prod(x.shape[axis + 1 :]))
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf show in the sums, checked below
            d = view - shift[:, None]  # float64, exact: x and the shift are on one grid
            s1 = np.add.reduce(d, axis=(0, 2))
            s2 = np.einsum("acb,acb->c", d, d)
            finite = bool(np.isfinite(s2).all())
        spent = time.thread_time() - started
        with self._queue_lock:
            # Settled as work on no bytes: the cost per byte the budget learns is the worker's, which
            # small inputs' per-call overhead would swing.
            self._budget.settle(0, estimate, spent)
            sums.add(view.shape[0] * view.shape[2], shift, s1, s2, requests, samples, finite=finite)

    def _take_inline_locked(self) -> list[tuple[tuple[str, int], _Sums, Moments | None, list[int]]]:
        """Every model version's running sums so far, as moments with their counts; reset for what follows."""
        taken = []
        for key, by_dtype in self._inline.items():
            for sums in by_dtype.values():
                moments, counts = sums.take()
                if any(counts):
                    taken.append((key, sums, moments, counts))
        return taken

    def _coverage_locked(self, key: tuple[str, int]) -> Coverage:
        coverage = self._coverage.get(key)
        if coverage is None:
            coverage = self._coverage[key] = Coverage()
        return coverage

    def _count_locked(self, key: tuple[str, int], outcome: DriftOutcome, requests: int, samples: int) -> None:
        coverage = self._coverage_locked(key)
        coverage.requests[outcome] += requests
        coverage.samples[outcome] += samples

    def flush(self) -> None:
        """Apply every input queued so far to its monitor, one merge per model; charge the CPU it took.

        The sums run one chunk at a time (small inputs up to `_CHUNK_BYTES` stacked once, or one large
        input) with the GIL released between chunks, so a request never waits behind more than one chunk.
        """
        with self._apply_lock:
            with self._queue_lock:
                remaining = len(self._pending)
                inline = self._take_inline_locked()
            tallies: dict[tuple[str, int], _Tally] = {}
            for key, sums, moments, counts in inline:
                watch = self._watches.get(key)
                if watch is None or watch.monitor is not sums.monitor:  # summed for an unloaded version
                    continue
                tally = tallies.get(key)
                if tally is None:
                    tally = tallies[key] = _Tally(watch.monitor)
                tally.add_sums(moments, counts)
            while remaining:
                started = time.thread_time()
                with self._queue_lock:
                    chunk, nbytes, estimated = self._take_locked(remaining)
                remaining -= len(chunk)
                for unit in _units(chunk):
                    key = unit[0][0]
                    watch = self._watches.get(key)
                    if watch is None:  # unloaded or reloaded since: these inputs belong to no monitor
                        continue
                    tally = tallies.get(key)
                    if tally is None:
                        tally = tallies[key] = _Tally(watch.monitor)
                    tally.add(unit)
                spent = time.thread_time() - started
                with self._queue_lock:
                    self._budget.settle(nbytes, estimated, spent)
                if remaining:
                    time.sleep(_YIELD_S)
            for key, tally in tallies.items():
                self._apply(key, tally)

    def _take_locked(self, limit: int) -> tuple[list[_Queued], int, float]:
        """The next chunk to sum, its bytes and the CPU seconds charged for it: the oldest queued inputs up
        to `_CHUNK_BYTES` together (at least one), at most `limit` of them, taken off the queue."""
        pending = self._pending
        first = pending.popleft()
        chunk, nbytes, estimated = [first], first[1].nbytes, first[3]
        while len(chunk) < limit and nbytes + pending[0][1].nbytes <= _CHUNK_BYTES:
            queued = pending.popleft()
            chunk.append(queued)
            nbytes += queued[1].nbytes
            estimated += queued[3]
        self._pending_bytes -= nbytes
        return chunk, nbytes, estimated

    def _apply(self, key: tuple[str, int], tally: _Tally) -> None:
        """Merge one model version's tally into its monitor, export the figures, count the requests."""
        monitor = tally.monitor
        merged = merge_all(tally.parts) if tally.parts else Moments.empty(monitor.num_channels)
        snapshot = monitor.add(merged, tally.counts["covered"][1], skipped_batches=tally.non_finite)
        model, version = key[0], str(key[1])
        self.metrics.observe_drift(model, version, snapshot)
        with self._queue_lock:
            for outcome, (requests, samples) in tally.counts.items():
                self._count_locked(key, outcome, requests, samples)
        for outcome, (requests, samples) in tally.counts.items():
            self.metrics.observe_drift_coverage(model, version, outcome, requests, samples)

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
            coverage = self._coverage_locked(key).to_json()
        return {
            **body,
            "input": watch.input_name,
            "channel_axis": watch.monitor.axis,
            "dropped_batches": coverage["dropped"]["requests"],
            "max_cpu_fraction": self._budget.fraction,
            "coverage": coverage,
            "drift": snapshot.to_json(),
        }


_Queued = tuple[tuple[str, int], NDArray[Any], int, float]
"""A queued input: (model key, the watched input array, requests in its run, CPU seconds charged for it)."""


class _Tally:
    """One model version's moments and request counts over the chunks of one flush."""

    def __init__(self, monitor: DriftMonitor) -> None:
        self.monitor = monitor
        self.parts: list[Moments] = []
        self.counts: dict[DriftOutcome, list[int]] = {"covered": [0, 0], "unusable": [0, 0]}
        self.non_finite = 0

    def add(self, unit: list[_Queued]) -> None:
        """Sum one unit (inputs of one sample shape and dtype, stacked once) and count its requests."""
        arrays = [array for _, array, _, _ in unit]
        batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
        try:
            moments = self.monitor.moments_of(batch)
        except InvalidInputError as exc:  # e.g. a dynamic channel axis of another size
            log.warning("drift of %s: input of shape %s skipped: %s", self.monitor.name, batch.shape, exc)
            moments = None
        else:
            self.non_finite += moments is None
        if moments is not None:
            self.parts.append(moments)
        counts = self.counts["unusable" if moments is None else "covered"]
        counts[0] += sum(requests for _, _, requests, _ in unit)
        counts[1] += int(batch.shape[0]) if batch.ndim else 1

    def add_sums(self, moments: Moments | None, counts: list[int]) -> None:
        """Add the moments and counts taken from a `_Sums`."""
        if moments is not None:
            self.parts.append(moments)
        covered, unusable = self.counts["covered"], self.counts["unusable"]
        covered[0] += counts[0]
        covered[1] += counts[1]
        unusable[0] += counts[2]
        unusable[1] += counts[3]
        self.non_finite += counts[4]


class _Sums:
    """One model version's running per-channel float64 sums of its small inputs of one dtype, about a shift
    `k: (C,)` on that dtype's grid (the frozen mean at first), and the requests and samples behind them:

        n = values per channel,  s1 = Σ(x-k),  s2 = Σ(x-k)²  ->  mean = k + s1/n,  M2 = s2 - s1²/n

    the sums `shifted_moments` takes over a chunk. Unlike a chunk, the inputs are gone when `s2 > 64·M2`
    (they sit over 8 of their std from k) shows: that flush's M2 keeps ~2^-53·s2/M2 relative error (1e-13
    at 30 std), and `take` moves k to their mean for the sums that follow. Not thread-safe: the caller
    holds a lock.
    """

    __slots__ = ("counts", "dtype", "monitor", "n", "s1", "s2", "shift")

    def __init__(self, monitor: DriftMonitor, dtype: np.dtype[Any]) -> None:
        self.monitor = monitor
        self.dtype = dtype
        self.shift = on_grid(monitor.moving_mean, dtype)
        self.n = 0
        self.s1 = np.zeros(monitor.num_channels)
        self.s2 = np.zeros(monitor.num_channels)
        # covered requests and samples, unusable requests and samples, inputs left out for NaN/Inf
        self.counts = [0, 0, 0, 0, 0]

    def add(
        self,
        n: int,
        shift: NDArray[np.float64],
        s1: NDArray[np.float64],
        s2: NDArray[np.float64],
        requests: int,
        samples: int,
        *,
        finite: bool,
    ) -> None:
        """Add sums over `n` values per channel about `shift` (when not `finite`, only count them)."""
        if not finite:
            self.counts[2] += requests
            self.counts[3] += samples
            self.counts[4] += 1
            return
        if shift is not self.shift:  # summed about the shift that `take` has moved since: re-centre
            delta = shift - self.shift
            s2 = s2 + 2.0 * delta * s1 + n * delta * delta
            s1 = s1 + n * delta
        self.n += n
        self.s1 += s1
        self.s2 += s2
        self.counts[0] += requests
        self.counts[1] += samples

    def take(self) -> tuple[Moments | None, list[int]]:
        """The moments summed so far (None without any) and the counts behind them; starts afresh."""
        counts, self.counts = self.counts, [0, 0, 0, 0, 0]
        if self.n == 0:
            return None, counts
        n, s1, s2 = self.n, self.s1, self.s2
        m2 = s2 - s1 * s1 / n
        # Rounding can push a constant channel's M2 just below 0.
        moments = Moments(n, self.shift + s1 / n, np.maximum(m2, 0.0))
        if np.any(s2 > CANCELLATION * m2):
            self.shift = on_grid(np.asarray(moments.mean, dtype=np.float64), self.dtype)
        self.n, self.s1, self.s2 = 0, np.zeros_like(s1), np.zeros_like(s2)
        return moments, counts


def _units(chunk: list[_Queued]) -> list[list[_Queued]]:
    """`chunk` in summing units: small inputs grouped by model, sample shape and dtype (stacked, one pass for
    many), each large one alone (a stacked copy would cost memory and time for nothing)."""
    small: dict[tuple[tuple[str, int], tuple[int, ...], np.dtype[Any]], list[_Queued]] = {}
    units: list[list[_Queued]] = []
    for queued in chunk:
        key, array = queued[0], queued[1]
        if array.nbytes > _CHUNK_BYTES or array.ndim == 0:
            units.append([queued])
        else:
            small.setdefault((key, array.shape[1:], array.dtype), []).append(queued)
    return [*small.values(), *units]
