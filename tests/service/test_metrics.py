"""ServiceMetrics: what `GET /metrics` exposes, read back with prometheus-client's own text parser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from service.drift import DriftSnapshot
from service.metrics import (
    DRIFT_OUTCOMES,
    FLUSH_INTERVAL_S,
    LATENCY_BUCKETS_SECONDS,
    METRICS,
    ServiceMetrics,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a text exposition as {(name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def samples(metrics: ServiceMetrics) -> Samples:
    return parse(metrics.render()[0].decode("utf-8"))


def value(metrics: ServiceMetrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, tuple(sorted(labels.items()))))


def test_requests_are_counted_by_model_version_status_and_protocol_with_total_suffix() -> None:
    metrics = ServiceMetrics()
    metrics.observe_request("digits", "1", 200, 0.001)
    metrics.observe_request("digits", "1", 200, 0.002)
    metrics.observe_request("digits", "1", "400", 0.0005)
    metrics.observe_request("digits", "2", 200, 0.003)
    metrics.observe_request("digits", "1", 200, 0.004, protocol="grpc")

    rest = {"model": "digits", "protocol": "rest"}
    assert value(metrics, "bn_serve_requests_total", **rest, version="1", status="200") == 2
    assert value(metrics, "bn_serve_requests_total", **rest, version="1", status="400") == 1
    assert value(metrics, "bn_serve_requests_total", **rest, version="2", status="200") == 1
    grpc = {"model": "digits", "version": "1", "protocol": "grpc"}
    assert value(metrics, "bn_serve_requests_total", **grpc, status="200") == 1
    assert value(metrics, "bn_serve_request_seconds_count", **grpc) == 1
    assert value(metrics, "bn_serve_request_seconds_count", **rest, version="1") == 3
    total = value(metrics, "bn_serve_request_seconds_sum", **rest, version="1")
    assert total == pytest.approx(0.0035)


def test_render_returns_the_prometheus_text_content_type() -> None:
    body, content_type = ServiceMetrics().render()
    assert content_type.startswith("text/plain; version=")
    assert "charset=utf-8" in content_type
    assert b"# TYPE bn_serve_requests_total counter" in body


def test_two_apps_in_one_process_keep_separate_figures() -> None:
    first, second = ServiceMetrics(), ServiceMetrics()
    first.observe_request("digits", "1", 200, 0.001)
    assert (
        value(first, "bn_serve_requests_total", model="digits", version="1", status="200", protocol="rest")
        == 1
    )
    assert (
        value(second, "bn_serve_requests_total", model="digits", version="1", status="200", protocol="rest")
        is None
    )


def test_latency_lands_in_the_buckets_around_it_from_microseconds_to_seconds() -> None:
    metrics = ServiceMetrics()
    for seconds in (0.00003, 0.0003, 0.3, 7.0):
        metrics.observe_inference("digits", "1", seconds, batch_size=1)
    assert LATENCY_BUCKETS_SECONDS[0] <= 0.0001
    assert LATENCY_BUCKETS_SECONDS[-1] >= 10
    counts = {
        le: value(metrics, "bn_serve_inference_seconds_bucket", model="digits", version="1", le=le)
        for le in ("5e-05", "0.00025", "0.0005", "0.25", "0.5", "5.0", "10.0", "+Inf")
    }
    assert counts == {
        "5e-05": 1,
        "0.00025": 1,
        "0.0005": 2,
        "0.25": 2,
        "0.5": 3,
        "5.0": 3,
        "10.0": 4,
        "+Inf": 4,
    }


def test_batch_sizes_are_recorded_per_model_version() -> None:
    metrics = ServiceMetrics()
    for size in (1, 3, 64):
        metrics.observe_inference("digits", "1", 0.001, batch_size=size)
    name = "bn_serve_batch_size_samples"
    assert value(metrics, f"{name}_bucket", model="digits", version="1", le="2.0") == 1
    assert value(metrics, f"{name}_bucket", model="digits", version="1", le="4.0") == 2
    assert value(metrics, f"{name}_bucket", model="digits", version="1", le="64.0") == 3
    assert value(metrics, f"{name}_sum", model="digits", version="1") == 68


def test_in_flight_counts_the_open_blocks_and_returns_to_zero_after_an_error() -> None:
    metrics = ServiceMetrics()
    with metrics.track_in_flight(), metrics.track_in_flight():
        assert value(metrics, "bn_serve_requests_in_flight") == 2
    with pytest.raises(RuntimeError), metrics.track_in_flight():
        raise RuntimeError("inference failed")
    assert value(metrics, "bn_serve_requests_in_flight") == 0


def test_model_state_reports_readiness_and_load_time_until_forgotten() -> None:
    metrics = ServiceMetrics()
    metrics.set_model_state("digits", "1", ready=False)
    assert value(metrics, "bn_serve_model_ready", model="digits", version="1") == 0
    assert value(metrics, "bn_serve_model_load_seconds", model="digits", version="1") is None
    metrics.set_model_state("digits", "1", ready=True, load_seconds=0.25)
    assert value(metrics, "bn_serve_model_ready", model="digits", version="1") == 1
    assert value(metrics, "bn_serve_model_load_seconds", model="digits", version="1") == 0.25
    metrics.forget_model("digits", "1")
    assert not any(labels and dict(labels).get("model") == "digits" for _, labels in samples(metrics))


def test_drift_gauges_follow_the_snapshot_and_stay_unset_before_any_sample() -> None:
    metrics = ServiceMetrics()
    metrics.observe_drift("digits", "1", DriftSnapshot(0, 0, 0.25, False, 0))
    assert value(metrics, "bn_serve_drift_samples", model="digits", version="1") == 0
    assert value(metrics, "bn_serve_drift_score", model="digits", version="1") is None
    snapshot = DriftSnapshot(
        samples=500,
        values=500,
        threshold=0.25,
        alerting=True,
        skipped_batches=0,
        score=0.75,
        max_abs_mean_shift=2.0,
        max_abs_log_var_ratio=0.5,
        worst_channel=3,
        mean_shift=np.zeros(4),
    )
    metrics.observe_drift("digits", "1", snapshot)
    assert value(metrics, "bn_serve_drift_score", model="digits", version="1") == 0.75
    assert value(metrics, "bn_serve_drift_max_abs_mean_shift", model="digits", version="1") == 2.0
    assert value(metrics, "bn_serve_drift_max_abs_log_var_ratio", model="digits", version="1") == 0.5
    assert value(metrics, "bn_serve_drift_alerting", model="digits", version="1") == 1
    assert value(metrics, "bn_serve_drift_samples", model="digits", version="1") == 500


_WORKER = """
import sys
from service.metrics import ServiceMetrics
metrics = ServiceMetrics()
for _ in range(int(sys.argv[1])):
    metrics.observe_request("digits", "1", 200, 0.001)
