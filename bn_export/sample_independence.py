"""Decide from the graph alone whether every output computed from the data keeps the samples apart.

`prove_samples_independent` proves, by dataflow over the main graph, that row i of every output computed
from the data depends on sample i alone, or names each node (or output) it cannot show that for, with the
reason. Every tensor is FREE (initializers, constants and what is computed from them or from the per-sample
shape) or BATCH (the samples on axis 0), and a node reading a BATCH tensor is accepted only by a rule for its
operator showing that it keeps the samples apart: elementwise and broadcasting ops whose constants cannot
line up with axis 0; normalizations, reductions, softmax, sorts and slices along other axes; inference-mode
BatchNormalization with constant statistics; convolutions and pools; MatMul/Gemm that do not contract the
batch axis; reshapes that keep it; ... It is an allowlist, not a list of known offenders: an operator without
a rule is refused, and so are control flow (If/Loop/Scan) over the data, custom-domain operators and random
ones, each node with its reason.

The batch size N is the one thing about the rest of the batch a graph can read without touching its values,
and a graph that computes with it (divides by it, branches on it, sizes a tensor by it) treats a sample
differently by the company it keeps. Size is refused outright. Shape from axis 0 is followed instead: N may
flow only through the shape operations PyTorch spells `x.view(x.size(0), -1)` with (Gather or Slice of the
shape's first entry, Unsqueeze/Squeeze, Cast to int64, Identity, and a Concat with N first and FREE entries
after it), into the leading entry of a Reshape of a tensor that carries the samples: the one whose shape was
read, or any other (every such tensor has the batch's N rows, graph inputs included, which share one batch).
That Reshape keeps each sample whole on its own row: with N rows of y's N·S elements, row i holds elements
i·S .. (i+1)·S - 1, sample i's. Any other use of N is refused as reading the batch size, naming the Shape node and the use.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from bn_export.onnx_graph import GraphIndex, constant_ints, node_attribute


@dataclass(frozen=True)
class SampleIndependence:
    """The proof's outcome: `problems`, each naming a node (or an output) and why it cannot be shown to keep
    the samples apart, none when the proof holds; and how many operations on the data it `accepted`."""

    problems: tuple[str, ...]
    accepted: int

    @property
    def proved(self) -> bool:
        return not self.problems


def prove_samples_independent(model: onnx.ModelProto | GraphIndex) -> SampleIndependence:
    """Whether row i of every output of `model` computed from the data depends on sample i alone (see the
    module docstring); reads the graph only, runs nothing."""
    graph = model if isinstance(model, GraphIndex) else GraphIndex(model)
    flow = _Dataflow(graph)
    problems = flow.run()
    return SampleIndependence(tuple(problems), flow.accepted)


_Dims = tuple[int | None, ...]


def _shapes(model: onnx.ModelProto) -> dict[str, _Dims]:
    """The shape of every main-graph tensor shape inference can tell, a symbolic dimension as None."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # an invalid graph: fall back to the declared signatures only
        inferred = model
    shapes: dict[str, _Dims] = {}
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


@dataclass(frozen=True)
class _BatchSize:
    """A tensor holding the batch size N of BATCH tensor `source`, read by the Shape node labelled `reader`:
    N itself (a scalar), or (`vector`) a 1-D shape of `length` entries (None: unknown) whose first entry is N
    and whose other entries are FREE."""

    source: str
    reader: str
    vector: bool
    length: int | None = None


class _ReadsBatchSize(str):
    """A refusal because a node uses a batch size other than as the leading entry of a Reshape of its own
    tensor: the whole problem, naming the Shape node that read it and the node that uses it."""


# A rule's verdict on a node that reads the samples (or a batch size): the reason it cannot be proven to
# keep them apart (str); the ranks of its outputs, which then carry the samples on axis 0 (one per output,
# None where unknown); the batch size its one output holds; or None when its outputs do not depend on the
# samples at all (the per-sample shape, say).
Verdict = str | tuple[int | None, ...] | _BatchSize | None


