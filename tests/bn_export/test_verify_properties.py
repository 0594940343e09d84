"""Properties of verify_model: every frozen export passes; every graph whose output mixes samples fails."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from bn_export.checkpoint import Checkpoint, LinearHead
from bn_export.errors import ExportError
from bn_export.export import export_onnx
from bn_export.onnx_graph import DEFAULT_OPSET, DTYPES, FORMS, MIN_OPSET, Dtype, Form, ir_version_for
from bn_export.providers import CPU
from bn_export.verify import BATCH_SIZES, PROBES, VerificationReport, verify_model
from tests.bn_export.graphs import LAYOUTS, make_checkpoint, samples_like


def failed(report: VerificationReport) -> set[str]:
    return {check.name for check in report.checks if not check.passed}


# -- 1. frozen exports pass ---------------------------------------------------------------------------------

# float16 graphs compute in float32 but take and give float16: the data (|mean| + 4 std, checked by the
# exporter) and the normalized output (gamma/sqrt(var + eps) times float16's rounding of x near the mean)
# must both stay within float16's range, so its statistics span a narrower band than float32/float64's.
_DECADES = {
    "float16": {"mean": (-3.0, 2.5), "var": (-4.0, 5.0)},
    "float32": {"mean": (-3.0, 12.0), "var": (-30.0, 30.0)},
    "float64": {"mean": (-3.0, 12.0), "var": (-30.0, 30.0)},
}


def _signed_decades(low: float, high: float) -> st.SearchStrategy[float]:
    """±10^e for e uniform in [low, high]: values spread over many orders of magnitude, both signs."""
    return st.builds(
        lambda sign, exponent: sign * 10.0**exponent,
        st.sampled_from([-1.0, 1.0]),
        st.floats(low, high),
    )


def head_that_may_cancel(
    gamma: np.ndarray,
    beta: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
    dtype: Dtype,
    classes: int,
    rng: np.random.Generator,
) -> LinearHead:
    """A head whose biases are of the order of what the pooled outputs add to them, either sign, so logits
    can cancel to near 0: on data up to 12 std from the mean (verify draws mean + 2·std·z, rounded to
    `dtype`) each bias is up to a quarter of the largest such sum."""
    std = np.sqrt(var + eps)
    deviation = 12 * std + (np.abs(mean) + 12 * std) * float(np.finfo(np.dtype(dtype)).eps)
    largest_output = np.abs(gamma) / std * deviation + np.abs(beta)
    weight = rng.standard_normal((gamma.size, classes))
    bias = rng.uniform(-0.25, 0.25, classes) * (largest_output @ np.abs(weight))
    return LinearHead(weight, bias, "cross-entropy")


@st.composite
def frozen_checkpoints(draw: st.DrawFn, dtype: Dtype) -> Checkpoint:
    """A checkpoint with statistics from tiny to huge variances and means far from 0, valid for `dtype`."""
    sample_shape, axis = draw(st.sampled_from(LAYOUTS))
    channels = sample_shape[axis - 1]
    decades = _DECADES[dtype]
    eps = draw(st.sampled_from([0.0, 1e-12, 1e-5, 1e-3, 0.1]))
    variance = st.builds(lambda e: 10.0**e, st.floats(*decades["var"]))
    if eps >= 10.0 ** decades["var"][0]:
        variance = st.one_of(st.just(0.0), variance)  # a constant channel: eps alone keeps it finite

    def per_channel(values: st.SearchStrategy[float]) -> np.ndarray:
        """(C,) drawn element by element, so hypothesis shrinks each channel on its own."""
        return np.array(draw(st.lists(values, min_size=channels, max_size=channels)))

    gamma = per_channel(_signed_decades(-1.0, 1.0))
    beta = per_channel(_signed_decades(-2.0, 2.0))
    mean = per_channel(st.one_of(st.just(0.0), _signed_decades(*decades["mean"])))
    var = per_channel(variance)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    head = head_that_may_cancel(gamma, beta, mean, var, eps, dtype, draw(st.integers(1, 4)), rng)
    return make_checkpoint(
        sample_shape,
        axis,
        gamma=gamma,
        beta=beta,
        moving_mean=mean,
        moving_var=var,
        eps=eps,
        head=head,
    )


@dataclass(frozen=True)
class FrozenExport:
    """How to export a checkpoint, and the samples (count, spatial size) to verify (None: generated)."""

    checkpoint: Checkpoint
    dtype: Dtype
    form: Form
    with_head: bool
    opset: int
    data: tuple[int, int] | None


@st.composite
def frozen_exports(draw: st.DrawFn) -> FrozenExport:
    dtype = draw(st.sampled_from(DTYPES))
    return FrozenExport(
        checkpoint=draw(frozen_checkpoints(dtype)),
        dtype=dtype,
        form=draw(st.sampled_from(FORMS)),
        with_head=draw(st.booleans()),
        opset=draw(st.sampled_from([MIN_OPSET, DEFAULT_OPSET, 18, 21])),
        data=draw(st.none() | st.tuples(st.integers(1, 9), st.integers(1, 6))),
    )


@settings(max_examples=40, deadline=None)
@given(case=frozen_exports())
def test_every_frozen_export_passes_every_check(
    tmp_path_factory: pytest.TempPathFactory, case: FrozenExport
) -> None:
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    export_onnx(
        case.checkpoint,
        path,
        form=case.form,
        opset=case.opset,
        dtype=case.dtype,
        with_head=case.with_head,
    )
    data = None
    if case.data is not None:  # another spatial size than the fitted one, and as few as one sample
        count, spatial = case.data
        data = samples_like(case.checkpoint, count, seed=count, spatial=spatial)
    report = verify_model(path, data=data)
    assert report.passed, report.render()
    invariance = report.checks[-1]
    assert invariance.name == "batch_invariance"
    # The normalization is elementwise: only pooled logits may move, by rounding, inside a batch.
    assert "output bitwise equal" in invariance.detail, invariance.detail


# -- 2. batch-mixing graphs fail ----------------------------------------------------------------------------

STRUCTURE = "samples_independent"
INVARIANCE = "batch_invariance"
MODE = "inference_mode"
FORMULA = "formula"
# The largest batch the invariance check builds (a graph that mixes only in larger batches is out of its
# reach, and the structural check alone must catch it).
LARGEST_PROBED_BATCH = max(*BATCH_SIZES, PROBES)


@dataclass(frozen=True)
class GraphSpec:
    """What a graph passes along, (N, C, *spatial) tensors of `rank` axes, and the opset it imports."""

    rank: int
    channels: int
    opset: int


class GraphBuilder:
    """The nodes and initializers of one graph under construction, with fresh tensor names."""

    def __init__(self, prefix: str = "") -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.prefix = prefix
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def const(self, value: Any, dtype: Any = np.float32, *, as_node: bool = False) -> str:
        """A constant tensor, as an initializer or (`as_node`) a Constant node: verify must read both."""
        name = self.fresh("const")
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        else:
            self.initializers.append(tensor)
        return name

    def ops(self, op_type: str, inputs: list[str], outputs: int, **attrs: Any) -> list[str]:
        names = [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, **attrs))
        return names

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        return self.ops(op_type, list(inputs), 1, **attrs)[0]

    def reduce(
        self,
        op: str,
        t: str,
        axes: list[int] | None,
        *,
        keepdims: int,
        opset: int,
        axes_as_node: bool = False,
    ) -> str:
        """`op` over `axes` (None: every axis), spelled as `op` takes them at `opset`: an attribute
        (Reduce*-13) or an input (ReduceSum-13, every Reduce*-18) from an initializer or a Constant node."""
        if op == "ReduceSum" or opset >= 18:
            inputs = [t] if axes is None else [t, self.const(axes, np.int64, as_node=axes_as_node)]
            return self.ops(op, inputs, 1, keepdims=keepdims)[0]
        return self.ops(op, [t], 1, keepdims=keepdims, **({} if axes is None else {"axes": axes}))[0]

    def batch_size(self, t: str) -> str:
        """N of `t` as a float32 scalar, derived from its spec at run time."""
        n = self.op("Gather", self.op("Shape", t), self.const(0, np.int64), axis=0)
        return self.op("Cast", n, to=TensorProto.FLOAT)

    def batch_larger_than(self, t: str, threshold: int) -> str:
        """A boolean scalar: N of `t` > `threshold`."""
        n = self.op("Shape", t, start=0, end=1)
        return self.op("Squeeze", self.op("Greater", n, self.const([threshold], np.int64)))

    def batch_norm(self, t: str, channels: int, seed: int, *, training: bool = False) -> str:
        """BatchNormalization over axis 1 with constant statistics (`training`: with batch statistics)."""
        rng = np.random.default_rng(seed)
        gamma, beta = rng.uniform(0.5, 2.0, channels), rng.standard_normal(channels)
        mean, var = 10 * rng.standard_normal(channels), rng.uniform(0.1, 5.0, channels)
        inputs = [t, *(self.const(v) for v in (gamma, beta, mean, var))]
        if training:  # training mode must have the running mean and variance outputs
            return self.ops("BatchNormalization", inputs, 3, epsilon=1e-3, training_mode=1)[0]
        return self.op("BatchNormalization", *inputs, epsilon=1e-3)

    def model(self, output: str, spec: GraphSpec) -> onnx.ModelProto:
        """The graph from `input` (N, C, *spatial; batch and spatial dims symbolic) to `output`."""
        self.nodes.append(helper.make_node("Identity", [output], ["output"]))
        dims: list[int | str] = ["N", spec.channels, *(f"s{a}" for a in range(2, spec.rank))]
        graph = helper.make_graph(
            self.nodes,
            "batch_mixing",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None] * spec.rank)],
            initializer=self.initializers,
        )
        return helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", spec.opset)],
            ir_version=ir_version_for(spec.opset),
        )


@dataclass(frozen=True)
class Mixing:
    """One batch-mixing step: its output (broadcast back to its input's spec), what it is, the checks it
    must fail, and any other check besides those and `formula` it fails by construction."""

    output: str
    label: str
    must_fail: frozenset[str]
    may_fail: frozenset[str] = frozenset()


Draw = Callable[[st.SearchStrategy[Any]], Any]
Family = Callable[[GraphBuilder, Draw, str, GraphSpec], Mixing]


def _batch_axis(draw: Draw, spec: GraphSpec) -> int:
    """The batch axis as 0 or as -rank: verify must see through both spellings."""
    return int(draw(st.sampled_from([0, -spec.rank])))


def _combine(b: GraphBuilder, draw: Draw, t: str, mixed: str) -> str:
    """Fold a batch-dependent tensor (broadcastable to `t`) back into `t`, the way a graph would use it."""
    how = draw(st.sampled_from(["sub", "add_scaled", "mul_shifted"]))
    if how == "sub":
        return b.op("Sub", t, mixed)
    k = b.const(draw(st.sampled_from([0.5, -1.0, 2.0, 4.0])))
    if how == "add_scaled":
        return b.op("Add", t, b.op("Mul", mixed, k))
    return b.op("Mul", t, b.op("Add", b.op("Mul", mixed, k), b.const(1.0)))


def _frozen_step(b: GraphBuilder, draw: Draw, t: str, spec: GraphSpec) -> str:
    """An elementwise step with constants that keeps distinct values distinct (powers of two, negation)."""
    kind = draw(st.sampled_from(["scale", "shift", "subtract_from", "negate", "identity"]))
    per_channel = (spec.channels,) + (1,) * (spec.rank - 2)
    if kind == "scale":
        return b.op("Mul", t, b.const(np.full(per_channel, draw(st.sampled_from([0.5, 2.0, -4.0])))))
    if kind in ("shift", "subtract_from"):
        offset = b.const(np.full(per_channel, draw(st.sampled_from([-3.0, 0.25, 5.0]))))
        return b.op("Add", t, offset) if kind == "shift" else b.op("Sub", offset, t)
    return b.op("Neg", t) if kind == "negate" else b.op("Identity", t)


REDUCTIONS = [
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceSumSquare",
    "ReduceLogSumExp", "ReduceProd",
]  # fmt: skip


def reduce_over_batch(b: GraphBuilder, draw: Draw, t: str, spec: GraphSpec) -> Mixing:
    """Reduce* over axes that include the batch axis (or over every axis), folded back into the data."""
    op, rank = draw(st.sampled_from(REDUCTIONS)), spec.rank
    every = draw(st.booleans())
    others = draw(st.lists(st.integers(1, rank - 1), unique=True, max_size=rank - 1))
    keepdims = int(draw(st.booleans()))
    # keepdims=0 broadcasts back only when the reduced axes are a leading block (or all of them)
    if not keepdims and not every and sorted(others) != list(range(1, len(others) + 1)):
        keepdims = 1
    axes: list[int] | None
    if every:
        axes = None if draw(st.booleans()) else list(range(rank))
    else:
        spelled = [_batch_axis(draw, spec), *(a - rank if draw(st.booleans()) else a for a in others)]
        axes = list(draw(st.permutations(spelled)))
    reduced = b.reduce(op, t, axes, keepdims=keepdims, opset=spec.opset, axes_as_node=draw(st.booleans()))
    label = f"{op}(axes={axes}, keepdims={keepdims})"
    return Mixing(_combine(b, draw, t, reduced), label, frozenset({STRUCTURE, INVARIANCE}))


def primitive_batch_norm(b: GraphBuilder, draw: Draw, t: str, spec: GraphSpec) -> Mixing:
    """Training-style BatchNorm from primitive ops: mean and variance over the batch and spatial axes."""
    axes = [_batch_axis(draw, spec), *range(2, spec.rank)]
    mean = b.reduce("ReduceMean", t, axes, keepdims=1, opset=spec.opset)
    centered = b.op("Sub", t, mean)
    var = b.reduce("ReduceMean", b.op("Mul", centered, centered), axes, keepdims=1, opset=spec.opset)
    normalized = b.op("Div", centered, b.op("Sqrt", b.op("Add", var, b.const(1e-5))))
    return Mixing(normalized, f"(x - mean_b)/std_b over {axes}", frozenset({STRUCTURE, INVARIANCE}))


def mean_by_count(b: GraphBuilder, draw: Draw, t: str, spec: GraphSpec) -> Mixing:
    """The batch mean as ReduceSum over the batch axis divided by a count taken from the spec."""
    total = b.reduce("ReduceSum", t, [_batch_axis(draw, spec)], keepdims=1, opset=spec.opset)
    mean = b.op("Div", total, b.batch_size(t))
    return Mixing(_combine(b, draw, t, mean), "ReduceSum(batch)/Shape[0]", frozenset({STRUCTURE, INVARIANCE}))


def cumulative_over_batch(b: GraphBuilder, draw: Draw, t: str, spec: GraphSpec) -> Mixing:
    exclusive, reverse = int(draw(st.booleans())), int(draw(st.booleans()))
    axis = b.const(_batch_axis(draw, spec), np.int64, as_node=draw(st.booleans()))
    summed = b.op("CumSum", t, axis, exclusive=exclusive, reverse=reverse)
    label = f"CumSum(batch, exclusive={exclusive}, reverse={reverse})"
    return Mixing(_combine(b, draw, t, summed), label, frozenset({STRUCTURE, INVARIANCE}))


def softmax_over_batch(b: GraphBuilder, draw: Draw, t: str, spec: GraphSpec) -> Mixing:
    op, axis = draw(st.sampled_from(["Softmax", "LogSoftmax", "Hardmax"])), _batch_axis(draw, spec)
    mixed = _combine(b, draw, t, b.op(op, t, axis=axis))
    return Mixing(mixed, f"{op}(axis={axis})", frozenset({STRUCTURE, INVARIANCE}))


def argument_over_batch(b: GraphBuilder, draw: Draw, t: str, spec: GraphSpec) -> Mixing:
    """The position of the batch's largest (smallest) value, used as a number."""
    op, axis = draw(st.sampled_from(["ArgMax", "ArgMin"])), _batch_axis(draw, spec)
    keepdims, last = int(draw(st.booleans())), int(draw(st.booleans()))
    index = b.op(op, t, axis=axis, keepdims=keepdims, select_last_index=last)
    mixed = _combine(b, draw, t, b.op("Cast", index, to=TensorProto.FLOAT))
    return Mixing(mixed, f"{op}(axis={axis}, keepdims={keepdims})", frozenset({STRUCTURE, INVARIANCE}))


def normalize_over_batch(b: GraphBuilder, draw: Draw, t: str, spec: GraphSpec) -> Mixing:
    """LayerNormalization from the batch axis on, or MeanVarianceNormalization over axes that include it."""
    axis = _batch_axis(draw, spec)
    if draw(st.booleans()):
        scale = b.const(np.full([1] * draw(st.integers(1, spec.rank)), 1.5))
        normalized, label = (
            b.op("LayerNormalization", t, scale, axis=axis),
            f"LayerNormalization(axis={axis})",
        )
    else:
        others = draw(st.lists(st.integers(1, spec.rank - 1), unique=True, max_size=spec.rank - 1))
        axes = list(draw(st.permutations([axis, *others])))
        normalized = b.op("MeanVarianceNormalization", t, axes=axes)
        label = f"MeanVarianceNormalization(axes={axes})"
    return Mixing(_combine(b, draw, t, normalized), label, frozenset({STRUCTURE, INVARIANCE}))


def flatten_batch(b: GraphBuilder, draw: Draw, t: str, spec: GraphSpec) -> Mixing:
    """Every sample in one row (Flatten at axis 0, or Reshape to (1, -1)), then an operation along the row."""
    if draw(st.booleans()):
        row, how, must_fail = b.op("Flatten", t, axis=0), "Flatten(axis=0)", {STRUCTURE, INVARIANCE}
    else:
        row, how, must_fail = (
            b.op("Reshape", t, b.const([1, -1], np.int64)),
            "Reshape(1, -1)",
            {STRUCTURE, INVARIANCE},
        )
    op = draw(st.sampled_from(["Softmax", "LpNormalization", "LayerNormalization", "ReduceSum"]))
    if op == "ReduceSum":
        total = b.reduce(op, row, [1], keepdims=1, opset=spec.opset)
        back = b.op("Reshape", total, b.const([1] * spec.rank, np.int64))
    else:
        extra = [b.const([1.0])] if op == "LayerNormalization" else []
        back = b.op("Reshape", b.ops(op, [row, *extra], 1, axis=-1)[0], b.op("Shape", t))
    return Mixing(_combine(b, draw, t, back), f"{how} then {op}(axis=-1)", frozenset(must_fail))


def transpose_batch_away(b: GraphBuilder, draw: Draw, t: str, spec: GraphSpec) -> Mixing:
    """Transpose the batch axis to p > 0, a per-sample-looking operation covering axis p, and back."""
    rank = spec.rank
    perm = list(draw(st.permutations(list(range(rank))).filter(lambda p: p[0] != 0)))
    moved, p = b.op("Transpose", t, perm=perm), perm.index(0)
    choices = ["ReduceMean", "Softmax", "LpNormalization", "CumSum", "MeanVarianceNormalization"]
    if p >= 2:
        choices += ["GlobalAveragePool", "GlobalMaxPool", "LayerNormalization"]
        if perm[1] == 1:  # the channels stay at axis 1, where InstanceNormalization's (C,) scale applies
            choices.append("InstanceNormalization")
    op = draw(st.sampled_from(choices))
    if op == "ReduceMean":
        mixed = b.reduce(op, moved, [p], keepdims=1, opset=spec.opset)
    elif op in ("Softmax", "LpNormalization"):
        mixed = b.op(op, moved, axis=p)
    elif op == "CumSum":
        mixed = b.op(op, moved, b.const(p, np.int64))
    elif op == "MeanVarianceNormalization":
        mixed = b.op(op, moved, axes=[p])
    elif op == "LayerNormalization":
        mixed = b.op(op, moved, b.const([1.0]), axis=int(draw(st.integers(1, p))))
    elif op == "InstanceNormalization":
        channels = spec.channels
        mixed = b.op(op, moved, b.const(np.ones(channels)), b.const(np.zeros(channels)))
    else:
        mixed = b.op(op, moved)
    back = b.op("Transpose", mixed, perm=[perm.index(a) for a in range(rank)])
    return Mixing(
        _combine(b, draw, t, back),
        f"Transpose{perm}, {op} over axis {p}, back",
        frozenset({STRUCTURE, INVARIANCE}),
    )


def matmul_across_batch(b: GraphBuilder, draw: Draw, t: str, spec: GraphSpec) -> Mixing:
    """Samples as the rows of an (N, D) matrix, mixed by a product over N: attention, Gram, batch mean."""
    rows = b.op("Flatten", t, axis=1)
    kind = draw(st.sampled_from(["attention", "gram", "einsum", "mean_row"]))
    if kind == "mean_row":  # ones(1, N) @ rows / N: the batch mean without a reduction
        ones_shape = b.op("Concat", b.const([1], np.int64), b.op("Shape", t, start=0, end=1), axis=0)
        ones = b.op("ConstantOfShape", ones_shape, value=numpy_helper.from_array(np.ones(1, np.float32)))
        mean_row = b.op("Div", b.op("MatMul", ones, rows), b.batch_size(t))
        one_sample = b.op("Concat", b.const([1], np.int64), b.op("Shape", t, start=1), axis=0)
        back = b.op("Reshape", mean_row, one_sample)
    else:
        if kind == "attention":  # (N, N) weights between the samples
            scores = b.op("MatMul", rows, b.op("Transpose", rows, perm=[1, 0]))
            weights = b.op("Softmax", b.op("Div", scores, b.const(100.0)), axis=-1)
            mixed = b.op("MatMul", weights, rows)
        elif kind == "gram":  # (D, D): a second moment over the batch
            gram = b.op("MatMul", b.op("Transpose", rows, perm=[1, 0]), rows)
            mixed = b.op("MatMul", rows, b.op("Div", gram, b.batch_size(t)))
        else:
            mixed = b.op("Einsum", rows, rows, rows, equation="nd,md,me->ne")
        back = b.op("Reshape", mixed, b.op("Shape", t))
    return Mixing(
        _combine(b, draw, t, back), f"MatMul across the batch ({kind})", frozenset({STRUCTURE, INVARIANCE})
    )


def pick_samples(b: GraphBuilder, draw: Draw, t: str, spec: GraphSpec) -> Mixing:
    """One sample broadcast to the whole batch (Gather, Slice), or the batch rolled by one (Slice, Concat)."""
    kind = draw(st.sampled_from(["gather_scalar", "gather_list", "slice_first", "slice_last", "roll"]))
    axis, end = _batch_axis(draw, spec), np.iinfo(np.int64).max
    axes = b.const([axis], np.int64)

    def take(start: int, stop: int) -> str:
        return b.op("Slice", t, b.const([start], np.int64), b.const([stop], np.int64), axes)

    if kind == "gather_scalar":
        picked = b.op("Gather", t, b.const(draw(st.sampled_from([0, -1])), np.int64), axis=axis)
    elif kind == "gather_list":
        picked = b.op("Gather", t, b.const([draw(st.sampled_from([0, -1]))], np.int64), axis=axis)
    elif kind == "slice_first":
        picked = take(0, 1)
    elif kind == "slice_last":
        picked = take(-1, end)
    else:
        picked = b.op("Concat", take(1, end), take(0, 1), axis=axis)
    return Mixing(
        _combine(b, draw, t, picked), f"{kind} along axis {axis}", frozenset({STRUCTURE, INVARIANCE})
    )


def sort_batch(b: GraphBuilder, draw: Draw, t: str, spec: GraphSpec) -> Mixing:
    """TopK along the batch axis: the batch's extreme (k = 1) or the whole batch sorted (k = N)."""
    axis, whole, largest = _batch_axis(draw, spec), draw(st.booleans()), int(draw(st.booleans()))
    k = b.op("Shape", t, start=0, end=1) if whole else b.const([1], np.int64)
    values, _ = b.ops("TopK", [t, k], 2, axis=axis, largest=largest, sorted=1)
    label = f"TopK(axis={axis}, k={'N' if whole else 1}, largest={largest})"
    return Mixing(_combine(b, draw, t, values), label, frozenset({STRUCTURE, INVARIANCE}))


def scale_by_batch_size(b: GraphBuilder, draw: Draw, t: str, spec: GraphSpec) -> Mixing:
    """Depends on the rest of the batch only through its size."""
    return Mixing(_combine(b, draw, t, b.batch_size(t)), "N from Shape", frozenset({STRUCTURE, INVARIANCE}))


def recurrence_over_batch(b: GraphBuilder, draw: Draw, t: str, spec: GraphSpec) -> Mixing:
    """The batch read as a sequence: a Scan carrying a running sum, or an RNN/GRU/LSTM over the samples."""
    rank, channels = spec.rank, spec.channels
    if draw(st.booleans()):
        body = helper.make_graph(
            [
                helper.make_node("Add", ["carry_in", "sample"], ["carry_out"]),
                helper.make_node("Identity", ["carry_out"], ["running"]),
            ],
            "running_sum",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("carry_in", "sample")],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("carry_out", "running")],
        )
        zero = b.op("Mul", b.op("Gather", t, b.const(0, np.int64), axis=0), b.const(0.0))
        running = b.ops("Scan", [zero, t], 2, body=body, num_scan_inputs=1)[1]
        return Mixing(
            _combine(b, draw, t, running),
            "Scan running sum over the batch",
            frozenset({STRUCTURE, INVARIANCE}),
        )
    op = draw(st.sampled_from(["RNN", "GRU", "LSTM"]))
    direction = draw(st.sampled_from(["forward", "reverse"]))
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[op]
    per_sample = t  # (N, C): the spatial mean of each sample, so the weights' shapes are fixed
    if rank > 2:
        per_sample = b.reduce("ReduceMean", t, list(range(2, rank)), keepdims=0, opset=spec.opset)
    sequence = b.op("Unsqueeze", per_sample, b.const([1], np.int64))  # (sequence = N, batch = 1, C)
    # Small input weights: the tanh/sigmoid gates must not saturate on the data, or the carried state
    # from the previous samples could not move them.
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    weights = b.const(rng.uniform(-0.05, 0.05, (1, gates * channels, channels)))
    recurrence = b.const(rng.uniform(-1.0, 1.0, (1, gates * channels, channels)))
    hidden = b.ops(op, [sequence, weights, recurrence], 1, hidden_size=channels, direction=direction)[0]
    back = b.op("Reshape", hidden, b.const([0, channels] + [1] * (rank - 2), np.int64))
    return Mixing(
        _combine(b, draw, t, back), f"{op}({direction}) over the batch", frozenset({STRUCTURE, INVARIANCE})
    )


