"""Prove an ONNX model keeps every sample's output independent of its batch: structure, statistics,
numerics, batch invariance. Any model: frozen-bn's one-layer graphs, and networks exported from PyTorch or
Keras with any number of BatchNormalization layers (or none: fused into convolutions, or absent).

`verify_model` runs every check and reports each one (name, pass/fail, a figure, a detail); it raises only
when the file is not ONNX at all (`ModelFileError`), so a server can call it at load time on any file and
refuse what fails. The checks:

- `onnx_checker`: `onnx.checker.check_model(full_check=True)` accepts the model;
- `opset_supported`: every opset the model imports is one the installed onnxruntime knows;
- `inference_mode`: every BatchNormalization has `training_mode` absent or 0, exactly one output, and constant
  (initializer) statistics;
- `samples_independent`: `bn_export.sample_independence`'s proof, by dataflow over the main graph, that row i
  of every output computed from the data depends on sample i alone; it names each node it cannot prove that
  for, with the reason (an operator without a rule, a read of the batch size, control flow over the data);
- `statistics_valid`: for every BatchNormalization layer (or the folded form's metadata statistics), gamma,
  beta and moving mean finite; moving variance finite and >= 0 with var + eps > 0 (a zero variance is a
  constant channel, e.g. an always-blank pixel; eps keeps it finite); a failure names the node and channel.
  A graph with no layer passes: there is nothing to check;
- `formula`: onnxruntime's BatchNormalization output equals the float64 inference formula from the node's own
  constants, on the node's real input, within the tolerance of `bn_export.reference`. For frozen-bn's
  one-layer graphs (the node fed by the graph input, or the folded form with its metadata statistics) the
  graph's `output` (and `logits`) are compared with the formula applied to the graph input, as exported. In
  any other graph each BatchNormalization's input and output are exposed as extra outputs of a copy of the
  graph, so each layer is checked on the input the network computes for it from the samples; the report
  names the worst layer. No layer: not applicable, passes;
- `batch_invariance`, the empirical side of the proof: each probe sample's outputs alone equal its outputs
  inside batches of other samples (sizes up to 257, see BATCH_SIZES; random, huge, zero and negative
  companions, built so that no value overflows the input dtype), over every input and output. `output` and
  every non-float output must match bit for bit. Other float outputs are held to the rounding bound of a sum
  over one sample's elements, because onnxruntime's GEMM and leading-axis reductions choose kernels (and so
  summation order) by batch size; a graph with batch statistics deviates by orders of magnitude more. The
  bound scales with the terms an output sums, `Σ_k |pooled_k|·|W_kj| + |b_j|` where the graph has a linear
  head (MatMul/Gemm with constant weights on a pooled output), so a logit near 0 by cancellation may still
  move by a few ulp of its terms; other outputs are bounded relative to their own magnitude.

The empirical checks (`formula`, `batch_invariance`) are sized by a time budget (`budget_s`, default
DEFAULT_BUDGET_S = 20 seconds): the run time per sample is measured first, the formula check takes as many
samples as a third of the budget affords (at most 256, at least PROBES), and the invariance check runs
batches from the smallest up while the rest of the budget affords the next one (at least one always runs).
Their details say what the budget allowed. Inputs are generated as `bn_export.probes` describes (dynamic
dimensions besides the batch are DEFAULT_DYNAMIC_SIZE = 8 unless `shapes` gives them), or taken from `data`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import ArrayLike, NDArray
from onnx import helper

from bn_export.errors import ModelFileError
from bn_export.graph_statistics import (
    BatchNormLayer,
    FrozenStatistics,
    batchnorm_layers,
    find_linear_head,
    find_statistics,
    frozen_bn_statistics,
    node_label,
)
from bn_export.onnx_graph import GraphIndex, node_attribute
from bn_export.probes import (
    DEFAULT_BUDGET_S,
    DEFAULT_DYNAMIC_SIZE,
    Batch,
    Budget,
    Runtime,
    companions,
    count,
    generate,
    one_line,
    open_runtime,
    open_session,
    prepare_data,
    rows,
    sample_bytes,
    sample_shapes,
    sample_values,
)
from bn_export.reference import (
    F64,
    compare,
    head_formula,
    inference_formula,
    layer_formula,
    relative_tolerance,
)
from bn_export.sample_independence import prove_samples_independent

# FrozenStatistics and find_statistics live in bn_export.graph_statistics; importable from here too.
__all__ = [
    "BATCH_SIZES",
    "COMPANIONS",
    "DEFAULT_BUDGET_S",
    "DEFAULT_DYNAMIC_SIZE",
    "PROBES",
    "CheckResult",
    "FrozenStatistics",
    "VerificationReport",
    "find_statistics",
    "load_model",
    "verify_model",
]

PROBES = 3
# Batches the probes are placed in. 257 is past the batches a server typically merges (powers of two up to
# 256), where kernels switch and a graph gated on the batch size would start mixing. Each batch is capped so
# that one of large samples stays within _INVARIANCE_BATCH_BYTES (a server verifies at load).
BATCH_SIZES = (2, 5, 16, 257)
_INVARIANCE_BATCH_BYTES = 64 << 20
COMPANIONS = ("random", "huge", "zeros", "negative")
_GENERATED = 64  # samples generated when no data is given
_FORMULA_ROWS = 256  # rows of --data fed to the formula check: enough to cover it, bounded for load time
_FORMULA_CHUNK_VALUES = 1 << 20  # input values per chunk of the float64 formula check (8 MiB per temporary)
_FORMULA_SHARE = 1 / 3  # of the budget left, for the formula check
_LAYER_CHUNK_BYTES = 256 << 20  # exposed layer inputs and outputs held at once by the layered formula check


@dataclass(frozen=True)
class CheckResult:
    """One check: its `name`, whether it `passed`, its headline `figure` (None if it has none), a `detail`."""

    name: str
    passed: bool
    figure: float | None
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "figure": _json_float(self.figure),
            "detail": self.detail,
        }


@dataclass(frozen=True)
class VerificationReport:
    """Every check run on one model; `passed` only when each one passed."""

    model: str
    checks: tuple[CheckResult, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable (non-finite figures become null or the string "inf")."""
        return {
            "model": self.model,
            "passed": self.passed,
            "checks": [check.to_dict() for check in self.checks],
            "metadata": dict(self.metadata),
        }

    def render(self) -> str:
        """A human-readable table: one line per check, then the verdict."""
        width = max(len(check.name) for check in self.checks)
        lines = [f"{self.model}"]
        for check in self.checks:
            figure = "-" if check.figure is None else f"{check.figure:.3g}"
            mark = "pass" if check.passed else "FAIL"
            lines.append(f"  [{mark}] {check.name:<{width}}  {figure:>9}  {check.detail}")
        failed = sum(not check.passed for check in self.checks)
        verdict = "PASSED" if self.passed else f"FAILED ({failed} of {len(self.checks)} checks)"
        lines.append(f"{verdict}: {len(self.checks) - failed}/{len(self.checks)} checks passed")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def _json_float(value: float | None) -> float | str | None:
    if value is None or np.isnan(value):
        return None
    if np.isinf(value):
        return "inf" if value > 0 else "-inf"
    return float(value)


