"""Recalibrate the BatchNormalization statistics inside an ONNX network on new data ("precise BN", AdaBN).

Two modes, both running the network with onnxruntime over DATA streamed in batches:

- `exact`: each layer gets the population mean and biased variance of its input over all of DATA,
  computed with every upstream layer already recalibrated. Layers are grouped by depth (a layer's group
  comes after the group of every layer it depends on, `graph_surgery.depth_groups`); each group costs one
  pass over DATA through a copy of the graph that holds the statistics found so far and exposes that
  group's inputs, summarised per channel by mergeable float64 `Moments`. A chain of L layers (an MLP, a
  plain CNN) takes L passes; parallel branches share a pass (a ResNet's shortcut BatchNorm shares one with
  the block's last). This is the statistics the network computes with at inference, exactly.
- `one-pass`: fvcore's `update_bn_stats` and PyTorch's train-mode forward with `momentum=None`: one pass in
  which every layer normalizes with its batch's statistics (biased variance, as PyTorch normalizes), and
  the new statistics are the plain average over batches of the batch means and of the *unbiased* batch
  variances `m2/(n - 1)` (each batch weighs the same whatever its size; PyTorch folds the unbiased
  variance into `running_var`, `torch.nn.functional.batch_norm`). Cheaper than `exact` (one pass) but
  downstream layers see batch-normalized inputs, so the result depends on the batch size.

Only the `mean` and `var` initializers of the layers recalibrated change, plus `metadata_props` (the
`recalibration_*` keys); gamma, beta, eps and every other byte of the file stay as they were. The result is
checked by `bn_export.verify.verify_model` before anything is written, and is the same bytes for the same
model, data and options.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray
from onnx import helper
from tqdm import tqdm

from bn_export import __version__
from bn_export.data import (
    PREFETCH_BYTES,
    Batch,
    Dataset,
    describe_nonfinite,
    open_dataset,
    prefetched,
)
from bn_export.distributed import _connect, is_zarr, open_zarr_dataset
from bn_export.errors import DataError, ExportError, InvalidInputError
from bn_export.files import write_atomically
from bn_export.fit import progress_bar
from bn_export.graph_surgery import (
    BatchNormLayer,
    batch_statistics_model,
    depth_groups,
    element_types,
    find_batchnorm_layers,
    probe_model,
    with_statistics,
)
from bn_export.moments import Moments, merge_all
from bn_export.onnx_graph import GraphIndex
from bn_export.verify import load_model, verify_model

Mode = Literal["exact", "one-pass"]
MODES: tuple[Mode, ...] = ("exact", "one-pass")
Engine = Literal["local", "dask"]
ENGINES: tuple[Engine, ...] = ("local", "dask")
#: Input bytes one Dask task reads (rounded to whole batches): long enough to pay for opening a session.
DASK_BLOCK_BYTES = 64 << 20
DEFAULT_BATCH_SIZE = 64
METADATA_PREFIX = "recalibration_"

F64 = NDArray[np.float64]


@dataclass(frozen=True)
class LayerChange:
    """What recalibration did to one layer.

    `mean_shift_*`: `|new_mean - old_mean| / sqrt(old_var + eps)` per channel (the shift in units of the
    standard deviation the layer normalized with), its largest value and root mean square;
    `var_ratio_*`: `(new_var + eps) / (old_var + eps)` per channel, smallest and largest.
    """

    name: str
    group: int
    channels: int
    values_per_channel: int
    mean_shift_max: float
    mean_shift_rms: float
    var_ratio_min: float
    var_ratio_max: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Recalibration:
    """A recalibrated network (`model`, not yet written) and how it was made."""

    model: onnx.ModelProto
    mode: Mode
    passes: int
    samples: int
    batch_size: int
    fingerprints: Mapping[str, str]
    layers: tuple[LayerChange, ...]
    statistics: Mapping[str, tuple[F64, F64]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "passes": self.passes,
            "samples": self.samples,
            "batch_size": self.batch_size,
            "data_fingerprints": dict(self.fingerprints),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def render(self) -> str:
        """A table, one line per layer."""
        width = max(len("layer"), *(len(layer.name) for layer in self.layers))
        lines = [f"{'layer':<{width}}  pass  channels  {'shift max':>9}  {'shift rms':>9}  {'var ratio':>19}"]
        for layer in self.layers:
            ratio = f"{layer.var_ratio_min:.3g}..{layer.var_ratio_max:.3g}"
            lines.append(
                f"{layer.name:<{width}}  {layer.group + 1:>4}  {layer.channels:>8}  "
                f"{layer.mean_shift_max:>9.3g}  {layer.mean_shift_rms:>9.3g}  {ratio:>19}"
            )
        lines.append(
            f"{len(self.layers)} layer(s) recalibrated ({self.mode}) on {self.samples} samples in "
            f"batches of {self.batch_size}: {self.passes} pass(es) over the data"
        )
        return "\n".join(lines)


class _Feeds:
    """The model's data inputs bound to datasets: checks them against the model and yields feed dicts."""

    def __init__(
        self, model: onnx.ModelProto, data: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]]
    ) -> None:
        inputs = GraphIndex(model).inputs
        specs: dict[str, str | os.PathLike[str]]
        if isinstance(data, Mapping):
            specs = dict(data)
        elif len(inputs) == 1:
            specs = {inputs[0].name: data}
        else:
            raise InvalidInputError(
                f"the network takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                "give one dataset per input as NAME=FILE"
            )
        names = [value.name for value in inputs]
        unknown = sorted(set(specs) - set(names))
        missing = [name for name in names if name not in specs]
        if unknown:
            raise InvalidInputError(
                f"the network has no input {unknown[0]!r}; its inputs are {', '.join(names)}"
            )
        if missing:
            raise InvalidInputError(
                f"no data for input {missing[0]!r}; give NAME=FILE for each of {', '.join(names)}"
            )
        self.specs = specs
        self.datasets: dict[str, Dataset] = {}
        self.dtypes: dict[str, np.dtype[Any]] = {}
        for value in inputs:
            spec = specs[value.name]
            dataset = open_zarr_dataset(os.fspath(spec)) if is_zarr(os.fspath(spec)) else open_dataset(spec)
            self.dtypes[value.name] = _check_fits(value, dataset)
            self.datasets[value.name] = dataset
        counts = {name: ds.num_samples for name, ds in self.datasets.items()}
        if len(set(counts.values())) != 1:
            listed = ", ".join(f"{name}: {count}" for name, count in counts.items())
            raise DataError(f"the inputs' datasets hold different numbers of samples ({listed}); one each")
        self.num_samples = next(iter(counts.values()))

    def fingerprints(self) -> dict[str, str]:
        return {name: dataset.fingerprint() for name, dataset in self.datasets.items()}

    def batches(
        self, batch_size: int, start: int = 0, stop: int | None = None
    ) -> Iterator[dict[str, NDArray[Any]]]:
        """Feed dicts of `batch_size` samples of `start..stop` (the last may be smaller), each checked for
        NaN/Inf, read one batch ahead."""
        stop = self.num_samples if stop is None else stop
        streams = [
            # Small batches are read inline: handing one over between threads costs more than reading it.
            prefetched(ranges) if ds.sample_bytes * batch_size >= PREFETCH_BYTES else ranges
            for ds in self.datasets.values()
            for ranges in [_ranges(ds, batch_size, start, stop)]
        ]
        for batch in zip(*streams, strict=True):
            feeds = {}
            for (name, dataset), part in zip(self.datasets.items(), batch, strict=True):
                x = np.asarray(part.data)
                if x.dtype.kind == "f" and not np.isfinite(x).all():
                    raise DataError(describe_nonfinite(part, dataset.path))
                feeds[name] = np.ascontiguousarray(x, dtype=self.dtypes[name])
            yield feeds


