"""ServiceMetrics: what `GET /metrics` exposes, read back with prometheus-client's own text parser."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.drift import DriftSnapshot
from service.metrics import LATENCY_BUCKETS_SECONDS, ServiceMetrics

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
