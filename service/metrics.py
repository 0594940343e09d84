"""Prometheus metrics of the server, held in a per-app `CollectorRegistry` and rendered for `GET /metrics`.

Every metric is prefixed `bn_serve_` and uses base units (seconds, samples). One `ServiceMetrics` belongs to
one app: a per-app registry (never prometheus-client's global one) lets several apps live in one process,
as they do in the tests.

Several worker processes. A scrape reaches one worker, so each worker alone would report a fraction of
the traffic. Two supported ways out:

- one worker per process/container (the KServe default) and scrape every replica: nothing to configure;
- several workers in one container: export `PROMETHEUS_MULTIPROC_DIR` (an empty directory, wiped before
  the server starts) in the server's environment *before* it starts. prometheus-client then keeps every
  value in per-process files there, and `render()` aggregates them with `MultiProcessCollector`: counters
  and histograms add up, the in-flight gauge sums over live workers, the model gauges take the maximum
  over live workers, and the drift gauges keep one series per worker (label `pid`), because a drift score
  computed from part of the traffic does not add. Call `ServiceMetrics.close()` when a worker exits so its
  live gauges disappear. A worker's request counts reach its files at its flushes (`FLUSH_INTERVAL_S`,
  see `ServiceMetrics`), so another worker's scrape shows them up to that long after they are answered.
"""

from __future__ import annotations

import itertools
import logging
import operator
import os
import threading
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial, reduce
from typing import TYPE_CHECKING, Any, Literal, get_args

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from service.native import name_this_thread

if TYPE_CHECKING:
    from service.drift import DriftSnapshot

log = logging.getLogger(__name__)

NAMESPACE = "bn_serve"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# How often the counts recorded since the last flush reach prometheus-client when nobody scrapes: in
# multi-process mode, the delay before another worker's `/metrics` shows them.
FLUSH_INTERVAL_S = 1.0

# A frozen BatchNorm (plus a linear head) answers in tens of microseconds on a CPU; HTTP and JSON add
# hundreds; a big batch or a cold GPU can take seconds. Roughly x2.5 steps from 50 µs to 10 s.
LATENCY_BUCKETS_SECONDS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# Samples per executed batch: powers of two up to the largest batch worth running at once.
BATCH_SIZE_BUCKETS = tuple(float(2**k) for k in range(13))  # 1 .. 4096

# What the drift monitor did with a served request: in its figures, over its CPU budget, over its queue's
# bytes, or holding NaN/Inf or a shape it cannot read.
DriftOutcome = Literal["covered", "skipped", "dropped", "unusable"]
DRIFT_OUTCOMES: tuple[DriftOutcome, ...] = get_args(DriftOutcome)

# Label value for requests that name no known model. Passing the requested name instead would let any
# client create unbounded series (one per made-up name).
UNKNOWN_MODEL = "_unknown"


def multiprocess_mode() -> bool:
    """True when prometheus-client keeps values in `PROMETHEUS_MULTIPROC_DIR` (read at its import time)."""
    return MULTIPROC_ENV in os.environ or MULTIPROC_ENV.lower() in os.environ


@dataclass(frozen=True)
class MetricDefinition:
    """One metric: its kind, name (after `bn_serve_`), help text, labels and kind-specific options.

    `per_model` marks what describes one loaded version (its state and its drift): those series are removed
    when the version is unloaded, so that a dashboard does not show a gauge of a model no longer held.
    """

    attribute: str
    kind: type[Counter] | type[Gauge] | type[Histogram]
    name: str
    documentation: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None
    multiprocess_mode: str | None = None
    per_model: bool = False

    def build(self, registry: CollectorRegistry) -> Counter | Gauge | Histogram:
        options: dict[str, Any] = {"namespace": NAMESPACE, "registry": registry}
        if self.buckets is not None:
            options["buckets"] = self.buckets
        if self.multiprocess_mode is not None:
            options["multiprocess_mode"] = self.multiprocess_mode
        return self.kind(self.name, self.documentation, self.labels, **options)


