"""Plots and a Markdown page of what `bn-export recalibrate` changed, from the recalibrated model alone.

`write_recalibration_report(model, out_dir)` reads the `recalibration_*` metadata the command wrote (the
per-layer summary of old against new statistics) and writes, under fixed names:

- `recalibration.png`: per layer, in graph order, the shift of the mean in units of the old standard
  deviation, `|new_mean - old_mean| / sqrt(old_var + eps)` (largest over channels and root mean square),
  and the variance ratio `(new_var + eps)/(old_var + eps)` (smallest to largest over channels, log scale,
  1 = unchanged);
- `report.md`: the recalibration's metadata, a table of the layers, and the plot.

Drawn with the Agg canvas as `bn_export.report` draws (matplotlib, the extra `plot`), without a date
stamp, so the same model gives the same bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import onnx

from bn_export.errors import InvalidInputError
from bn_export.recalibrate import METADATA_PREFIX
from bn_export.report import PAGE_NAME, ReportFiles, _matplotlib

RECALIBRATION_PLOT = "recalibration.png"
_LAYERS_KEY = METADATA_PREFIX + "layers"
_DPI = 100


def is_recalibrated(model: onnx.ModelProto) -> bool:
    """Whether `model` carries the per-layer summary `bn-export recalibrate` writes."""
    return any(prop.key == _LAYERS_KEY for prop in model.metadata_props)


def recalibration_layers(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """The per-layer summary stored in `model` (see `bn_export.recalibrate.LayerChange`)."""
    props = {prop.key: prop.value for prop in model.metadata_props}
    try:
        layers = json.loads(props[_LAYERS_KEY])
        keys = ("name", "mean_shift_max", "mean_shift_rms", "var_ratio_min", "var_ratio_max")
        if not isinstance(layers, list) or not layers or not all(all(k in x for k in keys) for x in layers):
            raise ValueError("expected a non-empty list of layer summaries")
    except (KeyError, ValueError, TypeError) as exc:
        raise InvalidInputError(f"the model holds no readable recalibration summary: {exc}") from exc
    return layers


def write_recalibration_report(
    model: onnx.ModelProto, out_dir: str | os.PathLike[str], name: str
) -> ReportFiles:
    """Draw the plot and write the page into `out_dir` (created if needed); returns the written files."""
    layers = recalibration_layers(model)
    figure_class, canvas_class = _matplotlib()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    positions = list(range(len(layers)))
    labels = [str(layer["name"]) for layer in layers]
    figure = figure_class(figsize=(max(6.0, 0.35 * len(layers) + 2.0), 6.0), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True)
    top.bar(
        positions, [x["mean_shift_max"] for x in layers], color="tab:orange", label="largest over channels"
    )
    top.plot(positions, [x["mean_shift_rms"] for x in layers], "ko", ms=4, label="root mean square")
    top.set_ylabel("|Δ mean| / old std")
    top.set_title(f"{name}: recalibration, per layer (graph order)")
    top.legend(loc="best", fontsize="small")
    top.grid(alpha=0.3)
    lows = [x["var_ratio_min"] for x in layers]
    highs = [x["var_ratio_max"] for x in layers]
    bottom.vlines(positions, lows, highs, lw=4, color="tab:blue", label="smallest to largest over channels")
    bottom.axhline(1.0, color="k", lw=0.8)
    bottom.set_yscale("log")
    bottom.set_ylabel("(new var + eps) / (old var + eps)")
    bottom.set_xticks(positions, labels, rotation=90, fontsize="small")
    bottom.legend(loc="best", fontsize="small")
    bottom.grid(alpha=0.3)
    canvas_class(figure)
    plot = out / RECALIBRATION_PLOT
    figure.savefig(plot, dpi=_DPI, metadata={"Software": None})
    page = out / PAGE_NAME
    page.write_text(_page(model, layers, name), encoding="utf-8")
    return ReportFiles(page=page, plots=(plot,))


def _page(model: onnx.ModelProto, layers: list[dict[str, Any]], name: str) -> str:
    props = {p.key: p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)}
    lines = [f"# Recalibration of {name}", "", "| key | value |", "| --- | --- |"]
    lines += [f"| {key} | `{value}` |" for key, value in sorted(props.items()) if key != _LAYERS_KEY]
    lines += [
        "",
        "| layer | mean shift max | mean shift rms | var ratio min | var ratio max |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| `{x['name']}` | {x['mean_shift_max']:.4g} | {x['mean_shift_rms']:.4g} | "
        f"{x['var_ratio_min']:.4g} | {x['var_ratio_max']:.4g} |"
        for x in layers
    ]
    lines += ["", f"![recalibration]({RECALIBRATION_PLOT})", ""]
    return "\n".join(lines)
