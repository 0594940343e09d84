"""The engine of the samples_independent proof: one pass of dataflow over a graph's main graph, which asks
an operator rule (from the tables in `bn_export.sample_rules`) about every node that reads the samples or a
batch size, and records each refusal with its reason. The rules read the graph through `Dataflow`'s helpers
(`is_batch`, `rank`, `shape`, `ints`, `same`, `spares_batch`, `broadcast_free`, ...) and answer a `Verdict`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from bn_export.onnx_graph import GraphIndex, constant_ints, node_attribute

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


ONNX_DOMAINS = ("", "ai.onnx")


class DataParameters(str):
    """A refusal because a node's parameters (weights, statistics, bounds) are computed from the data: always
    reported, even when those come from nodes refused already, since it names what the graph does wrong."""


@dataclass(frozen=True)
class BatchSize:
    """A tensor holding the batch size N of BATCH tensor `source`, read by the Shape node labelled `reader`:
    N itself (a scalar), or (`vector`) a 1-D shape of `length` entries (None: unknown) whose first entry is N
    and whose other entries are FREE."""

    source: str
    reader: str
    vector: bool
    length: int | None = None


class ReadsBatchSize(str):
    """A refusal because a node uses a batch size other than as the leading entry of a Reshape of its own
    tensor: the whole problem, naming the Shape node that read it and the node that uses it."""


# A rule's verdict on a node that reads the samples (or a batch size): the reason it cannot be proven to
# keep them apart (str); the ranks of its outputs, which then carry the samples on axis 0 (one per output,
# None where unknown); the batch size its one output holds; or None when its outputs do not depend on the
# samples at all (the per-sample shape, say).
Verdict = str | tuple[int | None, ...] | BatchSize | None


def node_label(node: onnx.NodeProto) -> str:
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


def normalized_axes(axes: Sequence[int], rank: int | None) -> list[int] | None:
    """`axes` counted from 0 (negative ones from the end); None when a negative axis meets an unknown rank."""
    normalized = []
    for axis in axes:
        if axis < 0:
            if rank is None:
                return None
            axis += rank
        normalized.append(axis)
    return normalized


class Dataflow:
    """The proof behind `samples_independent`, one pass over the main graph in its topological order.

    Every tensor is FREE (the same whatever the batch: initializers, constants, and what nodes compute from
    FREE tensors alone) or BATCH (carries the samples on axis 0, row i computed from input sample i and FREE
    tensors only; the graph's inputs are BATCH) or a batch size (`BatchSize`: N, or a shape vector led by N,
    of one BATCH tensor). A node with a BATCH input is accepted only by a rule proving that its outputs are
    BATCH again (or FREE); a node with a batch-size input only by one of the few rules that let N through
    to a Reshape of a BATCH tensor. Anything else, an operator without a rule included, is refused with the
    reason. Refused nodes' outputs are then taken as BATCH so the proof goes on and reports each problem
    where it is; a node reading only tensors that follow from refused nodes is not reported again.
    """

    def __init__(
        self,
        g: GraphIndex,
        rules: Mapping[str, Rule],
        size_rules: Mapping[str, Rule],
        random_ops: Collection[str],
    ) -> None:
        self.g = g
        self.rules = rules
        self.size_rules = size_rules
        self.random_ops = random_ops
        self.shapes = _shapes(g.model)
        self.batch: dict[str, int | None] = {value.name: self.inferred_rank(value.name) for value in g.inputs}
        self.reads_data = set(self.batch)  # BATCH tensors, and FREE ones computed from the input's shape
        self.sizes: dict[str, BatchSize] = {}
        self.follows_refused: set[str] = set()
        self.problems: list[str] = []
        self.accepted = 0

    def run(self) -> list[str]:
        for node in self.g.model.graph.node:
            implicit = set().union(*(_outer_names(sub) for sub in _subgraphs(node)))
            inputs = [name for name in node.input if name] + sorted(implicit)
            outputs = [name for name in node.output if name]
            label = node_label(node)
            if any(name in self.reads_data for name in inputs):
                self.reads_data.update(outputs)
            carried = [name for name in inputs if name in self.batch or name in self.sizes]
            if node.op_type in self.random_ops and node.domain in ONNX_DOMAINS:
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
                        verdict if isinstance(verdict, ReadsBatchSize) else f"{label}: {verdict}"
                    )
                self.refuse(node, outputs)
                continue
            self.accepted += 1
            if after_refused:
                self.follows_refused.update(outputs)
            if verdict is None:
                continue
            if isinstance(verdict, BatchSize):
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
        if isinstance(verdict, DataParameters):
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
            rule = self.size_rules.get(node.op_type) if node.domain in ONNX_DOMAINS else None
            return rule(self, node) if rule is not None else self.reads_batch_size(node)
        if node.domain not in ONNX_DOMAINS:
            return f"cannot prove {node.domain}.{node.op_type} keeps samples apart (not an ONNX operator)"
        if _subgraphs(node):
            return "control flow over the data is not proven per-sample"
        rule = self.rules.get(node.op_type)
        if rule is None:
            return f"cannot prove {node.op_type} keeps samples apart"
        return rule(self, node)

    # -- what the rules read: their whole view of the graph -------------------------------------------

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
                return DataParameters(f"its parameter {name!r} is computed from the data")
        return None

    def spares_batch(self, axes: Sequence[int], rank: int | None, verb: str) -> str | None:
        """Why `axes` of a rank-`rank` tensor may include the batch axis, or None when they cannot."""
        normalized = normalized_axes(axes, rank)
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

    def operand_output(self, node: onnx.NodeProto, index: int) -> str:
        return node.output[index] if len(node.output) > index else ""

    def reads_batch_size(self, node: onnx.NodeProto) -> ReadsBatchSize:
        size = next(self.sizes[name] for name in node.input if name in self.sizes)
        return ReadsBatchSize(
            f"{size.reader}: reads the batch size, which {node_label(node)} uses other than as the first "
            f"entry of a Reshape of {size.source!r}"
        )

    def others_free(self, node: onnx.NodeProto, first: int) -> bool:
        """Whether the inputs from `first` on are FREE: neither the samples nor a batch size."""
        return not any(self.is_batch(name) or name in self.sizes for name in node.input[first:])

    def vector_length(self, name: str) -> int | None:
        shape = self.shape(name)
        return shape[0] if shape is not None and len(shape) == 1 else None


# A rule: a node that reads the samples (or a batch size) -> its Verdict.
Rule = Callable[["Dataflow", onnx.NodeProto], Verdict]