metrics.set_model_state("digits", "1", ready=True, load_seconds=float(sys.argv[1]))
sys.stdout.write(metrics.render()[0].decode())
"""


def test_multiprocess_mode_adds_up_the_workers_counts(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    outputs = [
        subprocess.run(
            [sys.executable, "-c", _WORKER, str(n)], env=env, check=True, capture_output=True, text=True
        ).stdout
        for n in (2, 3)
    ]
    # The second worker's scrape sees both workers' requests; the load-time gauge takes the max.
    parsed = parse(outputs[1])
    digits = (("model", "digits"), ("version", "1"))
    assert (
        parsed[("bn_serve_requests_total", (*digits[:1], ("protocol", "rest"), ("status", "200"), digits[1]))]
        == 5
    )
    assert parsed[("bn_serve_model_load_seconds", digits)] == 3


# -- the deferred updates against prometheus-client observing each value ----------------------------------

# One update of the request path, as the app makes it: ("request", model, version, status, seconds,
# protocol), ("run", model, version, seconds, batch size), ("coverage", model, version, outcome, requests,
# samples), ("auth", status), ("enter",), ("leave",) or ("scrape",) between them.
Update = tuple[Any, ...]

_names = st.sampled_from(["digits", "fashion"])
_versions = st.sampled_from(["1", "2"])
# Bucket bounds themselves (a value equal to a bound lands in that bucket) and values between them.
_seconds = st.sampled_from(LATENCY_BUCKETS_SECONDS) | st.floats(0, 20, allow_nan=False)
_updates = st.lists(
    st.tuples(st.just("request"), _names, _versions, st.sampled_from([200, 400, 499]), _seconds,
              st.sampled_from(["rest", "grpc"]))
    | st.tuples(st.just("run"), _names, _versions, _seconds, st.integers(1, 5000))
    | st.tuples(st.just("coverage"), _names, _versions, st.sampled_from(DRIFT_OUTCOMES), st.integers(0, 3),
                st.integers(0, 300))
    | st.tuples(st.just("auth"), st.sampled_from([401, 403]))
    | st.tuples(st.sampled_from(["enter", "scrape"])),
    max_size=60,
)  # fmt: skip


def reference_exposition(updates: list[Update]) -> str:
    """`updates` applied with prometheus-client's own calls, one value at a time, to the `METRICS` series."""
    registry = CollectorRegistry()
    built = {d.attribute: d.build(registry) for d in METRICS}
    for update in updates:
        kind, *args = update
        if kind == "request":
            model, version, status, seconds, protocol = args
            built["requests"].labels(model, version, str(status), protocol).inc()
            built["request_seconds"].labels(model, version, protocol).observe(seconds)
        elif kind == "run":
            model, version, seconds, size = args
            built["inference_seconds"].labels(model, version).observe(seconds)
            built["batch_size"].labels(model, version).observe(size)
        elif kind == "coverage" and args[3]:
            model, version, outcome, requests, samples = args
            built["drift_requests"].labels(model, version, outcome).inc(requests)
            built["drift_request_samples"].labels(model, version, outcome).inc(samples)
        elif kind == "auth":
            built["auth_rejected"].labels(str(args[0])).inc()
        elif kind == "enter":
            built["requests_in_flight"].inc()
    return generate_latest(registry).decode()