_MODEL = ("model", "version")
_DRIFT_OUTCOME = (*_MODEL, "outcome")
_LAYER = (*_MODEL, "layer")
METRICS: tuple[MetricDefinition, ...] = (
    MetricDefinition(
        "requests", Counter, "requests",
        "Inference requests answered, by model, version, status (HTTP status code; over gRPC the one "
        "REST would answer) and protocol (rest or grpc).",
        (*_MODEL, "status", "protocol"),
    ),
    MetricDefinition(
        "request_seconds", Histogram, "request_seconds",
        "Time from a request's arrival to its response, in seconds, by model, version and protocol.",
        (*_MODEL, "protocol"), LATENCY_BUCKETS_SECONDS,
    ),
    MetricDefinition(
        "inference_seconds", Histogram, "inference_seconds",
        "Time onnxruntime spent running one batch, in seconds.", _MODEL, LATENCY_BUCKETS_SECONDS,
    ),
    MetricDefinition(
        "batch_size", Histogram, "batch_size_samples",
        "Samples in each batch run by onnxruntime.", _MODEL, BATCH_SIZE_BUCKETS,
    ),
    MetricDefinition(
        "auth_rejected", Counter, "auth_rejected",
        "Requests refused by authentication before any route, by status: 401 no or malformed token, "
        "403 a token that is not a key.",
        ("status",),
    ),
    MetricDefinition(
        "requests_in_flight", Gauge, "requests_in_flight", "Requests being processed right now.",
        multiprocess_mode="livesum",
    ),
    MetricDefinition(
        "model_ready", Gauge, "model_ready", "1 when the model version is loaded and ready to serve, else 0.",
        _MODEL, multiprocess_mode="livemax", per_model=True,
    ),
    MetricDefinition(
        "model_load_seconds", Gauge, "model_load_seconds",
        "Time the last load of the model version took, in seconds.",
        _MODEL, multiprocess_mode="livemax", per_model=True,
    ),
    MetricDefinition(
        "drift_score", Gauge, "drift_score",
        "Mean over channels of the symmetric KL divergence between the served inputs' per-channel "
        "Gaussian and the frozen statistics' (0 = no drift).",
        _MODEL, multiprocess_mode="liveall", per_model=True,
    ),
    MetricDefinition(
        "drift_mean_shift", Gauge, "drift_max_abs_mean_shift",
        "Largest |live mean - moving mean| / sqrt(moving var + eps) over channels.",
        _MODEL, multiprocess_mode="liveall", per_model=True,
    ),
    MetricDefinition(
        "drift_log_var_ratio", Gauge, "drift_max_abs_log_var_ratio",
        "Largest |log((live var + eps) / (moving var + eps))| over channels.",
        _MODEL, multiprocess_mode="liveall", per_model=True,
    ),
    MetricDefinition(
        "drift_samples", Gauge, "drift_samples", "Served samples (rows) behind the live drift statistics.",
        _MODEL, multiprocess_mode="liveall", per_model=True,
    ),
    MetricDefinition(
        "drift_requests", Counter, "drift_requests",
        "Requests served, by what the drift monitor did with them (outcome): covered (in the figures), "
        "skipped (over its CPU budget), dropped (its queue full) or unusable (NaN/Inf, wrong shape).",
        _DRIFT_OUTCOME, per_model=True,
    ),
    MetricDefinition(
        "drift_request_samples", Counter, "drift_request_samples",
        "Samples (batch rows) of the requests counted in bn_serve_drift_requests_total, by outcome.",
        _DRIFT_OUTCOME, per_model=True,
    ),
    MetricDefinition(
        "drift_alerting", Gauge, "drift_alerting", "1 while the drift score is above its threshold, else 0.",
        _MODEL, multiprocess_mode="liveall", per_model=True,
    ),
    # A network's BatchNormalization layers (label `layer`: node names read from the graph at load, so the
    # series stay bounded); dropped with the version by `forget_layers`.
    MetricDefinition(
        "layer_drift_score", Gauge, "layer_drift_score",
        "Drift score (as bn_serve_drift_score) of the input of one BatchNormalization layer of a network.",
        _LAYER, multiprocess_mode="liveall",
    ),
    MetricDefinition(
        "layer_drift_mean_shift", Gauge, "layer_drift_max_abs_mean_shift",
        "Largest |live mean - moving mean| / sqrt(moving var + eps) over one layer's channels.",
        _LAYER, multiprocess_mode="liveall",
    ),
    MetricDefinition(
        "layer_drift_log_var_ratio", Gauge, "layer_drift_max_abs_log_var_ratio",
        "Largest |log((live var + eps) / (moving var + eps))| over one layer's channels.",
        _LAYER, multiprocess_mode="liveall",
    ),
    MetricDefinition(
        "layer_drift_samples", Gauge, "layer_drift_samples",
        "Served samples (rows) behind one layer's live drift statistics.",
        _LAYER, multiprocess_mode="liveall",
    ),
    MetricDefinition(
        "layer_drift_alerting", Gauge, "layer_drift_alerting",
        "1 while one layer's drift score is above its threshold, else 0.",
        _LAYER, multiprocess_mode="liveall",
    ),
)  # fmt: skip
_LAYER_METRICS = tuple(d for d in METRICS if d.labels == _LAYER)