def _mixing_branch(b: GraphBuilder, op: str, t: str, spec: GraphSpec) -> onnx.GraphProto:
    """An If branch computing `t - op(t)` over the batch axis (ReduceMean, CumSum or Softmax), reading `t`
    from the enclosing graph."""
    sub = GraphBuilder(prefix=b.fresh("branch") + "_")
    if op == "ReduceMean":
        mixed = sub.reduce(op, t, [0], keepdims=1, opset=spec.opset, axes_as_node=True)
    elif op == "CumSum":
        mixed = sub.op(op, t, sub.const(0, np.int64, as_node=True))
    else:
        mixed = sub.op(op, t, axis=0)
    out = sub.op("Sub", t, mixed)
    return helper.make_graph(
        sub.nodes,
        f"{op}_over_batch",
        [],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        initializer=sub.initializers,
    )


def _if_batch_larger_than(b: GraphBuilder, t: str, threshold: int, then_branch: onnx.GraphProto) -> str:
    """If(N > threshold, then_branch, t)."""
    kept = b.fresh("frozen")
    frozen = helper.make_graph(
        [helper.make_node("Identity", [t], [kept])],
        "frozen",
        [],
        [helper.make_tensor_value_info(kept, TensorProto.FLOAT, None)],
    )
    condition = b.batch_larger_than(t, threshold)
    return b.op("If", condition, then_branch=then_branch, else_branch=frozen)


