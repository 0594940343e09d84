"""Plots and a Markdown page of a fitted layer's frozen statistics, from a checkpoint or an ONNX model.

`write_report(load_report_source(path), out_dir)` writes, under fixed names:

- `channels.png`: per channel c, the frozen `moving_mean[c]` ± `sqrt(moving_var[c])`;
- `affine.png`: `gamma[c]` and `beta[c]`, against the identity (1 and 0) they start from;
- `trajectory.png` (checkpoints that recorded it): the moving statistics after each recorded step of the fit,
  per channel, as their gap to the final frozen statistics (the population's, for `--stats population`):
  the standardized mean gap `(mean_t - mean_final)/sqrt(var_final + eps)` and the log variance ratio
  `log((var_t + eps)/(var_final + eps))`, with the largest |gap| over channels in bold. That is how far
  an EMA left by training would be from what the data says, and how fast it got there;
- `report.md`: a metadata table and the plots above.

matplotlib is the optional extra `plot`. The figures are drawn with the Agg canvas directly, never
pyplot, so no global backend or figure state is touched, and saved without a software/date stamp so the
same input gives the same bytes.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from numpy.typing import NDArray

from bn_export.checkpoint import Checkpoint, Trajectory, load_checkpoint
from bn_export.errors import InvalidInputError, MissingDependencyError, ModelFileError
from bn_export.graph_statistics import find_statistics

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PAGE_NAME = "report.md"
CHANNELS_PLOT = "channels.png"
AFFINE_PLOT = "affine.png"
TRAJECTORY_PLOT = "trajectory.png"

_PARAMETERS = ("gamma", "beta", "moving_mean", "moving_var")
_DPI = 100
_WIDTH_INCHES = 9.0
# Per-channel error bars stay readable up to about this many channels; beyond, a shaded band.
_MAX_ERRORBAR_CHANNELS = 128
_MAX_TABLE_VALUE = 100


@dataclass(frozen=True)
class ReportSource:
    """What a report shows: the frozen parameters, all (C,) float64, plus metadata rows for its table.

    `trajectory` is the moving statistics recorded during the fit (checkpoints only), `stats_kind` the kind
    of the frozen statistics ("ema", "population") when known.
    """

    name: str
    kind: str
    gamma: NDArray[np.float64]
    beta: NDArray[np.float64]
    moving_mean: NDArray[np.float64]
    moving_var: NDArray[np.float64]
    eps: float
    stats_kind: str | None = None
    trajectory: Trajectory | None = None
    metadata: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def num_channels(self) -> int:
        return int(self.gamma.shape[0])


@dataclass(frozen=True)
class ReportFiles:
    """The files one report wrote: the Markdown page and its PNG plots, in page order."""

    page: Path
    plots: tuple[Path, ...]


def load_report_source(path: str | os.PathLike[str]) -> ReportSource:
    """Read a checkpoint (`.npz`, recognised by its zip header) or an ONNX model as a `ReportSource`."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such file (expected a checkpoint .npz or an ONNX model)")
    if zipfile.is_zipfile(path):
        return source_from_checkpoint(load_checkpoint(path), path.name)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError, ... depending on the damage
        raise ModelFileError(f"{path}: neither a checkpoint (.npz) nor an ONNX model: {exc}") from exc
    return source_from_model(model, path.name)


def source_from_checkpoint(checkpoint: Checkpoint, name: str = "checkpoint") -> ReportSource:
    """The report's view of a checkpoint: its parameters, trajectory and metadata."""
    rows: list[tuple[str, str]] = [
        ("source", f"{name} (checkpoint)"),
        ("channels", str(checkpoint.num_channels)),
        ("sample shape", str(tuple(checkpoint.sample_shape))),
        ("channel axis", str(checkpoint.axis)),
        ("statistics", checkpoint.stats),
        ("eps", repr(checkpoint.eps)),
        ("momentum", "cumulative average" if checkpoint.momentum is None else repr(checkpoint.momentum)),
        ("unbiased moving var", str(checkpoint.unbiased_moving_var).lower()),
        ("samples seen", str(checkpoint.samples_seen)),
        ("batches seen", str(checkpoint.batches_seen)),
        ("dtype", str(checkpoint.gamma.dtype)),
        ("head", "none" if checkpoint.head is None else _describe_head(checkpoint)),
        ("data fingerprint", checkpoint.data_fingerprint),
        ("created", checkpoint.created),
        ("version", checkpoint.version),
    ]
    rows += [(f"fit: {key}", _format_value(value)) for key, value in sorted(checkpoint.extras.items())]
    params = {n: np.asarray(getattr(checkpoint, n), dtype=np.float64) for n in _PARAMETERS}
    return ReportSource(
        name=name,
        kind="checkpoint",
        **params,
        eps=float(checkpoint.eps),
        stats_kind=checkpoint.stats,
        trajectory=checkpoint.trajectory,
        metadata=tuple(rows),
    )