def _ranges(dataset: Dataset, batch_size: int, start: int, stop: int) -> Iterator[Batch]:
    for number, lo in enumerate(range(start, stop, batch_size)):
        hi = min(lo + batch_size, stop)
        yield Batch(number, np.arange(lo, hi, dtype=np.int64), dataset.read(lo, hi))


def _check_fits(value: onnx.ValueInfoProto, dataset: Dataset) -> np.dtype[Any]:
    """The dtype to feed `value`; raises `DataError` naming what does not fit."""
    tensor = value.type.tensor_type
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    if not np.can_cast(dataset.dtype, dtype, casting="same_kind"):
        raise DataError(
            f"{dataset.path}: data of dtype {dataset.dtype} does not fit input {value.name!r}, "
            f"which takes {dtype}"
        )
    if tensor.HasField("shape"):
        dims: list[int | None] = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        expected = tuple("N" if d is None else d for d in ["N", *dims[1:]])
        if len(dims) != 1 + len(dataset.sample_shape) or any(
            d is not None and d != s for d, s in zip(dims[1:], dataset.sample_shape, strict=True)
        ):
            raise DataError(
                f"{dataset.path}: samples of shape {dataset.sample_shape} do not fit input {value.name!r}, "
                f"which takes {expected} (the batch axis first)"
            )
    return dtype