def branch_on_batch_size(b: GraphBuilder, draw: Draw, t: str, spec: GraphSpec) -> Mixing:
    """An If that takes a batch-mixing subgraph once N > threshold, within the probed batch sizes."""
    threshold = draw(st.integers(0, LARGEST_PROBED_BATCH - 1))
    op = draw(st.sampled_from(["ReduceMean", "CumSum", "Softmax"]))
    mixed = _if_batch_larger_than(b, t, threshold, _mixing_branch(b, op, t, spec))
    return Mixing(
        mixed, f"If(N > {threshold}, x - {op}(x, batch axis), x)", frozenset({STRUCTURE, INVARIANCE})
    )


def gated_batch_reduction(b: GraphBuilder, draw: Draw, t: str, spec: GraphSpec) -> Mixing:
    """A Reduce* over the batch used only once N > threshold (Where): possibly past every batch that verify
    runs, so only the structural check sees it."""
    threshold = draw(st.integers(0, 10_000))
    reduced = reduce_over_batch(b, draw, t, spec)
    mixed = b.op("Where", b.batch_larger_than(t, threshold), reduced.output, t)
    must_fail = {STRUCTURE} | ({INVARIANCE} if threshold < LARGEST_PROBED_BATCH else set())
    return Mixing(mixed, f"Where(N > {threshold}, {reduced.label}, x)", frozenset(must_fail))