def _sliced(length: int, start: int, end: int, step: int) -> list[int]:
    """The positions ONNX's Slice takes from an axis of `length` entries (negative bounds count from the end,
    then clamp: to [0, length] going forward, to [0, length - 1] and [-1, length - 1] going backward)."""
    start, end = start + length if start < 0 else start, end + length if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), length), min(max(end, 0), length)
    else:
        start, end = min(max(start, 0), length - 1), min(max(end, -1), length - 1)
    return list(range(start, end, step))


def _label(node: onnx.NodeProto) -> str:
    """How a problem names `node`: its operator and its name, or its first output when it has none."""
    outputs = [name for name in node.output if name]
    return f"{node.op_type} {node.name or (outputs[0] if outputs else '')!r}"


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
    tensors only; the graph's inputs are BATCH) or a batch size (`_BatchSize`: N, or a shape vector led by N,
    of one BATCH tensor). A node with a BATCH input is accepted only by a rule proving that its outputs are
    BATCH again (or FREE); a node with a batch-size input only by one of the few rules that let N through
    to a Reshape of its own tensor. Anything else, an operator without a rule included, is refused with the
    reason. Refused nodes' outputs are then taken as BATCH so the proof goes on and reports each problem
    where it is; a node reading only tensors that follow from refused nodes is not reported again.
    """

    def __init__(self, g: GraphIndex) -> None:
        self.g = g
        self.shapes = _shapes(g.model)
        self.batch: dict[str, int | None] = {value.name: self.inferred_rank(value.name) for value in g.inputs}
        self.reads_data = set(self.batch)  # BATCH tensors, and FREE ones computed from the input's shape
        self.sizes: dict[str, _BatchSize] = {}
        self.follows_refused: set[str] = set()
        self.problems: list[str] = []
        self.accepted = 0

    def run(self) -> list[str]:
        for node in self.g.model.graph.node:
            implicit = set().union(*(_outer_names(sub) for sub in _subgraphs(node)))
            inputs = [name for name in node.input if name] + sorted(implicit)
            outputs = [name for name in node.output if name]
            label = _label(node)
            if any(name in self.reads_data for name in inputs):
                self.reads_data.update(outputs)
            carried = [name for name in inputs if name in self.batch or name in self.sizes]
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
                    self.problems.append(
                        verdict if isinstance(verdict, _ReadsBatchSize) else f"{label}: {verdict}"
                    )
                self.refuse(node, outputs)
                continue
            self.accepted += 1
            if after_refused:
                self.follows_refused.update(outputs)
            if verdict is None:
                continue
            if isinstance(verdict, _BatchSize):
                self.sizes[node.output[0]] = verdict
                continue
            for index, name in enumerate(node.output):
                if name:
                    rank = verdict[index] if index < len(verdict) else None
                    self.batch[name] = rank if rank is not None else self.inferred_rank(name)
        for name in self.g.outputs:
            size = self.sizes.get(name)
            if size is not None:
                if name not in self.follows_refused:
                    self.problems.append(
                        f"{size.reader}: reads the batch size, which output {name!r} returns"
                    )
            elif name in self.reads_data and name not in self.batch:
                self.problems.append(
                    f"output {name!r} depends on the data but does not carry one row per sample"
                )
        return self.problems

    def own_problem(self, node: onnx.NodeProto, verdict: str, tainted: list[str]) -> bool:
        """Whether `node` is refused for what it does itself, not only for reading `tainted` tensors (which
        follow refused nodes, and may carry the samples or be no per-sample tensors at all, a batch size say):
        it is when it stays refused whichever of FREE or what it was found to be (BATCH, or a batch size)
        each tainted input is taken as (up to a few of them; past that, all FREE), or when the refusal is that
        its parameters come from the data."""
        if isinstance(verdict, _DataParameters):
            return True
        saved_batch = {name: self.batch[name] for name in tainted if name in self.batch}
        saved_sizes = {name: self.sizes[name] for name in tainted if name in self.sizes}
        choices = itertools.product((False, True), repeat=len(tainted) if len(tainted) <= 4 else 0)
        try:
            for kept in choices:
                for index, name in enumerate(tainted):
                    self.batch.pop(name, None)
                    self.sizes.pop(name, None)
                    if index < len(kept) and kept[index]:
                        if name in saved_batch:
                            self.batch[name] = saved_batch[name]
                        else:
                            self.sizes[name] = saved_sizes[name]
                if not isinstance(self.verdict(node), str):
                    return False
            return True
        finally:
            self.batch.update(saved_batch)
            self.sizes.update(saved_sizes)

    def refuse(self, node: onnx.NodeProto, outputs: list[str]) -> None:
        self.follows_refused.update(outputs)
        for name in outputs:
            self.batch[name] = self.inferred_rank(name)

    def verdict(self, node: onnx.NodeProto) -> Verdict:
        if any(name in self.sizes for name in node.input):
            rule = _BATCH_SIZE_RULES.get(node.op_type) if node.domain in _ONNX_DOMAINS else None
            return rule(self, node) if rule is not None else self.reads_batch_size(node)
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
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    def shape(self, name: str) -> _Dims | None:
        if name in self.g.constants:
            return tuple(int(d) for d in np.shape(self.g.constants[name]))
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        known = self.batch.get(name)
        if known is not None:
            return known
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def ints(self, name: str) -> list[int] | None:
        return constant_ints(self.g, name) if name else None

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
        value = node_attribute(node, attr)
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
                self.g.opset < 7 and not int(node_attribute(node, "is_test", 0))
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
        if int(node_attribute(node, "training_mode", 0)):
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
            axes = [int(a) for a in node_attribute(node, "axes", [0, 2, 3])]
        else:
            default = 1 if node.op_type in ("Softmax", "LogSoftmax", "Hardmax") and self.g.opset < 13 else -1
            axes = [int(node_attribute(node, "axis", default))]
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
            if int(node_attribute(node, "noop_with_empty_axes", 0)):
                return self.same(node, rank)
            return "reduces every axis, the batch axis included"
        reason = self.spares_batch(axes, rank, "reduces over")
        if reason:
            return reason
        if int(node_attribute(node, "keepdims", 1)) or rank is None:
            return self.same(node, rank)
        return self.same(node, rank - len(set(_normalized(axes, rank) or [])))

    def arg_reduction(self, node: onnx.NodeProto) -> Verdict:
        rank = self.rank(node.input[0])
        reason = self.spares_batch([int(node_attribute(node, "axis", 0))], rank, "reduces over")
        if reason:
            return reason
        keep = int(node_attribute(node, "keepdims", 1))
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
        reason = self.spares_batch([int(node_attribute(node, "axis", -1))], rank, "sorts along")
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
        if not self.is_batch(a) or self.is_batch(b) or int(node_attribute(node, "transA", 0)):
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
        perm = node_attribute(node, "perm")
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
        allowzero = int(node_attribute(node, "allowzero", 0))
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
        axis = int(node_attribute(node, "axis", 1))
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
        return self.spares_batch(
            [int(node_attribute(node, "axis", 0))], rank, "concatenates along"
        ) or self.same(node, rank)

    def split(self, node: onnx.NodeProto) -> Verdict:
        rank = self.rank(node.input[0])
        reason = self.spares_batch([int(node_attribute(node, "axis", 0))], rank, "splits")
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
        axis = int(node_attribute(node, "axis", 0))
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
        return self.spares_batch([int(node_attribute(node, "axis", 0))], rank, "picks along") or self.same(
            node, rank
        )

    def pad(self, node: onnx.NodeProto) -> Verdict:
        rank = self.rank(node.input[0])
        reason = self.parameters(node)
        if reason:
            return reason
        pads: list[int] | None
        if self.g.opset < 11:
            pads = [int(p) for p in node_attribute(node, "pads", [])]
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
        axes = node_attribute(node, "axes")
        resized = list(range(rank)) if axes is None and rank is not None else _normalized(axes or [], rank)
        if resized is None or (axes is None and rank is None):
            return "cannot tell which axes it resizes (rank unknown)"
        if 0 not in resized:
            return self.same(node, rank)
        position = resized.index(0)
        sizes = ""
        if node.op_type == "Upsample" and self.g.opset < 9:
            scales = [float(s) for s in node_attribute(node, "scales", [])]
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
        mode = _text(node_attribute(node, "coordinate_transformation_mode", "half_pixel"))
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
            reason = self.spares_batch(
                [int(node_attribute(node, "axis", 1))], rank, "quantizes per slice along"
            )
        return reason or self.same(node, rank)

    def recurrent(self, node: onnx.NodeProto) -> Verdict:
        if int(node_attribute(node, "layout", 0)) != 1:
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
        data = node.input[0]
        rank = self.rank(data)
        start = _normalized([int(node_attribute(node, "start", 0))], rank)
        if start is None:
            return "reads the batch size"
        if start[0] >= 1:
            return None  # one sample's shape: the same alone and in any batch
        end = node_attribute(node, "end")
        length = rank
        if end is not None:
            stop = _normalized([int(end)], rank)
            if stop is not None and stop[0] <= 0:
                return None  # no entries at all
            length = None if stop is None or rank is None else min(stop[0], rank)
        return _BatchSize(data, _label(node), vector=True, length=length)

    def size(self, node: onnx.NodeProto) -> Verdict:
        return "reads the batch size"

    # -- the rules for a batch size: only what leads it into a Reshape of its own tensor ----------------

    def reads_batch_size(self, node: onnx.NodeProto) -> _ReadsBatchSize:
        size = next(self.sizes[name] for name in node.input if name in self.sizes)
        return _ReadsBatchSize(
            f"{size.reader}: reads the batch size, which {_label(node)} uses other than as the first entry "
            f"of a Reshape of {size.source!r}"
        )

    def others_free(self, node: onnx.NodeProto, first: int) -> bool:
        """Whether the inputs from `first` on are FREE: neither the samples nor a batch size."""
        return not any(self.is_batch(name) or name in self.sizes for name in node.input[first:])

    def size_pass_through(self, node: onnx.NodeProto) -> Verdict:
        """Identity, and Cast to int64: the value unchanged (a narrower or float type could round it)."""
        size = self.sizes.get(node.input[0])
        if size is None or (node.op_type == "Cast" and node_attribute(node, "to") != onnx.TensorProto.INT64):
            return self.reads_batch_size(node)
        return size

    def size_gather(self, node: onnx.NodeProto) -> Verdict:
        """Constant entries of a shape vector: N alone (index 0 as a scalar), a vector still led by N, or
        per-sample entries only (FREE)."""
        size = self.sizes.get(node.input[0])
        indices = self.g.constants.get(node.input[1])
        if size is None or not size.vector or indices is None or not self.others_free(node, 1):
            return self.reads_batch_size(node)
        if _normalized([int(node_attribute(node, "axis", 0))], 1) != [0] or np.ndim(indices) > 1:
            return self.reads_batch_size(node)
        positions = _normalized([int(i) for i in np.asarray(indices).reshape(-1)], size.length)
        if positions is None:
            return self.reads_batch_size(node)
        if 0 not in positions:
            return None
        if np.ndim(indices) == 0:
            return replace(size, vector=False, length=None)
        if positions[0] == 0 and positions.count(0) == 1:
            return replace(size, length=len(positions))
        return self.reads_batch_size(node)

    def size_slice(self, node: onnx.NodeProto) -> Verdict:
        """A constant slice of a shape vector: still led by N when it starts at entry 0, FREE when it skips
        it."""
        size = self.sizes.get(node.input[0])
        if size is None or not size.vector or not self.others_free(node, 1):
            return self.reads_batch_size(node)
        bounds: list[list[int] | None]
        if self.g.opset < 10:
            bounds = [node_attribute(node, "starts"), node_attribute(node, "ends"), [1]]
            axes = node_attribute(node, "axes")
        else:
            given, axes = self.axes_operand(node, 3, "axes")
            if given and axes is None:
                return self.reads_batch_size(node)
            steps = self.operand(node, 4)
            bounds = [self.ints(self.operand(node, 1)), self.ints(self.operand(node, 2))]
            bounds.append(self.ints(steps) if steps else [1])
        found = [values for values in bounds if values is not None and len(values) == 1]
        if len(found) != 3 or (axes is not None and _normalized([int(a) for a in axes], 1) != [0]):
            return self.reads_batch_size(node)
        start, end, step = (int(values[0]) for values in found)
        positions: list[int]
        if size.length is not None and step != 0:
            positions = _sliced(size.length, start, end, step)
            if positions != list(range(size.length))[start:end:step]:
                # Past -length, numpy's clamping (which onnx's reference evaluator follows) takes other
                # entries than the standard's: refused unless both agree.
                return self.reads_batch_size(node)
        elif step > 0 and start >= 1:
            positions = []  # the first entry skipped, whatever the length
        elif step > 0 and start == 0 and end >= 0:
            positions = [0] if end > 0 else []  # led by entry 0; how many more is not known
        else:
            return self.reads_batch_size(node)
        if 0 not in positions:
            return None
        if positions[0] != 0:
            return self.reads_batch_size(node)
        return replace(size, length=len(positions) if size.length is not None else None)

    def size_unsqueeze(self, node: onnx.NodeProto) -> Verdict:
        """N as the one-entry vector [N]."""
        size = self.sizes.get(node.input[0])
        _, axes = self.axes_operand(node, 1, "axes")
        if size is None or size.vector or axes is None or not self.others_free(node, 1):
            return self.reads_batch_size(node)
        if _normalized(axes, 1) != [0]:
            return self.reads_batch_size(node)
        return replace(size, vector=True, length=1)

    def size_squeeze(self, node: onnx.NodeProto) -> Verdict:
        """The one-entry vector [N] as N."""
        size = self.sizes.get(node.input[0])
        given, axes = self.axes_operand(node, 1, "axes")
        if size is None or not size.vector or not self.others_free(node, 1) or (given and axes is None):
            return self.reads_batch_size(node)
        if (axes is not None and _normalized(axes, 1) != [0]) or (axes is None and size.length != 1):
            return self.reads_batch_size(node)
        return replace(size, vector=False, length=None)

    def size_concat(self, node: onnx.NodeProto) -> Verdict:
        """A shape vector led by N, then FREE entries: still led by N."""
        operands = [name for name in node.input if name]
        size = self.sizes.get(operands[0])
        if size is None or not size.vector or not self.others_free(node, 1):
            return self.reads_batch_size(node)
        if _normalized([int(node_attribute(node, "axis", 0))], 1) != [0]:
            return self.reads_batch_size(node)
        lengths = [size.length, *(self.vector_length(name) for name in operands[1:])]
        known = [length for length in lengths if length is not None]
        return replace(size, length=sum(known) if len(known) == len(lengths) else None)

    def vector_length(self, name: str) -> int | None:
        shape = self.shape(name)
        return shape[0] if shape is not None and len(shape) == 1 else None

    def size_reshape(self, node: onnx.NodeProto) -> Verdict:
        """Reshape(y, [N of x, FREE...]) with y and x both carrying the samples: every such tensor has the
        batch's N rows, so this is N rows of one sample's elements each, sample i's on row i (PyTorch's
        `x.view(x.size(0), -1)`, and GroupNorm's reshape back to `Shape(x)` after InstanceNormalization)."""
        data, target = node.input[0], node.input[1]
        size = self.sizes.get(target)
        if size is None or not size.vector or not self.is_batch(data) or not self.others_free(node, 2):
            return self.reads_batch_size(node)
        return self.same(node, size.length)


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

# What a batch size may flow through: the spellings of PyTorch's `x.view(x.size(0), -1)` and its kin.
_BATCH_SIZE_RULES: dict[str, Callable[[_Dataflow, onnx.NodeProto], Verdict]] = {
    "Cast": _Dataflow.size_pass_through,
    "Concat": _Dataflow.size_concat,
    "Gather": _Dataflow.size_gather,
    "Identity": _Dataflow.size_pass_through,
    "Reshape": _Dataflow.size_reshape,
    "Slice": _Dataflow.size_slice,
    "Squeeze": _Dataflow.size_squeeze,
    "Unsqueeze": _Dataflow.size_unsqueeze,
}
