"""Prove an ONNX graph normalizes with frozen statistics: structure, statistics, numerics, batch invariance.

`verify_model` runs every check and reports each one (name, pass/fail, a figure, a detail); it raises only
when the file is not ONNX at all (`ModelFileError`), so a server can call it at load time on any file and
refuse what fails. The checks:

- `onnx_checker`: `onnx.checker.check_model(full_check=True)` accepts the model;
- `opset_supported`: every opset the model imports is one the installed onnxruntime knows;
- `inference_mode`: every BatchNormalization has `training_mode` absent or 0, exactly one output, and constant
  (initializer) statistics;
- `samples_independent`: a proof, by dataflow over the main graph, that row i of every output computed from
  the data depends on sample i alone. Every tensor is FREE (initializers, constants and what is computed
  from them or from the per-sample shape) or BATCH (the samples on axis 0), and a node reading a BATCH
  tensor is accepted only by a rule for its operator showing that it keeps the samples apart: elementwise
  and broadcasting ops whose constants cannot line up with axis 0; normalizations, reductions, softmax,
  sorts and slices along other axes; inference-mode BatchNormalization with constant statistics;
  convolutions and pools; MatMul/Gemm that do not contract the batch axis; reshapes that keep it; ... It is
  an allowlist, not a list of known offenders: an operator without a rule is refused, and so are reading
  the batch size (Shape from axis 0, Size), control flow (If/Loop/Scan) over the data, custom-domain
  operators and random ones, each node with its reason;
- `statistics_valid`: gamma, beta and moving mean finite; moving variance finite and >= 0 with var + eps > 0
  (a zero variance is a constant channel, e.g. an always-blank pixel; eps keeps it finite);
- `formula`: onnxruntime's `output` (and `logits`) equal the float64 inference formula computed from the
  statistics stored in the model (BatchNormalization initializers, or for the folded form the statistics in
  `metadata_props`), within the tolerance below;
- `batch_invariance`, the empirical side of the proof: each probe sample's outputs alone equal its outputs
  inside batches of other samples (sizes up to 257, see BATCH_SIZES; random, huge, zero and negative
  companions, built so that no value overflows the input dtype). `output` must match bit for bit: the
  normalization is elementwise, so a sample's arithmetic cannot depend on its companions. Pooled outputs
  (`logits`) are held to the rounding bound of a sum over one sample's elements instead, because
  onnxruntime's GEMM and leading-axis reductions choose kernels (and so summation order) by batch size; a
  graph with batch statistics deviates by orders of magnitude more. The bound scales with the terms a logit
  sums, `Σ_k |pooled_k|·|W_kj| + |b_j|` where the graph has a linear head (MatMul/Gemm with constant
  weights on a pooled output), as the formula check's does, so a logit near 0 by cancellation may still
  move by a few ulp of its terms; other outputs are bounded relative to their own magnitude.

Tolerance of `formula` (also used by `export`). Each element is compared with a bound proportional to the
magnitude of the terms the graph adds up, not to the output, because `x*scale + shift` can cancel (x near the
mean of a large-mean channel) and rounding error scales with the terms, not the result::

    magnitude = |x|·|s| + |mean|·|s| + |beta|,   s = gamma/sqrt(var + eps)
    |onnxruntime - formula| <= (16 + n)·u·magnitude + tiny

with `u` the unit roundoff of the model's input/output dtype (2^-11 float16, 2^-24 float32, 2^-53 float64),
16 a budget for the rounding of the stored parameters, the few elementwise operations and the final cast,
`n` the number of terms summed (0 for `output`; C + spatial size for `logits`, Higham's γ_n bound for a dot
product), and `tiny` the dtype's smallest normal number. ONNX stores BatchNormalization's epsilon as a float32
attribute; the formula uses the value stored (metadata keeps the exact one).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import ArrayLike, NDArray
from onnx import helper, numpy_helper

from bn_export.errors import ModelFileError
from bn_export.providers import CPU, exact_providers

ROUNDING_BUDGET = 16
PROBES = 3
# Batches the probes are placed in. 257 is past the batches a server typically merges (powers of two up to
# 256), where kernels switch and a graph gated on the batch size would start mixing. Each batch is capped so
# that one of large samples stays within _INVARIANCE_BATCH_BYTES (a server verifies at load).
BATCH_SIZES = (2, 5, 16, 257)
_INVARIANCE_BATCH_BYTES = 64 << 20
COMPANIONS = ("random", "huge", "zeros", "negative")
_FORMULA_ROWS = 256  # rows of --data fed to the formula check: enough to cover it, bounded for load time
_FORMULA_CHUNK_VALUES = 1 << 20  # input values per chunk of the float64 formula check (8 MiB per temporary)

F64 = NDArray[np.float64]


def _along(values: ArrayLike, axis: int, rank: int) -> F64:
    """(C,) -> shaped to broadcast along `axis` of a rank-`rank` array."""
    shape = [1] * rank
    shape[axis] = -1
    return np.asarray(values, dtype=np.float64).reshape(shape)


def inference_formula(
    x: ArrayLike,
    gamma: ArrayLike,
    beta: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    eps: float,
    axis: int,
) -> tuple[F64, F64]:
    """`y = gamma*(x - mean)/sqrt(var + eps) + beta` along channel `axis` in float64, and its magnitude.

    x: (N, *sample) with C channels at `axis`; gamma, beta, mean, var: (C,). Returns (y, magnitude), both
    shaped like x (see the module docstring for the magnitude).
    """
    x64 = np.asarray(x, dtype=np.float64)
    rank = x64.ndim
    g, b, m, v = (_along(a, axis, rank) for a in (gamma, beta, mean, var))
    scale = g / np.sqrt(v + float(eps))
    y = (x64 - m) * scale + b
    magnitude = np.abs(x64) * np.abs(scale) + np.abs(m) * np.abs(scale) + np.abs(b)
    return y, magnitude


def head_formula(
    y: ArrayLike, magnitude: ArrayLike, weight: ArrayLike, bias: ArrayLike, axis: int
) -> tuple[F64, F64, int]:
    """`logits = mean_spatial(y) @ weight + bias` in float64, its magnitude, and the number of summed terms.

    y: (N, *sample) with C channels at `axis`; weight: (C, K); bias: (K,). Returns ((N, K), (N, K), n).
    """
    y64 = np.asarray(y, dtype=np.float64)
    mag64 = np.asarray(magnitude, dtype=np.float64)
    spatial = tuple(a for a in range(1, y64.ndim) if a != axis)
    pooled = y64.mean(axis=spatial) if spatial else y64
    pooled_mag = mag64.mean(axis=spatial) if spatial else mag64
    w = np.asarray(weight, dtype=np.float64)
    b = np.asarray(bias, dtype=np.float64)
    spatial_size = int(np.prod([y64.shape[a] for a in spatial])) if spatial else 1
    return pooled @ w + b, np.abs(pooled_mag) @ np.abs(w) + np.abs(b), w.shape[0] + spatial_size


def relative_tolerance(dtype: np.dtype[Any] | str, terms: int = 0) -> float:
    """`(ROUNDING_BUDGET + terms)·u` for the I/O dtype `dtype` (u = unit roundoff, eps/2)."""
    unit = float(np.finfo(np.dtype(dtype)).eps) / 2
    return (ROUNDING_BUDGET + terms) * unit


def compare(
    actual: ArrayLike, expected: F64, magnitude: F64, rtol: float, dtype: np.dtype[Any]
) -> tuple[float, float]:
    """(max |actual - expected|, max error/bound); NaN or Inf against a finite formula is infinite."""
    a = np.asarray(actual, dtype=np.float64)
    if a.shape != expected.shape:
        return float("inf"), float("inf")
    if a.size == 0:
        return 0.0, 0.0
    # Inf - Inf, or NaN data (whose bound is NaN too), is a mismatch like any other, reported as infinite;
    # the arithmetic on them must not warn (verify never prints).
    with np.errstate(all="ignore"):
        error = np.abs(a - expected)
        error = np.where(np.isfinite(error), error, np.inf)
        ratio = error / (rtol * magnitude + float(np.finfo(dtype).smallest_normal))
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    return float(error.max()), float(ratio.max())


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


# -- what the checks read from the graph -------------------------------------------------------------------


@dataclass(frozen=True)
class FrozenStatistics:
    """The statistics a model normalizes with, as float64, and where the channel axis of its input is."""

    gamma: F64
    beta: F64
    mean: F64
    var: F64
    eps: float
    axis: int
    source: str


@dataclass
class _Graph:
    """Lookups over one graph: constants, producers, metadata, input and output signatures."""

    model: onnx.ModelProto

    def __post_init__(self) -> None:
        graph = self.model.graph
        self.constants: dict[str, NDArray[Any]] = {
            t.name: numpy_helper.to_array(t) for t in graph.initializer
        }
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                value = _constant_value(node)
                if value is not None:
                    self.constants[node.output[0]] = value
        self.producer = {out: node for node in graph.node for out in node.output if out}
        self.metadata = {prop.key: prop.value for prop in self.model.metadata_props}
        initializers = {t.name for t in graph.initializer}
        self.inputs = [value for value in graph.input if value.name not in initializers]
        self.outputs = [value.name for value in graph.output]
        opsets = {o.domain or "ai.onnx": int(o.version) for o in self.model.opset_import}
        self.opset = opsets.get("ai.onnx", 0)
        self.shapes = _shapes(self.model)


def _constant_value(node: onnx.NodeProto) -> NDArray[Any] | None:
    """The value of a Constant node, however it is spelled (a tensor, or a number or list attribute)."""
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_int", "value_ints"):
            return np.asarray(helper.get_attribute_value(attr), dtype=np.int64)
        if attr.name in ("value_float", "value_floats"):
            return np.asarray(helper.get_attribute_value(attr), dtype=np.float32)
    return None


Shape = tuple[int | None, ...]


def _shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """The shape of every main-graph tensor shape inference can tell, a symbolic dimension as None."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # an invalid graph: fall back to the declared signatures only
        inferred = model
    shapes: dict[str, Shape] = {}
    graph = inferred.graph
    for value in (*graph.input, *graph.value_info, *graph.output):
        tensor = value.type.tensor_type
        if value.type.HasField("tensor_type") and tensor.HasField("shape"):
            shapes[value.name] = tuple(
                int(d.dim_value) if d.HasField("dim_value") else None for d in tensor.shape.dim
            )
    for init in graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    return shapes


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def find_statistics(model: onnx.ModelProto) -> FrozenStatistics | str:
    """The frozen statistics of a frozen-bn graph, or a sentence saying why there are none to check against.

    From the single BatchNormalization node's constant inputs (channel axis 1 of its input, or `perm[1]` when
    a Transpose feeds it), else from `metadata_props["statistics"]` with `eps` and `axis` (the folded form).
    """
    return _find_statistics(_Graph(model))