def batch_norm_in_training_mode(b: GraphBuilder, draw: Draw, t: str, spec: GraphSpec) -> Mixing:
    normalized = b.batch_norm(t, spec.channels, draw(st.integers(0, 2**16)), training=True)
    label = "BatchNormalization(training_mode=1)"
    return Mixing(normalized, label, frozenset({MODE, STRUCTURE, INVARIANCE}))


def batch_norm_with_batch_statistics(b: GraphBuilder, draw: Draw, t: str, spec: GraphSpec) -> Mixing:
    """An inference-mode BatchNormalization fed the batch's mean and mean square instead of constants."""
    axes = [_batch_axis(draw, spec), *range(2, spec.rank)]
    mean = b.reduce("ReduceMean", t, axes, keepdims=0, opset=spec.opset)
    square = b.reduce("ReduceMean", b.op("Mul", t, t), axes, keepdims=0, opset=spec.opset)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    gamma, beta = b.const(rng.uniform(0.5, 2.0, spec.channels)), b.const(rng.standard_normal(spec.channels))
    normalized = b.op("BatchNormalization", t, gamma, beta, mean, square, epsilon=1e-3)
    return Mixing(
        normalized,
        f"BatchNormalization(mean=ReduceMean over {axes}, var=mean square)",
        frozenset({MODE, STRUCTURE, INVARIANCE}),
        frozenset({"statistics_valid"}),  # no constant statistics to validate
    )


