"""Metrics and live drift, end to end: real requests through the app and a real bn-serve process, the
Prometheus text parsed with prometheus_client's parser, drift figures against float64 numpy."""

from __future__ import annotations

import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from prometheus_client.parser import text_string_to_metric_families

from bn_export.moments import ShiftedSums, shifted_sums
from service.drift import DriftMonitor
from service.metrics import UNKNOWN_MODEL
from service.model import LoadOptions, load_model
from service.observability import CpuBudget, DriftWatch, Observability
from service.repository import ModelState, ModelVersion
from service.runtime import CPU
from tests.service.conftest import CHANNELS, FrozenParams, InProcess, Repository

# The layer's epsilon as the graph stores it (a float32 attribute), which is what the monitor reads.
EPS = float(np.float32(1e-5))
THRESHOLD = 0.25


def infer_body(x: NDArray[Any]) -> dict[str, Any]:
    return {
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
    }


@dataclass(frozen=True)
class Sample:
    """One series of the exposition: name (with `_total`, `_bucket`... suffix), labels, value."""

    name: str
    labels: dict[str, str]
    value: float


def scrape(get: Callable[[str], Any]) -> list[Sample]:
    response = get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return [
        Sample(s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    ]


def values(samples: list[Sample], name: str, **labels: str) -> list[float]:
    return [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = values(samples, name, **labels)
    assert len(found) == 1, f"{name} {labels}: {found}"
    return found[0]


def request_counts(samples: list[Sample]) -> dict[tuple[str, str, str], float]:
    return {
        (s.labels["model"], s.labels["version"], s.labels["status"]): s.value
        for s in samples
        if s.name == "bn_serve_requests_total"
    }


def served_inputs(params: FrozenParams, rng: np.random.Generator, n: int, shift_std: float) -> NDArray[Any]:
    """(n, C) float32 drawn from the frozen Gaussian per channel, every channel shifted by `shift_std` std."""
    std = np.sqrt(params.var.astype(np.float64) + EPS)
    z = rng.standard_normal((n, CHANNELS))
    return (params.mean + (z + shift_std) * std).astype(np.float32)


def expected_drift(x: NDArray[Any], params: FrozenParams) -> dict[str, Any]:
    """The drift figures written out from the definitions, in float64, from every served row."""
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=0), x64.var(axis=0)  # population variance, like moving_var
    frozen = params.var.astype(np.float64) + EPS
    d = (mean - params.mean.astype(np.float64)) / np.sqrt(frozen)
    r = (var + EPS) / frozen
    kl_live_frozen = 0.5 * (r - 1 - np.log(r) + d**2)
    kl_frozen_live = 0.5 * (1 / r - 1 + np.log(r) + d**2 / r)
    return {
        "mean": mean,
        "var": var,
        "d": d,
        "r": r,
        "score": float((kl_live_frozen + kl_frozen_live).mean()),
    }


def post_in_batches(server: Any, url: str, x: NDArray[Any], sizes: list[int]) -> None:
    """Post the rows of `x` split into requests of the given sizes (cycled), each answered 200."""
    start, i = 0, 0
    while start < len(x):
        stop = min(len(x), start + sizes[i % len(sizes)])
        response = server.post(url, json=infer_body(x[start:stop]))
        assert response.status_code == 200, response.text
        start, i = stop, i + 1


@pytest.fixture
def fresh(serve_in_process: Callable[..., InProcess]) -> Iterator[InProcess]:
    """A server of its own, so that its counters start at zero."""
    server = serve_in_process()
    try:
        yield server
    finally:
        server.close()


# -- requests, statuses and labels --------------------------------------------------------------------------


def test_requests_are_counted_by_model_version_and_status_for_200_400_404_and_503(fresh: InProcess) -> None:
    x = np.zeros((2, CHANNELS), dtype=np.float32)
    assert fresh.post("/v2/models/frozen/infer", json=infer_body(x)).status_code == 200
    assert fresh.post("/v2/models/frozen/versions/1/infer", json=infer_body(x)).status_code == 200
    assert fresh.post("/v2/models/frozen/versions/1/infer", json=infer_body(x)).status_code == 200
    wrong_shape = infer_body(np.zeros((2, CHANNELS + 1), dtype=np.float32))
    assert fresh.post("/v2/models/frozen/infer", json=wrong_shape).status_code == 400
    assert fresh.post("/v2/models/frozen/infer", content=b"{not json").status_code == 400
    assert fresh.post("/v2/models/frozen/versions/7/infer", json=infer_body(x)).status_code == 404
    assert fresh.post("/v2/models/batchstat/infer", json=infer_body(x)).status_code == 503

    counts = request_counts(scrape(fresh.get))
    assert counts == {
        ("frozen", "2", "200"): 1,
        ("frozen", "1", "200"): 2,
        ("frozen", "2", "400"): 2,
        ("frozen", UNKNOWN_MODEL, "404"): 1,
        ("batchstat", "1", "503"): 1,
    }


def test_unknown_model_names_share_one_bounded_label_value(fresh: InProcess) -> None:
    x = np.zeros((1, CHANNELS), dtype=np.float32)
    names = [f"made-up-{uuid.uuid4().hex}" for _ in range(3)]
    for name in names:
        response = fresh.post(f"/v2/models/{name}/infer", json=infer_body(x))
        assert response.status_code == 404
        assert name in response.json()["error"]

    samples = scrape(fresh.get)
    exposed = {s.labels.get("model") for s in samples} | {s.labels.get("version") for s in samples}
    assert not any(name in str(label) for name in names for label in exposed)
    assert request_counts(samples) == {(UNKNOWN_MODEL, UNKNOWN_MODEL, "404"): 3}


def test_a_scrape_right_after_each_request_counts_it(fresh: InProcess) -> None:
    # Far sooner than the periodic flush (every second): only the scrape's own flush can show them.
    x = np.ones((1, CHANNELS), dtype=np.float32)
    frozen = {"model": "frozen", "version": "2"}
    for n in range(1, 4):
        assert fresh.post("/v2/models/frozen/infer", json=infer_body(x)).status_code == 200
        samples = scrape(fresh.get)
        assert request_counts(samples)[("frozen", "2", "200")] == n
        assert value(samples, "bn_serve_request_seconds_count", **frozen) == n
        assert value(samples, "bn_serve_inference_seconds_count", **frozen) == n
        assert value(samples, "bn_serve_requests_in_flight") == 0
        assert value(samples, "bn_serve_pending_response_bytes") == 0


def test_histograms_count_every_request_and_every_run_with_its_samples(fresh: InProcess) -> None:
    sizes = [1, 3, 8, 3]
    for n in sizes:
        x = np.ones((n, CHANNELS), dtype=np.float32)
        assert fresh.post("/v2/models/frozen/infer", json=infer_body(x)).status_code == 200
    assert fresh.post("/v2/models/frozen/infer", content=b"[]").status_code == 400  # counted, never run

    samples = scrape(fresh.get)
    frozen = {"model": "frozen", "version": "2"}
    assert value(samples, "bn_serve_request_seconds_count", **frozen) == len(sizes) + 1
    assert value(samples, "bn_serve_inference_seconds_count", **frozen) == len(sizes)
    assert value(samples, "bn_serve_batch_size_samples_count", **frozen) == len(sizes)
    assert value(samples, "bn_serve_batch_size_samples_sum", **frozen) == sum(sizes)
    # Cumulative buckets: 1 sample <= 1, three runs <= 4, all four <= 8 and +Inf.
    buckets = {
        s.labels["le"]: s.value
        for s in samples
        if s.name == "bn_serve_batch_size_samples_bucket" and frozen.items() <= s.labels.items()
    }
    assert (buckets["1.0"], buckets["2.0"], buckets["4.0"], buckets["8.0"], buckets["+Inf"]) == (
        1,
        1,
        3,
        4,
        4,
    )
    for name in ("bn_serve_request_seconds", "bn_serve_inference_seconds"):
        assert value(samples, f"{name}_bucket", le="+Inf", **frozen) == value(
            samples, f"{name}_count", **frozen
        )
        assert value(samples, f"{name}_sum", **frozen) > 0
    assert value(samples, "bn_serve_requests_in_flight") == 0


def test_model_gauges_say_which_versions_are_ready_and_how_long_they_took_to_load(fresh: InProcess) -> None:
    samples = scrape(fresh.get)
    ready = {
        (s.labels["model"], s.labels["version"]): s.value for s in samples if s.name == "bn_serve_model_ready"
    }
    assert ready == {("frozen", "1"): 1, ("frozen", "2"): 1, ("batchstat", "1"): 0, ("corrupt", "1"): 0}
    for model, version in ready:
        assert value(samples, "bn_serve_model_load_seconds", model=model, version=version) > 0


# -- drift ---------------------------------------------------------------------------------------------------


def test_stats_match_float64_moments_of_every_served_row(fresh: InProcess, repository: Repository) -> None:
    params = repository.params[1]
    x = served_inputs(params, np.random.default_rng(0), 150, shift_std=0.7)
    post_in_batches(fresh, "/v2/models/frozen/versions/1/infer", x, [1, 7, 32, 5])

    response = fresh.get("/v2/models/frozen/versions/1/stats")
    assert response.status_code == 200
    stats = response.json()
    assert (stats["name"], stats["version"], stats["state"]) == ("frozen", "1", "READY")
    assert (stats["input"], stats["channel_axis"], stats["dropped_batches"]) == ("input", 1, 0)
    drift, want = stats["drift"], expected_drift(x, params)
    assert (drift["samples"], drift["values"], drift["threshold"]) == (150, 150, THRESHOLD)
    np.testing.assert_allclose(drift["channels"]["live_mean"], want["mean"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(drift["channels"]["live_var"], want["var"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(drift["channels"]["mean_shift"], want["d"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(drift["channels"]["var_ratio"], want["r"], rtol=1e-10)
    assert drift["score"] == pytest.approx(want["score"], rel=1e-10)
    assert drift["max_abs_mean_shift"] == pytest.approx(np.abs(want["d"]).max(), rel=1e-10)
    # Version 2 served nothing: its monitor is its own.
    assert fresh.get("/v2/models/frozen/stats").json()["drift"]["samples"] == 0


def test_drift_gauges_repeat_the_stats_figures(fresh: InProcess, repository: Repository) -> None:
    x = served_inputs(repository.params[2], np.random.default_rng(1), 64, shift_std=0.3)
    post_in_batches(fresh, "/v2/models/frozen/infer", x, [16])
    drift = fresh.get("/v2/models/frozen/stats").json()["drift"]
    samples = scrape(fresh.get)
    labels = {"model": "frozen", "version": "2"}
    assert value(samples, "bn_serve_drift_score", **labels) == pytest.approx(drift["score"], rel=1e-12)
    assert value(samples, "bn_serve_drift_samples", **labels) == 64
    assert value(samples, "bn_serve_drift_max_abs_mean_shift", **labels) == pytest.approx(
        drift["max_abs_mean_shift"], rel=1e-12
    )
    assert value(samples, "bn_serve_drift_alerting", **labels) == 0  # under 100 samples: never alerts


def test_unshifted_inputs_stay_quiet_and_shifted_inputs_alert_once(
    serve_in_process: Callable[..., InProcess], repository: Repository, caplog: pytest.LogCaptureFixture
) -> None:
    params = repository.params[2]
    rng = np.random.default_rng(2)
    quiet, drifting = serve_in_process(), serve_in_process()
    try:
        with caplog.at_level(logging.WARNING, logger="service.drift"):
            post_in_batches(quiet, "/v2/models/frozen/infer", served_inputs(params, rng, 400, 0.0), [50])
            calm = quiet.get("/v2/models/frozen/stats").json()["drift"]
            # Two standard deviations in every channel: J = d²(1 + 1/r)/2 ≈ 4, far above 0.25.
            shifted = served_inputs(params, rng, 400, 2.0)
            post_in_batches(drifting, "/v2/models/frozen/infer", shifted[:200], [50])
            drifting.get("/v2/models/frozen/stats")  # applies the first half: the crossing happens here
            post_in_batches(drifting, "/v2/models/frozen/infer", shifted[200:], [50])
            alarm = drifting.get("/v2/models/frozen/stats").json()["drift"]
            gauges = scrape(drifting.get)
    finally:
        quiet.close()
        drifting.close()

    assert calm["score"] < 0.05
    assert calm["alerting"] is False
    assert alarm["score"] == pytest.approx(expected_drift(shifted, params)["score"], rel=1e-10)
    assert alarm["score"] > THRESHOLD
    assert alarm["alerting"] is True
    assert value(gauges, "bn_serve_drift_alerting", model="frozen", version="2") == 1
    warnings = [r for r in caplog.records if r.name == "service.drift" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "'frozen' version 2" in warnings[0].getMessage()


def test_stats_of_an_unknown_model_is_a_v2_404_and_of_a_refused_model_says_why(fresh: InProcess) -> None:
    response = fresh.get(f"/v2/models/{uuid.uuid4().hex}/stats")
    assert response.status_code == 404
    assert set(response.json()) == {"error"}
    assert fresh.get("/v2/models/frozen/versions/9/stats").status_code == 404

    refused = fresh.get("/v2/models/batchstat/stats")
    assert refused.status_code == 200
    assert refused.json()["drift"] is None
    assert refused.json()["state"] == "UNAVAILABLE"


def test_drift_off_by_environment_leaves_no_drift_figures(
    serve_in_process: Callable[..., InProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BN_SERVE_DRIFT", "false")
    server = serve_in_process()
    try:
        x = np.ones((4, CHANNELS), dtype=np.float32)
        assert server.post("/v2/models/frozen/infer", json=infer_body(x)).status_code == 200
        stats = server.get("/v2/models/frozen/stats").json()
        samples = scrape(server.get)
    finally:
        server.close()
    assert stats["drift"] is None
    assert "BN_SERVE_DRIFT" in stats["reason"]
    assert not [s for s in samples if s.name.startswith("bn_serve_drift_")]
    assert request_counts(samples) == {("frozen", "2", "200"): 1}


def test_a_full_drift_queue_drops_inputs_and_counts_them(repository: Repository) -> None:
    x = np.ones((8, CHANNELS), dtype=np.float32)  # 128 bytes
    observability = Observability(max_pending_bytes=3 * x.nbytes, inline_values=0)  # every input queued
    entry = _loaded(repository, observability)
    for _ in range(5):
        observability.sample(_watch(entry), x)
    observability.flush()
    stats = observability.drift_stats(entry)
    assert (stats["drift"]["samples"], stats["dropped_batches"]) == (24, 2)


# -- a real process ------------------------------------------------------------------------------------------


def test_a_real_bn_serve_process_exports_counts_and_drift(launch: Any, repository: Repository) -> None:
    server = launch("--model-repository", str(repository.root), "--device", "cpu", "--intra-op-threads", "1")
    params = repository.params[2]
    x = served_inputs(params, np.random.default_rng(3), 120, shift_std=1.0)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        post_in_batches(http, "/v2/models/frozen/infer", x, [40])
        assert http.post(f"/v2/models/{uuid.uuid4().hex}/infer", json=infer_body(x[:1])).status_code == 404
        assert http.post("/v2/models/frozen/infer", json={"inputs": []}).status_code == 400
        stats = http.get("/v2/models/frozen/stats").json()["drift"]
        samples = scrape(http.get)

    assert request_counts(samples) == {
        ("frozen", "2", "200"): 3,
        (UNKNOWN_MODEL, UNKNOWN_MODEL, "404"): 1,
        ("frozen", "2", "400"): 1,
    }
    want = expected_drift(x, params)
    assert stats["samples"] == 120
    np.testing.assert_allclose(stats["channels"]["live_mean"], want["mean"], rtol=1e-12, atol=1e-12)
    assert stats["score"] == pytest.approx(want["score"], rel=1e-10)
    assert value(samples, "bn_serve_drift_score", model="frozen", version="2") == pytest.approx(
        want["score"], rel=1e-10
    )
    assert value(samples, "bn_serve_drift_alerting", model="frozen", version="2") == 1


# -- the drift CPU budget ------------------------------------------------------------------------------------


def test_cpu_budget_refills_at_its_fraction_up_to_one_second_of_it() -> None:
    now = [0.0]
    budget = CpuBudget(0.1, clock=lambda: now[0])
    assert budget.admit(1000) == 0.0  # nothing measured yet: admitted, nothing charged
    budget.settle(1000, 0.0, 0.25)  # that work took 0.25 s of CPU: 0.15 s overdrawn
    assert budget.credit == pytest.approx(-0.15)
    assert budget.cost_per_byte == pytest.approx(0.25 / 1000)
    now[0] = 1.0  # +0.1 s of credit: still overdrawn
    assert budget.admit(1000) is None
    now[0] = 2.0  # paid back
    assert budget.admit(400) == pytest.approx(0.1)
    assert budget.credit == pytest.approx(0.05 - 0.1)
    now[0] = 1000.0  # a long idle time refills no more than one second's worth
    budget.admit(0)
    assert budget.credit == pytest.approx(0.1)


def _loaded(repository: Repository, observability: Observability, version: int = 1) -> ModelVersion:
    """Version `version` of the repository's model loaded with `observability`'s drift, and swapped in."""
    path = repository.root / "frozen" / str(version) / "model.onnx"
    options = LoadOptions([CPU], 1, observability=observability)
    entry = ModelVersion(
        "frozen", version, path, ModelState.READY, model=load_model("frozen", version, path, None, options)
    )
    observability.swapped([], [entry])
    return entry


def _watch(entry: ModelVersion) -> DriftWatch:
    assert entry.model is not None
    assert entry.model.drift is not None
    return entry.model.drift


def _serve_one_by_one(
    observability: Observability, entry: ModelVersion, runs: list[NDArray[Any]]
) -> list[str]:
    """Serve each run and flush; the outcome of each, read from the coverage counts it moved."""
    outcomes = []
    for x in runs:
        before = observability.drift_stats(entry)["coverage"]
        observability.sample(_watch(entry), x)
        observability.flush()
        after = observability.drift_stats(entry)["coverage"]
        (moved,) = [o for o in after if after[o]["requests"] != before[o]["requests"]]
        assert after[moved]["samples"] - before[moved]["samples"] == len(x)
        outcomes.append(moved)
    return outcomes


def test_over_budget_whole_requests_are_skipped_and_counted(repository: Repository) -> None:
    # A millionth of a core: the first request is admitted on the initial credit, its cost overdraws the
    # budget for far longer than this test, so every later one is skipped whole.
    observability = Observability(max_cpu_fraction=1e-6)
    entry = _loaded(repository, observability)
    rng = np.random.default_rng(8)
    runs = [served_inputs(repository.params[1], rng, n, shift_std=0.5) for n in (5, 3, 9, 1)]
    assert _serve_one_by_one(observability, entry, runs) == ["covered", "skipped", "skipped", "skipped"]

    stats = observability.drift_stats(entry)
    assert stats["coverage"]["covered"] == {"requests": 1, "samples": 5}
    assert stats["coverage"]["skipped"] == {"requests": 3, "samples": 13}
    assert stats["max_cpu_fraction"] == 1e-6
    drift, want = stats["drift"], expected_drift(runs[0], repository.params[1])
    assert drift["samples"] == 5
    np.testing.assert_allclose(drift["channels"]["live_mean"], want["mean"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(drift["channels"]["live_var"], want["var"], rtol=1e-10, atol=1e-12)


def test_the_figures_are_exact_over_the_covered_requests_whichever_the_budget_covers(
    repository: Repository,
) -> None:
    # Two thousandths of a core covers some of these requests and skips others, depending on the machine:
    # whichever they are, the figures are those of exactly the covered ones.
    observability = Observability(max_cpu_fraction=2e-3)
    entry = _loaded(repository, observability)
    rng = np.random.default_rng(9)
    params = repository.params[1]
    runs = [served_inputs(params, rng, int(n), shift_std=0.3) for n in rng.integers(1, 200, size=40)]
    outcomes = _serve_one_by_one(observability, entry, runs)
    covered = [x for x, outcome in zip(runs, outcomes, strict=True) if outcome == "covered"]
    assert set(outcomes) <= {"covered", "skipped"}
    assert covered

    stats = observability.drift_stats(entry)
    assert stats["coverage"]["covered"]["requests"] == len(covered)
    assert stats["coverage"]["skipped"]["requests"] == len(runs) - len(covered)
    drift, want = stats["drift"], expected_drift(np.concatenate(covered), params)
    assert drift["samples"] == sum(len(x) for x in covered)
    np.testing.assert_allclose(drift["channels"]["live_mean"], want["mean"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(drift["channels"]["live_var"], want["var"], rtol=1e-10, atol=1e-12)
    assert drift["score"] == pytest.approx(want["score"], rel=1e-10)


def test_coverage_counters_repeat_the_stats_per_outcome(
    serve_in_process: Callable[..., InProcess], repository: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BN_SERVE_DRIFT_MAX_FRACTION", "1e-9")
    server = serve_in_process()
    try:
        x = served_inputs(repository.params[2], np.random.default_rng(10), 12, shift_std=0.0)
        for part in np.split(x, 4):
            post_in_batches(server, "/v2/models/frozen/infer", part, [3])
            # The stats route applies what is queued: the first request's cost is measured before the next.
            coverage = server.get("/v2/models/frozen/stats").json()["coverage"]
        samples = scrape(server.get)
    finally:
        server.close()
    assert coverage["covered"]["requests"] >= 1
    assert coverage["skipped"]["requests"] >= 1
    assert sum(c["samples"] for c in coverage.values()) == 12
    for outcome, counts in coverage.items():
        labels = {"model": "frozen", "version": "2", "outcome": outcome}
        found = values(samples, "bn_serve_drift_requests_total", **labels)
        assert found == ([counts["requests"]] if counts["requests"] else [])
        found = values(samples, "bn_serve_drift_request_samples_total", **labels)
        assert found == ([counts["samples"]] if counts["samples"] else [])


def test_one_flush_over_many_chunks_is_exact(repository: Repository) -> None:
    # 3,000 one-row requests (16 bytes each: several chunks of stacked inputs) and three requests over a
    # chunk (alone each), for two versions at once: the figures are those of every row, whatever the chunks.
    rng = np.random.default_rng(11)
    # The whole core: every request is covered; every input is queued, none summed where served.
    observability = Observability(max_cpu_fraction=1.0, inline_values=0)
    entries = {v: _loaded(repository, observability, v) for v in (1, 2)}
    served: dict[int, list[NDArray[Any]]] = {1: [], 2: []}
    sizes = [1] * 3000 + [4096, 1, 5000, 2048]
    for i, n in enumerate(sizes):
        version = 1 + i % 2
        x = served_inputs(repository.params[version], rng, n, shift_std=0.2)
        observability.sample(_watch(entries[version]), x)
        served[version].append(x)

    observability.flush()

    for version, entry in entries.items():
        stats = observability.drift_stats(entry)
        rows = np.concatenate(served[version])
        want = expected_drift(rows, repository.params[version])
        assert stats["coverage"]["covered"] == {"requests": len(served[version]), "samples": len(rows)}
        drift = stats["drift"]
        np.testing.assert_allclose(drift["channels"]["live_mean"], want["mean"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(drift["channels"]["live_var"], want["var"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shift_std", [0.2, 30.0])
def test_small_inputs_summed_where_served_give_the_float64_figures_of_every_row(
    repository: Repository, shift_std: float
) -> None:
    # Requests of 1-40 rows (at most 160 values: all summed where served, none queued) over three flushes,
    # near the frozen mean and 30 std away from it (past the cancellation bound: the running sums move
    # their shift to the inputs' mean after the first flush): the figures are those of every row.
    params = repository.params[1]
    observability = Observability(max_cpu_fraction=1.0, inline_values=CHANNELS * 40)
    entry = _loaded(repository, observability)
    rng = np.random.default_rng(12)
    served = []
    for _ in range(3):
        for n in rng.integers(1, 41, size=200):
            x = served_inputs(params, rng, int(n), shift_std=shift_std)
            observability.sample(_watch(entry), x)
            served.append(x)
        assert not observability._pending  # nothing was left to the worker
        observability.flush()

    stats = observability.drift_stats(entry)
    rows = np.concatenate(served)
    want = expected_drift(rows, params)
    assert stats["coverage"]["covered"] == {"requests": len(served), "samples": len(rows)}
    assert stats["coverage"]["skipped"] == {"requests": 0, "samples": 0}
    drift = stats["drift"]
    assert (drift["samples"], drift["values"]) == (len(rows), len(rows))
    np.testing.assert_allclose(drift["channels"]["live_mean"], want["mean"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(drift["channels"]["live_var"], want["var"], rtol=1e-10, atol=1e-12)
    assert drift["score"] == pytest.approx(want["score"], rel=1e-10)


def _samples_within(watch: DriftWatch, samples: int, seconds: float) -> bool:
    """Whether `watch`'s monitor holds `samples` samples within `seconds` (polling)."""
    deadline = time.monotonic() + seconds
    while watch.monitor.snapshot().samples != samples:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_the_worker_sums_queued_inputs_every_interval_and_updates_the_figures_every_update_interval(
    repository: Repository,
) -> None:
    # A large input (queued) is summed within the worker's interval, which keeps the queue short; its sums
    # and a small input's rows (copied where served) reach the monitor at the update interval, or at once
    # when the figures are read (flush).
    params = repository.params[1]
    rng = np.random.default_rng(21)
    small, large = served_inputs(params, rng, 1, 0.0), served_inputs(params, rng, 100, 0.0)
    inline = CHANNELS * 10  # inputs of up to 10 rows are copied where served
    rare = Observability(max_cpu_fraction=1.0, interval_s=0.01, rows_interval_s=3600, inline_values=inline)
    entry = _loaded(repository, rare)
    rare.start()
    try:
        rare.sample(_watch(entry), small)
        rare.sample(_watch(entry), large)
        deadline = time.monotonic() + 10.0
        while rare._pending:
            assert time.monotonic() < deadline, "the queued input was never summed"
            time.sleep(0.005)
        time.sleep(0.1)  # ten more intervals of the worker
        assert _watch(entry).monitor.snapshot().samples == 0
        rare.flush()
        assert _watch(entry).monitor.snapshot().samples == 101
    finally:
        rare.close()

    often = Observability(max_cpu_fraction=1.0, interval_s=0.01, rows_interval_s=0.02, inline_values=inline)
    entry = _loaded(repository, often)
    often.start()
    try:
        often.sample(_watch(entry), small)
        often.sample(_watch(entry), large)
        assert _samples_within(_watch(entry), 101, 10.0)
    finally:
        often.close()


def test_bringing_the_monitors_up_to_date_is_charged_to_the_cpu_budget(repository: Repository) -> None:
    params = repository.params[1]
    # Inputs past 10 rows are queued for the worker, not copied into blocks of rows where served.
    observability = Observability(max_cpu_fraction=0.05, rows_interval_s=3600, inline_values=CHANNELS * 10)
    entry = _loaded(repository, observability)
    observability.sample(_watch(entry), served_inputs(params, np.random.default_rng(5), 100, 0.0))
    observability._flush_locked(update=False)  # summed, as the worker does every interval
    assert not observability._pending
    assert _watch(entry).monitor.snapshot().samples == 0
    credit = observability._budget.credit
    observability.flush()  # the update: a merge, a snapshot and the gauges, and nothing left to sum
    assert _watch(entry).monitor.snapshot().samples == 100
    assert observability._budget.credit < credit


class SteppingCpuClock:
    """A CPU clock that advances `step_s` at every reading: each stretch of work the sampler times costs
    a known amount, so what the budget is charged can be compared with what the clock says was spent."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.now = 0.0

    def __call__(self) -> float:
        self.now += self.step_s
        return self.now


@pytest.mark.parametrize("queued", [0, 5], ids=["nothing-queued", "large-inputs-queued"])
def test_a_flush_is_charged_all_the_cpu_it_took(repository: Repository, queued: int) -> None:
    params = repository.params[1]
    clock = SteppingCpuClock(0.001)
    observability = Observability(max_cpu_fraction=0.05, inline_values=CHANNELS * 10, cpu_clock=clock)
    entry = _loaded(repository, observability)
    rng = np.random.default_rng(21)
    for _ in range(queued):  # 50 rows each: queued for the worker, each summed as one chunk
        observability.sample(_watch(entry), served_inputs(params, rng, 50, 0.0))
    budget = observability._budget
    credit, started = budget.credit, clock.now
    observability.flush()
    spent = clock.now - started - clock.step_s  # the flush's first reading opens its span
    assert spent > 0
    assert _watch(entry).monitor.snapshot().samples == 50 * queued
    # Charged at admission: nothing (the budget had learned no cost per byte yet); at the flush: its parts
    # (the sums, the update) and whatever else the flush took, so the whole of it.
    assert budget.credit == pytest.approx(credit - spent, abs=1e-12)


def test_small_inputs_holding_nan_are_counted_unusable_and_left_out(repository: Repository) -> None:
    params = repository.params[1]
    observability = Observability(max_cpu_fraction=1.0)
    entry = _loaded(repository, observability)
    rng = np.random.default_rng(13)
    good = served_inputs(params, rng, 150, shift_std=0.5)
    bad = served_inputs(params, rng, 3, shift_std=0.5)
    bad[1, 2] = np.nan
    observability.sample(_watch(entry), good[:100])
    observability.sample(_watch(entry), bad)
    observability.sample(_watch(entry), good[100:])
    observability.flush()

    stats = observability.drift_stats(entry)
    assert stats["coverage"]["covered"] == {"requests": 2, "samples": 150}
    assert stats["coverage"]["unusable"] == {"requests": 1, "samples": 3}
    drift, want = stats["drift"], expected_drift(good, params)
    assert (drift["samples"], drift["skipped_batches"]) == (150, 1)
    np.testing.assert_allclose(drift["channels"]["live_var"], want["var"], rtol=1e-10, atol=1e-12)


# Where a watch's input has its channels: (monitor axis, one sample's shape), as `shifted_sums` reads them.
LAYOUTS = [(1, (CHANNELS,)), (1, (CHANNELS, 3)), (2, (2, CHANNELS))]


@settings(max_examples=40, deadline=None)
@given(
    layout=st.sampled_from(LAYOUTS),
    runs=st.lists(st.tuples(st.integers(0, 30), st.integers(1, 3)), min_size=1, max_size=40),
    nan_at=st.sets(st.integers(0, 39), max_size=3),
    flush_at=st.sets(st.integers(0, 39), max_size=4),
    block_rows=st.integers(1, 50),
    seed=st.integers(0, 2**32 - 1),
)
def test_blocks_of_small_inputs_give_the_sums_of_each_input_alone(
    layout: tuple[int, tuple[int, ...]],
    runs: list[tuple[int, int]],
    nan_at: set[int],
    flush_at: set[int],
    block_rows: int,
    seed: int,
) -> None:
    # Runs of 0-30 samples (each of `requests` merged requests) fill blocks of 1-50 rows, so that runs
    # cross the blocks' ends, some hold a NaN, and the figures are read at random points between them: at
    # each read, the counts are exact and the sums are those of adding each usable input's own
    # `shifted_sums` about the frozen mean (the path before blocks), to float64 rounding.
    axis, sample_shape = layout
    rng = np.random.default_rng(seed)
    mean, var = rng.normal(0.0, 2.0, CHANNELS), rng.uniform(0.5, 3.0, CHANNELS)
    per_sample = int(np.prod(sample_shape))
    observability = Observability(
        max_cpu_fraction=1.0, inline_values=30 * per_sample, block_values=block_rows * per_sample
    )
    watch = DriftWatch(DriftMonitor(mean, var, EPS, axis=axis), "input", "m", "1")
    reference = ShiftedSums(mean, np.dtype(np.float32))
    per_channel = [1] * (len(sample_shape) + 1)
    per_channel[axis] = CHANNELS
    covered, unusable = [0, 0], [0, 0]
    for i, (samples, requests) in enumerate(runs):
        x = (rng.normal(size=(samples, *sample_shape)) + mean.reshape(per_channel)).astype(np.float32)
        if i in nan_at and x.size:
            x.reshape(-1)[rng.integers(x.size)] = np.nan
        observability.sample(watch, x, requests)
        n, s1, s2 = shifted_sums(x, axis, reference.shift)
        if np.isfinite(s2).all():
            reference.add(n, reference.shift, s1, s2)
            covered = [covered[0] + requests, covered[1] + samples]
        else:
            unusable = [unusable[0] + requests, unusable[1] + samples]
        if i in flush_at or i == len(runs) - 1:
            observability.flush()
            assert not observability._pending  # every input went through a block
            assert watch.coverage.requests["covered"] == covered[0]
            assert watch.coverage.samples["covered"] == covered[1]
            assert watch.coverage.requests["unusable"] == unusable[0]
            assert watch.coverage.samples["unusable"] == unusable[1]
            snapshot = watch.monitor.snapshot()
            assert snapshot.samples == covered[1]
            assert snapshot.skipped_batches == len([j for j in nan_at if j <= i and runs[j][0]])
            moments = ShiftedSums(mean, np.dtype(np.float32))
            moments.add(reference.n, reference.shift, reference.s1, reference.s2)
            want = moments.take()
            if want is None:
                assert snapshot.values == 0
                continue
            assert snapshot.values == want.count
            np.testing.assert_allclose(snapshot.live_mean, want.mean, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(snapshot.live_var, want.variance(), rtol=1e-10, atol=1e-12)


def test_sums_of_a_full_block_are_charged_to_the_budget_once(repository: Repository) -> None:
    # 64 one-row requests fill a 64-row block: the 65th sums it where it is served; until then nothing was
    # summed or charged, and no CPU clock was read on the requests' path.
    observability = Observability(max_cpu_fraction=1.0, inline_values=CHANNELS, block_values=64 * CHANNELS)
    entry = _loaded(repository, observability)
    watch = _watch(entry)
    rows = served_inputs(repository.params[1], np.random.default_rng(14), 65, shift_std=0.1)
    for row in rows[:64]:
        observability.sample(watch, row[None])
    (block,) = watch.blocks.values()
    assert (block.filled, block.data.shape) == (64, (64, CHANNELS))
    assert observability._budget.credit == observability._budget.capacity  # charged nothing yet
    observability.sample(watch, rows[64:])
    assert block.filled == 1
    assert watch.pending[:2] == [64, 64]
    assert observability._budget.credit < observability._budget.capacity
    observability.flush()
    stats = observability.drift_stats(entry)
    assert stats["coverage"]["covered"] == {"requests": 65, "samples": 65}
    want = expected_drift(rows, repository.params[1])
    np.testing.assert_allclose(stats["drift"]["channels"]["live_mean"], want["mean"], rtol=1e-12, atol=1e-12)


def test_inputs_of_many_layouts_share_one_block_per_dtype() -> None:
    # Small inputs of a model with dynamic spatial sizes (1x4xH, 40 sizes) and two dtypes: rows of C values
    # whatever the layout, so the memory held stays one block per dtype, not one per shape.
    observability = Observability(max_cpu_fraction=1.0)
    mean = np.zeros(CHANNELS)
    watch = DriftWatch(DriftMonitor(mean, np.ones(CHANNELS), EPS), "input", "m", "1")
    rng = np.random.default_rng(16)
    served = [rng.normal(size=(2, CHANNELS, h)).astype(dtype) for h in range(1, 41) for dtype in ("f4", "f8")]
    for x in served:
        observability.sample(watch, x)
    assert sorted(str(dtype) for dtype in watch.blocks) == ["float32", "float64"]
    observability.flush()
    snapshot = watch.monitor.snapshot()
    values = np.concatenate([np.moveaxis(x.astype(np.float64), 1, -1).reshape(-1, CHANNELS) for x in served])
    assert (snapshot.samples, snapshot.values) == (2 * len(served), len(values))
    np.testing.assert_allclose(snapshot.live_mean, values.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(snapshot.live_var, values.var(axis=0), rtol=1e-10, atol=1e-12)


def test_stats_and_metrics_read_right_after_a_request_count_it(
    fresh: InProcess, repository: Repository
) -> None:
    x = served_inputs(repository.params[2], np.random.default_rng(15), 6, shift_std=0.2)
    labels = {"model": "frozen", "version": "2", "outcome": "covered"}
    served = 0
    for i, n in enumerate((1, 2, 3), start=1):
        response = fresh.post("/v2/models/frozen/infer", json=infer_body(x[served : served + n]))
        assert response.status_code == 200
        served += n
        stats = fresh.get("/v2/models/frozen/stats").json()
        assert stats["coverage"]["covered"] == {"requests": i, "samples": served}
        assert stats["drift"]["samples"] == served
        samples = scrape(fresh.get)
        assert value(samples, "bn_serve_drift_requests_total", **labels) == i
        assert value(samples, "bn_serve_drift_request_samples_total", **labels) == served
        assert value(samples, "bn_serve_drift_samples", model="frozen", version="2") == served
    want = expected_drift(x, repository.params[2])
    np.testing.assert_allclose(stats["drift"]["channels"]["live_var"], want["var"], rtol=1e-10, atol=1e-12)


def _thread_nice(thread_id: int) -> int:
    """A thread's nice value as the kernel reports it (`/proc/self/task/<tid>/stat`, field 19)."""
    stat = Path(f"/proc/self/task/{thread_id}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[16])


def _worker_nice_within(observability: Observability, expected: int, timeout_s: float) -> bool:
    worker = observability._worker
    assert worker is not None
    assert worker.native_id is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _thread_nice(worker.native_id) == expected:
            return True
        time.sleep(0.01)
    return False


@pytest.mark.skipif(sys.platform != "linux", reason="nice is per thread on Linux only")
@pytest.mark.parametrize("increment", [0, 5, 19])
def test_the_worker_thread_alone_runs_at_the_lower_priority(increment: int) -> None:
    # The worker's sums and trims yield the core to requests: its own nice value rises by the increment
    # (capped at 19, as the kernel caps it), while the threads that serve keep the process's.
    process_nice = _thread_nice(threading.get_native_id())
    observability = Observability(worker_nice=increment, interval_s=0.01)
    observability.start()
    try:
        assert _worker_nice_within(observability, min(19, process_nice + increment), 5.0)
        assert _thread_nice(threading.get_native_id()) == process_nice
    finally:
        observability.close()


@pytest.mark.skipif(sys.platform != "linux", reason="nice is per thread on Linux only")
def test_the_servers_drift_worker_takes_the_configured_increment(
    serve_in_process: Callable[..., InProcess],
) -> None:
    process_nice = _thread_nice(threading.get_native_id())
    server = serve_in_process(drift_worker_nice=7)
    try:
        observability = server.app.state.observability
        assert observability.worker_nice == 7
        assert _worker_nice_within(observability, min(19, process_nice + 7), 5.0)
    finally:
        server.close()
