"""What the server reports about itself: plain Prometheus metrics (`service.metrics`) and a drift sampler.

`Observability` belongs to one app and holds no model state: each loaded model carries its own
`DriftWatch` (frozen-bn's one-layer graph, watched at its input) or `LayerDriftWatch` (any other network,
watched at every BatchNormalization layer), built here at its load, with the model. The core hands each
run's watched input to `sample(watch, array)`, or a network's feeds to `sample_layers(watch, feeds)`;
after a swap commits, `swapped` retires the old watches and moves the gauges; the HTTP layer counts
requests and serves `/metrics` and `/v2/models/{name}/stats` from it.

A network's feeds are only queued on the request's path (O(1)); the worker runs its layer probe
(`service.layer_drift`) on them, small requests of one shape stacked into one run, one run at a time with
the GIL given up between runs, under the same CPU budget and byte bound as the input sums below.

Drift stays off the request's critical path. A small input (at most `inline_values` values, e.g. one
1x64 row) is copied where it is served into its watch's block of its dtype (`_RowBlock`: `block_values`
values as rows of C, 1,024 such inputs), under a lock, O(C). The block is summed when it fills or when
the drift worker updates the figures (every `rows_interval_s`, and before any figure is read): one pass
over all its rows (`bn_export.moments.shifted_sums`: float64 `Σ(x-k)`, `Σ(x-k)²` about the frozen mean
`k`; only when NaN/±Inf show in the totals, each input's apart, so that one holding them is left out
alone) and one CPU charge per block.
Its sums go into the watch's running sums (`ShiftedSums`), which the flush hands to the monitor as one
`Moments`: the figures are those of summing each request alone, to float64 rounding. Summing each request
where it was served cost every request two CPU clock reads and a few numpy calls; queuing such inputs
for the worker made the requests that arrived while it summed them wait for the GIL. A larger input only
appends a reference to its array to a bounded queue; a background thread wakes every `interval_s`, sums
what arrived one chunk at a time (up to `_CHUNK_BYTES` of small inputs stacked once, or one large input),
sleeping briefly between chunks so that the GIL goes to the event loop whenever a request is waiting; with
the small inputs' rows, every `rows_interval_s` (and before any figure is read), it adds each watch's sums to
its `DriftMonitor` in one merge. Holding the GIL for a whole flush made the requests arriving meanwhile wait
for it; updating the figures after every few large inputs (every two or three at W3-binary) was work the
CPU budget did not count. What each of these costs is measured in benchmarks/README.md,
"Serving costs".

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
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bn_export.errors import InvalidInputError
from bn_export.moments import Moments, ShiftedSums, merge_all, shifted_sums, shifted_sums_by_part
from service.drift import DEFAULT_MAX_CPU_FRACTION, DEFAULT_THRESHOLD, DriftMonitor, DriftSnapshot
from service.errors import ModelNotFound
from service.layer_drift import LayerMonitor, LayerProbe, LayerSummary, layer_moments, summarize
from service.memory import release_free_memory
from service.metrics import DRIFT_OUTCOMES, UNKNOWN_MODEL, DriftOutcome, ServiceMetrics
from service.native import name_this_thread
from service.repository import ModelRepository, ModelVersion

log = logging.getLogger("bn_serve")

DEFAULT_INTERVAL_S = 0.1
# The small inputs' rows are summed and their monitors brought up to date this often when nothing reads the
# figures (a scrape or a stats request applies everything first; a full block is summed where it fills).
# Each such update holds the GIL for ~0.3 ms in the middle of the requests: once a second rather than every
# `interval_s` (benchmarks/README.md, "The one-connection tail"; `python benchmarks/drift_update.py`).
DEFAULT_ROWS_INTERVAL_S = 1.0
TRIM_INTERVAL_S = 1.0
# The worker's nice value above the process's (Linux, where nice is per thread). Raised, its sums, probes
# and trims run in the time requests leave free on a shared core; but on a saturated core it then falls
# behind, and the large inputs it holds queued raised W3-json's peak resident memory by 15-30 MiB
# (benchmarks/README.md, "The drift worker at low priority"): left at the process's by default.
DEFAULT_WORKER_NICE = 0
# Three 8x3x224x224 FP32 requests: the queue only has to bridge one interval of a worker within budget.
DEFAULT_MAX_PENDING_BYTES = 16 * 1024 * 1024
# The drift sums hold the GIL one chunk at a time: inputs up to this many bytes together (each no larger
# is stacked with the others of its model and sample shape: one pass for many), or one larger input.
_CHUNK_BYTES = 16 * 1024
# The pause between chunks: a real sleep, so that a thread waiting for the GIL gets it (`sleep(0)` lets
# this thread take it straight back).
_YIELD_S = 50e-6
# Inputs of at most this many values are copied into their watch's block of rows where they are served
# (O(C)); larger ones are queued for the worker, whose chunked sums cost less per value.
DEFAULT_INLINE_VALUES = 4096
# A block of small inputs' rows holds this many values (at least one input of `inline_values`): 1,024 rows
# of 64 channels, 256 KiB of float32, summed in one pass.
DEFAULT_BLOCK_VALUES = 64 * 1024
# A network's probe runs on requests of one model and one sample shape stacked up to this many bytes of
# input at once (one run for many small requests), or on one larger request alone.
_LAYER_CHUNK_BYTES = 64 * 1024


def lower_thread_priority(increment: int) -> None:
    """Add `increment` to the calling thread's nice value (at most 19), where nice is per thread (Linux).
    Never raises: a worker left at the process's priority costs latency, not correctness."""
    if increment <= 0 or sys.platform != "linux":
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + increment))
    except OSError as exc:  # e.g. a sandbox that forbids it
        log.debug("the drift worker keeps the process's priority: %s", exc)


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