# Reductions and normalizations over the batch axis, and batch statistics built from primitive ops.
BATCH_REDUCTIONS: list[Family] = [
    reduce_over_batch,
    primitive_batch_norm,
    mean_by_count,
    cumulative_over_batch,
    softmax_over_batch,
    argument_over_batch,
    normalize_over_batch,
    flatten_batch,
]
# Samples moved off axis 0, multiplied together, picked, sorted, counted, read as a sequence, or mixed in a
# subgraph: no reduction anywhere, yet each mixes samples.
OTHER_MIXING: list[Family] = [
    transpose_batch_away,
    matmul_across_batch,
    pick_samples,
    sort_batch,
    scale_by_batch_size,
    recurrence_over_batch,
    branch_on_batch_size,
]
REPLACES_BATCH_NORM: list[Family] = [batch_norm_in_training_mode, batch_norm_with_batch_statistics]


@st.composite
def batch_mixing_graphs(draw: st.DrawFn, families: list[Family]) -> tuple[onnx.ModelProto, Mixing]:
    """A chain of frozen elementwise steps around one constant BatchNormalization, with one batch-mixing
    step from `families` at a random position (or in place of the BatchNormalization)."""
    spec = GraphSpec(
        rank=draw(st.integers(2, 4)),
        channels=draw(st.integers(1, 4)),
        opset=draw(st.sampled_from([17, 18, 21])),
    )
    family = draw(st.sampled_from(families))
    steps = ["frozen"] * draw(st.integers(0, 2)) + ["batch_norm"] + ["frozen"] * draw(st.integers(0, 2))
    if family not in REPLACES_BATCH_NORM:
        steps.insert(draw(st.integers(0, len(steps))), "mixing")
    b, t, mixing = GraphBuilder(), "input", None
    for step in steps:
        if step == "frozen":
            t = _frozen_step(b, draw, t, spec)
        elif step == "batch_norm" and family not in REPLACES_BATCH_NORM:
            t = b.batch_norm(t, spec.channels, draw(st.integers(0, 2**16)))
        else:
            mixing = family(b, draw, t, spec)
            t = mixing.output
    assert mixing is not None
    return b.model(t, spec), mixing