def _drain(pending: deque[float]) -> list[float]:
    """What `pending` held at the call, oldest first, popped from the left one at a time (in C, `map`):
    a value appended on the right meanwhile stays for the next drain. Only one thread may drain."""
    return list(map(deque.popleft, itertools.repeat(pending, len(pending))))


class _CounterSeries:
    """One counter child's increments since the last flush, in a deque: `add(amount)` is `deque.append`,
    one C call that the GIL makes atomic, so threads add without a lock and none is lost."""

    __slots__ = ("_pending", "add", "child")

    def __init__(self, child: Any) -> None:
        self.child = child
        self._pending: deque[float] = deque()
        self.add: Callable[[float], None] = self._pending.append

    def flush(self) -> None:
        total = sum(_drain(self._pending))  # whole numbers: exact in any order
        if total:
            self.child.inc(total)


class _HistogramSeries:
    """One histogram child's observations since the last flush, appended as `_CounterSeries`' are.

    `flush` buckets them as `Histogram.observe` does (the first upper bound >= the value) and adds them to
    running totals one at a time in arrival order, then sets the child's bucket counts and sum to those
    totals: the sum is the same float, to the last bit, as observing each value in turn would give. The
    series is its child's only writer (`ServiceMetrics` keeps one per label set).
    """

    __slots__ = ("_bounds", "_counts", "_pending", "_sum", "add", "child")

    def __init__(self, child: Any, upper_bounds: Sequence[float]) -> None:
        self.child = child
        self._bounds = tuple(upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._pending: deque[float] = deque()
        self.add: Callable[[float], None] = self._pending.append

    def flush(self) -> None:
        arrived = _drain(self._pending)
        if not arrived:
            return
        # Loops in C (`reduce`, `sorted`) rather than one Python step per value. `reduce` adds left to right,
        # as `+=` per observation does (`sum` compensates from Python 3.12 on: another last bit).
        self._sum = total = reduce(operator.add, arrived, self._sum)
        ordered = sorted(arrived)
        counts, below = self._counts, 0
        for index, bound in enumerate(self._bounds):
            at_most = bisect_right(ordered, bound)  # values <= bound: this bucket's and those below
            counts[index] += at_most - below
            below = at_most
        # prometheus-client keeps a histogram child's per-bucket (not cumulative) counts and its sum as
        # values with `set`; it has no public call that adds many observations at once.
        child = self.child
        child._sum.set(total)
        for value, count in zip(child._buckets, counts, strict=True):
            value.set(count)


_Series = _CounterSeries | _HistogramSeries


class LiveCount:
    """The number of open blocks (requests in flight): `inc` and `dec` are `next` on two `itertools.count`
    (C calls the GIL makes atomic: no lock, no Python frame); `value()` is their difference."""

    __slots__ = ("_finished", "_reads", "_started", "dec", "inc")

    def __init__(self) -> None:
        self._started = itertools.count()
        self._finished = itertools.count()
        self.inc: Callable[[], int] = partial(next, self._started)
        self.dec: Callable[[], int] = partial(next, self._finished)
        self._reads = 0  # each `value()` takes one number from both counts

    def value(self) -> int:
        """Blocks entered and not yet left; call from one thread at a time (`ServiceMetrics.flush`)."""
        # Finished first: a block that enters and leaves between the two reads is then counted as open, a
        # moment's overcount, where the other order could report fewer than zero.
        finished = next(self._finished) - self._reads
        started = next(self._started) - self._reads
        self._reads += 1
        return started - finished


class ModelMetrics:
    """One loaded model version's request and run series of `metrics`, each looked up once.

    Built with the model (`LoadedModel.metrics`), so the label values are the version's own. A series is
    created on first use, not here: a version that serves nothing exports no series for it. Each update
    is one append (see `ServiceMetrics`).
    """

    __slots__ = ("_metrics", "_model", "_requests", "_run", "_seconds", "_version")

    def __init__(self, metrics: ServiceMetrics, model: str, version: str) -> None:
        self._metrics = metrics
        self._model = model
        self._version = version
        self._run: tuple[Callable[[float], None], Callable[[float], None]] | None = None
        self._requests: dict[tuple[int, str], Callable[[float], None]] = {}
        self._seconds: dict[str, Callable[[float], None]] = {}

    def observe_inference(self, seconds: float, batch_size: int) -> None:
        """As `ServiceMetrics.observe_inference` for this version."""
        run = self._run
        if run is None:
            labels = (self._model, self._version)
            series = self._metrics.series
            run = self._run = (series("inference_seconds", labels).add, series("batch_size", labels).add)
        run[0](seconds)
        run[1](batch_size)

    def observe_request(self, status: int, seconds: float, protocol: str = "rest") -> None:
        """As `ServiceMetrics.observe_request` for this version."""
        count = self._requests.get((status, protocol))
        if count is None:
            labels = (self._model, self._version, str(status), protocol)
            count = self._requests[status, protocol] = self._metrics.series("requests", labels).add
        count(1)
        observe = self._seconds.get(protocol)
        if observe is None:
            series = self._metrics.series("request_seconds", (self._model, self._version, protocol))
            observe = self._seconds[protocol] = series.add
        observe(seconds)


class ServiceMetrics:
    """The server's metrics (`METRICS`): request counts and latencies, batching, model state, input drift.

    Build one per app; the app calls the `observe_*`/`set_*` methods from its request path (all are
    thread-safe and O(1)) and serves `render()` on `GET /metrics`.

    Counters and histograms are not updated in prometheus-client per request: each labelled series
    (`series`) appends what it is given to a deque and `flush()` moves it into the prometheus-client child;
    the in-flight gauge is a `LiveCount` read at flush. prometheus-client's own update takes a lock and a
    few checks per value, about ten times per request. `render()` flushes first, so
    a scrape sees every request answered before it; `start()` also flushes every `flush_interval_s`, which
    bounds what waits in the deques and is how long other workers' scrapes lag in multi-process mode. The
    exposition (names, labels, buckets, sums) is what observing each value in prometheus-client gives.
    """

    requests: Counter
    request_seconds: Histogram
    inference_seconds: Histogram
    batch_size: Histogram
    auth_rejected: Counter
    requests_in_flight: Gauge
    model_ready: Gauge
    model_load_seconds: Gauge
    drift_score: Gauge
    drift_mean_shift: Gauge
    drift_log_var_ratio: Gauge
    drift_samples: Gauge
    drift_requests: Counter
    drift_request_samples: Counter
    drift_alerting: Gauge
    layer_drift_score: Gauge
    layer_drift_mean_shift: Gauge
    layer_drift_log_var_ratio: Gauge
    layer_drift_samples: Gauge
    layer_drift_alerting: Gauge

    def __init__(
        self, registry: CollectorRegistry | None = None, *, flush_interval_s: float = FLUSH_INTERVAL_S
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        for definition in METRICS:
            setattr(self, definition.attribute, definition.build(self.registry))
        self.in_flight = LiveCount()
        self.flush_interval_s = flush_interval_s
        # Per counter or histogram, its series by label values; entries are added without a lock (one
        # `setdefault`) and removed only under `_flush_lock`, by `forget_model`.
        self._series: dict[str, dict[tuple[str, ...], _Series]] = {
            d.attribute: {} for d in METRICS if d.kind is not Gauge
        }
        self._definitions = {d.attribute: d for d in METRICS}
        self._exporters: list[Callable[[], None]] = []
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None

    def series(self, attribute: str, labels: tuple[str, ...]) -> _CounterSeries | _HistogramSeries:
        """The series of counter or histogram `attribute` (a `METRICS` entry) with these label values.

        Its prometheus-client child is created here, on first use, as `labels()` would on a first update
        (so its `_created` time is the first update's); updates go through the returned series' `add`.
        """
        table = self._series[attribute]
        found = table.get(labels)
        if found is not None:
            return found
        metric = getattr(self, attribute)
        child = metric.labels(*labels)
        definition = self._definitions[attribute]
        created: _Series
        if definition.kind is Histogram:
            created = _HistogramSeries(child, (*(definition.buckets or ()), float("inf")))
        else:
            created = _CounterSeries(child)
        # Two threads creating the same series at once share the first one stored (the child is one).
        return table.setdefault(labels, created)

    def on_flush(self, export: Callable[[], None]) -> None:
        """Call `export` at every flush, to set gauges kept elsewhere (as plain numbers) in the registry."""
        self._exporters.append(export)

    def flush(self) -> None:
        """Move every update recorded since the last flush into prometheus-client (and its files in
        multi-process mode); set the in-flight gauge and run the `on_flush` exporters."""
        with self._flush_lock:
            for table in self._series.values():
                for series in tuple(table.values()):
                    series.flush()
            self.requests_in_flight.set(self.in_flight.value())
            for export in self._exporters:
                export()

    def start(self) -> None:
        """Flush every `flush_interval_s` from a background thread until `close()` (no-op when started)."""
        if self._flusher is None:
            self._stop.clear()
            self._flusher = threading.Thread(
                target=self._flush_periodically, name="bn-serve-metrics", daemon=True
            )
            self._flusher.start()

    def _flush_periodically(self) -> None:
        name_this_thread()
        while not self._stop.wait(self.flush_interval_s):
            try:
                self.flush()
            except Exception:  # a fault here must cost the metrics only, never the server
                log.exception("the metrics could not be flushed")

    def observe_request(
        self, model: str, version: str, status: int | str, seconds: float, protocol: str = "rest"
    ) -> None:
        """Count one answered request and record its end-to-end latency.

        `model` must be a known model name (or `UNKNOWN_MODEL`), `status` the HTTP status code and
        `protocol` "rest" or "grpc", so that the number of series stays bounded whatever clients send.
        """
        self.series("requests", (model, version, str(status), protocol)).add(1)
        self.series("request_seconds", (model, version, protocol)).add(seconds)

    def for_model(self, model: str, version: str) -> ModelMetrics:
        """The series of one loaded model version, for its request path (see `ModelMetrics`)."""
        return ModelMetrics(self, model, version)

    def observe_auth_rejected(self, status: int) -> None:
        """Count one request refused by authentication (401 or 403): it never reaches a route."""
        self.series("auth_rejected", (str(status),)).add(1)

    def observe_inference(self, model: str, version: str, seconds: float, batch_size: int) -> None:
        """Record one onnxruntime run: its duration and the number of samples it held."""
        self.series("inference_seconds", (model, version)).add(seconds)
        self.series("batch_size", (model, version)).add(batch_size)

    @contextmanager
    def track_in_flight(self) -> Iterator[None]:
        """Count the enclosed block as one request in flight, even if it raises."""
        self.in_flight.inc()
        try:
            yield
        finally:
            self.in_flight.dec()

    def set_model_state(
        self, model: str, version: str, *, ready: bool, load_seconds: float | None = None
    ) -> None:
        """Mark a model version ready (1) or not (0); record how long its load took when given."""
        self.model_ready.labels(model, version).set(1 if ready else 0)
        if load_seconds is not None:
            self.model_load_seconds.labels(model, version).set(load_seconds)

    def forget_model(self, model: str, version: str) -> None:
        """Drop the series describing an unloaded model version (`per_model`) so they stop being exported,
        with their updates not yet flushed: a later flush would bring them back."""
        with self._flush_lock:
            for definition in METRICS:
                if not definition.per_model:
                    continue
                table = self._series.get(definition.attribute, {})
                for labels in [labels for labels in table if labels[:2] == (model, version)]:
                    del table[labels]
                metric = getattr(self, definition.attribute)
                extra = [(o,) for o in DRIFT_OUTCOMES] if "outcome" in definition.labels else [()]
                for rest in extra:
                    with suppress(KeyError):  # never set for this version: nothing to drop
                        metric.remove(model, version, *rest)

    def observe_drift(self, model: str, version: str, snapshot: DriftSnapshot) -> None:
        """Export a drift monitor's latest figures; figures not yet defined (no samples) are left unset."""
        self.drift_samples.labels(model, version).set(snapshot.samples)
        self.drift_alerting.labels(model, version).set(1 if snapshot.alerting else 0)
        if snapshot.score is not None:
            self.drift_score.labels(model, version).set(snapshot.score)
        if snapshot.max_abs_mean_shift is not None:
            self.drift_mean_shift.labels(model, version).set(snapshot.max_abs_mean_shift)
        if snapshot.max_abs_log_var_ratio is not None:
            self.drift_log_var_ratio.labels(model, version).set(snapshot.max_abs_log_var_ratio)

    def observe_layer_drift(self, model: str, version: str, layer: str, snapshot: DriftSnapshot) -> None:
        """Export one BN layer's drift figures (`layer`: a node name of the loaded graph)."""
        self.layer_drift_samples.labels(model, version, layer).set(snapshot.samples)
        self.layer_drift_alerting.labels(model, version, layer).set(1 if snapshot.alerting else 0)
        if snapshot.score is not None:
            self.layer_drift_score.labels(model, version, layer).set(snapshot.score)
        if snapshot.max_abs_mean_shift is not None:
            self.layer_drift_mean_shift.labels(model, version, layer).set(snapshot.max_abs_mean_shift)
        if snapshot.max_abs_log_var_ratio is not None:
            self.layer_drift_log_var_ratio.labels(model, version, layer).set(snapshot.max_abs_log_var_ratio)

    def forget_layers(self, model: str, version: str, layers: Sequence[str]) -> None:
        """Drop an unloaded version's per-layer drift series."""
        for definition in _LAYER_METRICS:
            metric = getattr(self, definition.attribute)
            for layer in layers:
                with suppress(KeyError):  # never set for this layer: nothing to drop
                    metric.remove(model, version, layer)

    def observe_drift_coverage(
        self, model: str, version: str, outcome: DriftOutcome, requests: int, samples: int
    ) -> None:
        """Count `requests` served requests of `samples` samples by what drift did with them."""
        if requests:
            self.series("drift_requests", (model, version, outcome)).add(requests)
            self.series("drift_request_samples", (model, version, outcome)).add(samples)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its content type, for `GET /metrics`.

        Every update recorded before is flushed first. In multi-process mode the figures are read back from
        every worker's files, not from this registry.
        """
        self.flush()
        if multiprocess_mode():
            aggregated = CollectorRegistry()
            multiprocess.MultiProcessCollector(aggregated)  # type: ignore[no-untyped-call]
            return generate_latest(aggregated), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def close(self) -> None:
        """Call when this worker exits: stops the periodic flush after a last one; in multi-process mode,
        its live gauges stop being exported."""
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join()
            self._flusher = None
        self.flush()
        if multiprocess_mode():
            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