class _RowBlock:
    """Small inputs of one watch and dtype, copied one after another as rows of C values (each input's
    values of every channel, channels last, whatever its layout), waiting to be summed in one pass (see the
    module docstring). Needs the sampler's lock."""

    __slots__ = ("data", "estimated", "filled", "requests", "samples", "spare", "starts")

    def __init__(self, dtype: np.dtype[Any], channels: int, rows: int) -> None:
        self.data: NDArray[Any] = np.empty((rows, channels), dtype)
        # The buffer a detached block handed back once summed: the next detach swaps it in.
        self.spare: NDArray[Any] | None = None
        self.filled = 0
        self.starts: list[int] = []  # each input's first row
        self.samples: list[int] = []  # each input's samples (its rows are its values per channel)
        self.requests: list[int] = []  # the requests in each input's run
        self.estimated = 0.0  # CPU seconds charged for them when admitted

    def add(self, x: NDArray[Any], axis: int, samples: int, requests: int) -> None:
        """Copy `x: (N, ..., C at axis, ...)` in, as its `x.size // C` rows; the caller made room."""
        filled = self.filled
        rows = x.size // self.data.shape[1]
        target = self.data[filled : filled + rows]
        if x.ndim == 2:  # (N, C): its rows as they are
            target[...] = x
        else:
            outer = math.prod(x.shape[:axis])
            target.reshape(outer, -1, x.shape[axis])[...] = np.moveaxis(
                x.reshape(outer, x.shape[axis], -1), 1, 2
            )
        self.starts.append(filled)
        self.samples.append(samples)
        self.requests.append(requests)
        self.filled = filled + rows

    def detach(self) -> _Rows:
        """The rows copied so far, with what the block knows of them; the block starts afresh on another
        buffer. Hand the detached buffer back to `spare` once summed."""
        rows = _Rows(self.data, self.filled, self.starts, self.samples, self.requests, self.estimated)
        self.data = self.spare if self.spare is not None else np.empty_like(self.data)
        self.spare = None
        self.filled, self.starts, self.samples, self.requests, self.estimated = 0, [], [], [], 0.0
        return rows


@dataclass(frozen=True)
class _Rows:
    """A detached block: `filled` rows of `buffer`; each input's first row, samples and requests; their
    CPU charge."""

    buffer: NDArray[Any]
    filled: int
    starts: list[int]
    samples: list[int]
    requests: list[int]
    estimated: float

    def sums(self, shift: NDArray[np.float64]) -> tuple[int, NDArray[Any], NDArray[Any], list[int]]:
        """Values per channel, `Σ(x-k)`, `Σ(x-k)²` per channel of the inputs whose sums are finite, and the
        counts of `DriftWatch.pending` (covered requests and samples, unusable ones, inputs with NaN/Inf)."""
        rows = self.buffer[: self.filled]
        # All rows in one pass first (summing each input apart builds two (R, C) float64 arrays: five
        # times the cost); NaN/±Inf anywhere show in the totals, and only then is each input summed apart,
        # to leave out the ones holding them.
        _, t1, t2 = shifted_sums(rows, 1, shift)
        if np.isfinite(t2).all():
            return self.filled, t1, t2, [sum(self.requests), sum(self.samples), 0, 0, 0]
        s1, s2 = shifted_sums_by_part(rows, shift, self.starts)
        finite = np.isfinite(s2).all(axis=1)  # NaN/Inf anywhere in an input show in its own sums
        values = np.diff(np.append(self.starts, self.filled))
        samples, requests = np.asarray(self.samples), np.asarray(self.requests)
        counts = [
            int(requests[finite].sum()),
            int(samples[finite].sum()),
            int(requests[~finite].sum()),
            int(samples[~finite].sum()),
            int((~finite).sum()),
        ]
        return int(values[finite].sum()), s1[finite].sum(axis=0), s2[finite].sum(axis=0), counts


