"""Read from any ONNX graph what the checks compare with: its BatchNormalization layers and their constant
statistics, the single-layer statistics of a frozen-bn graph (its node, or the folded form's metadata), and a
linear head (the terms a logit sums). Nothing here runs the graph.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
from numpy.typing import ArrayLike

from bn_export.onnx_graph import GraphIndex, constant_ints, node_attribute
from bn_export.reference import F64


@dataclass(frozen=True)
class BatchNormLayer:
    """One BatchNormalization node: its `node` label, the tensors it reads and writes, and its statistics as
    float64 (each (C,), or shaped like one sample for opset < 9's `spatial=0`), or `problem` when they are not
    constants. ONNX's BatchNormalization normalizes along axis 1 of its input."""

    node: str
    input: str
    output: str
    gamma: F64
    beta: F64
    mean: F64
    var: F64
    eps: float
    problem: str | None = None

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0]) if self.mean.ndim else 0

    def scale(self) -> F64:
        """gamma/sqrt(var + eps): how much the layer multiplies its input by (NaN where var + eps < 0)."""
        with np.errstate(all="ignore"):
            scale: F64 = self.gamma / np.sqrt(self.var + self.eps)
        return scale


def node_label(node: onnx.NodeProto) -> str:
    """A node's name, or its first output when it has none."""
    return node.name or (node.output[0] if node.output else node.op_type)


def batchnorm_layers(g: GraphIndex) -> list[BatchNormLayer]:
    """Every BatchNormalization node of the main graph, in graph order."""
    layers = []
    empty = np.zeros(0)
    for node in g.model.graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        names = list(node.input[1:5])
        eps = float(node_attribute(node, "epsilon", 1e-5))
        label, source, target = node_label(node), node.input[0], node.output[0] if node.output else ""
        missing = [name for name in names if name not in g.constants]
        if len(names) != 4 or missing:
            problem = f"statistics computed at run time ({', '.join(missing) or 'missing inputs'})"
            layers.append(BatchNormLayer(label, source, target, empty, empty, empty, empty, eps, problem))
            continue
        gamma, beta, mean, var = (np.asarray(g.constants[n], dtype=np.float64) for n in names)
        layers.append(BatchNormLayer(label, source, target, gamma, beta, mean, var, eps))
    return layers


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
class HeadTerms:
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


def find_linear_head(g: GraphIndex, logits: str) -> HeadTerms | None:
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
    return HeadTerms(source, pool_axes, mean, keepdims, weight, bias)


def frozen_bn_statistics(g: GraphIndex) -> FrozenStatistics | str | None:
    """The statistics of frozen-bn's own one-layer form, which `verify` checks against the graph's `output`
    (and `logits`) from the graph input: one BatchNormalization fed by the graph input (directly, or through
    a Transpose) that writes `output` (through a Transpose back or a Cast), or the folded form's metadata
    statistics with no BatchNormalization node. None for any other graph; a sentence when the metadata
    statistics are malformed."""
    outputs = set(g.outputs)
    if "output" not in outputs or not outputs <= {"output", "logits"} or len(g.inputs) != 1:
        return None
    bns = [node for node in g.model.graph.node if node.op_type == "BatchNormalization"]
    if not bns:
        return _find_statistics(g) if "statistics" in g.metadata else None
    if len(bns) != 1:
        return None
    source = bns[0].input[0]
    producer = g.producer.get(source)
    if producer is not None and producer.op_type == "Transpose":
        source = producer.input[0]
    if source != g.inputs[0].name:
        return None
    # ... and writing `output` itself, through at most a Transpose back and a Cast (nothing after it).
    writer = g.producer.get("output")
    while writer is not None and writer.op_type in ("Transpose", "Cast", "Identity") and writer is not bns[0]:
        writer = g.producer.get(writer.input[0])
    if writer is not bns[0]:
        return None
    found = _find_statistics(g)
    return found if isinstance(found, FrozenStatistics) else None