def load_model(model: onnx.ModelProto | str | os.PathLike[str]) -> tuple[onnx.ModelProto, str]:
    """The model and a name for it; raises `ModelFileError` (one line) when the file is not an ONNX model."""
    if isinstance(model, onnx.ModelProto):
        proto, name = model, "<in-memory model>"
    else:
        path = Path(model)
        name = str(path)
        if not path.exists():
            raise ModelFileError(f"{path}: no such file")
        if path.is_dir():
            raise ModelFileError(f"{path}: is a directory, not an ONNX model file")
        if path.stat().st_size == 0:
            raise ModelFileError(f"{path}: empty file, not an ONNX model")
        try:
            proto = onnx.load_model(str(path))
        except Exception as exc:  # protobuf's DecodeError, external-data and OS errors: all mean "not ONNX"
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelFileError(f"{path}: not an ONNX model (cannot parse it: {message})") from None
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.graph.output:
        raise ModelFileError(f"{name}: not an ONNX model (no IR version, graph or graph output)")
    return proto, name


# -- the checks ---------------------------------------------------------------------------------------------


def _check_onnx(g: GraphIndex) -> CheckResult:
    try:
        onnx.checker.check_model(g.model, full_check=True)
    except Exception as exc:  # the checker raises ValidationError, shape inference InferenceError, ...
        return CheckResult("onnx_checker", False, None, one_line(exc))
    return CheckResult(
        "onnx_checker", True, None, "onnx.checker.check_model(full_check=True) accepts the model"
    )


