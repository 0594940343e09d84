"""`inspect_model`: what a graph holds: every BatchNormalization layer (node, input tensor, channels, ranges
of its statistics, eps, largest |gamma/sqrt(var + eps)|), frozen-bn's per-channel table (statistics, scale
and shift) when it has one layer or the folded form, and the metadata."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from onnx import numpy_helper

from bn_export.graph_statistics import BatchNormLayer, FrozenStatistics, batchnorm_layers, find_statistics
from bn_export.layer import folded_scale_shift
from bn_export.onnx_graph import GraphIndex
from bn_export.verify import load_model

_FUSING_OPERATORS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class LayerSummary:
    """One BatchNormalization layer: where it is and the ranges of what it holds (None where the statistics
    are not constants)."""

    node: str
    input: str
    channels: int
    mean_range: tuple[float, float] | None
    var_range: tuple[float, float] | None
    eps: float
    largest_scale: float | None
    problem: str | None = None

    @classmethod
    def of(cls, layer: BatchNormLayer) -> LayerSummary:
        if layer.problem is not None or not layer.mean.size:
            return cls(layer.node, layer.input, layer.channels, None, None, layer.eps, None, layer.problem)
        with np.errstate(all="ignore"):
            scale = np.abs(layer.scale())
        largest = float(np.nanmax(scale)) if not np.all(np.isnan(scale)) else float("nan")
        return cls(
            layer.node,
            layer.input,
            layer.channels,
            (float(np.min(layer.mean)), float(np.max(layer.mean))),
            (float(np.min(layer.var)), float(np.max(layer.var))),
            layer.eps,
            largest,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "input": self.input,
            "channels": self.channels,
            "mean_range": _floats(self.mean_range),
            "var_range": _floats(self.var_range),
            "min_var": None if self.var_range is None else _float(self.var_range[0]),
            "eps": _float(self.eps),
            "largest_abs_scale": _float(self.largest_scale),
            "problem": self.problem,
        }


def _float(value: float | None) -> float | str | None:
    if value is None or np.isnan(value):
        return None
    return float(value) if np.isfinite(value) else ("inf" if value > 0 else "-inf")


def _floats(pair: tuple[float, float] | None) -> list[float | str | None] | None:
    return None if pair is None else [_float(pair[0]), _float(pair[1])]


@dataclass(frozen=True)
class ModelSummary:
    """The per-channel table and the metadata of one model.

    `scale` = gamma/sqrt(var + eps) and `shift` = beta - mean*scale (C,): read from the folded form's
    initializers, computed in float64 from the BatchNormalization statistics otherwise. `statistics` is None
    when the graph holds none (then `problem` says why).
    """

    model: str
    opset: int
    producer: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    statistics: FrozenStatistics | None
    scale: NDArray[np.float64] | None
    shift: NDArray[np.float64] | None
    problem: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    layers: tuple[LayerSummary, ...] = ()
    fused_into: int = 0  # Conv/Gemm/MatMul nodes a graph without BatchNormalization may have folded it into

    def layers_note(self) -> str:
        """What a graph without BatchNormalization layers says about them."""
        if self.layers:
            return f"BatchNormalization layers: {len(self.layers)}"
        if self.fused_into:
            return (
                "no BatchNormalization layers: fused into other operators (the weights of its "
                f"{self.fused_into} Conv/Gemm/MatMul node(s)), or absent"
            )
        return "no BatchNormalization layers"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the header, every layer, frozen-bn's per-channel table when there is one."""
        stats = self.statistics
        channels = None
        if stats is not None and self.scale is not None and self.shift is not None:
            channels = {
                "source": stats.source,
                "axis": stats.axis,
                "eps": stats.eps,
                **{
                    name: [_float(float(v)) for v in values]
                    for name, values in (
                        ("mean", stats.mean),
                        ("var", stats.var),
                        ("gamma", stats.gamma),
                        ("beta", stats.beta),
                        ("scale", self.scale),
                        ("shift", self.shift),
                    )
                },
            }
        return {
            "model": self.model,
            "opset": self.opset,
            "producer": self.producer,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "layers": [layer.to_dict() for layer in self.layers],
            "layers_note": self.layers_note(),
            "channels": channels,
            "metadata": dict(self.metadata),
        }

    def render(self) -> str:
        """Header lines, a channel table, then the metadata (long values shortened)."""
        lines = [
            self.model,
            f"  producer {self.producer}, opset {self.opset}",
            f"  inputs  {', '.join(self.inputs)}",
            f"  outputs {', '.join(self.outputs)}",
        ]
        lines.append(f"  {self.layers_note()}")
        if self.layers:
            header = ("node", "input", "channels", "mean range", "var range", "eps", "max|scale|")
            rows = [header]
            for layer in self.layers:
                if layer.mean_range is None or layer.var_range is None or layer.largest_scale is None:
                    rows.append(
                        (layer.node, layer.input, str(layer.channels), "-", "-", "-", str(layer.problem))
                    )
                    continue
                rows.append(
                    (
                        layer.node,
                        layer.input,
                        str(layer.channels),
                        f"{layer.mean_range[0]:.4g} .. {layer.mean_range[1]:.4g}",
                        f"{layer.var_range[0]:.4g} .. {layer.var_range[1]:.4g}",
                        f"{layer.eps:.3g}",
                        f"{layer.largest_scale:.4g}",
                    )
                )
            widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
            for row in rows:
                cells = (f"{cell:<{width}}" for cell, width in zip(row, widths, strict=True))
                lines.append(("    " + "  ".join(cells)).rstrip())
        stats = self.statistics
        if stats is None or self.scale is None or self.shift is None:
            if not self.layers:
                lines.append(f"  no frozen statistics: {self.problem}")
        else:
            lines.append(f"  statistics from {stats.source}; eps {stats.eps:.6g}; channel axis {stats.axis}")
            header = ("channel", "mean", "var", "gamma", "beta", "scale", "shift")
            lines.append("  " + "".join(f"{h:>13}" for h in header))
            columns = (stats.mean, stats.var, stats.gamma, stats.beta, self.scale, self.shift)
            for c in range(stats.mean.size):
                lines.append("  " + f"{c:>13}" + "".join(f"{float(col[c]):>13.6g}" for col in columns))
        if self.metadata:
            lines.append("  metadata:")
            width = max(len(key) for key in self.metadata)
            for key, value in sorted(self.metadata.items()):
                shown = value if len(value) <= 80 else f"{value[:77]}..."
                lines.append(f"    {key:<{width}}  {shown}")
        return "\n".join(lines)


