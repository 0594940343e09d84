"""`inspect_model`: what a frozen graph holds, per channel (statistics, scale and shift) and its metadata."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from onnx import numpy_helper

from bn_export.layer import folded_scale_shift
from bn_export.verify import FrozenStatistics, find_statistics, load_model


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

    def render(self) -> str:
        """Header lines, a channel table, then the metadata (long values shortened)."""
        lines = [
            self.model,
            f"  producer {self.producer}, opset {self.opset}",
            f"  inputs  {', '.join(self.inputs)}",
            f"  outputs {', '.join(self.outputs)}",
        ]
        stats = self.statistics
        if stats is None or self.scale is None or self.shift is None:
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
    )