def _find_statistics(g: _Graph) -> FrozenStatistics | str:
    bns = [node for node in g.model.graph.node if node.op_type == "BatchNormalization"]
    if len(bns) > 1:
        return f"{len(bns)} BatchNormalization nodes; a frozen-bn graph has one"
    if bns:
        node = bns[0]
        names = list(node.input[1:5])
        missing = [name for name in names if name not in g.constants]
        if len(names) != 4 or missing:
            return (
                f"BatchNormalization statistics are not constants: {', '.join(missing) or 'missing inputs'}"
            )
        gamma, beta, mean, var = (np.asarray(g.constants[n], dtype=np.float64).reshape(-1) for n in names)
        source = g.producer.get(node.input[0])
        axis = 1
        if source is not None and source.op_type == "Transpose":
            perm = _attr(source, "perm")
            axis = int(perm[1]) if perm else 1
        eps = float(_attr(node, "epsilon", 1e-5))
        return FrozenStatistics(gamma, beta, mean, var, eps, axis, "BatchNormalization initializers")
    text = g.metadata.get("statistics")
    if text is None:
        return "no BatchNormalization node and no statistics in metadata_props"
    try:
        stats = json.loads(text)
        arrays = [
            np.asarray(stats[k], dtype=np.float64) for k in ("gamma", "beta", "moving_mean", "moving_var")
        ]
        eps, axis = float(g.metadata["eps"]), int(g.metadata["axis"])
    except (KeyError, TypeError, ValueError) as exc:
        return f"metadata_props statistics are malformed: {exc!r}"
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
        return "metadata_props statistics must be four (C,) lists"
    gamma, beta, mean, var = arrays
    return FrozenStatistics(gamma, beta, mean, var, eps, axis, "metadata_props statistics")


@dataclass(frozen=True)
class _HeadTerms:
    """`logits = pool(source) @ weight + bias` as found in a graph, with |weight| and |bias| in float64.

    source: the graph output the head reads (the normalized `output`); pool_axes: the axes a ReduceMean (or
    ReduceSum, `mean` False) pools before the product, None when there is no pooling.
    """

    source: str
    pool_axes: tuple[int, ...] | None
    mean: bool
    keepdims: bool
    weight: F64
    bias: F64

    def magnitude(self, source: ArrayLike) -> F64 | None:
        """`Σ_k |pooled_k|·|W_kj| + |b_j|`, what each logit sums: source (n, *sample) -> (n, M), or None
        when the shapes do not fit the weights. Pooling |source| bounds the pooled terms, cancellation
        included."""
        y = np.abs(np.asarray(source, dtype=np.float64))
        if self.pool_axes is not None:
            axes = tuple(a + y.ndim if a < 0 else a for a in self.pool_axes)
            if not axes or any(not 0 < a < y.ndim for a in axes):
                return None
            pool = np.mean if self.mean else np.sum
            with np.errstate(all="ignore"):
                y = pool(y, axis=axes, keepdims=self.keepdims)
        if y.ndim < 1 or y.shape[-1] != self.weight.shape[0]:
            return None
        with np.errstate(all="ignore"):
            terms = y @ self.weight
        try:
            fits = np.broadcast_shapes(terms.shape, self.bias.shape) == terms.shape
        except ValueError:  # a bias that does not broadcast: not a head this bound knows
            fits = False
        return np.asarray(terms + self.bias, dtype=np.float64) if fits else None


_PASS_THROUGH = frozenset({"Cast", "Identity"})