class DriftWatch:
    """A loaded model version's drift monitor, the graph input it watches, and what was fed to it.

    Built once with its model (`Observability.watch`) and never shared with another load: a reload builds a
    new one, and the swap retires the old one, whose queued inputs and sums then go nowhere.
    """

    __slots__ = (
        "blocks",
        "coverage",
        "input_name",
        "model",
        "monitor",
        "pending",
        "retired",
        "sums",
        "version",
    )

    def __init__(self, monitor: DriftMonitor, input_name: str, model: str, version: str) -> None:
        self.monitor = monitor
        self.input_name = input_name
        self.model = model
        self.version = version
        # The rest is the sampler's and needs its lock.
        self.coverage = Coverage()
        self.sums: dict[str, ShiftedSums] = {}  # running sums of small inputs, per dtype
        # Small inputs' rows not summed yet, per dtype.
        self.blocks: dict[np.dtype[Any], _RowBlock] = {}
        # Behind `sums`: covered requests and samples, unusable requests and samples, inputs with NaN/Inf.
        self.pending = [0, 0, 0, 0, 0]
        self.retired = False


class LayerDriftWatch:
    """A loaded network's drift at every BatchNormalization layer: the probe session exposing the layers'
    inputs, one monitor per layer, and what was fed to them (`service.layer_drift`).

    Built once with its model (`Observability.layer_watch`) and never shared with another load; the swap
    retires the old one, whose queued feeds then go nowhere.
    """

    __slots__ = ("alerting", "coverage", "layers", "model", "probe", "retired", "version")

    def __init__(self, probe: LayerProbe, layers: list[LayerMonitor], model: str, version: str) -> None:
        self.probe = probe
        self.layers = layers
        self.model = model
        self.version = version
        # The rest is the sampler's: `coverage` and `retired` need its lock, `alerting` its apply lock.
        self.coverage = Coverage()
        self.retired = False
        self.alerting = False

    def summary(self) -> tuple[list[DriftSnapshot], LayerSummary]:
        """Every layer's figures (in layer order) and the model's reading of them."""
        snapshots = [layer.monitor.snapshot() for layer in self.layers]
        return snapshots, summarize(self.layers, snapshots)