def assert_caught(model: onnx.ModelProto, mixing: Mixing) -> None:
    """verify fails the graph, with (at least) the checks `mixing` must fail, for mixing samples: the graph
    is valid ONNX that onnxruntime runs, and no other check fails unless the construction says so."""
    report = verify_model(model)
    context = f"{mixing.label}\n{report.render()}"
    bad = failed(report)
    assert not report.passed, context
    assert mixing.must_fail <= bad, context
    assert bad - {STRUCTURE, INVARIANCE, FORMULA} <= mixing.must_fail | mixing.may_fail, context
    invariance = next(check for check in report.checks if check.name == INVARIANCE)
    if INVARIANCE in mixing.must_fail:  # it ran and measured a sample moving, not a load failure
        assert invariance.figure is not None, context
        assert invariance.figure > 0, context


@settings(max_examples=40, deadline=None)
@given(case=batch_mixing_graphs(BATCH_REDUCTIONS + REPLACES_BATCH_NORM))
def test_batch_reductions_fail_the_structural_and_invariance_checks(
    case: tuple[onnx.ModelProto, Mixing],
) -> None:
    assert_caught(*case)


@settings(max_examples=40, deadline=None)
@given(case=batch_mixing_graphs(OTHER_MIXING))
def test_batch_mixing_without_reductions_fails_the_structural_and_invariance_checks(
    case: tuple[onnx.ModelProto, Mixing],
) -> None:
    assert_caught(*case)