def source_from_model(model: onnx.ModelProto, name: str = "model") -> ReportSource:
    """The report's view of an exported model, its statistics read as `bn-export verify` reads them.

    A `batchnorm` graph holds them as the constant inputs of its one BatchNormalization node; a `folded`
    graph holds only `scale` and `shift`, so they come from its `statistics` metadata (exact JSON).
    """
    props = {p.key: p.value for p in model.metadata_props}
    stats = find_statistics(model)
    if isinstance(stats, str):
        raise ModelFileError(f"{name}: not a frozen-bn model: {stats}")
    # The epsilon attribute is a float32; the metadata, when there, keeps the exact value.
    eps = float(props.get("eps", stats.eps))
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
    rows: list[tuple[str, str]] = [
        ("source", f"{name} (ONNX model)"),
        ("channels", str(stats.gamma.shape[0])),
        ("channel axis", str(stats.axis)),
        ("statistics read from", stats.source),
        ("producer", f"{model.producer_name} {model.producer_version}".strip()),
        ("IR version", str(model.ir_version)),
        ("opset", opsets),
        ("inputs", "; ".join(_describe_value(v) for v in model.graph.input)),
        ("outputs", "; ".join(_describe_value(v) for v in model.graph.output)),
    ]
    # `statistics` is the parameter arrays themselves, plotted rather than tabulated.
    rows += [(key, value) for key, value in sorted(props.items()) if key != "statistics"]
    return ReportSource(
        name=name,
        kind="onnx",
        gamma=stats.gamma,
        beta=stats.beta,
        moving_mean=stats.mean,
        moving_var=stats.var,
        eps=eps,
        stats_kind=props.get("statistics_kind"),
        metadata=tuple(rows),
    )


def write_report(source: ReportSource, out_dir: str | os.PathLike[str]) -> ReportFiles:
    """Draw the plots and write the page into `out_dir` (created if needed); returns the written files."""
    figure_class, canvas_class = _matplotlib()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = [
        (CHANNELS_PLOT, _plot_channels(source, figure_class)),
        (AFFINE_PLOT, _plot_affine(source, figure_class)),
    ]
    if source.trajectory is not None and source.trajectory.samples.size:
        figures.append((TRAJECTORY_PLOT, _plot_trajectory(source, source.trajectory, figure_class)))
    plots = []
    for file_name, figure in figures:
        canvas_class(figure)
        path = out / file_name
        # No "Software" stamp: identical inputs give identical files.
        figure.savefig(path, dpi=_DPI, metadata={"Software": None})
        plots.append(path)
    page = out / PAGE_NAME
    page.write_text(_page(source, [p.name for p in plots]), encoding="utf-8")
    return ReportFiles(page=page, plots=tuple(plots))


