"""Prove an ONNX graph normalizes with frozen statistics: structure, statistics, numerics, batch invariance.

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
from onnx import helper

from bn_export.errors import ModelFileError
from bn_export.onnx_graph import GraphIndex, constant_ints, node_attribute
from bn_export.providers import CPU, exact_providers
from bn_export.sample_independence import prove_samples_independent

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


def find_statistics(model: onnx.ModelProto) -> FrozenStatistics | str:
    """The frozen statistics of a frozen-bn graph, or a sentence saying why there are none to check against.

    From the single BatchNormalization node's constant inputs (channel axis 1 of its input, or `perm[1]` when
    a Transpose feeds it), else from `metadata_props["statistics"]` with `eps` and `axis` (the folded form).
    """
    return _find_statistics(GraphIndex(model))


def _find_statistics(g: GraphIndex) -> FrozenStatistics | str:
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
            perm = node_attribute(source, "perm")
            axis = int(perm[1]) if perm else 1
        eps = float(node_attribute(node, "epsilon", 1e-5))
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


def _find_linear_head(g: GraphIndex, logits: str) -> _HeadTerms | None:
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
    elif node.op_type == "Gemm" and not int(node_attribute(node, "transA", 0)):
        weight = absolute(node.input[1]) * abs(float(node_attribute(node, "alpha", 1.0)))
        weight = weight.T if int(node_attribute(node, "transB", 0)) else weight
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in g.constants:
                return None
            bias = bias + absolute(node.input[2]) * abs(float(node_attribute(node, "beta", 1.0)))
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
        axes = node_attribute(pool, "axes")
        if axes is None and len(pool.input) > 1 and pool.input[1]:
            axes = constant_ints(g, pool.input[1])
        if not axes:
            return None
        pool_axes, mean = tuple(int(a) for a in axes), pool.op_type == "ReduceMean"
        keepdims = bool(int(node_attribute(pool, "keepdims", 1)))
        pooled = unwrapped(pool.input[0])
    source = aliases.get(pooled)
    if source is None or source == logits:
        return None
    return _HeadTerms(source, pool_axes, mean, keepdims, weight, bias)


# -- the checks ---------------------------------------------------------------------------------------------


def _check_onnx(g: GraphIndex) -> CheckResult:
    try:
        onnx.checker.check_model(g.model, full_check=True)
    except Exception as exc:  # the checker raises ValidationError, shape inference InferenceError, ...
        return CheckResult("onnx_checker", False, None, _one_line(exc))
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
        label = node.name or node.output[0]
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


def _check_statistics(g: GraphIndex, stats: FrozenStatistics | str) -> CheckResult:
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


def _open_runtime(g: GraphIndex, providers: Sequence[str] | None) -> _Runtime | str:
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
    g: GraphIndex, stats: FrozenStatistics | str, runtime: _Runtime | str, x: NDArray[Any]
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
    g: GraphIndex, alone: dict[str, NDArray[Any]], rtol: float, dtype: np.dtype[Any]
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
    g: GraphIndex, runtime: _Runtime | str, probes: NDArray[Any], pool: NDArray[Any], seed: int
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
    g = GraphIndex(proto)
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