@settings(max_examples=30, deadline=None)
@given(case=batch_mixing_graphs([gated_batch_reduction]))
def test_batch_reduction_used_only_in_large_batches_fails_the_structural_check(
    case: tuple[onnx.ModelProto, Mixing],
) -> None:
    assert_caught(*case)


# -- graphs that mix samples only past every batch verify runs ---------------------------------------------

GATED_MIXERS = ["Gather", "ReduceMean", "CumSum", "Softmax"]
# Past the largest batch of the invariance check and the formula check's 64 generated samples.
GATE = max(LARGEST_PROBED_BATCH, 64)


def gated_past_every_probed_batch(mixer: str) -> onnx.ModelProto:
    """input -> constant BatchNormalization -> a step that mixes samples only once N > GATE: `x - x[0]`
    through Where, or `x - op(x)` over the batch axis inside an If branch. No batch verify runs is that
    large, so the structural check alone can catch them."""
    spec = GraphSpec(rank=3, channels=3, opset=DEFAULT_OPSET)
    b = GraphBuilder()
    t = b.batch_norm("input", spec.channels, seed=0)
    if mixer == "Gather":
        mixed = b.op("Sub", t, b.op("Gather", t, b.const(0, np.int64), axis=0))
        out = b.op("Where", b.batch_larger_than(t, GATE), mixed, t)
    else:
        out = _if_batch_larger_than(b, t, GATE, _mixing_branch(b, mixer, t, spec))
    return b.model(out, spec)