class Observability:
    """The app's metrics and its drift sampler: each loaded model's `DriftWatch` fed from a bounded queue
    by one thread. It holds no model state: the watches belong to the loaded models.

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
        rows_interval_s: float = DEFAULT_ROWS_INTERVAL_S,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        max_cpu_fraction: float = DEFAULT_MAX_CPU_FRACTION,
        inline_values: int = DEFAULT_INLINE_VALUES,
        block_values: int = DEFAULT_BLOCK_VALUES,
        worker_nice: int = DEFAULT_WORKER_NICE,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self.metrics = ServiceMetrics()
        # The calling thread's CPU seconds: what the drift work is charged by.
        self._cpu_clock = cpu_clock
        # CPU seconds the flushes settled with the budget, part by part (needs `_apply_lock`): what is left
        # of a flush's CPU beyond them (its wake-up, queue handling, glue) is charged at its end.
        self._flush_settled_s = 0.0
        self.worker_nice = worker_nice
        self.drift = drift
        self.drift_threshold = drift_threshold
        self.drift_window = drift_window
        self.interval_s = interval_s
        self.rows_interval_s = rows_interval_s
        self.max_pending_bytes = max_pending_bytes
        self.inline_values = inline_values
        self.block_values = max(block_values, inline_values)  # room for any small input
        # The queue of inputs to sum; the queue, its byte count, the budget, the watches whose running sums
        # hold something (`_summed`) and every watch's sums and coverage need the lock.
        self._pending: deque[_Queued] = deque()
        self._pending_bytes = 0
        self._budget = CpuBudget(max_cpu_fraction)
        self._summed: set[DriftWatch] = set()
        # Feeds of networks' runs for their layer probes (sharing the byte bound and the CPU budget).
        self._layer_pending: deque[_QueuedFeeds] = deque()
        # What the worker summed since the monitors were last brought up to date (each input is summed
        # within `interval_s`, keeping the queue short; the figures are updated every `rows_interval_s`
        # and before any is read). Need `_apply_lock`.
        self._tallies: dict[DriftWatch, _Tally] = {}
        self._layer_tallies: dict[LayerDriftWatch, _LayerTally] = {}
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
        """Start the background worker and the metrics' periodic flush (no-op when already started). With
        drift off the worker still runs: it is also what hands freed heap back to the OS once a second."""
        self.metrics.start()
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
        name_this_thread()
        lower_thread_priority(self.worker_nice)
        trimmed_at = rows_at = time.monotonic()
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if self.drift:
                    update = time.monotonic() - rows_at >= self.rows_interval_s
                    with self._apply_lock:
                        self._flush_locked(update=update)
                    if update:
                        rows_at = time.monotonic()
            except Exception:  # a fault here must cost the drift figures only, never the server
                log.exception("the drift worker failed to apply queued inputs")
            # The process's one periodic thread also hands freed heap back to the OS (see service.memory).
            if time.monotonic() - trimmed_at >= TRIM_INTERVAL_S:
                release_free_memory()
                trimmed_at = time.monotonic()

    # -- models ------------------------------------------------------------------------------------------

    def watch(
        self, statistics: Any, input_names: Sequence[str], model: str, version: str
    ) -> tuple[DriftWatch | None, str | None]:
        """The drift watch of a model being loaded, or None and why not.

        `statistics` is what `bn_export.verify.find_statistics` read from the graph (`FrozenStatistics`, or
        a sentence saying why there are none); the watched input is the model's one input.
        """
        if not self.drift:
            return None, "drift monitoring is off (BN_SERVE_DRIFT=false)"
        if isinstance(statistics, str):
            return None, statistics
        if len(input_names) != 1:
            return None, f"drift is watched on a model's one input; this one has {len(input_names)}"
        try:
            monitor = DriftMonitor(
                statistics.mean,
                statistics.var,
                statistics.eps,
                axis=statistics.axis,
                name=f"model {model!r} version {version}",
                threshold=self.drift_threshold,
                window=self.drift_window,
            )
        except InvalidInputError as exc:  # statistics the monitor cannot compare with
            return None, f"the frozen statistics cannot be monitored: {exc}"
        return DriftWatch(monitor, input_names[0], model, version), None

    def layer_watch(
        self, proto: Any, providers: Sequence[str], model: str, version: str
    ) -> tuple[LayerDriftWatch | None, str | None]:
        """The per-layer drift watch of a network being loaded (`proto`, its parsed graph), or None and why
        not (drift off; no BatchNormalization layer, or one that cannot be monitored)."""
        if not self.drift:
            return None, "drift monitoring is off (BN_SERVE_DRIFT=false)"
        from service.layer_drift import layer_monitors  # onnx's graph tools: only with models

        try:
            layers = layer_monitors(
                proto, model, version, threshold=self.drift_threshold, window=self.drift_window
            )
        except InvalidInputError as exc:
            return None, f"no layer to watch: {exc}"
        try:
            probe = LayerProbe(proto, [layer.input for layer in layers], providers)
        except Exception as exc:  # onnxruntime's own errors: the model serves without layer figures
            return None, f"the session exposing the layers' inputs could not be built: {exc}"
        return LayerDriftWatch(probe, layers, model, version), None

    def swapped(
        self, old: Sequence[ModelVersion], new: Sequence[ModelVersion], *, export: bool = True
    ) -> None:
        """A model's versions `old` were replaced by `new` (committed): retire the old drift watches, drop
        the old versions' series, and export the new ones' (unless `export` is False: an unload).

        Under the apply lock, so neither a flush nor a scrape (`render`) sees half of it.
        """
        with self._apply_lock:
            # What the old versions served and the worker summed counts in their figures before they go.
            self._update_monitors_locked()
            with self._queue_lock:
                for entry in old:
                    if entry.model is not None and entry.model.drift is not None:
                        entry.model.drift.retired = True
                    if entry.model is not None and entry.model.layer_drift is not None:
                        entry.model.layer_drift.retired = True
            for entry in old:
                self.metrics.forget_model(entry.name, str(entry.version))
                layer_watch = entry.model.layer_drift if entry.model is not None else None
                if layer_watch is not None:
                    names = [layer.layer for layer in layer_watch.layers]
                    self.metrics.forget_layers(entry.name, str(entry.version), names)
            if not export:
                return
            for entry in new:
                model, version = entry.name, str(entry.version)
                ready = entry.model is not None
                self.metrics.set_model_state(model, version, ready=ready, load_seconds=entry.load_seconds)
                drift = entry.model.drift if entry.model is not None else None
                if drift is not None:
                    self.metrics.observe_drift(model, version, drift.monitor.snapshot())
                layer_watch = entry.model.layer_drift if entry.model is not None else None
                if layer_watch is not None:
                    for layer in layer_watch.layers:
                        snapshot = layer.monitor.snapshot()
                        self.metrics.observe_layer_drift(model, version, layer.layer, snapshot)

    def render(self) -> tuple[bytes, str]:
        """`/metrics`: every input queued so far applied first, so a scrape sees every request answered
        before it; never in the middle of a swap."""
        with self._apply_lock:
            self._flush_locked()
            return self.metrics.render()

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

    def ran(self, model: str, version: str, seconds: float, batch_size: int) -> None:
        """Record one onnxruntime run of `batch_size` samples that took `seconds`."""
        self.metrics.observe_inference(model, version, seconds, batch_size)

    def sample(self, watch: DriftWatch, array: NDArray[Any], requests: int = 1) -> None:
        """Add the watched input `array` of a run of `requests` served requests to `watch`: copied into its
        block of rows when small (O(C)), else queued for the drift worker (O(1)); never waits for the
        worker's sums. Left out (and counted) while the CPU budget is spent or the queue is full.

        A queued array is kept by reference: callers must not write into it afterwards (decoded request
        arrays are never reused).
        """
        samples = int(array.shape[0]) if array.ndim else 1
        monitor = watch.monitor
        if (
            array.size <= self.inline_values
            and array.ndim > monitor.axis
            and array.shape[monitor.axis] == monitor.num_channels
            and array.dtype.kind in "fiu"
        ):
            self._add_rows(watch, array, requests, samples)
            return
        with self._queue_lock:
            if watch.retired:
                return
            if self._pending_bytes + array.nbytes > self.max_pending_bytes:
                outcome: DriftOutcome = "dropped"
                if watch.coverage.requests["dropped"] == 0:
                    log.warning(
                        "drift of model %s version %s: the worker is behind; inputs beyond %d queued bytes "
                        "are left out of the drift figures",
                        watch.model,
                        watch.version,
                        self.max_pending_bytes,
                    )
            else:
                estimate = self._budget.admit(array.nbytes)
                if estimate is not None:
                    self._pending_bytes += array.nbytes
                    self._pending.append((watch, array, requests, estimate))
                    if 2 * self._pending_bytes > self.max_pending_bytes:
                        self._wake.set()
                    return
                outcome = "skipped"
            self._count_locked(watch, outcome, requests, samples)

    def sample_layers(
        self, watch: LayerDriftWatch, feeds: dict[str, NDArray[Any]], requests: int = 1
    ) -> None:
        """Queue the validated `feeds` of a network's run of `requests` requests for its layer probe, O(1);
        never blocks on the worker. Left out (and counted) while the CPU budget is spent or the queue is
        full. The arrays are kept by reference, as `sample` keeps its inputs."""
        first = next(iter(feeds.values()), None)
        samples = int(first.shape[0]) if first is not None and first.ndim else 1
        nbytes = sum(array.nbytes for array in feeds.values())
        with self._queue_lock:
            if watch.retired:
                return
            outcome: DriftOutcome = "dropped"
            if self._pending_bytes + nbytes <= self.max_pending_bytes:
                estimate = self._budget.admit(nbytes)
                if estimate is not None:
                    self._pending_bytes += nbytes
                    self._layer_pending.append((watch, feeds, requests, estimate, nbytes))
                    if 2 * self._pending_bytes > self.max_pending_bytes:
                        self._wake.set()
                    return
                outcome = "skipped"
            self._count_layers_locked(watch, outcome, requests, samples)

    def _count_layers_locked(
        self, watch: LayerDriftWatch, outcome: DriftOutcome, requests: int, samples: int
    ) -> None:
        watch.coverage.requests[outcome] += requests
        watch.coverage.samples[outcome] += samples
        if not watch.retired:
            self.metrics.observe_drift_coverage(watch.model, watch.version, outcome, requests, samples)

    def _add_rows(self, watch: DriftWatch, x: NDArray[Any], requests: int, samples: int) -> None:
        """Copy a small `x: (N, ..., C at axis, ...)` into `watch`'s block of its dtype, summing the block
        first when `x` does not fit; its sums' CPU is charged to the budget when the block is summed, as
        the worker's is."""
        with self._queue_lock:
            if watch.retired:
                return
            estimate = self._budget.admit(x.nbytes)
            if estimate is None:
                self._count_locked(watch, "skipped", requests, samples)
                return
            self._summed.add(watch)
            if x.size == 0:  # no value to sum: covered as it is
                pending = watch.pending
                pending[0] += requests
                pending[1] += samples
                return
            block = watch.blocks.get(x.dtype)
            if block is None:
                channels = watch.monitor.num_channels
                block = watch.blocks[x.dtype] = _RowBlock(x.dtype, channels, self.block_values // channels)
            if block.filled + x.size // block.data.shape[1] > block.data.shape[0]:
                self._sum_block_locked(watch, block)
            block.add(x, watch.monitor.axis, samples, requests)
            block.estimated += estimate

    def _shifted_sums_locked(self, watch: DriftWatch, dtype: np.dtype[Any]) -> ShiftedSums:
        sums = watch.sums.get(dtype.str)
        if sums is None:
            sums = watch.sums[dtype.str] = ShiftedSums(watch.monitor.moving_mean, dtype)
        return sums

    def _sum_block_locked(self, watch: DriftWatch, block: _RowBlock) -> None:
        """Sum a full block where it filled (the request's thread, holding the lock: once per block)."""
        sums = self._shifted_sums_locked(watch, block.data.dtype)
        rows = block.detach()
        started = self._cpu_clock()
        summed = rows.sums(sums.shift)
        spent = self._cpu_clock() - started
        self._add_block_locked(watch, sums, sums.shift, summed)
        # Settled as work on no bytes: the cost per byte the budget learns is the worker's.
        self._budget.settle(0, rows.estimated, spent)
        block.spare = rows.buffer

    @staticmethod
    def _add_block_locked(
        watch: DriftWatch,
        sums: ShiftedSums,
        shift: NDArray[np.float64],
        summed: tuple[int, NDArray[Any], NDArray[Any], list[int]],
    ) -> None:
        n, s1, s2, counts = summed
        if n:
            sums.add(n, shift, s1, s2)
        pending = watch.pending
        for i, count in enumerate(counts):
            pending[i] += count

    def _count_locked(self, watch: DriftWatch, outcome: DriftOutcome, requests: int, samples: int) -> None:
        """Count requests left out of (or added to) `watch`'s figures, in its stats and its counters."""
        watch.coverage.requests[outcome] += requests
        watch.coverage.samples[outcome] += samples
        if not watch.retired:
            self.metrics.observe_drift_coverage(watch.model, watch.version, outcome, requests, samples)

    def flush(self) -> None:
        """Apply every input queued so far to its monitor, one merge per model; charge the CPU it took.

        The sums run one chunk at a time (small inputs up to `_CHUNK_BYTES` stacked once, or one large
        input) with the GIL released between chunks, so a request never waits behind more than one chunk.
        """
        with self._apply_lock:
            self._flush_locked()

    def _flush_locked(self, *, update: bool = True) -> None:
        """Sum the queued inputs and feeds; with `update`, also the small inputs' rows, and bring every
        monitor up to date with all that was summed (see `flush`). Its whole CPU time is charged: each part
        as it is done (the budget learns the sums' cost per byte from those), the rest at the end."""
        started, settled = self._cpu_clock(), self._flush_settled_s
        self._drain_locked(update=update)
        rest = (self._cpu_clock() - started) - (self._flush_settled_s - settled)
        if rest > 0:
            with self._queue_lock:
                self._settle_flush_locked(0, 0.0, rest)

    def _settle_flush_locked(self, nbytes: int, estimated: float, spent: float) -> None:
        """`CpuBudget.settle` for a part of a flush; the caller holds both locks."""
        self._budget.settle(nbytes, estimated, spent)
        self._flush_settled_s += spent

    def _drain_locked(self, *, update: bool) -> None:
        with self._queue_lock:
            remaining = len(self._pending)
            summed: set[DriftWatch] = set()
            if update:
                summed, self._summed = self._summed, set()
            detached = []
            for watch in summed:
                if watch.retired:  # unloaded or reloaded since: its rows go nowhere
                    continue
                for block in watch.blocks.values():
                    if block.filled:
                        sums = self._shifted_sums_locked(watch, block.data.dtype)
                        detached.append((watch, block, sums, sums.shift, block.detach()))
        if detached:
            # Summed off the lock: requests go on filling fresh blocks meanwhile.
            started = self._cpu_clock()
            summed_blocks = [rows.sums(shift) for _, _, _, shift, rows in detached]
            spent = self._cpu_clock() - started
        with self._queue_lock:
            if detached:
                for (watch, block, sums, shift, rows), block_sums in zip(
                    detached, summed_blocks, strict=True
                ):
                    self._add_block_locked(watch, sums, shift, block_sums)
                    if block.spare is None:
                        block.spare = rows.buffer
                self._settle_flush_locked(0, sum(rows.estimated for *_, rows in detached), spent)
            inline = []
            for watch in summed:
                parts = [moments for sums in watch.sums.values() if (moments := sums.take()) is not None]
                counts, watch.pending = watch.pending, [0, 0, 0, 0, 0]
                inline.append((watch, parts, counts))
        tallies = self._tallies
        for watch, parts, counts in inline:
            tallies.setdefault(watch, _Tally(watch.monitor)).add_sums(parts, counts)
        while remaining:
            started = self._cpu_clock()
            with self._queue_lock:
                chunk, nbytes, estimated = self._take_locked(remaining)
            remaining -= len(chunk)
            for unit in _units(chunk):
                watch = unit[0][0]
                if not watch.retired:  # else unloaded or reloaded since: these inputs go nowhere
                    tallies.setdefault(watch, _Tally(watch.monitor)).add(unit)
            spent = self._cpu_clock() - started
            with self._queue_lock:
                self._settle_flush_locked(nbytes, estimated, spent)
            if remaining:
                time.sleep(_YIELD_S)
        self._flush_layers_locked()
        if update:
            self._update_monitors_locked()

    def _update_monitors_locked(self) -> None:
        """Merge what was summed into the monitors, export the figures, count the requests; charge the
        CPU it took to the budget (a merge, a snapshot and the gauges per model: less often than the sums,
        which large inputs need every `interval_s` to keep the queue short)."""
        started = self._cpu_clock()
        tallies, self._tallies = self._tallies, {}
        layer_tallies, self._layer_tallies = self._layer_tallies, {}
        for watch, tally in tallies.items():
            if not watch.retired:
                self._apply(watch, tally)
        for layer_watch, layer_tally in layer_tallies.items():
            if not layer_watch.retired:
                self._apply_layers(layer_watch, layer_tally)
        if tallies or layer_tallies:
            spent = self._cpu_clock() - started
            with self._queue_lock:
                self._settle_flush_locked(0, 0.0, spent)

    def _flush_layers_locked(self) -> None:
        """Run the layer probes on the feeds queued so far, one chunk at a time (as `_flush_locked` sums),
        into each network's pending tally."""
        with self._queue_lock:
            remaining = len(self._layer_pending)
        tallies = self._layer_tallies
        while remaining:
            started = self._cpu_clock()
            with self._queue_lock:
                chunk, _, estimated = self._take_feeds_locked(remaining)
            remaining -= len(chunk)
            watch = chunk[0][0]
            if not watch.retired:
                tallies.setdefault(watch, _LayerTally(watch)).add(chunk)
            spent = self._cpu_clock() - started
            with self._queue_lock:
                # Settled as work on no bytes: a probe run costs more per byte than the sums whose cost
                # per byte the budget learns; its CPU is charged all the same.
                self._settle_flush_locked(0, estimated, spent)
            if remaining:
                time.sleep(_YIELD_S)

    def _take_feeds_locked(self, limit: int) -> tuple[list[_QueuedFeeds], int, float]:
        """The next probe run: the oldest queued feeds and, when its probe stacks, the following ones of
        the same network and sample shapes up to `_LAYER_CHUNK_BYTES`, at most `limit` in all."""
        pending = self._layer_pending
        first = pending.popleft()
        chunk, nbytes, estimated = [first], first[4], first[3]
        if first[0].probe.stackable:
            key = _feed_key(first)
            while (
                len(chunk) < limit
                and nbytes + pending[0][4] <= _LAYER_CHUNK_BYTES
                and _feed_key(pending[0]) == key
            ):
                queued = pending.popleft()
                chunk.append(queued)
                nbytes += queued[4]
                estimated += queued[3]
        self._pending_bytes -= nbytes
        return chunk, nbytes, estimated

    def _apply_layers(self, watch: LayerDriftWatch, tally: _LayerTally) -> None:
        """Merge one network's tally into its layers' monitors, export the figures, log the model's alert
        when it starts or ends (naming the layer and channel that moved most), count the requests."""
        samples = tally.counts["covered"][1]
        snapshots = []
        for layer, parts in zip(watch.layers, tally.parts, strict=True):
            merged = merge_all(parts) if parts else Moments.empty(layer.monitor.num_channels)
            snapshot = layer.monitor.add(merged, samples, skipped_batches=tally.unusable_runs)
            self.metrics.observe_layer_drift(watch.model, watch.version, layer.layer, snapshot)
            snapshots.append(snapshot)
        summary = summarize(watch.layers, snapshots)
        if summary.alerting and not watch.alerting:
            alerting = [layer.layer for layer, s in zip(watch.layers, snapshots, strict=True) if s.alerting]
            log.warning(
                "drift at BatchNorm layers of model %s version %s: layer %r channel %s moved most "
                "(score %.4g, mean shift up to %.3g std); alerting layers: %s",
                watch.model,
                watch.version,
                summary.worst_layer,
                summary.worst_channel,
                summary.score,
                summary.max_abs_mean_shift,
                ", ".join(alerting),
            )
        elif watch.alerting and not summary.alerting:
            log.info(
                "drift at BatchNorm layers of model %s version %s recovered: every layer at or below its "
                "threshold",
                watch.model,
                watch.version,
            )
        watch.alerting = summary.alerting
        with self._queue_lock:
            for outcome, (requests, count) in tally.counts.items():
                self._count_layers_locked(watch, outcome, requests, count)

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

    def _apply(self, watch: DriftWatch, tally: _Tally) -> None:
        """Merge one watch's tally into its monitor, export the figures, count the requests."""
        monitor = tally.monitor
        merged = merge_all(tally.parts) if tally.parts else Moments.empty(monitor.num_channels)
        snapshot = monitor.add(merged, tally.counts["covered"][1], skipped_batches=tally.non_finite)
        self.metrics.observe_drift(watch.model, watch.version, snapshot)
        with self._queue_lock:
            for outcome, (requests, samples) in tally.counts.items():
                self._count_locked(watch, outcome, requests, samples)

    def drift_stats(self, entry: ModelVersion) -> dict[str, Any]:
        """The JSON body of `GET /v2/models/{name}[/versions/{v}]/stats` (after a `flush`)."""
        body: dict[str, Any] = {"name": entry.name, "version": str(entry.version), "state": entry.state.value}
        model = entry.model
        if model is not None and model.layer_drift is not None:
            return {**body, **self._layer_stats(model.layer_drift)}
        if model is None or model.drift is None:
            reason = model.drift_reason if model is not None else None
            return {**body, "drift": None, "reason": reason or f"the model is {entry.state.value.lower()}"}
        watch = model.drift
        snapshot: DriftSnapshot = watch.monitor.snapshot()
        with self._queue_lock:
            coverage = watch.coverage.to_json()
        return {
            **body,
            "input": watch.input_name,
            "channel_axis": watch.monitor.axis,
            "dropped_batches": coverage["dropped"]["requests"],
            "max_cpu_fraction": self._budget.fraction,
            "coverage": coverage,
            "drift": snapshot.to_json(),
        }

    def _layer_stats(self, watch: LayerDriftWatch) -> dict[str, Any]:
        """The stats of a network watched at its BN layers: the model's reading and, per layer and per
        channel, the served mean and variance of the layer's input against its frozen ones."""
        snapshots, summary = watch.summary()
        with self._queue_lock:
            coverage = watch.coverage.to_json()
        layers = []
        for layer, snapshot in zip(watch.layers, snapshots, strict=True):
            monitor = layer.monitor
            layers.append(
                {
                    "layer": layer.layer,
                    "input": layer.input,
                    "channel_axis": monitor.axis,
                    "eps": monitor.eps,
                    "frozen_mean": [float(v) for v in monitor.moving_mean],
                    "frozen_var": [float(v) for v in monitor.moving_var],
                    "drift": snapshot.to_json(),
                }
            )
        return {
            "drift": {
                "alerting": summary.alerting,
                "worst_layer": summary.worst_layer,
                "worst_channel": summary.worst_channel,
                "score": summary.score,
                "max_abs_mean_shift": summary.max_abs_mean_shift,
                "threshold": self.drift_threshold,
                "samples": snapshots[0].samples if snapshots else 0,
            },
            "watched": "layers",
            "max_cpu_fraction": self._budget.fraction,
            "coverage": coverage,
            "layers": layers,
        }


_Queued = tuple[DriftWatch, NDArray[Any], int, float]
"""A queued input: (its model's drift watch, the watched input array, requests in its run, CPU seconds
charged for it)."""


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

    def add_sums(self, parts: list[Moments], counts: list[int]) -> None:
        """Add the moments and counts taken from a watch's running sums."""
        self.parts.extend(parts)
        covered, unusable = self.counts["covered"], self.counts["unusable"]
        covered[0] += counts[0]
        covered[1] += counts[1]
        unusable[0] += counts[2]
        unusable[1] += counts[3]
        self.non_finite += counts[4]


def _units(chunk: list[_Queued]) -> list[list[_Queued]]:
    """`chunk` in summing units: small inputs grouped by model, sample shape and dtype (stacked, one pass for
    many), each large one alone (a stacked copy would cost memory and time for nothing)."""
    small: dict[tuple[DriftWatch, tuple[int, ...], np.dtype[Any]], list[_Queued]] = {}
    units: list[list[_Queued]] = []
    for queued in chunk:
        key, array = queued[0], queued[1]
        if array.nbytes > _CHUNK_BYTES or array.ndim == 0:
            units.append([queued])
        else:
            small.setdefault((key, array.shape[1:], array.dtype), []).append(queued)
    return [*small.values(), *units]


_QueuedFeeds = tuple[LayerDriftWatch, dict[str, NDArray[Any]], int, float, int]
"""Queued feeds of a network's run: (its layer watch, the validated feeds, requests in the run, CPU seconds
charged for it, their bytes)."""


def _feed_key(queued: _QueuedFeeds) -> tuple[Any, ...]:
    """What feeds must share to be stacked into one probe run: the network, each input's sample shape and
    dtype."""
    watch, feeds = queued[0], queued[1]
    return (watch, *((name, a.shape[1:], a.dtype) for name, a in feeds.items()))


class _LayerTally:
    """One network's per-layer moments and request counts over the probe runs of one flush."""

    def __init__(self, watch: LayerDriftWatch) -> None:
        self.watch = watch
        self.parts: list[list[Moments]] = [[] for _ in watch.layers]
        self.counts: dict[DriftOutcome, list[int]] = {"covered": [0, 0], "unusable": [0, 0]}
        self.unusable_runs = 0

    def add(self, chunk: list[_QueuedFeeds]) -> None:
        """Run the probe once on `chunk`'s feeds (stacked) and add every layer's moments of it."""
        watch = self.watch
        feeds = chunk[0][1]
        if len(chunk) > 1:
            feeds = {name: np.concatenate([queued[1][name] for queued in chunk], axis=0) for name in feeds}
        first = next(iter(feeds.values()), None)
        rows = int(first.shape[0]) if first is not None and first.ndim else 1
        moments: list[Moments | None]
        try:
            moments = layer_moments(watch.layers, watch.probe.run(feeds))
        except Exception as exc:  # onnxruntime's own errors: these feeds say nothing about drift
            log.warning("drift of model %s version %s: probe run failed: %s", watch.model, watch.version, exc)
            moments = [None]
        present = [m for m in moments if m is not None]
        usable = len(present) == len(self.parts)
        if usable:
            for parts, m in zip(self.parts, present, strict=True):
                parts.append(m)
        else:
            self.unusable_runs += 1
        counts = self.counts["covered" if usable else "unusable"]
        counts[0] += sum(queued[2] for queued in chunk)
        counts[1] += rows