def _check_opset(g: GraphIndex) -> CheckResult:
    known: dict[str, int] = {}
    for schema in ort.capi._pybind_state.get_all_operator_schema():
        domain = schema.domain or "ai.onnx"
        known[domain] = max(known.get(domain, 0), int(schema.since_version))
    problems = []
    for opset in g.model.opset_import:
        domain = opset.domain or "ai.onnx"
        if domain not in known:
            problems.append(f"domain {domain!r} is unknown to onnxruntime {ort.__version__}")
        elif opset.version > known[domain]:
            problems.append(f"{domain} opset {opset.version} > {known[domain]}, the newest onnxruntime knows")
    detail = (
        "; ".join(problems)
        or f"ai.onnx opset {g.opset} <= {known.get('ai.onnx')} (onnxruntime {ort.__version__})"
    )
    return CheckResult("opset_supported", not problems, float(g.opset), detail)


def _check_inference_mode(g: GraphIndex) -> CheckResult:
    problems = []
    count = 0
    for node in g.model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        count += 1
        label = node_label(node)
        if int(node_attribute(node, "training_mode", 0)) != 0:
            problems.append(f"{label}: training_mode=1 (normalizes with batch statistics)")
        outputs = [out for out in node.output if out]
        if len(outputs) != 1:
            problems.append(f"{label}: {len(outputs)} outputs (inference mode has exactly 1)")
        dynamic = [name for name in node.input[1:5] if name not in g.constants]
        if dynamic:
            problems.append(f"{label}: statistics computed at run time ({', '.join(dynamic)})")
    detail = (
        "; ".join(problems) or f"{count} BatchNormalization node(s), all in inference mode with constants"
    )
    return CheckResult("inference_mode", not problems, float(len(problems)), detail)


def _check_samples_independent(g: GraphIndex) -> CheckResult:
    proof = prove_samples_independent(g)
    if proof.problems:
        return CheckResult(
            "samples_independent", False, float(len(proof.problems)), "; ".join(proof.problems)
        )
    detail = (
        f"proved by dataflow over {proof.accepted} operation(s) on the data: each keeps every sample on its "
        "own row of the batch axis, and every output computed from the data has one row per sample"
    )
    return CheckResult("samples_independent", True, 0.0, detail)