def _session(model: onnx.ModelProto, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def select_layers(layers: Sequence[BatchNormLayer], names: Sequence[str] | None) -> list[BatchNormLayer]:
    """The layers named (all when `names` is None); an unknown name raises naming the layers there are."""
    if names is None:
        return list(layers)
    known = {layer.name: layer for layer in layers}
    for name in names:
        if name not in known:
            listed = ", ".join(list(known)[:8]) + (", ..." if len(known) > 8 else "")
            raise InvalidInputError(f"no BatchNormalization layer named {name!r}; the network has {listed}")
    wanted = set(names)
    return [layer for layer in layers if layer.name in wanted]


def recalibrate(
    model: onnx.ModelProto | str | os.PathLike[str],
    data: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
    *,
    mode: Mode = "exact",
    batch_size: int = DEFAULT_BATCH_SIZE,
    layers: Sequence[str] | None = None,
    verify: bool = True,
    progress: bool = False,
    engine: Engine = "local",
    scheduler: str | None = None,
    client: Any = None,
    threads: int | None = None,
) -> Recalibration:
    """Recalibrate `model`'s BatchNormalization layers (all, or those named in `layers`) on `data`.

    data: one dataset path (`.npy`, `.npz`, `.csv`, a directory of `.npy` shards, a Zarr array) for a
    one-input network, or `{input name: path}`. With `verify`, the result must pass `verify_model` or
    `ExportError` is raised. `engine="dask"` (exact mode) runs each pass on a Dask cluster: `client` if
    given, else one at `scheduler` (`tcp://host:8786`), else a local one; the workers read DATA by path.
    `threads`: onnxruntime's intra-op threads here (default: one per physical core).
    """
    if mode not in MODES:
        raise InvalidInputError(f"unknown mode {mode!r}, expected one of {', '.join(MODES)}")
    if engine not in ENGINES:
        raise InvalidInputError(f"unknown engine {engine!r}, expected one of {', '.join(ENGINES)}")
    if engine == "dask" and mode != "exact":
        raise InvalidInputError("the dask engine runs exact mode's population passes; use --mode exact")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InvalidInputError(f"threads must be a positive integer or None, got {threads!r}")
    if engine == "local" and (scheduler is not None or client is not None):
        raise InvalidInputError("a scheduler or client is for the dask engine")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch size must be a positive integer, got {batch_size!r}")
    proto, _ = load_model(model)
    chosen = select_layers(find_batchnorm_layers(proto), layers)
    feeds = _Feeds(proto, data)
    if mode == "exact":
        with contextlib.ExitStack() as stack:
            population: _Engine = functools.partial(_local_population, threads=threads)
            if engine == "dask":
                population = _dask_population(stack.enter_context(_connect(scheduler, client)))
            statistics, counts, groups = _exact(proto, chosen, feeds, batch_size, progress, population)
    else:
        statistics, counts = _one_pass(proto, chosen, feeds, batch_size, progress, threads)
        groups = {layer.name: 0 for layer in chosen}
    changes = tuple(
        _change(layer, statistics[layer.name], groups[layer.name], counts[layer.name]) for layer in chosen
    )
    passes = 1 + max(groups.values())
    result = with_statistics(proto, chosen, statistics)
    fingerprints = feeds.fingerprints()
    _set_metadata(
        result,
        {
            "mode": mode,
            "version": __version__,
            "data_fingerprint": json.dumps(fingerprints, sort_keys=True),
            "samples": str(feeds.num_samples),
            "batch_size": str(batch_size),
            "passes": str(passes),
            "layers": json.dumps([change.to_dict() for change in changes]),
        },
    )
    if verify:
        report = verify_model(result)
        if not report.passed:
            failed = "; ".join(f"{c.name}: {c.detail}" for c in report.checks if not c.passed)
            raise ExportError(f"the recalibrated network fails verify, nothing written: {failed}")
    return Recalibration(
        result, mode, passes, feeds.num_samples, batch_size, fingerprints, changes, statistics
    )


def write_recalibrated(recalibration: Recalibration, path: str | os.PathLike[str]) -> Path:
    """Write the recalibrated network atomically (a reader never sees half a file)."""
    return write_atomically(Path(path), recalibration.model.SerializeToString(deterministic=True))


def _exact(
    proto: onnx.ModelProto,
    chosen: Sequence[BatchNormLayer],
    feeds: _Feeds,
    batch_size: int,
    progress: bool,
    engine: _Engine,
) -> tuple[dict[str, tuple[F64, F64]], dict[str, int], dict[str, int]]:
    statistics: dict[str, tuple[F64, F64]] = {}
    counts: dict[str, int] = {}
    groups: dict[str, int] = {}
    plan = depth_groups(chosen)
    types = element_types(proto)
    for number, group in enumerate(plan):
        current = with_statistics(proto, chosen, statistics)
        channels = {layer.input: layer.num_channels for layer in group}
        probe, outputs = probe_model(current, list(channels), types)
        with progress_bar(progress, feeds.num_samples, f"pass {number + 1}/{len(plan)}") as bar:
            totals = engine(probe, feeds, batch_size, outputs, list(channels.values()), bar)
        found = dict(zip(channels, totals, strict=True))
        for layer in group:
            moments = found[layer.input]
            statistics[layer.name] = (moments.mean, moments.variance())
            counts[layer.name] = moments.count
            groups[layer.name] = number
    return statistics, counts, groups


class _Engine(Protocol):
    """Runs `probe` over all of DATA and returns the `Moments` of each of its `outputs`."""

    def __call__(
        self,
        probe: onnx.ModelProto,
        feeds: _Feeds,
        batch_size: int,
        outputs: list[str],
        channels: list[int],
        bar: tqdm[Any],
    ) -> list[Moments]: ...


def _local_population(
    probe: onnx.ModelProto,
    feeds: _Feeds,
    batch_size: int,
    outputs: list[str],
    channels: list[int],
    bar: tqdm[Any],
    threads: int | None = None,
) -> list[Moments]:
    return _reduce(_session(probe, threads), feeds.batches(batch_size), outputs, channels, bar)


def _reduce(
    session: ort.InferenceSession,
    batches: Iterator[dict[str, NDArray[Any]]],
    outputs: list[str],
    channels: list[int],
    bar: tqdm[Any] | None = None,
) -> list[Moments]:
    """The float64 moments of each of `outputs` over `batches`, merged batch after batch."""
    totals = [Moments.empty(c) for c in channels]
    for feed in batches:
        values = session.run(outputs, feed)
        for position, (value, count) in enumerate(zip(values, channels, strict=True)):
            totals[position] = totals[position].merge(_moments(value, outputs[position], count))
        if bar is not None:
            bar.update(len(next(iter(feed.values()))))
    return totals


def reduce_block(
    probe: bytes,
    specs: Mapping[str, str],
    start: int,
    stop: int,
    batch_size: int,
    outputs: list[str],
    channels: list[int],
) -> list[Moments]:
    """Runs on a Dask worker: the moments of `outputs` of the graph `probe` over samples `start..stop`."""
    model = onnx.load_from_string(probe)
    feeds = _Feeds(model, specs)
    return _reduce(_session(model), feeds.batches(batch_size, start, stop), outputs, channels)


def _dask_population(dask_client: Any) -> _Engine:
    """The engine that cuts DATA into blocks of whole batches, one task each on the Dask cluster of
    `dask_client`, and merges the blocks' moments in block order."""

    def population(
        probe: onnx.ModelProto,
        feeds: _Feeds,
        batch_size: int,
        outputs: list[str],
        channels: list[int],
        bar: tqdm[Any],
    ) -> list[Moments]:
        from distributed import as_completed

        sample_bytes = sum(ds.sample_bytes for ds in feeds.datasets.values())
        block = max(1, DASK_BLOCK_BYTES // max(1, sample_bytes * batch_size)) * batch_size
        # Absolute paths: a worker's working directory is not the driver's.
        specs = {name: os.path.abspath(os.fspath(spec)) for name, spec in feeds.specs.items()}
        run = uuid.uuid4().hex[:12]
        model = dask_client.scatter(probe.SerializeToString(), broadcast=True)
        futures = [
            dask_client.submit(
                reduce_block,
                model,
                specs,
                lo,
                min(lo + block, feeds.num_samples),
                batch_size,
                outputs,
                channels,
                key=f"bn-recalibrate-{run}-{i}",
                retries=2,
                pure=False,
            )
            for i, lo in enumerate(range(0, feeds.num_samples, block))
        ]
        stops = {
            future.key: min(lo + block, feeds.num_samples) - lo
            for future, lo in zip(futures, range(0, feeds.num_samples, block), strict=True)
        }
        for done in as_completed(futures):  # type: ignore[no-untyped-call]
            bar.update(stops[done.key])
        parts: list[list[Moments]] = dask_client.gather(futures)
        return [merge_all(part[k] for part in parts) for k in range(len(outputs))]

    return population


def _moments(value: NDArray[Any], tensor: str, channels: int) -> Moments:
    if value.ndim < 2 or value.shape[1] != channels:
        raise InvalidInputError(
            f"input {tensor!r} of a BatchNormalization has shape {value.shape}, expected (N, {channels}, ...)"
        )
    return Moments.from_batch(value.reshape(value.shape[0], channels, -1), axis=1)


def _one_pass(
    proto: onnx.ModelProto,
    chosen: Sequence[BatchNormLayer],
    feeds: _Feeds,
    batch_size: int,
    progress: bool,
    threads: int | None,
) -> tuple[dict[str, tuple[F64, F64]], dict[str, int]]:
    model, exposed = batch_statistics_model(proto, chosen)
    session = _session(model, threads)
    names = [name for layer in chosen for name in exposed[layer.name]]
    mean_sums = {layer.name: np.zeros(layer.num_channels) for layer in chosen}
    var_sums = {layer.name: np.zeros(layer.num_channels) for layer in chosen}
    counts = {layer.name: 0 for layer in chosen}
    batches = 0
    with progress_bar(progress, feeds.num_samples, "one pass") as bar:
        for feed in feeds.batches(batch_size):
            values = iter(session.run(names, feed))
            for layer in chosen:
                mean, var, shape = next(values), next(values), next(values)
                n = int(shape[0]) * int(shape[2])
                if n < 2:
                    raise InvalidInputError(
                        f"batch {batches} gives layer {layer.name!r} {n} value per channel; the unbiased "
                        "variance of one-pass needs two (PyTorch's train mode refuses it too): pick a "
                        "batch size that leaves no batch of one sample, or use --mode exact"
                    )
                mean_sums[layer.name] += np.asarray(mean, dtype=np.float64).reshape(-1)
                var_sums[layer.name] += np.asarray(var, dtype=np.float64).reshape(-1) * (n / (n - 1))
                counts[layer.name] += n
            batches += 1
            bar.update(len(next(iter(feed.values()))))
    statistics = {name: (mean_sums[name] / batches, var_sums[name] / batches) for name in mean_sums}
    for layer in chosen:
        mean, var = statistics[layer.name]
        if not (np.isfinite(mean).all() and np.isfinite(var).all()):
            raise InvalidInputError(
                f"layer {layer.name!r}: the batch statistics overflow; the data is out of range"
            )
    return statistics, counts


def _change(layer: BatchNormLayer, new: tuple[F64, F64], group: int, count: int) -> LayerChange:
    mean, var = new
    old_std = np.sqrt(layer.var + layer.eps)
    shift = np.abs(mean - layer.mean) / old_std
    ratio = (var + layer.eps) / (layer.var + layer.eps)
    return LayerChange(
        name=layer.name,
        group=group,
        channels=layer.num_channels,
        values_per_channel=count,
        mean_shift_max=float(shift.max()),
        mean_shift_rms=float(math.sqrt(float(np.mean(shift * shift)))),
        var_ratio_min=float(ratio.min()),
        var_ratio_max=float(ratio.max()),
    )


def _set_metadata(model: onnx.ModelProto, values: Mapping[str, str]) -> None:
    """Set `recalibration_<key>` entries, in place where the key exists (a second recalibration)."""
    props = {prop.key: prop for prop in model.metadata_props}
    for key, value in values.items():
        full = METADATA_PREFIX + key
        if full in props:
            props[full].value = value
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = full, value