@pytest.mark.parametrize("mixer", GATED_MIXERS)
def test_graphs_gated_past_every_probed_batch_mix_samples_in_larger_batches(mixer: str) -> None:
    """The gated graphs below are real batch-mixing graphs, by onnxruntime: equal to per-sample runs up to
    GATE samples, not one more."""
    session = ort.InferenceSession(gated_past_every_probed_batch(mixer).SerializeToString(), providers=[CPU])
    x = np.random.default_rng(0).standard_normal((GATE + 1, 3, 4)).astype(np.float32)
    alone = np.concatenate([session.run(None, {"input": x[i : i + 1]})[0] for i in range(len(x))])
    np.testing.assert_array_equal(session.run(None, {"input": x[:GATE]})[0], alone[:-1])
    assert not np.array_equal(session.run(None, {"input": x})[0], alone)


def test_mixing_past_the_checked_batch_sizes_fails_the_structural_check() -> None:
    report = verify_model(gated_past_every_probed_batch("Gather"))
    assert failed(report) == {STRUCTURE}, report.render()
    detail = next(check.detail for check in report.checks if check.name == STRUCTURE)
    assert "reads the batch size" in detail, detail
    assert "picks samples along the batch axis" in detail, detail


@pytest.mark.parametrize("mixer", ["ReduceMean", "CumSum", "Softmax"])
def test_batch_statistics_inside_a_subgraph_fail_the_structural_check(mixer: str) -> None:
    report = verify_model(gated_past_every_probed_batch(mixer))
    assert failed(report) == {STRUCTURE}, report.render()
    detail = next(check.detail for check in report.checks if check.name == STRUCTURE)
    assert "control flow over the data is not proven per-sample" in detail, detail


def test_single_logit_head_that_cancels_passes_batch_invariance(tmp_path: Path) -> None:
    # Nothing unusual: the default statistics, channels-last data, a one-output head (a regression or a
    # binary classifier) whose logit crosses 0 on the generated samples.
    checkpoint = make_checkpoint((4, 5, 3), 3, classes=1, seed=15)
    export_onnx(checkpoint, tmp_path / "model.onnx", with_head=True)
    report = verify_model(tmp_path / "model.onnx")
    assert report.passed, report.render()


def test_float16_data_near_the_range_limit_verifies_without_warnings(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(
        (3, 4, 5), 1, moving_mean=np.full(3, 1000.0), moving_var=np.full(3, 1000.0**2)
    )
    export_onnx(checkpoint, tmp_path / "model.onnx", dtype="float16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = verify_model(tmp_path / "model.onnx")
    assert report.passed, report.render()


def test_float16_export_whose_output_overflows_names_the_channel(tmp_path: Path) -> None:
    # The data fits float16 (|mean| + 4 std well inside it) but one channel's scale takes its normalized
    # output past 65504: the exporter must say so, not report an infinite error against the formula.
    checkpoint = make_checkpoint((3, 4), 1, gamma=np.array([1.0, 1e5, 1.0]))
    with pytest.raises(ExportError) as caught:
        export_onnx(checkpoint, tmp_path / "model.onnx", dtype="float16")
    message = str(caught.value)
    assert "overflows float16: channel 1 reaches |y| = " in message, message
    assert "--dtype float32" in message, message
    assert "inf" not in message, message
    assert not (tmp_path / "model.onnx").exists()
    export_onnx(checkpoint, tmp_path / "model.onnx", dtype="float32")  # the suggested remedy works
    assert verify_model(tmp_path / "model.onnx").passed