def _check_statistics(
    g: GraphIndex, layers: list[BatchNormLayer], folded: FrozenStatistics | str | None
) -> CheckResult:
    """Every layer's statistics, or the folded form's metadata statistics (`folded`, only without layers)."""
    if isinstance(folded, str):
        return CheckResult("statistics_valid", False, None, folded)
    checked = list(layers)
    if isinstance(folded, FrozenStatistics):
        stats = folded
        checked.append(
            BatchNormLayer(stats.source, "", "", stats.gamma, stats.beta, stats.mean, stats.var, stats.eps)
        )
    if not checked:
        return CheckResult(
            "statistics_valid",
            True,
            None,
            "no BatchNormalization layers (absent or fused into other operators): nothing to check",
        )
    problems = []
    for layer in checked:
        if layer.problem is not None:
            problems.append(f"{layer.node}: {layer.problem}")
        else:
            problems += _statistics_problems(layer)
    for name in ("scale", "shift", "head_weight", "head_bias"):
        if name in g.constants and np.count_nonzero(~np.isfinite(np.asarray(g.constants[name], np.float64))):
            problems.append(f"{name}: non-finite value(s)")
    variances = [layer.var.reshape(-1) for layer in checked if layer.var.size]
    var = np.concatenate(variances) if variances else np.zeros(0)
    figure = float(np.nanmin(var)) if var.size and not np.all(np.isnan(var)) else None
    if problems:
        shown = "; ".join(problems[:5]) + (f"; {len(problems) - 5} more" if len(problems) > 5 else "")
        return CheckResult("statistics_valid", False, figure, shown)
    eps = min(layer.eps for layer in checked)
    if len(checked) == 1:
        detail = (
            f"{var.size} channels from {checked[0].node}: finite, min moving_var {figure:.3g}, eps {eps:.3g}"
        )
    else:
        detail = (
            f"{len(checked)} BatchNormalization layers, {var.size} channels: finite, min moving_var "
            f"{figure:.3g}, smallest eps {eps:.3g}"
        )
    return CheckResult("statistics_valid", True, figure, detail)


def _statistics_problems(layer: BatchNormLayer) -> list[str]:
    """What is wrong with one layer's statistics, each naming the layer and the first channel concerned."""
    problems = []
    columns = (
        ("gamma", layer.gamma),
        ("beta", layer.beta),
        ("moving_mean", layer.mean),
        ("moving_var", layer.var),
    )
    for name, values in columns:
        flat = values.reshape(-1)
        bad = np.flatnonzero(~np.isfinite(flat))
        if bad.size:
            problems.append(
                f"{layer.node}: {name} has {bad.size} non-finite value(s) (channel {int(bad[0])}: "
                f"{float(flat[bad[0]])!r})"
            )
    var = layer.var.reshape(-1)
    negative = np.flatnonzero(var < 0)
    if negative.size:
        problems.append(
            f"{layer.node}: moving_var has {negative.size} negative value(s) (channel {int(negative[0])}: "
            f"{float(var[negative[0]])!r})"
        )
    with np.errstate(invalid="ignore"):
        not_positive = np.flatnonzero(~(var + layer.eps > 0))
    if not np.isfinite(layer.eps) or not_positive.size:
        where = f" (channel {int(not_positive[0])})" if not_positive.size else ""
        problems.append(f"{layer.node}: moving_var + eps is not > 0{where} (eps={layer.eps!r})")
    return problems