def inspect_model(model: Any | str | os.PathLike[str]) -> ModelSummary:
    """Summarise an ONNX model (a `ModelProto` or a path); raises `ModelFileError` when it is not ONNX."""
    proto, name = load_model(model)
    graph = proto.graph
    layers = batchnorm_layers(GraphIndex(proto))
    fused_into = sum(node.op_type in _FUSING_OPERATORS for node in graph.node)
    initializers = {t.name: t for t in graph.initializer}
    found = find_statistics(proto)
    stats = None if isinstance(found, str) else found
    scale = shift = None
    if "scale" in initializers and "shift" in initializers:
        scale = numpy_helper.to_array(initializers["scale"]).astype(np.float64).reshape(-1)
        shift = numpy_helper.to_array(initializers["shift"]).astype(np.float64).reshape(-1)
    elif stats is not None:
        with np.errstate(all="ignore"):  # negative variances show up as NaN scales, which is the point
            scale, shift = folded_scale_shift(stats.gamma, stats.beta, stats.mean, stats.var, stats.eps)
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return ModelSummary(
        model=name,
        opset=int(opset),
        producer=f"{proto.producer_name} {proto.producer_version}".strip() or "unknown",
        inputs=tuple(v.name for v in graph.input if v.name not in initializers),
        outputs=tuple(v.name for v in graph.output),
        statistics=stats,
        scale=scale,
        shift=shift,
        problem=found if isinstance(found, str) else None,
        metadata={p.key: p.value for p in proto.metadata_props},
        layers=tuple(LayerSummary.of(layer) for layer in layers),
        fused_into=0 if layers else fused_into,
    )
