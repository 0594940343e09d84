"""Drift at every BatchNormalization layer of a network: each layer's served input against its frozen
statistics.

A network's BN layers each normalize with statistics fixed at export; a shift of the served inputs reaches
every layer differently, and a shift inside the network (a sensor's gain, a new domain) may show at one
layer only. `LayerProbe` is a second onnxruntime session of the same graph cut down to what computes every
BN layer's input and exposing those inputs as outputs (`bn_export.graph_surgery.probe_model`); it is built
at load, with the model, and run by the drift worker on sampled requests' feeds, never on a request's own
path. Each layer has its own `DriftMonitor` on channel axis 1 (ONNX's BatchNormalization normalizes along
axis 1 of its input), so the figures per layer and per channel are those of the input drift
(`service.drift`), and the model's alert names the layer and the channel that moved most.

The probe runs on the model's providers (TF32 off on CUDA, as every session), with one intra-op thread,
on the worker's own thread, so that the CPU it takes is what the worker's `time.thread_time` measures and
charges to the drift budget. It holds its own copy of the weights up to the last BN layer: a network
watched at its layers takes up to twice its weights' memory.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray

from bn_export.moments import Moments
from bn_export.providers import exact_providers
from service.drift import DriftMonitor, DriftSnapshot

log = logging.getLogger("bn_serve")

# ONNX BatchNormalization normalizes along axis 1 of its input `X: (N, C, *spatial)`.
CHANNEL_AXIS = 1


@dataclass(frozen=True)
class LayerMonitor:
    """One BN layer: its node name, the tensor it normalizes, its monitor (which holds the frozen mean,
    variance and eps)."""

    layer: str
    input: str
    monitor: DriftMonitor


class LayerProbe:
    """The network cut down to its BN layers' inputs, on onnxruntime; `run(feeds)` returns them in layer
    order. Thread-safe (onnxruntime's `run` is)."""

    def __init__(self, model: onnx.ModelProto, tensors: Sequence[str], providers: Sequence[str]) -> None:
        from bn_export.graph_surgery import probe_model  # onnx's shape inference: only with models

        # One output per distinct tensor: layers reading the same tensor share it.
        self.tensors = list(dict.fromkeys(tensors))
        probe, self.outputs = probe_model(model, self.tensors)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._session = ort.InferenceSession(
            probe.SerializeToString(), sess_options=options, providers=exact_providers(providers)
        )
        self.input_names = [node.name for node in self._session.get_inputs()]
        # Requests can be stacked into one run only when every input takes any number of rows.
        self.stackable = all(
            node.shape and not (isinstance(node.shape[0], int) and node.shape[0] > 0)
            for node in self._session.get_inputs()
        )

    def run(self, feeds: Mapping[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        """The probed tensors (by name) for `feeds` (a served run's validated feeds)."""
        results = self._session.run(self.outputs, {name: feeds[name] for name in self.input_names})
        return {tensor: np.asarray(r) for tensor, r in zip(self.tensors, results, strict=True)}


@dataclass(frozen=True)
class LayerSummary:
    """The model-level reading of its layers: alerting while any layer is, and the layer (with its worst
    channel) whose score is highest."""

    alerting: bool
    worst_layer: str | None
    worst_channel: int | None
    score: float | None
    max_abs_mean_shift: float | None


def summarize(monitors: Sequence[LayerMonitor], snapshots: Sequence[DriftSnapshot]) -> LayerSummary:
    """The alert state of a model from its layers' snapshots (in the same order)."""
    scored = [(s.score, m, s) for m, s in zip(monitors, snapshots, strict=True) if s.score is not None]
    alerting = any(s.alerting for s in snapshots)
    if not scored:
        return LayerSummary(alerting, None, None, None, None)
    # While alerting, the worst among the alerting layers (whose windows hold enough samples).
    candidates = [entry for entry in scored if entry[2].alerting] if alerting else scored
    score, monitor, snapshot = max(candidates, key=lambda entry: entry[0] or 0.0)
    return LayerSummary(alerting, monitor.layer, snapshot.worst_channel, score, snapshot.max_abs_mean_shift)


def layer_monitors(
    model: onnx.ModelProto,
    name: str,
    version: str,
    *,
    threshold: float,
    window: int | None,
) -> list[LayerMonitor]:
    """One monitor per BN layer of `model` (raises `InvalidInputError` when it has none, or one that cannot
    be monitored: training mode, statistics computed at run time)."""
    from bn_export.graph_surgery import find_batchnorm_layers

    monitors = []
    for layer in find_batchnorm_layers(model):
        monitor = DriftMonitor(
            layer.mean,
            layer.var,
            layer.eps,
            axis=CHANNEL_AXIS,
            name=f"model {name!r} version {version} layer {layer.name!r}",
            threshold=threshold,
            window=window,
            log_events=False,
        )
        monitors.append(LayerMonitor(layer.name, layer.input, monitor))
    return monitors


def layer_moments(
    monitors: Sequence[LayerMonitor], probed: Mapping[str, NDArray[Any]]
) -> list[Moments | None]:
    """Each layer's moments of its probed input (None where it holds NaN/±Inf or has the wrong shape)."""
    result: list[Moments | None] = []
    for layer in monitors:
        try:
            result.append(layer.monitor.moments_of(probed[layer.input]))
        except Exception as exc:  # a dynamic channel axis of another size: that layer's sample is unusable
            log.debug("drift of %s: probed input skipped: %s", layer.monitor.name, exc)
            result.append(None)
    return result