def apply(metrics: ServiceMetrics, updates: list[Update], versions: dict[tuple[str, str], Any]) -> None:
    """`updates` through the app's calls: a REST 200 through the version's `ModelMetrics`, as the route
    makes it, and any other request through `ServiceMetrics.observe_request`."""
    for update in updates:
        kind, *args = update
        if kind == "request":
            model, version, status, seconds, protocol = args
            if status == 200 and protocol == "rest":
                versions[model, version].observe_request(status, seconds)
            else:
                metrics.observe_request(model, version, status, seconds, protocol)
        elif kind == "run":
            model, version, seconds, size = args
            versions[model, version].observe_inference(seconds, size)
        elif kind == "coverage":
            metrics.observe_drift_coverage(*args)
        elif kind == "auth":
            metrics.observe_auth_rejected(args[0])
        elif kind == "enter":
            metrics.in_flight.inc()
        elif kind == "scrape":
            metrics.render()


def without_created(text: str) -> list[str]:
    """The exposition's lines but the `_created` samples: timestamps of each series' first update."""
    return [line for line in text.splitlines() if not line.partition("{")[0].endswith("_created")]


@settings(max_examples=60, deadline=None)
@given(_updates)
def test_exposition_equals_prometheus_client_observing_each_value(updates: list[Update]) -> None:
    metrics = ServiceMetrics()
    versions = {(m, v): metrics.for_model(m, v) for m in ("digits", "fashion") for v in ("1", "2")}
    apply(metrics, updates, versions)
    # Exact, sums included: the deferred sums add the same floats in the same order.
    assert without_created(metrics.render()[0].decode()) == without_created(reference_exposition(updates))