def _check_graph_formula(
    g: GraphIndex, stats: FrozenStatistics, runtime: Runtime, x: NDArray[Any], note: str
) -> CheckResult:
    """frozen-bn's one-layer graph: `output` (and `logits`) against the formula on the graph input."""
    outputs = runtime.run({runtime.inputs[0].name: x})
    if "output" not in outputs:
        return CheckResult("formula", False, None, "the graph has no output named 'output'")
    unverified = sorted(set(outputs) - {"output", "logits"})
    if unverified:
        return CheckResult(
            "formula", False, None, f"outputs with no formula to check: {', '.join(unverified)}"
        )
    dtype = runtime.inputs[0].dtype
    has_head = "logits" in outputs
    if has_head and ("head_weight" not in g.constants or "head_bias" not in g.constants):
        return CheckResult("formula", False, None, "logits without head_weight/head_bias initializers")
    # The float64 formula and its magnitude take several full-size float64 temporaries: over 64 image-sized
    # samples, hundreds of MB at a server's load. Rows are compared a bounded chunk at a time instead (the
    # figures are maxima, so the same); outputs with the wrong number of rows are compared whole (and fail).
    rows = len(x)
    if all(np.shape(value)[:1] == (len(x),) for value in outputs.values()):
        rows = max(1, _FORMULA_CHUNK_VALUES // max(1, int(np.prod(x.shape[1:]))))
    # Per chunk (error, ratio), and for the head; NaN (a NaN statistic) must survive the maximum.
    found: list[tuple[float, float]] = []
    head_found: list[tuple[float, float]] = []
    for lo in range(0, max(1, len(x)), rows):
        chunk = slice(lo, lo + rows) if rows < len(x) else slice(None)
        expected, magnitude = inference_formula(
            x[chunk], stats.gamma, stats.beta, stats.mean, stats.var, stats.eps, stats.axis
        )
        found.append(compare(outputs["output"][chunk], expected, magnitude, relative_tolerance(dtype), dtype))
        if has_head:
            logits, mag, terms = head_formula(
                expected, magnitude, g.constants["head_weight"], g.constants["head_bias"], stats.axis
            )
            head_found.append(
                compare(outputs["logits"][chunk], logits, mag, relative_tolerance(dtype, terms), dtype)
            )
    error, ratio = (float(v) for v in np.max(found, axis=0))
    parts = [f"output: max error {error:.3g} ({ratio:.3g} of tolerance)"]
    if has_head:
        head_error, head_ratio = (float(v) for v in np.max(head_found, axis=0))
        parts.append(f"logits: max error {head_error:.3g} ({head_ratio:.3g} of tolerance)")
        error, ratio = max(error, head_error), max(ratio, head_ratio)
    passed = ratio <= 1.0
    detail = f"{'; '.join(parts)}; {x.shape[0]} samples vs float64 formula from {stats.source}{note}"
    return CheckResult("formula", passed, error, detail)


def _check_layer_formula(
    g: GraphIndex,
    layers: list[BatchNormLayer],
    runtime: Runtime,
    feeds: Batch,
    providers: Sequence[str] | None,
    deadline: float,
) -> CheckResult:
    """Each layer's output against the formula from its constants, on the input the network computes for it:
    read from a copy of the graph that returns every layer's input and output as extra outputs. Past
    `deadline` (time.perf_counter), no further chunk of samples starts once PROBES samples are checked."""
    stuck = [layer for layer in layers if layer.problem is not None]
    if stuck:
        return CheckResult("formula", False, None, f"{stuck[0].node}: {stuck[0].problem}")
    names = list(dict.fromkeys(name for layer in layers for name in (layer.input, layer.output)))
    try:
        session = open_session(_exposing(g.model, names), providers)
    except Exception as exc:  # onnxruntime's own error types
        return CheckResult(
            "formula", False, None, f"cannot run the graph with its layers exposed: {one_line(exc)}"
        )
    # Every layer's input and output at once take a network's whole activations per sample: the rows go a
    # bounded chunk at a time, sized by what the rows before took.
    found: dict[str, tuple[float, float, str]] = {}
    samples, lo = count(feeds), 0
    chunk = samples if runtime.fixed_batch is not None else 1  # a fixed batch runs whole or not at all
    while lo < samples:
        values = dict(zip(names, session.run(names, rows(feeds, slice(lo, lo + chunk))), strict=True))
        for layer in layers:
            x, y = np.asarray(values[layer.input]), np.asarray(values[layer.output])
            expected = layer_formula(x, layer.gamma, layer.beta, layer.mean, layer.var, layer.eps)
            if expected is None:
                return CheckResult(
                    "formula",
                    False,
                    None,
                    f"{layer.node}: statistics of shape {layer.mean.shape} do not fit its input {x.shape}",
                )
            dtype = y.dtype if y.dtype.kind == "f" else np.dtype(np.float32)
            error, ratio = compare(y, *expected, relative_tolerance(dtype), dtype)
            previous = found.get(layer.node, (0.0, 0.0, str(dtype)))
            found[layer.node] = (max(previous[0], error), max(previous[1], ratio), str(dtype))
        done = min(chunk, samples - lo)
        lo += done
        if lo >= min(PROBES, samples) and time.perf_counter() > deadline:
            break
        per_row = sum(int(np.asarray(v).nbytes) for v in values.values()) // done
        # Doubling, so that the deadline is looked at often while the cost is still unknown.
        chunk = max(1, min(2 * chunk, _LAYER_CHUNK_BYTES // max(1, per_row)))
        del values
    worst = max(found, key=lambda node: (found[node][1], found[node][0]))
    error, ratio, dtype_name = found[worst]
    passed = ratio <= 1.0
    detail = (
        f"{len(layers)} BatchNormalization layer(s) on {lo} samples vs float64 formula from each node's "
        f"constants on its real input; worst {worst}: max error {error:.3g} ({ratio:.3g} of the "
        f"{dtype_name} tolerance)"
    )
    if lo < samples:
        detail += f" (the budget's share ran out after {lo} of {samples} samples)"
    return CheckResult("formula", passed, error, detail)


def _exposing(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` that also returns the tensors `names` (element types from shape inference)."""
    types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # shape inference refuses the graph: the exposed tensors are taken as float
        inferred = onnx.GraphProto()
    for value in (*inferred.input, *inferred.value_info, *inferred.output):
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {value.name for value in copy.graph.output}
    for name in names:
        if name not in present:
            elem = types.get(name) or onnx.TensorProto.FLOAT
            copy.graph.output.append(helper.make_tensor_value_info(name, elem, None))
            present.add(name)
    return copy


def _check_formula(
    g: GraphIndex,
    layers: list[BatchNormLayer],
    frozen: FrozenStatistics | str | None,
    runtime: Runtime,
    feeds: Batch,
    providers: Sequence[str] | None,
    note: str,
    deadline: float,
) -> CheckResult:
    if isinstance(frozen, str):
        return CheckResult("formula", False, None, f"nothing to compare against: {frozen}")
    if isinstance(frozen, FrozenStatistics):
        return _check_graph_formula(g, frozen, runtime, feeds[runtime.inputs[0].name], note)
    if not layers:
        return CheckResult(
            "formula",
            True,
            None,
            "not applicable: no BatchNormalization layers (absent or fused into other operators)",
        )
    result = _check_layer_formula(g, layers, runtime, feeds, providers, deadline)
    return CheckResult(result.name, result.passed, result.figure, result.detail + note)


def _differences(a: NDArray[Any], b: NDArray[Any]) -> F64 | None:
    """|a - b| element by element, bitwise: equal values (NaN matching NaN, Inf matching Inf) differ by 0,
    NaN against a number infinitely; None when the shapes differ."""
    if a.shape != b.shape:
        return None
    if a.size == 0 or np.array_equal(a, b, equal_nan=True):
        return np.zeros(a.shape)
    with np.errstate(all="ignore"):
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        same = (a == b) | (np.isnan(a) & np.isnan(b))
    diff = np.where(same, 0.0, diff)
    return np.where(np.isnan(diff), np.inf, diff)


def _output_bounds(g: GraphIndex, alone: dict[str, NDArray[Any]], terms: int) -> dict[str, F64 | float]:
    """How far each float output of one sample (besides `output`, which must not move at all) may move by
    rounding; outputs not listed must match bit for bit.

    A linear head's logit sums |pooled_k|·|W_kj| + |b_j| worth of terms, and rounding errors scale with those,
    not with the logit: a logit near 0 by cancellation still moves by a few ulp of its terms when the GEMM
    picks another kernel. Outputs with no head found in the graph are bounded relative to their own largest
    magnitude instead. Non-finite magnitudes bound nothing (the value must then match bitwise).
    """
    bounds: dict[str, F64 | float] = {}
    for name, value in alone.items():
        if name == "output" or value.dtype.kind != "f":
            continue
        rtol = relative_tolerance(value.dtype, terms)
        tiny = float(np.finfo(value.dtype).smallest_normal)
        head = find_linear_head(g, name)
        magnitude = None
        if head is not None and head.source in alone:
            magnitude = head.magnitude(alone[head.source])
        if magnitude is not None and magnitude.shape == value.shape:
            bounds[name] = (rtol * np.where(np.isfinite(magnitude), magnitude, 0.0) + tiny)[0]
        else:
            finite = bool(np.all(np.isfinite(value)))
            bounds[name] = rtol * float(np.max(np.abs(value), initial=0.0)) + tiny if finite else 0.0
    return bounds


def _check_batch_invariance(
    g: GraphIndex, runtime: Runtime, probes: Batch, pool: Batch, seed: int, budget: Budget
) -> CheckResult:
    fixed = runtime.fixed_batch
    if fixed is not None:
        detail = (
            f"the batch dimension is fixed to {fixed}: a batch cannot be formed (torch.onnx.export needs "
            "dynamic_axes={name: {0: 'batch'}} for every input and output)"
        )
        return CheckResult("batch_invariance", False, None, detail)
    rng = np.random.default_rng(seed + 1)
    n = count(probes)
    alone = [budget.timed_run(runtime, rows(probes, slice(i, i + 1))) for i in range(n)]
    # `output` must match bit for bit. Other float outputs (pooled `logits`) may move in the last bits:
    # onnxruntime's GEMM and reductions over leading axes pick kernels by batch size. They are held to the
    # rounding bound of a sum over one sample's elements; real batch dependence is orders past it.
    bounds = [_output_bounds(g, outputs, sample_values(probes)) for outputs in alone]
    largest = max(n, _INVARIANCE_BATCH_BYTES // max(1, sample_bytes(probes)))
    sizes = list(dict.fromkeys(min(max(size, n), largest) for size in BATCH_SIZES))
    planned = [(size, kind) for size in sizes for kind in COMPANIONS]
    worst, max_ratio, runs = 0.0, 0.0, 0
    ran: list[int] = []
    failures: list[str] = []
    for size, kind in planned:
        if runs and not budget.affords(size):
            break  # sizes only grow from here
        batch = companions(kind, pool, size, rng)
        slots = rng.permutation(size)[:n]
        for name, values in batch.items():
            values[slots] = probes[name]
        together = budget.timed_run(runtime, batch)
        runs += 1
        ran.append(size)
        for i, slot in enumerate(slots):
            for name, value in alone[i].items():
                diff = _differences(value[0], together[name][slot])
                dev = float("inf") if diff is None else float(diff.max(initial=0.0))
                worst = max(worst, dev)
                if dev == 0.0:
                    continue
                bound = bounds[i].get(name, 0.0)
                if diff is None or not np.all(diff <= bound):
                    failures.append(f"{name} of probe {i} moved by {dev:.3g} in a batch of {size} ({kind})")
                    continue
                ratio = np.divide(diff, bound, out=np.zeros_like(diff), where=diff > 0)
                max_ratio = max(max_ratio, float(ratio.max()))
        # Freed before the next batch is built: with the largest samples each batch and its outputs
        # take _INVARIANCE_BATCH_BYTES apiece, and a server runs this at load.
        del batch, together
    shown = list(dict.fromkeys(ran))
    setting = (
        f"{runs} batches (sizes {', '.join(map(str, shown))}; {', '.join(COMPANIONS)} companions; {n} probes)"
    )
    if runs < len(planned):
        setting += f"; the {budget.seconds:g} s budget allowed {runs} of the {len(planned)} planned batches"
    if failures:
        detail = f"{failures[0]} ({len(failures)} deviations); a sample's output must not depend on its batch"
        return CheckResult("batch_invariance", False, worst, detail)
    if worst == 0.0:
        return CheckResult(
            "batch_invariance", True, worst, f"every output bitwise equal alone and in {setting}"
        )
    if "output" in alone[0]:
        detail = (
            f"output bitwise equal alone and in {setting}; logits within {max_ratio:.3g} of their rounding "
            "bound"
        )
    else:
        detail = (
            f"outputs alone and in {setting}: equal, or float outputs within {max_ratio:.3g} of their "
            "rounding bound"
        )
    return CheckResult("batch_invariance", True, worst, detail)


def _guard(name: str, check: Callable[[], CheckResult]) -> CheckResult:
    """Run one check; a check that breaks on a strange graph fails with the reason instead of raising."""
    try:
        return check()
    except Exception as exc:  # verify must report on any parseable graph, never raise
        return CheckResult(name, False, None, f"could not run: {one_line(exc)}")


def verify_model(
    model: onnx.ModelProto | str | os.PathLike[str],
    *,
    data: ArrayLike | Mapping[str, ArrayLike] | None = None,
    seed: int = 0,
    providers: Sequence[str] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    budget_s: float = DEFAULT_BUDGET_S,
) -> VerificationReport:
    """Run every check on `model` (see the module docstring) and report each one; never prints.

    data: samples to feed instead of generated ones, one (N, *sample) array for a model with one input or
    one per input name (cast to the inputs' dtypes); shapes: full shapes (batch first, ignored) of generated
    samples per input name, for dimensions the graph leaves dynamic; seed fixes the generated samples and
    companions; budget_s: the seconds the empirical checks may take. Raises `ModelFileError` only when
    `model` is not an ONNX model.
    """
    proto, name = load_model(model)
    g = GraphIndex(proto)
    layers = batchnorm_layers(g)
    frozen = frozen_bn_statistics(g)
    checks = [
        _guard("onnx_checker", lambda: _check_onnx(g)),
        _guard("opset_supported", lambda: _check_opset(g)),
        _guard("inference_mode", lambda: _check_inference_mode(g)),
        _guard("samples_independent", lambda: _check_samples_independent(g)),
        _guard("statistics_valid", lambda: _check_statistics(g, layers, None if layers else frozen)),
    ]
    runtime = open_runtime(g, providers)
    budget = Budget(budget_s)
    rng = np.random.default_rng(seed)
    samples: Batch | str
    if isinstance(runtime, str):
        samples = runtime
    else:
        try:
            if data is None:
                samples_count = runtime.fixed_batch or _GENERATED
                stats = frozen if isinstance(frozen, FrozenStatistics) else None
                samples = generate(runtime, sample_shapes(runtime, shapes), samples_count, rng, stats)
            else:
                samples = prepare_data(data, runtime)
            # Times one sample (the first run is the slowest, so the estimate errs on the safe side).
            budget.timed_run(runtime, rows(samples, slice(0, runtime.fixed_batch or 1)))
        except Exception as exc:  # malformed --data, or a graph that fails on its samples
            samples = f"cannot use the data: {one_line(exc)}"
    if isinstance(samples, str) or isinstance(runtime, str):
        reason = samples if isinstance(samples, str) else str(runtime)
        checks += [
            CheckResult("formula", False, None, reason),
            CheckResult("batch_invariance", False, None, reason),
        ]
        return VerificationReport(model=name, checks=tuple(checks), metadata=g.metadata)
    rt, xs = runtime, samples
    wanted = min(count(xs), _FORMULA_ROWS)
    affordable = int(_FORMULA_SHARE * budget.left() / max(budget.per_sample, 1e-9))
    formula_rows = max(min(wanted, affordable), min(wanted, PROBES))
    if rt.fixed_batch is not None:
        formula_rows = count(xs)
    note = ""
    if formula_rows < wanted:
        note = f" (the {budget.seconds:g} s budget allowed {formula_rows} of {wanted} samples)"
    formula_feeds = rows(xs, slice(0, formula_rows))
    deadline = time.perf_counter() + _FORMULA_SHARE * budget.left()
    checks.append(
        _guard(
            "formula", lambda: _check_formula(g, layers, frozen, rt, formula_feeds, providers, note, deadline)
        )
    )
    probes = rows(xs, slice(0, min(PROBES, count(xs))))
    checks.append(
        _guard("batch_invariance", lambda: _check_batch_invariance(g, rt, probes, xs, seed, budget))
    )
    return VerificationReport(model=name, checks=tuple(checks), metadata=g.metadata)