def _find_linear_head(g: _Graph, logits: str) -> _HeadTerms | None:
    """The linear head computing graph output `logits` from another graph output, or None.

    Recognized: [Cast] <- [Add constant bias] <- MatMul(A, constant W) or Gemm(A, constant B[, constant C],
    transA=0) <- [ReduceMean/ReduceSum over constant axes] <- a graph output (or the tensor a Cast/Identity
    turns into one, as the float16 export's float32 `normalized`).
    """
    graph_outputs = set(g.outputs)
    aliases = {name: name for name in g.outputs}
    for node in g.model.graph.node:
        if node.op_type in _PASS_THROUGH and node.output and node.output[0] in graph_outputs:
            aliases.setdefault(node.input[0], node.output[0])

    def producer(name: str) -> onnx.NodeProto | None:
        """The node computing `name`, seen through casts and identities."""
        node = g.producer.get(name)
        while node is not None and node.op_type in _PASS_THROUGH and node.input:
            node = g.producer.get(node.input[0])
        return node

    def absolute(name: str) -> F64:
        return np.abs(np.asarray(g.constants[name], dtype=np.float64))

    node = producer(logits)
    bias: F64 = np.zeros(1)
    if node is not None and node.op_type == "Add" and len(node.input) == 2:
        data, constant = node.input if node.input[1] in g.constants else node.input[::-1]
        if constant not in g.constants:
            return None
        bias, node = absolute(constant), producer(data)
    if node is None or len(node.input) < 2 or node.input[1] not in g.constants:
        return None
    if node.op_type == "MatMul":
        weight = absolute(node.input[1])
    elif node.op_type == "Gemm" and not int(_attr(node, "transA", 0)):
        weight = absolute(node.input[1]) * abs(float(_attr(node, "alpha", 1.0)))
        weight = weight.T if int(_attr(node, "transB", 0)) else weight
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in g.constants:
                return None
            bias = bias + absolute(node.input[2]) * abs(float(_attr(node, "beta", 1.0)))
    else:
        return None
    if weight.ndim != 2:
        return None

    def unwrapped(name: str) -> str:
        """`name` seen back through casts and identities, stopping at a graph output (or its alias)."""
        while name not in aliases and name in g.producer and g.producer[name].op_type in _PASS_THROUGH:
            name = g.producer[name].input[0]
        return name

    pooled = unwrapped(node.input[0])
    pool_axes: tuple[int, ...] | None = None
    mean, keepdims = True, False
    if pooled not in aliases:
        pool = g.producer.get(pooled)
        if pool is None or pool.op_type not in ("ReduceMean", "ReduceSum"):
            return None
        axes = _attr(pool, "axes")
        if axes is None and len(pool.input) > 1 and pool.input[1]:
            axes = _constant_ints(g, pool.input[1])
        if not axes:
            return None
        pool_axes, mean = tuple(int(a) for a in axes), pool.op_type == "ReduceMean"
        keepdims = bool(int(_attr(pool, "keepdims", 1)))
        pooled = unwrapped(pool.input[0])
    source = aliases.get(pooled)
    if source is None or source == logits:
        return None
    return _HeadTerms(source, pool_axes, mean, keepdims, weight, bias)


# -- the checks ---------------------------------------------------------------------------------------------


def _check_onnx(g: _Graph) -> CheckResult:
    try:
        onnx.checker.check_model(g.model, full_check=True)
    except Exception as exc:  # the checker raises ValidationError, shape inference InferenceError, ...
        return CheckResult("onnx_checker", False, None, _one_line(exc))
    return CheckResult(
        "onnx_checker", True, None, "onnx.checker.check_model(full_check=True) accepts the model"
    )


def _check_opset(g: _Graph) -> CheckResult:
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


def _check_inference_mode(g: _Graph) -> CheckResult:
    problems = []
    count = 0
    for node in g.model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        count += 1
        label = node.name or node.output[0]
        if int(_attr(node, "training_mode", 0)) != 0:
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


def _constant_ints(g: _Graph, name: str) -> list[int] | None:
    value = g.constants.get(name)
    return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]


# -- samples_independent: a proof by dataflow ---------------------------------------------------------------