_MULTIPROCESS_WORKER = """
import json, sys
from service.metrics import ServiceMetrics
from tests.service.test_metrics import apply, reference_exposition
updates = [tuple(u) for u in json.loads(sys.stdin.read())]
if sys.argv[1] == "reference":
    reference_exposition(updates)  # written to the directory's files as it goes
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    sys.stdout.write(generate_latest(registry).decode())
else:
    metrics = ServiceMetrics()
    apply(metrics, updates, {(m, v): metrics.for_model(m, v) for m in ("digits", "fashion") for v in "12"})
    sys.stdout.write(metrics.render()[0].decode())
"""

_SOME_UPDATES: list[Update] = [
    ("request", "digits", "1", 200, 0.001, "rest"),
    ("request", "digits", "1", 200, 0.0025, "rest"),
    ("run", "digits", "1", 0.0003, 3),
    ("scrape",),
    ("request", "digits", "1", 400, 0.1, "rest"),
    ("request", "fashion", "2", 200, 7.0, "grpc"),
    ("run", "digits", "1", 0.00004, 4096),
    ("coverage", "digits", "1", "skipped", 2, 40),
    ("auth", 401),
    ("enter",),
    ("enter",),
]


def test_multiprocess_exposition_equals_prometheus_client_observing_each_value(tmp_path: Path) -> None:
    outputs = {}
    for mode in ("reference", "deferred"):
        directory = tmp_path / mode
        directory.mkdir()
        outputs[mode] = subprocess.run(
            [sys.executable, "-c", _MULTIPROCESS_WORKER, mode],
            input=json.dumps(_SOME_UPDATES),
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)},
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    # The same lines; their order is the order the files were first written in, which the flush changes.
    assert sorted(without_created(outputs["deferred"])) == sorted(without_created(outputs["reference"]))
    key = (
        "bn_serve_requests_total",
        (("model", "digits"), ("protocol", "rest"), ("status", "200"), ("version", "1")),
    )
    assert parse(outputs["deferred"])[key] == 2


_IDLE_WORKER = """
import sys
from service.metrics import ServiceMetrics
metrics = ServiceMetrics()
metrics.start()
model = metrics.for_model("digits", "1")
for _ in range(int(sys.argv[1])):
    model.observe_request(200, 0.001)
metrics.in_flight.inc()
print("recorded", flush=True)
sys.stdin.read()  # never scrapes: only the periodic flush can write the files
"""


