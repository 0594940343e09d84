"""Drift at every BatchNormalization layer of a served network (service.layer_drift, Observability's layer
path): the live statistics of each layer's input equal those onnx's reference evaluator computes for the
same samples, and the alert names the layer and the channel whose frozen statistics the traffic left."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from onnx.reference import ReferenceEvaluator

from bn_export.graph_surgery import find_batchnorm_layers, with_statistics
from bn_export.providers import CPU
from bn_export.recalibrate import recalibrate
from service.model import LoadedModel, LoadOptions, load_model
from service.observability import Observability
from tests.fixtures.make_networks import NETWORKS, OUT, example_inputs

MLP = OUT / "mlp_bn1d.onnx"


def served(path: Path, observability: Observability, name: str = "mlp") -> LoadedModel:
    options = LoadOptions(providers=[CPU], intra_op_threads=1, observability=observability)
    return load_model(name, 1, path, None, options)


def layer_inputs(path: Path, x: NDArray[np.float32]) -> dict[str, NDArray[np.float64]]:
    """Every BN layer's input for `x`, from onnx's reference evaluator (float64 copies)."""
    model = onnx.load(path)
    evaluator = ReferenceEvaluator(model)
    values: dict[str, Any] = evaluator.run(None, {"features": x}, intermediate=True)  # type: ignore[assignment]
    return {
        layer.name: np.asarray(values[layer.input], dtype=np.float64)
        for layer in find_batchnorm_layers(model)
    }


def test_each_layers_live_statistics_equal_the_reference_evaluators_over_served_samples() -> None:
    observability = Observability(max_cpu_fraction=1.0)
    model = served(MLP, observability)
    watch = model.layer_drift
    assert model.drift is None
    assert watch is not None
    rng = np.random.default_rng(7)
    requests = [
        rng.normal(0.3, 2.0, size=(int(rng.integers(1, 5)), 10)).astype(np.float32) for _ in range(60)
    ]
    for x in requests:
        observability.sample_layers(watch, {"features": x})
    observability.flush()
    expected = layer_inputs(MLP, np.concatenate(requests))
    snapshots, _ = watch.summary()
    assert [layer.layer for layer in watch.layers] == list(expected)
    for layer, snapshot in zip(watch.layers, snapshots, strict=True):
        reference = expected[layer.layer]
        assert snapshot.samples == sum(len(x) for x in requests)
        assert snapshot.live_mean is not None
        assert snapshot.live_var is not None
        np.testing.assert_allclose(snapshot.live_mean, reference.mean(axis=0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(snapshot.live_var, reference.var(axis=0), rtol=1e-4)
    body = observability._layer_stats(watch)
    assert body["coverage"]["covered"]["requests"] == len(requests)
    assert [entry["layer"] for entry in body["layers"]] == list(expected)
    first = body["layers"][0]
    np.testing.assert_array_equal(first["frozen_mean"], watch.layers[0].monitor.moving_mean)
    assert first["channel_axis"] == 1


@pytest.mark.parametrize("name", ["resnet_bn", "two_inputs", "norms", "channels_last"])
def test_every_fixture_networks_layers_are_watched_as_the_reference_evaluator_sees_them(name: str) -> None:
    """Convolutional layers (N, C, H, W), several inputs (one of them integer), a BatchNorm after other
    norms, a channels-last input transposed before its layer: each layer's live statistics over the served
    samples equal the reference evaluator's, per channel over axis 1 and every spatial position."""
    path = OUT / f"{name}.onnx"
    observability = Observability(max_cpu_fraction=1.0)
    watch = served(path, observability, name=name).layer_drift
    assert watch is not None
    runs = [example_inputs(NETWORKS[name], rows, seed=seed) for seed, rows in enumerate([1, 3, 2, 1, 4])]
    for feeds in runs:
        observability.sample_layers(watch, feeds)
    observability.flush()
    everything = {key: np.concatenate([feeds[key] for feeds in runs]) for key in runs[0]}
    model = onnx.load(path)
    values: dict[str, Any] = ReferenceEvaluator(model).run(None, everything, intermediate=True)  # type: ignore[assignment]
    snapshots, _ = watch.summary()
    assert [layer.layer for layer in watch.layers] == [layer.name for layer in find_batchnorm_layers(model)]
    for layer, snapshot in zip(watch.layers, snapshots, strict=True):
        reference = np.moveaxis(np.asarray(values[layer.input], dtype=np.float64), 1, -1)
        reference = reference.reshape(-1, reference.shape[-1])
        assert snapshot.samples == 11
        assert snapshot.values == reference.shape[0]
        assert snapshot.live_mean is not None
        assert snapshot.live_var is not None
        np.testing.assert_allclose(snapshot.live_mean, reference.mean(axis=0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(snapshot.live_var, reference.var(axis=0), rtol=1e-4, atol=1e-7)


def calibrated(tmp_path: Path, data: NDArray[np.float32]) -> onnx.ModelProto:
    """The fixture MLP with every layer's statistics those of `data` (exact recalibration)."""
    np.save(tmp_path / "base.npy", data)
    return recalibrate(MLP, tmp_path / "base.npy", verify=False).model


def test_the_alert_names_the_layer_and_channel_whose_frozen_statistics_the_traffic_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(3)
    traffic = rng.normal(size=(4000, 10)).astype(np.float32)
    model = calibrated(tmp_path, traffic[:2000])
    layers = find_batchnorm_layers(model)
    last = layers[-1]
    # The last layer's frozen mean of channel 3 moved by 2 standard deviations: the traffic now sits
    # 2 std away from it there, and nowhere else.
    moved = last.mean.copy()
    moved[3] += 2.0 * np.sqrt(last.var[3] + last.eps)
    path = tmp_path / "moved.onnx"
    onnx.save(with_statistics(model, [last], {last.name: (moved, last.var)}), path)
    observability = Observability(max_cpu_fraction=1.0)
    watch = served(path, observability).layer_drift
    assert watch is not None
    with caplog.at_level(logging.WARNING, logger="bn_serve"):
        for start in range(2000, 4000, 8):
            observability.sample_layers(watch, {"features": traffic[start : start + 8]})
        observability.flush()
    snapshots, summary = watch.summary()
    assert summary.alerting
    assert summary.worst_layer == last.name
    assert summary.worst_channel == 3
    alerting = {layer.layer for layer, s in zip(watch.layers, snapshots, strict=True) if s.alerting}
    assert alerting == {last.name}
    assert snapshots[0].score is not None
    assert snapshots[0].score < 0.05
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"layer {last.name!r} channel 3" in warnings[0]
    metrics = observability.render()[0].decode()
    assert f'bn_serve_layer_drift_alerting{{layer="{last.name}",model="mlp",version="1"}} 1.0' in metrics
    assert f'bn_serve_layer_drift_alerting{{layer="{layers[0].name}",model="mlp",version="1"}} 0.0' in metrics


def test_over_its_cpu_budget_the_probe_skips_whole_requests_and_counts_them() -> None:
    observability = Observability(max_cpu_fraction=1e-6)
    watch = served(MLP, observability).layer_drift
    assert watch is not None
    x = np.ones((2, 10), dtype=np.float32)
    observability.sample_layers(watch, {"features": x})  # the first is admitted on the initial credit
    observability.flush()
    for _ in range(20):
        observability.sample_layers(watch, {"features": x})
    observability.flush()
    coverage = observability._layer_stats(watch)["coverage"]
    assert coverage["covered"]["requests"] >= 1
    assert coverage["skipped"]["requests"] >= 19
    assert coverage["covered"]["requests"] + coverage["skipped"]["requests"] == 21
    assert watch.summary()[0][0].samples == 2 * coverage["covered"]["requests"]


def test_single_layer_frozen_bn_graphs_keep_their_input_watch(tmp_path: Path) -> None:
    from tests.service.conftest import frozen_model, frozen_params

    path = tmp_path / "frozen.onnx"
    onnx.save(frozen_model(frozen_params(0)), path)
    model = served(path, Observability(), name="frozen")
    assert model.drift is not None
    assert model.layer_drift is None


def test_with_drift_off_no_probe_is_built_and_the_reason_says_so() -> None:
    model = served(MLP, Observability(drift=False))
    assert model.layer_drift is None
    assert model.drift is None
    assert model.drift_reason is not None
    assert "BN_SERVE_DRIFT=false" in model.drift_reason


def test_a_network_without_batchnorm_layers_is_not_watched_and_says_why() -> None:
    model = served(OUT / "resnet_fused.onnx", Observability(), name="fused")
    assert model.layer_drift is None
    assert model.drift is None
    assert model.drift_reason is not None
    assert "no BatchNormalization node" in model.drift_reason