_ONNX_DOMAINS = ("", "ai.onnx")
# Elementwise on their first input; any other input (Clip's bounds, Dropout's ratio) is a parameter.
_ELEMENTWISE = frozenset(
    {
        "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "BitwiseNot", "Cast", "CastLike", "Ceil",
        "Celu", "Clip", "Cos", "Cosh", "Dropout", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid",
        "HardSwish", "Identity", "IsInf", "IsNaN", "LeakyRelu", "Log", "Mish", "Neg", "Not", "Reciprocal",
        "Relu", "Round", "Selu", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt",
        "Tan", "Tanh", "ThresholdedRelu",
    }
)  # fmt: skip
# Elementwise over operands broadcast together (numpy rules, or PRelu's one-way broadcast of its slope).
_BROADCASTING = frozenset(
    {
        "Add", "And", "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Div", "Equal", "Greater",
        "GreaterOrEqual", "Less", "LessOrEqual", "Max", "Mean", "Min", "Mod", "Mul", "Or", "Pow", "PRelu",
        "Sub", "Sum", "Where", "Xor",
    }
)  # fmt: skip
# Computed per sample (over its channels and spatial axes) with constant weights: rank unchanged.
_PER_SAMPLE = frozenset(
    {
        "AveragePool", "Conv", "ConvTranspose", "DepthToSpace", "GlobalAveragePool", "GlobalLpPool",
        "GlobalMaxPool", "GroupNormalization", "InstanceNormalization", "LpPool", "LRN", "MaxPool",
        "SpaceToDepth",
    }
)  # fmt: skip
_REDUCTIONS = frozenset(
    {
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
        "ReduceProd", "ReduceSum", "ReduceSumSquare",
    }
)  # fmt: skip
_RANDOM = frozenset(
    {"Bernoulli", "Multinomial", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike"}
)


class _DataParameters(str):
    """A refusal because a node's parameters (weights, statistics, bounds) are computed from the data: always
    reported, even when those come from nodes refused already, since it names what the graph does wrong."""


# A rule's verdict on a node that reads the samples: the reason it cannot be proven to keep them apart
# (str); the ranks of its outputs, which then carry the samples on axis 0 (one per output, None where
# unknown); or None when its outputs do not depend on the samples at all (the per-sample shape, say).
Verdict = str | tuple[int | None, ...] | None


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    graphs: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attr.graphs)
    return graphs


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """The tensors a subgraph (or one nested in it) reads from the graphs around it."""
    defined = {value.name for value in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(name for name in node.input if name)
        for sub in _subgraphs(node):
            used |= _outer_names(sub)
        defined.update(name for name in node.output if name)
    return used - defined


def _normalized(axes: Sequence[int], rank: int | None) -> list[int] | None:
    """`axes` counted from 0 (negative ones from the end); None when a negative axis meets an unknown rank."""
    normalized = []
    for axis in axes:
        if axis < 0:
            if rank is None:
                return None
            axis += rank
        normalized.append(axis)
    return normalized


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Dataflow:
    """The proof behind `samples_independent`, one pass over the main graph in its topological order.

    Every tensor is FREE (the same whatever the batch: initializers, constants, and what nodes compute from
    FREE tensors alone) or BATCH (carries the samples on axis 0, row i computed from input sample i and FREE
    tensors only; the graph's inputs are BATCH). A node with a BATCH input is accepted only by a rule proving
    that its outputs are BATCH again (or FREE); anything else, an operator without a rule included, is
    refused with the reason. Refused nodes' outputs are then taken as BATCH so the proof goes on and reports
    each problem where it is; a node reading only tensors that follow from refused nodes is not reported
    again.
    """

    def __init__(self, g: _Graph) -> None:
        self.g = g
        self.batch: dict[str, int | None] = {value.name: self.inferred_rank(value.name) for value in g.inputs}
        self.reads_data = set(self.batch)  # BATCH tensors, and FREE ones computed from the input's shape
        self.follows_refused: set[str] = set()
        self.problems: list[str] = []
        self.accepted = 0

    def run(self) -> list[str]:
        for node in self.g.model.graph.node:
            implicit = set().union(*(_outer_names(sub) for sub in _subgraphs(node)))
            inputs = [name for name in node.input if name] + sorted(implicit)
            outputs = [name for name in node.output if name]
            label = f"{node.op_type} {node.name or (outputs[0] if outputs else '')!r}"
            if any(name in self.reads_data for name in inputs):
                self.reads_data.update(outputs)
            carried = [name for name in inputs if name in self.batch]
            if node.op_type in _RANDOM and node.domain in _ONNX_DOMAINS:
                self.problems.append(f"{label}: draws random numbers, so outputs change from run to run")
                if carried:
                    self.refuse(node, outputs)
                continue
            if not carried:
                continue
            verdict = self.verdict(node)
            tainted = [name for name in carried if name in self.follows_refused]
            after_refused = len(tainted) == len(carried)
            if isinstance(verdict, str):
                if not tainted or (not after_refused and self.own_problem(node, verdict, tainted)):
                    self.problems.append(f"{label}: {verdict}")
                self.refuse(node, outputs)
                continue
            self.accepted += 1
            if after_refused:
                self.follows_refused.update(outputs)
            if verdict is None:
                continue
            for index, name in enumerate(node.output):
                if name:
                    rank = verdict[index] if index < len(verdict) else None
                    self.batch[name] = rank if rank is not None else self.inferred_rank(name)
        for name in self.g.outputs:
            if name in self.reads_data and name not in self.batch:
                self.problems.append(
                    f"output {name!r} depends on the data but does not carry one row per sample"
                )
        return self.problems

    def own_problem(self, node: onnx.NodeProto, verdict: str, tainted: list[str]) -> bool:
        """Whether `node` is refused for what it does itself, not only for reading `tainted` tensors (which
        follow refused nodes, and may carry the samples or be no per-sample tensors at all, a batch size say):
        it is when it stays refused whichever of FREE or BATCH each tainted input is taken as (up to a few
        of them; past that, all FREE), or when the refusal is that its parameters come from the data."""
        if isinstance(verdict, _DataParameters):
            return True
        saved = {name: self.batch[name] for name in tainted}
        choices = itertools.product((False, True), repeat=len(tainted) if len(tainted) <= 4 else 0)
        try:
            for carried in choices:
                for index, name in enumerate(tainted):
                    if index < len(carried) and carried[index]:
                        self.batch[name] = saved[name]
                    else:
                        self.batch.pop(name, None)
                if not isinstance(self.verdict(node), str):
                    return False
            return True
        finally:
            self.batch.update(saved)

    def refuse(self, node: onnx.NodeProto, outputs: list[str]) -> None:
        self.follows_refused.update(outputs)
        for name in outputs:
            self.batch[name] = self.inferred_rank(name)

    def verdict(self, node: onnx.NodeProto) -> Verdict:
        if node.domain not in _ONNX_DOMAINS:
            return f"cannot prove {node.domain}.{node.op_type} keeps samples apart (not an ONNX operator)"
        if _subgraphs(node):
            return "control flow over the data is not proven per-sample"
        rule = _RULES.get(node.op_type)
        if rule is None:
            return f"cannot prove {node.op_type} keeps samples apart"
        return rule(self, node)

    # -- what the rules read ----------------------------------------------------------------------------

    def is_batch(self, name: str) -> bool:
        return bool(name) and name in self.batch

    def inferred_rank(self, name: str) -> int | None:
        shape = self.g.shapes.get(name)
        return None if shape is None else len(shape)

    def shape(self, name: str) -> Shape | None:
        if name in self.g.constants:
            return tuple(int(d) for d in np.shape(self.g.constants[name]))
        return self.g.shapes.get(name)

    def rank(self, name: str) -> int | None:
        known = self.batch.get(name)
        if known is not None:
            return known
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def ints(self, name: str) -> list[int] | None:
        return _constant_ints(self.g, name) if name else None

    def floats(self, name: str) -> list[float] | None:
        value = self.g.constants.get(name) if name else None
        return None if value is None else [float(v) for v in np.asarray(value).reshape(-1)]

    def operand(self, node: onnx.NodeProto, index: int) -> str:
        return node.input[index] if len(node.input) > index else ""

    def axes_operand(self, node: onnx.NodeProto, index: int, attr: str) -> tuple[bool, list[int] | None]:
        """(given, values) of axes spelled as input `index` (newer opsets) or attribute `attr` (older ones);
        values None when given as a tensor computed at run time."""
        name = self.operand(node, index)
        if name:
            return True, self.ints(name)
        value = _attr(node, attr)
        return value is not None, None if value is None else [int(a) for a in value]

    def same(self, node: onnx.NodeProto, rank: int | None) -> tuple[int | None, ...]:
        return (rank,) * len(node.output)

    def parameters(self, node: onnx.NodeProto, first: int = 1) -> str | None:
        """Why the inputs from `first` on are not parameters: one of them is computed from the samples."""
        for name in node.input[first:]:
            if self.is_batch(name):
                return _DataParameters(f"its parameter {name!r} is computed from the data")
        return None

    def spares_batch(self, axes: Sequence[int], rank: int | None, verb: str) -> str | None:
        """Why `axes` of a rank-`rank` tensor may include the batch axis, or None when they cannot."""
        normalized = _normalized(axes, rank)
        if normalized is None:
            return f"{verb} axes {list(axes)} of a tensor of unknown rank"
        return f"{verb} the batch axis" if 0 in normalized else None

    def broadcast_free(self, name: str, rank: int | None) -> str | None:
        """Why FREE operand `name` may line up with the batch axis of a rank-`rank` broadcast result."""
        own = self.rank(name)
        if own is None or rank is None:
            return f"cannot tell how {name!r} broadcasts against the batch axis (rank unknown)"
        if own < rank:
            return None
        if own > rank:
            return f"{name!r} has more axes than the data: broadcasting moves the batch axis"
        shape = self.shape(name)
        first = shape[0] if shape else None
        if first == 1:
            return None
        size = "an unknown size" if first is None else f"size {first}"
        return f"{name!r} spans axis 0 ({size}): its rows would pair with the samples by position"

    # -- the rules --------------------------------------------------------------------------------------

    def elementwise(self, node: onnx.NodeProto) -> Verdict:
        data = node.input[0]
        if node.op_type == "CastLike":  # the second input lends its element type only
            return self.same(node, self.rank(data)) if self.is_batch(data) else None
        if node.op_type == "Dropout":
            training = self.operand(node, 2)
            if (training and self.ints(training) != [0]) or (
                self.g.opset < 7 and not int(_attr(node, "is_test", 0))
            ):
                return "may run in training mode, dropping values at random"
        return self.parameters(node) or self.same(node, self.rank(data))

    def broadcasting(self, node: onnx.NodeProto) -> Verdict:
        operands = [name for name in node.input if name]
        ranks = [self.rank(name) for name in operands]
        if any(rank is None for rank in ranks):
            return "cannot tell how its operands broadcast against the batch axis (rank unknown)"
        out = max(rank for rank in ranks if rank is not None)
        for name, rank in zip(operands, ranks, strict=True):
            if not self.is_batch(name):
                reason = self.broadcast_free(name, out)
                if reason:
                    return reason
            elif rank != out:
                return (
                    f"broadcasting moves the batch axis of {name!r} (rank {rank}) to axis {out - (rank or 0)}"
                )
        return self.same(node, out)

    def batch_normalization(self, node: onnx.NodeProto) -> Verdict:
        if int(_attr(node, "training_mode", 0)):
            return "training_mode=1 normalizes with batch statistics"
        if len([name for name in node.output if name]) > 1:
            return "running-statistics outputs: it updates statistics from the batch (training mode)"
        dynamic = [name for name in node.input[1:5] if self.is_batch(name)]
        if dynamic:
            return _DataParameters(
                f"statistics computed from the data ({', '.join(dynamic)}): batch statistics"
            )
        return self.same(node, self.rank(node.input[0]))

    def per_sample(self, node: onnx.NodeProto) -> Verdict:
        if not self.is_batch(node.input[0]):
            return _DataParameters("its weights are computed from the data")
        if node.op_type == "MaxPool" and self.operand_output(node, 1):
            return "its Indices output counts positions across the whole batch (flattened over N)"
        return self.parameters(node) or self.same(node, self.rank(node.input[0]))

    def operand_output(self, node: onnx.NodeProto, index: int) -> str:
        return node.output[index] if len(node.output) > index else ""

    def normalization_along(self, node: onnx.NodeProto) -> Verdict:
        """LayerNormalization (from `axis` on), LpNormalization, MeanVarianceNormalization (`axes`), Softmax,
        LogSoftmax, Hardmax (opset 13+: along `axis`; before: over the axes from `axis` on)."""
        data = node.input[0]
        rank = self.rank(data)
        if node.op_type == "MeanVarianceNormalization":
            axes = [int(a) for a in _attr(node, "axes", [0, 2, 3])]
        else:
            default = 1 if node.op_type in ("Softmax", "LogSoftmax", "Hardmax") and self.g.opset < 13 else -1
            axes = [int(_attr(node, "axis", default))]
        reason = self.spares_batch(axes, rank, "normalizes over")
        if reason:
            return reason
        if not self.is_batch(data):
            return _DataParameters("its scale or bias is computed from the data")
        for name in node.input[1:]:
            if name:
                reason = self.parameters(node) or self.broadcast_free(name, rank)
                if reason:
                    return reason
        return self.same(node, rank)

    def reduction(self, node: onnx.NodeProto) -> Verdict:
        rank = self.rank(node.input[0])
        given, axes = self.axes_operand(node, 1, "axes")
        if given and axes is None:
            return "reduction axes computed at run time"
        if not axes:
            if int(_attr(node, "noop_with_empty_axes", 0)):
                return self.same(node, rank)
            return "reduces every axis, the batch axis included"
        reason = self.spares_batch(axes, rank, "reduces over")
        if reason:
            return reason
        if int(_attr(node, "keepdims", 1)) or rank is None:
            return self.same(node, rank)
        return self.same(node, rank - len(set(_normalized(axes, rank) or [])))

    def arg_reduction(self, node: onnx.NodeProto) -> Verdict:
        rank = self.rank(node.input[0])
        reason = self.spares_batch([int(_attr(node, "axis", 0))], rank, "reduces over")
        if reason:
            return reason
        keep = int(_attr(node, "keepdims", 1))
        return self.same(node, rank if keep or rank is None else rank - 1)

    def cumulative(self, node: onnx.NodeProto) -> Verdict:
        axis = self.ints(self.operand(node, 1))
        if axis is None:
            return "accumulation axis computed at run time"
        return self.spares_batch(axis, self.rank(node.input[0]), "accumulates along") or self.same(
            node, self.rank(node.input[0])
        )

    def top_k(self, node: onnx.NodeProto) -> Verdict:
        rank = self.rank(node.input[0])
        reason = self.spares_batch([int(_attr(node, "axis", -1))], rank, "sorts along")
        return reason or self.parameters(node) or self.same(node, rank)

    def matmul(self, node: onnx.NodeProto) -> Verdict:
        a, b = node.input[0], node.input[1]
        ra, rb = self.rank(a), self.rank(b)
        if ra is None or rb is None:
            return "cannot tell which axes it contracts (rank unknown)"
        if self.is_batch(a) and self.is_batch(b):
            # Both stacks of matrices: a batched product pairs sample i with sample i when the ranks agree.
            fits = ra == rb >= 3
        elif self.is_batch(a):
            fits = ra >= 2 and self.stacks_apart(b, rb, ra)
        else:
            fits = rb >= 3 and self.stacks_apart(a, ra, rb)
        if not fits:
            return f"contracts or broadcasts the batch axis (ranks {ra} @ {rb}): it sums or pairs samples"
        out = max(ra, rb) - (1 if 1 in (ra, rb) else 0)
        return self.same(node, out)

    def stacks_apart(self, free: str, free_rank: int, batch_rank: int) -> bool:
        """Whether a FREE MatMul operand's stacking axes cannot line up with the other's batch axis."""
        if free_rank <= 2 or free_rank < batch_rank:
            return True
        shape = self.shape(free)
        return free_rank == batch_rank and bool(shape) and shape is not None and shape[0] == 1

    def gemm(self, node: onnx.NodeProto) -> Verdict:
        a, b, c = node.input[0], node.input[1], self.operand(node, 2)
        if not self.is_batch(a) or self.is_batch(b) or int(_attr(node, "transA", 0)):
            return "contracts the batch axis (only A's rows, untransposed, may carry the samples)"
        if c and self.is_batch(c):  # per-sample biases, one (N, M) row each
            return self.same(node, 2) if self.rank(c) == 2 else "its bias C carries the samples off axis 0"
        if c:
            reason = self.broadcast_free(c, 2)
            if reason:
                return reason
        return self.same(node, 2)

    def transpose(self, node: onnx.NodeProto) -> Verdict:
        rank = self.rank(node.input[0])
        perm = _attr(node, "perm")
        if perm is None:
            if rank is None:
                return "reverses the axes of a tensor of unknown rank"
            perm = list(reversed(range(rank)))
        if int(perm[0]) != 0:
            return f"moves the batch axis to axis {list(perm).index(0) if 0 in perm else '?'}"
        return self.same(node, len(perm))

    def reshape(self, node: onnx.NodeProto) -> Verdict:
        data, target = node.input[0], node.input[1]
        if not self.is_batch(data) or self.is_batch(target):
            return "target shape computed from the data"
        shape = self.ints(target)
        if shape is None:
            return "target shape computed at run time: cannot prove it keeps axis 0 as the batch"
        allowzero = int(_attr(node, "allowzero", 0))
        if shape and shape[0] == 0 and not allowzero:
            return self.same(node, len(shape))
        if shape and shape[0] == -1:
            full = self.shape(data)
            sample = full[1:] if full is not None else None
            rest: list[int | None] = []
            for position, size in enumerate(shape[1:], start=1):
                copies = size == 0 and not allowzero
                fits = sample is not None and position - 1 < len(sample)
                rest.append(
                    (sample[position - 1] if sample is not None and fits else None) if copies else size
                )
            if (
                sample is not None
                and all(d is not None for d in sample)
                and all(r is not None and r >= 0 for r in rest)
                and int(np.prod([d or 0 for d in sample])) > 0
                and int(np.prod([r or 0 for r in rest])) == int(np.prod([d or 0 for d in sample]))
            ):
                return self.same(node, len(shape))
            return f"target shape {shape} puts -1 on axis 0, but the rest is not provably one sample's size"
        return (
            f"target shape {shape} does not keep axis 0 as the batch (its first entry must be 0, or -1 with "
            "the rest one sample's size): samples would be merged or split"
        )

    def flatten(self, node: onnx.NodeProto) -> Verdict:
        axis = int(_attr(node, "axis", 1))
        normalized = _normalized([axis], self.rank(node.input[0]))
        if normalized is None:
            return f"flattens at axis {axis} of a tensor of unknown rank"
        if normalized[0] == 0:
            return "flattens the batch axis into the features"
        if normalized[0] > 1:
            return f"flattens at axis {axis}: axis 0 would hold samples times the axes before it"
        return self.same(node, 2)

    def squeeze(self, node: onnx.NodeProto) -> Verdict:
        rank = self.rank(node.input[0])
        given, axes = self.axes_operand(node, 1, "axes")
        if not given:
            return "squeezes every size-1 axis: the batch axis too, for a batch of one"
        if axes is None:
            return "squeeze axes computed at run time"
        reason = self.spares_batch(axes, rank, "squeezes")
        if reason:
            return reason
        return self.same(node, None if rank is None else rank - len(set(_normalized(axes, rank) or [])))

    def unsqueeze(self, node: onnx.NodeProto) -> Verdict:
        rank = self.rank(node.input[0])
        given, axes = self.axes_operand(node, 1, "axes")
        if not given or axes is None:
            return "unsqueeze axes computed at run time"
        out = None if rank is None else rank + len(axes)
        reason = self.spares_batch(axes, out, "inserts an axis at")
        return reason or self.same(node, out)

    def concat(self, node: onnx.NodeProto) -> Verdict:
        operands = [name for name in node.input if name]
        free = [name for name in operands if not self.is_batch(name)]
        if free:
            return f"joins {free[0]!r}, which does not carry the samples: it fits one batch size only"
        rank = self.rank(operands[0])
        return self.spares_batch([int(_attr(node, "axis", 0))], rank, "concatenates along") or self.same(
            node, rank
        )

    def split(self, node: onnx.NodeProto) -> Verdict:
        rank = self.rank(node.input[0])
        reason = self.spares_batch([int(_attr(node, "axis", 0))], rank, "splits")
        return reason or self.parameters(node) or self.same(node, rank)

    def slice(self, node: onnx.NodeProto) -> Verdict:
        rank = self.rank(node.input[0])
        reason = self.parameters(node)
        if reason:
            return reason
        given, axes = self.axes_operand(node, 3, "axes")
        if not given:
            return "slices from axis 0 on (no axes given): it cuts the batch"
        if axes is None:
            return "slice axes computed at run time"
        return self.spares_batch(axes, rank, "slices") or self.same(node, rank)

    def gather(self, node: onnx.NodeProto) -> Verdict:
        data, indices = node.input[0], node.input[1]
        axis = int(_attr(node, "axis", 0))
        rank_data, rank_indices = self.rank(data), self.rank(indices)
        out = None if rank_data is None or rank_indices is None else rank_data + rank_indices - 1
        if self.is_batch(indices):
            if self.is_batch(data):
                return "indexes the data with values computed from the data: it picks among the samples"
            # A constant table looked up by the samples: row i of the result is sample i's lookup.
            normalized = _normalized([axis], rank_data)
            if normalized != [0]:
                return f"places the samples of its indices on axis {axis}"
            return self.same(node, out)
        reason = self.spares_batch([axis], rank_data, "picks samples along")
        return reason or self.same(node, out)

    def gather_elements(self, node: onnx.NodeProto) -> Verdict:
        data, indices = node.input[0], node.input[1]
        if not (self.is_batch(data) and self.is_batch(indices)):
            return "one of data and indices does not carry the samples: it fits one batch size only"
        rank = self.rank(data)
        return self.spares_batch([int(_attr(node, "axis", 0))], rank, "picks along") or self.same(node, rank)

    def pad(self, node: onnx.NodeProto) -> Verdict:
        rank = self.rank(node.input[0])
        reason = self.parameters(node)
        if reason:
            return reason
        pads: list[int] | None
        if self.g.opset < 11:
            pads = [int(p) for p in _attr(node, "pads", [])]
        else:
            pads = self.ints(self.operand(node, 1))
        if pads is None:
            return "pads computed at run time"
        axes_name = self.operand(node, 3)
        axes = self.ints(axes_name) if axes_name else list(range(len(pads) // 2))
        if axes is None:
            return "pad axes computed at run time"
        normalized = _normalized(axes, rank)
        if normalized is None:
            return "pads axes of a tensor of unknown rank"
        half = len(pads) // 2
        for i, axis in enumerate(normalized):
            if axis == 0 and i + half < len(pads) and (pads[i] or pads[i + half]):
                return "pads the batch axis: it adds rows that belong to no sample"
        return self.same(node, rank)

    def tile(self, node: onnx.NodeProto) -> Verdict:
        repeats = self.ints(self.operand(node, 1))
        if repeats is None:
            return "repeats computed at run time"
        if not repeats or repeats[0] != 1:
            return "repeats the batch axis"
        return self.same(node, self.rank(node.input[0]))

    def expand(self, node: onnx.NodeProto) -> Verdict:
        rank = self.rank(node.input[0])
        shape = self.ints(self.operand(node, 1))
        if shape is None or rank is None:
            return (
                "target shape computed at run time" if shape is None else "expands a tensor of unknown rank"
            )
        if len(shape) > rank:
            return "adds axes in front of the batch axis"
        if len(shape) == rank and shape[0] != 1:
            return f"expands the batch axis to {shape[0]}"
        return self.same(node, rank)

    def resize(self, node: onnx.NodeProto) -> Verdict:
        rank = self.rank(node.input[0])
        reason = self.parameters(node)
        if reason:
            return reason
        axes = _attr(node, "axes")
        resized = list(range(rank)) if axes is None and rank is not None else _normalized(axes or [], rank)
        if resized is None or (axes is None and rank is None):
            return "cannot tell which axes it resizes (rank unknown)"
        if 0 not in resized:
            return self.same(node, rank)
        position = resized.index(0)
        sizes = ""
        if node.op_type == "Upsample" and self.g.opset < 9:
            scales = [float(s) for s in _attr(node, "scales", [])]
        else:
            newer = node.op_type == "Resize" and self.g.opset >= 11
            scales_name = self.operand(node, 2 if newer else 1)
            sizes = self.operand(node, 3) if newer else ""
            found = self.floats(scales_name)
            if scales_name and found is None:
                return "scales computed at run time"
            scales = found or []
        if not scales:
            return "sets the batch axis to a fixed size" if sizes else "resize scales computed at run time"
        if position >= len(scales) or scales[position] != 1.0:
            return "rescales the batch axis"
        mode = _text(_attr(node, "coordinate_transformation_mode", "half_pixel"))
        if mode == "tf_crop_and_resize":
            roi = self.floats(self.operand(node, 1))
            if (
                roi is None
                or len(roi) != 2 * len(resized)
                or (roi[position], roi[position + len(resized)])
                != (
                    0.0,
                    1.0,
                )
            ):
                return "crops the batch axis"
        return self.same(node, rank)

    def quantization(self, node: onnx.NodeProto) -> Verdict:
        rank = self.rank(node.input[0])
        reason = self.parameters(node)
        if reason:
            return reason
        scale = self.shape(node.input[1])
        if scale is None:
            return "cannot tell how its scale lines up with the data (shape unknown)"
        if len(scale) >= 2:  # blocked quantization: a scale shaped like the data, one row per sample
            return self.broadcast_free(node.input[1], rank) or self.same(node, rank)
        if len(scale) == 1 and scale[0] != 1:  # per-axis: one scale per slice along `axis`
            reason = self.spares_batch([int(_attr(node, "axis", 1))], rank, "quantizes per slice along")
        return reason or self.same(node, rank)

    def recurrent(self, node: onnx.NodeProto) -> Verdict:
        if int(_attr(node, "layout", 0)) != 1:
            return "layout=0 reads axis 0 as the sequence: the samples would be steps of one sequence"
        if not self.is_batch(node.input[0]):
            return "its sequence input does not carry the samples"
        for index in (1, 2, 3, 7):  # W, R, B, P (peepholes)
            name = self.operand(node, index)
            if self.is_batch(name):
                return _DataParameters(f"its parameter {name!r} is computed from the data")
        for index in (4, 5, 6):  # sequence_lens, initial_h, initial_c: one row per sample with layout=1
            name = self.operand(node, index)
            if name and not self.is_batch(name):
                return f"{name!r} does not carry the samples: it fits one batch size only"
        return (4, 3, 3)[: len(node.output)]

    def shape_of(self, node: onnx.NodeProto) -> Verdict:
        start = _normalized([int(_attr(node, "start", 0))], self.rank(node.input[0]))
        if start is None or start[0] < 1:
            return "reads the batch size"
        return None  # one sample's shape: the same alone and in any batch

    def size(self, node: onnx.NodeProto) -> Verdict:
        return "reads the batch size"


_RULES: dict[str, Callable[[_Dataflow, onnx.NodeProto], Verdict]] = {
    **dict.fromkeys(_ELEMENTWISE, _Dataflow.elementwise),
    **dict.fromkeys(_BROADCASTING, _Dataflow.broadcasting),
    **dict.fromkeys(_PER_SAMPLE, _Dataflow.per_sample),
    **dict.fromkeys(_REDUCTIONS, _Dataflow.reduction),
    **dict.fromkeys(
        (
            "LayerNormalization",
            "LpNormalization",
            "MeanVarianceNormalization",
            "Softmax",
            "LogSoftmax",
            "Hardmax",
        ),
        _Dataflow.normalization_along,
    ),
    **dict.fromkeys(("ArgMax", "ArgMin"), _Dataflow.arg_reduction),
    **dict.fromkeys(("QuantizeLinear", "DequantizeLinear"), _Dataflow.quantization),
    **dict.fromkeys(("RNN", "GRU", "LSTM"), _Dataflow.recurrent),
    **dict.fromkeys(("Resize", "Upsample"), _Dataflow.resize),
    "BatchNormalization": _Dataflow.batch_normalization,
    "Concat": _Dataflow.concat,
    "CumSum": _Dataflow.cumulative,
    "Expand": _Dataflow.expand,
    "Flatten": _Dataflow.flatten,
    "Gather": _Dataflow.gather,
    "GatherElements": _Dataflow.gather_elements,
    "Gemm": _Dataflow.gemm,
    "MatMul": _Dataflow.matmul,
    "Pad": _Dataflow.pad,
    "Reshape": _Dataflow.reshape,
    "Shape": _Dataflow.shape_of,
    "Size": _Dataflow.size,
    "Slice": _Dataflow.slice,
    "Split": _Dataflow.split,
    "Squeeze": _Dataflow.squeeze,
    "Tile": _Dataflow.tile,
    "TopK": _Dataflow.top_k,
    "Transpose": _Dataflow.transpose,
    "Unsqueeze": _Dataflow.unsqueeze,
}


def _check_samples_independent(g: _Graph) -> CheckResult:
    flow = _Dataflow(g)
    problems = flow.run()
    if problems:
        return CheckResult("samples_independent", False, float(len(problems)), "; ".join(problems))
    detail = (
        f"proved by dataflow over {flow.accepted} operation(s) on the data: each keeps every sample on its "
        "own row of the batch axis, and every output computed from the data has one row per sample"
    )
    return CheckResult("samples_independent", True, 0.0, detail)


def _check_statistics(g: _Graph, stats: FrozenStatistics | str) -> CheckResult:
    if isinstance(stats, str):
        return CheckResult("statistics_valid", False, None, stats)
    problems = []
    for name, values in (("gamma", stats.gamma), ("beta", stats.beta), ("moving_mean", stats.mean)):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            problems.append(f"{name}: {bad} non-finite value(s)")
    var = stats.var
    if np.count_nonzero(~np.isfinite(var)):
        problems.append(f"moving_var: {np.count_nonzero(~np.isfinite(var))} non-finite value(s)")
    if np.count_nonzero(var < 0):
        problems.append(f"moving_var: {np.count_nonzero(var < 0)} negative value(s)")
    if not np.isfinite(stats.eps) or np.count_nonzero(~(var + stats.eps > 0)):
        problems.append(f"moving_var + eps is not > 0 (eps={stats.eps!r})")
    for name in ("scale", "shift", "head_weight", "head_bias"):
        if name in g.constants and np.count_nonzero(~np.isfinite(np.asarray(g.constants[name], np.float64))):
            problems.append(f"{name}: non-finite value(s)")
    figure = float(np.nanmin(var)) if var.size and not np.all(np.isnan(var)) else None
    detail = "; ".join(problems) or (
        f"{var.size} channels from {stats.source}: finite, min moving_var {figure:.3g}, eps {stats.eps:.3g}"
    )
    return CheckResult("statistics_valid", not problems, figure, detail)


@dataclass
class _Runtime:
    """The one onnxruntime session the numeric checks share, and the input it takes."""

    session: ort.InferenceSession
    input_name: str
    input_dtype: np.dtype[Any]
    input_shape: tuple[int | None, ...]

    def run(self, x: NDArray[Any]) -> dict[str, NDArray[Any]]:
        names = [out.name for out in self.session.get_outputs()]
        values = self.session.run(names, {self.input_name: x})
        return {name: np.asarray(value) for name, value in zip(names, values, strict=True)}


def _open_runtime(g: _Graph, providers: Sequence[str] | None) -> _Runtime | str:
    if len(g.inputs) != 1:
        return f"the graph takes {len(g.inputs)} inputs; a frozen-bn graph takes one"
    value = g.inputs[0]
    tensor = value.type.tensor_type
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    except Exception:
        return f"input {value.name!r} has no tensor element type"
    if not np.issubdtype(dtype, np.floating):
        return f"input {value.name!r} has dtype {dtype}, expected a float type"
    shape = tuple(
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings on stderr would leak into a server's log at every load
    options.intra_op_num_threads = 1  # small probes: one thread is fastest and reproducible
    # No arena: it keeps each run's buffers reserved beside the next batch's, which adds up to two of the
    # largest batches (_INVARIANCE_BATCH_BYTES each) to a server's peak memory at load.
    options.enable_cpu_mem_arena = False
    try:
        session = ort.InferenceSession(
            g.model.SerializeToString(), options, providers=exact_providers(providers or [CPU])
        )
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
        return f"onnxruntime cannot load the model: {_one_line(exc)}"
    return _Runtime(session, value.name, dtype, shape)


def _sample_shape(runtime: _Runtime) -> tuple[int, ...]:
    """One sample's shape: fixed dims as declared, dynamic ones 3, 4, 5, ... (distinct to expose mix-ups)."""
    dims, size = [], 3
    for dim in runtime.input_shape[1:]:
        if dim is None:
            dims.append(size)
            size += 1
        else:
            dims.append(dim)
    return tuple(dims)


def _generate(
    runtime: _Runtime, stats: FrozenStatistics | str, count: int, rng: np.random.Generator
) -> NDArray[Any]:
    """`count` samples drawn around the stored statistics (mean ± 2 std per channel), in the input dtype."""
    shape = (count, *_sample_shape(runtime))
    x = rng.standard_normal(shape)
    if not isinstance(stats, str) and stats.axis < len(shape) and shape[stats.axis] == stats.mean.size:
        with np.errstate(all="ignore"):
            std = np.sqrt(np.abs(stats.var) + abs(stats.eps))
        center, spread = (
            _along(np.nan_to_num(stats.mean), stats.axis, len(shape)),
            _along(np.nan_to_num(std, nan=1.0, posinf=1.0), stats.axis, len(shape)),
        )
        # In place: 64 image-sized float64 samples are ~77 MB each copy, and a server verifies at load.
        x *= 2 * spread
        x += center
    return x.astype(runtime.input_dtype)


def _check_formula(
    g: _Graph, stats: FrozenStatistics | str, runtime: _Runtime | str, x: NDArray[Any]
) -> CheckResult:
    if isinstance(runtime, str):
        return CheckResult("formula", False, None, runtime)
    if isinstance(stats, str):
        return CheckResult("formula", False, None, f"nothing to compare against: {stats}")
    outputs = runtime.run(x)
    if "output" not in outputs:
        return CheckResult("formula", False, None, "the graph has no output named 'output'")
    unverified = sorted(set(outputs) - {"output", "logits"})
    if unverified:
        return CheckResult(
            "formula", False, None, f"outputs with no formula to check: {', '.join(unverified)}"
        )
    dtype = runtime.input_dtype
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
    detail = f"{'; '.join(parts)}; {x.shape[0]} samples vs float64 formula from {stats.source}"
    return CheckResult("formula", passed, error, detail)


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


def _companions(
    kind: str, pool: NDArray[Any], count: int, rng: np.random.Generator, dtype: np.dtype[Any]
) -> NDArray[Any]:
    """`count` samples of one kind, shaped and typed like `pool`'s, built so that no value overflows `dtype`
    (an overflow would warn, and verify never prints)."""
    shape = (count, *pool.shape[1:])
    huge = float(np.finfo(dtype).max) / 4
    if kind == "random":
        picked: NDArray[Any] = pool[rng.integers(0, len(pool), count)]
        return picked
    if kind == "huge":
        signs = rng.integers(0, 2, shape, dtype=np.int8).astype(bool)
        signed: NDArray[Any] = np.where(signs, dtype.type(huge), dtype.type(-huge))
        return signed
    if kind == "zeros":
        return np.zeros(shape, dtype)
    # -10·|x|, with |x| clipped to huge/10 first so the product stays finite: float16 data past |x| ~ 6550
    # would overflow. Computed in the input dtype, so the largest batch takes no float64 temporaries.
    negative: NDArray[Any] = np.abs(pool[rng.integers(0, len(pool), count)])
    np.minimum(negative, dtype.type(huge / 10), out=negative)
    negative *= dtype.type(-10)
    return negative


def _logit_bounds(
    g: _Graph, alone: dict[str, NDArray[Any]], rtol: float, dtype: np.dtype[Any]
) -> dict[str, F64 | float]:
    """How far each output of one sample (besides `output`, which must not move at all) may move by rounding.

    A linear head's logit sums |pooled_k|·|W_kj| + |b_j| worth of terms, and rounding errors scale with those,
    not with the logit: a logit near 0 by cancellation still moves by a few ulp of its terms when the GEMM
    picks another kernel. Outputs with no head found in the graph are bounded relative to their own largest
    magnitude instead. Non-finite magnitudes bound nothing (the value must then match bitwise).
    """
    tiny = float(np.finfo(dtype).smallest_normal)
    bounds: dict[str, F64 | float] = {}
    for name, value in alone.items():
        if name == "output":
            continue
        head = _find_linear_head(g, name)
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
    g: _Graph, runtime: _Runtime | str, probes: NDArray[Any], pool: NDArray[Any], seed: int
) -> CheckResult:
    if isinstance(runtime, str):
        return CheckResult("batch_invariance", False, None, runtime)
    if runtime.input_shape and runtime.input_shape[0] is not None:
        return CheckResult(
            "batch_invariance", False, None, f"the batch dimension is fixed to {runtime.input_shape[0]}"
        )
    rng = np.random.default_rng(seed + 1)
    dtype = runtime.input_dtype
    alone = [runtime.run(probes[i : i + 1]) for i in range(len(probes))]
    # `output` must match bit for bit. Other outputs (pooled `logits`) may move in the last bits:
    # onnxruntime's GEMM and reductions over leading axes pick kernels by batch size. They are held to the
    # rounding bound of a sum over one sample's elements; real batch dependence is orders past it.
    rtol = relative_tolerance(dtype, int(np.prod(probes.shape[1:])))
    bounds = [_logit_bounds(g, outputs, rtol, dtype) for outputs in alone]
    sample_bytes = max(1, int(np.prod(probes.shape[1:])) * dtype.itemsize)
    largest = max(len(probes), _INVARIANCE_BATCH_BYTES // sample_bytes)
    sizes = list(dict.fromkeys(min(max(size, len(probes)), largest) for size in BATCH_SIZES))
    worst, max_ratio, runs = 0.0, 0.0, 0
    failures: list[str] = []
    for count in sizes:
        for kind in COMPANIONS:
            batch = _companions(kind, pool, count, rng, dtype)
            slots = rng.permutation(count)[: len(probes)]
            batch[slots] = probes
            together = runtime.run(batch)
            runs += 1
            for i, slot in enumerate(slots):
                for name, value in alone[i].items():
                    diff = _differences(value[0], together[name][slot])
                    dev = float("inf") if diff is None else float(diff.max(initial=0.0))
                    worst = max(worst, dev)
                    if dev == 0.0:
                        continue
                    bound = bounds[i].get(name, 0.0)
                    if diff is None or not np.all(diff <= bound):
                        failures.append(
                            f"{name} of probe {i} moved by {dev:.3g} in a batch of {count} ({kind})"
                        )
                        continue
                    ratio = np.divide(diff, bound, out=np.zeros_like(diff), where=diff > 0)
                    max_ratio = max(max_ratio, float(ratio.max()))
            # Freed before the next batch is built: with the largest samples each batch and its outputs
            # take _INVARIANCE_BATCH_BYTES apiece, and a server runs this at load.
            del batch, together
    setting = (
        f"{runs} batches (sizes {', '.join(map(str, sizes))}; {', '.join(COMPANIONS)} companions; "
        f"{len(probes)} probes)"
    )
    if failures:
        detail = f"{failures[0]} ({len(failures)} deviations); a sample's output must not depend on its batch"
        return CheckResult("batch_invariance", False, worst, detail)
    if worst == 0.0:
        return CheckResult(
            "batch_invariance", True, worst, f"every output bitwise equal alone and in {setting}"
        )
    detail = (
        f"output bitwise equal alone and in {setting}; logits within {max_ratio:.3g} of their rounding bound"
    )
    return CheckResult("batch_invariance", True, worst, detail)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}"


def _guard(name: str, check: Callable[[], CheckResult]) -> CheckResult:
    """Run one check; a check that breaks on a strange graph fails with the reason instead of raising."""
    try:
        return check()
    except Exception as exc:  # verify must report on any parseable graph, never raise
        return CheckResult(name, False, None, f"could not run: {_one_line(exc)}")


def _prepare_data(data: ArrayLike, runtime: _Runtime) -> NDArray[Any]:
    x = np.asarray(data)
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"data has dtype {x.dtype}, expected numbers")
    expected = runtime.input_shape
    if x.ndim != len(expected) or any(
        e is not None and e != s for e, s in zip(expected[1:], x.shape[1:], strict=True)
    ):
        shown = ["N" if e is None else e for e in expected]
        raise ValueError(f"data has shape {x.shape}, the model takes {tuple(shown)}")
    if x.shape[0] == 0:
        raise ValueError("data has no samples")
    return x.astype(runtime.input_dtype)


def verify_model(
    model: onnx.ModelProto | str | os.PathLike[str],
    *,
    data: NDArray[Any] | None = None,
    seed: int = 0,
    providers: Sequence[str] | None = None,
) -> VerificationReport:
    """Run every check on `model` (see the module docstring) and report each one; never prints.

    data: (N, *sample) samples to feed instead of generated ones (cast to the model's input dtype); seed fixes
    the generated samples and companions. Raises `ModelFileError` only when `model` is not an ONNX model.
    """
    proto, name = load_model(model)
    g = _Graph(proto)
    stats = _find_statistics(g)
    checks = [
        _guard("onnx_checker", lambda: _check_onnx(g)),
        _guard("opset_supported", lambda: _check_opset(g)),
        _guard("inference_mode", lambda: _check_inference_mode(g)),
        _guard("samples_independent", lambda: _check_samples_independent(g)),
        _guard("statistics_valid", lambda: _check_statistics(g, stats)),
    ]
    runtime = _open_runtime(g, providers)
    rng = np.random.default_rng(seed)
    samples: NDArray[Any] | str
    if isinstance(runtime, str):
        samples = runtime
    else:
        try:
            samples = _generate(runtime, stats, 64, rng) if data is None else _prepare_data(data, runtime)
        except Exception as exc:  # malformed --data: both numeric checks fail with the reason
            samples = f"cannot use the data: {_one_line(exc)}"
    if isinstance(samples, str) or isinstance(runtime, str):
        reason = samples if isinstance(samples, str) else str(runtime)
        checks += [
            CheckResult("formula", False, None, reason),
            CheckResult("batch_invariance", False, None, reason),
        ]
    else:
        rt, xs = runtime, samples
        checks.append(_guard("formula", lambda: _check_formula(g, stats, rt, xs[:_FORMULA_ROWS])))
        probes = xs[: min(PROBES, len(xs))]
        checks.append(_guard("batch_invariance", lambda: _check_batch_invariance(g, rt, probes, xs, seed)))
    return VerificationReport(model=name, checks=tuple(checks), metadata=g.metadata)