def trajectory_gaps(
    source: ReportSource, trajectory: Trajectory
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per recorded step t and channel c, (T, C): the standardized mean gap and the log variance ratio.

    `(mean_t - mean_final)/sqrt(var_final + eps)` and `log((var_t + eps)/(var_final + eps))`.
    """
    scale = source.moving_var + source.eps
    mean = np.asarray(trajectory.mean, dtype=np.float64)
    var = np.asarray(trajectory.var, dtype=np.float64)
    return (mean - source.moving_mean) / np.sqrt(scale), np.log((var + source.eps) / scale)


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingDependencyError(
            "the report needs matplotlib, the optional extra 'plot': pip install 'frozen-bn[plot]'"
        ) from exc
    return Figure, FigureCanvasAgg


def _describe_head(checkpoint: Checkpoint) -> str:
    head = checkpoint.head
    return "none" if head is None else f"linear, {head.weight.shape[1]} outputs, {head.loss} loss"


def _describe_value(value: onnx.ValueInfoProto) -> str:
    tensor = value.type.tensor_type
    dims = [d.dim_param or str(d.dim_value) for d in tensor.shape.dim]
    return f"{value.name}: {onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)} ({', '.join(dims)})"


def _format_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _cell(text: str) -> str:
    """A Markdown table cell: pipes escaped, newlines flattened, very long values cut."""
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= _MAX_TABLE_VALUE else flat[: _MAX_TABLE_VALUE - 1] + "…"


def _page(source: ReportSource, plots: Sequence[str]) -> str:
    stats = f"frozen {source.stats_kind} statistics" if source.stats_kind else "frozen statistics"
    lines = [
        f"# Statistics report: {source.name}",
        "",
        f"BatchNorm with {source.num_channels} channels and {stats}; "
        "inference computes `gamma*(x - moving_mean)/sqrt(moving_var + eps) + beta` per channel.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {_cell(key)} | {_cell(value)} |" for key, value in source.metadata),
        "",
        "## Per-channel statistics",
        "",
        f"![moving mean ± one standard deviation per channel]({CHANNELS_PLOT})",
        "",
        "## Scale and shift",
        "",
        f"![gamma and beta per channel]({AFFINE_PLOT})",
        "",
        "## Moving statistics over the fit",
        "",
    ]
    if TRAJECTORY_PLOT in plots and source.trajectory is not None:
        mean_gap, log_ratio = trajectory_gaps(source, source.trajectory)
        moving = "the EMA" if source.stats_kind == "population" else "the moving statistics"
        worst_mean, worst_var = np.abs(mean_gap[-1]), np.abs(log_ratio[-1])
        lines += [
            f"![{moving} during the fit against the {stats}]({TRAJECTORY_PLOT})",
            "",
            f"{source.trajectory.samples.size} records over {int(source.trajectory.samples[-1])} samples. "
            f"At the last record, the largest gaps between {moving} and the {stats} are "
            f"{worst_mean.max():.3g} standard deviations in mean (channel {int(worst_mean.argmax())}) and "
            f"{worst_var.max():.3g} in |log variance ratio| (channel {int(worst_var.argmax())}).",
        ]
    elif source.kind == "onnx":
        lines.append("An ONNX model does not carry the fit's trajectory; report on the checkpoint to see it.")
    else:
        lines.append("This checkpoint recorded no trajectory of its moving statistics.")
    return "\n".join(lines) + "\n"


def _new_figure(figure_class: Any, rows: int) -> tuple[Figure, list[Axes]]:
    figure = figure_class(figsize=(_WIDTH_INCHES, 2.6 * rows + 0.6), layout="constrained")
    axes = figure.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    return figure, list(axes)


def _plot_channels(source: ReportSource, figure_class: Any) -> Figure:
    figure, (ax,) = _new_figure(figure_class, 1)
    channels = np.arange(source.num_channels)
    std = np.sqrt(source.moving_var)
    if source.num_channels <= _MAX_ERRORBAR_CHANNELS:
        ax.errorbar(
            channels, source.moving_mean, yerr=std, fmt="o", ms=3, capsize=2, lw=1, label="mean ± std"
        )
    else:
        ax.plot(channels, source.moving_mean, lw=1, label="mean")
        ax.fill_between(
            channels, source.moving_mean - std, source.moving_mean + std, alpha=0.3, label="± std"
        )
    kind = f"{source.stats_kind} " if source.stats_kind else ""
    ax.set_title(f"{source.name}: frozen {kind}statistics per channel")
    ax.set_xlabel("channel")
    ax.set_ylabel("moving mean ± sqrt(moving var)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return figure


def _plot_affine(source: ReportSource, figure_class: Any) -> Figure:
    figure, (top, bottom) = _new_figure(figure_class, 2)
    channels = np.arange(source.num_channels)
    for ax, values, name, identity in ((top, source.gamma, "gamma", 1.0), (bottom, source.beta, "beta", 0.0)):
        ax.axhline(identity, color="0.6", lw=1, ls="--")
        ax.plot(channels, values, "o-", ms=3, lw=1)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    top.set_title(f"{source.name}: scale (gamma) and shift (beta) per channel; dashed: identity")
    bottom.set_xlabel("channel")
    return figure


def _plot_trajectory(source: ReportSource, trajectory: Trajectory, figure_class: Any) -> Figure:
    figure, (top, bottom) = _new_figure(figure_class, 2)
    samples = np.asarray(trajectory.samples, dtype=np.float64)
    mean_gap, log_ratio = trajectory_gaps(source, trajectory)
    panels = (
        (top, mean_gap, "(mean_t - final mean) / final std"),
        (bottom, log_ratio, "log(var_t / final var)"),
    )
    for ax, gaps, label in panels:
        ax.plot(samples, gaps, color="tab:blue", lw=0.6, alpha=0.35)
        ax.plot(samples, np.abs(gaps).max(axis=1), color="black", lw=1.6, label="max |gap| over channels")
        ax.axhline(0.0, color="0.4", lw=1, ls="--")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize="small")
    final = f"final {source.stats_kind}" if source.stats_kind else "final"
    top.set_title(
        f"{source.name}: moving statistics during the fit against the {final} statistics (per channel)"
    )
    bottom.set_xlabel("samples seen")
    return figure