def test_multiprocess_mode_shows_a_worker_s_requests_without_its_scrape_within_the_flush_interval(
    tmp_path: Path,
) -> None:
    worker = subprocess.Popen(
        [sys.executable, "-c", _IDLE_WORKER, "7"],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline() == "recorded\n"
        recorded = time.monotonic()
        labels = {"model": "digits", "version": "1", "status": "200", "protocol": "rest"}
        while True:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
            # The series exists (at 0) from the first update on; its count arrives with the flush.
            if registry.get_sample_value("bn_serve_requests_total", labels) == 7:
                break
            # The interval, plus room for a busy machine to start the flush late.
            assert time.monotonic() - recorded < FLUSH_INTERVAL_S + 10, "never flushed"
            time.sleep(0.05)
        assert registry.get_sample_value("bn_serve_requests_in_flight") == 1
    finally:
        assert worker.stdin is not None
        assert worker.stdout is not None
        worker.stdin.close()
        worker.stdout.close()
        worker.wait(10)


def test_updates_from_many_threads_are_all_counted_while_scrapes_run() -> None:
    metrics = ServiceMetrics()
    model = metrics.for_model("digits", "1")
    threads, per_thread = 8, 3000
    start = threading.Barrier(threads + 1)
    done = threading.Event()

    def serve(index: int) -> None:
        start.wait()
        for i in range(per_thread):
            metrics.in_flight.inc()
            model.observe_request(200, 0.25)  # binary fractions: the sum is exact in any order
            model.observe_inference(0.5, 1 + i % 2)
            metrics.observe_request("digits", "1", 404, 0.125)
            metrics.observe_drift_coverage("digits", "1", "covered", 1, 3)
            if i % 3:
                metrics.in_flight.dec()

    def scrape_until_done() -> None:
        start.wait()
        while not done.is_set():
            metrics.render()

    workers = [threading.Thread(target=serve, args=(i,)) for i in range(threads)]
    scraper = threading.Thread(target=scrape_until_done)
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as the interpreter lets them: races show
    try:
        for thread in [*workers, scraper]:
            thread.start()
        for thread in workers:
            thread.join()
        done.set()
        scraper.join()
    finally:
        sys.setswitchinterval(switch_interval)

    n = threads * per_thread
    model_labels = {"model": "digits", "version": "1"}
    rest = {**model_labels, "protocol": "rest"}
    assert value(metrics, "bn_serve_requests_total", **rest, status="200") == n
    assert value(metrics, "bn_serve_requests_total", **rest, status="404") == n
    assert value(metrics, "bn_serve_request_seconds_count", **rest) == 2 * n
    assert value(metrics, "bn_serve_request_seconds_sum", **rest) == n * 0.25 + n * 0.125
    assert value(metrics, "bn_serve_request_seconds_bucket", **rest, le="0.1") == 0
    assert value(metrics, "bn_serve_request_seconds_bucket", **rest, le="0.25") == 2 * n
    assert value(metrics, "bn_serve_inference_seconds_sum", **model_labels) == n * 0.5
    assert value(metrics, "bn_serve_batch_size_samples_bucket", **model_labels, le="1.0") == n / 2
    assert value(metrics, "bn_serve_batch_size_samples_sum", **model_labels) == n * 1.5
    assert value(metrics, "bn_serve_drift_requests_total", **model_labels, outcome="covered") == n
    assert value(metrics, "bn_serve_drift_request_samples_total", **model_labels, outcome="covered") == 3 * n
    assert value(metrics, "bn_serve_requests_in_flight") == threads * (per_thread // 3)


def test_forgetting_a_version_drops_its_unflushed_drift_counts_and_keeps_its_request_counts() -> None:
    metrics = ServiceMetrics()
    metrics.observe_drift_coverage("digits", "1", "covered", 1, 5)
    metrics.render()
    metrics.observe_drift_coverage("digits", "1", "skipped", 2, 10)  # not flushed yet
    metrics.observe_drift_coverage("digits", "2", "covered", 1, 5)
    metrics.for_model("digits", "1").observe_request(200, 0.001)
    metrics.forget_model("digits", "1")

    exposed = samples(metrics)
    drift = {dict(labels)["version"] for name, labels in exposed if name.startswith("bn_serve_drift_request")}
    assert drift == {"2"}
    rest = {"model": "digits", "version": "1", "protocol": "rest"}
    assert value(metrics, "bn_serve_requests_total", **rest, status="200") == 1
    # A version loaded again under the same labels starts from zero.
    metrics.observe_drift_coverage("digits", "1", "covered", 1, 5)
    assert (
        value(metrics, "bn_serve_drift_requests_total", model="digits", version="1", outcome="covered") == 1
    )
    assert (
        value(metrics, "bn_serve_drift_requests_total", model="digits", version="1", outcome="skipped")
        is None
    )


def test_close_flushes_what_was_recorded_and_stops_the_periodic_flush() -> None:
    registry = CollectorRegistry()
    metrics = ServiceMetrics(registry, flush_interval_s=3600)
    before = set(threading.enumerate())
    metrics.start()
    (flusher,) = set(threading.enumerate()) - before
    metrics.observe_request("digits", "1", 200, 0.001)
    labels = {"model": "digits", "version": "1", "status": "200", "protocol": "rest"}
    assert registry.get_sample_value("bn_serve_requests_total", labels) == 0  # created, not yet flushed
    metrics.close()
    assert registry.get_sample_value("bn_serve_requests_total", labels) == 1
    assert not flusher.is_alive()
