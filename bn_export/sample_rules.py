"""The operator rules of the samples_independent proof, and the tables that name them: the one place to
extend it. A rule takes the engine (`bn_export.sample_dataflow.Dataflow`, which tells what each tensor is)
and a node that reads the samples, and answers a `Verdict`: the reason the node cannot be shown to keep the
samples apart (a str; a `DataParameters` when its parameters come from the data), the ranks of its outputs
(which then carry the samples on axis 0), a `BatchSize` its one output holds, or None when its outputs do not
depend on the samples. An operator absent from RULES is refused; BATCH_SIZE_RULES lists the few operators a
batch size may flow through (PyTorch's `x.view(x.size(0), -1)` and its kin), anything else that reads one is
refused as reading the batch size.

To accept a new operator: write `def my_op(flow: Dataflow, node: onnx.NodeProto) -> Verdict` below (or add
it to one of the families, when it behaves like them) and name it in RULES, with a test that onnxruntime
agrees (a sample alone and in a batch) and one that a variant mixing the samples is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import onnx

from bn_export.onnx_graph import node_attribute
from bn_export.sample_dataflow import (
    BatchSize,
    Dataflow,
    DataParameters,
    Rule,
    Verdict,
    node_label,
    normalized_axes,
)

# Elementwise on their first input; any other input (Clip's bounds, Dropout's ratio) is a parameter.
ELEMENTWISE = frozenset(
    {
        "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "BitwiseNot", "Cast", "CastLike", "Ceil",
        "Celu", "Clip", "Cos", "Cosh", "Dropout", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid",
        "HardSwish", "Identity", "IsInf", "IsNaN", "LeakyRelu", "Log", "Mish", "Neg", "Not", "Reciprocal",
        "Relu", "Round", "Selu", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt",
        "Tan", "Tanh", "ThresholdedRelu",
    }
)  # fmt: skip
# Elementwise over operands broadcast together (numpy rules, or PRelu's one-way broadcast of its slope).
BROADCASTING = frozenset(
    {
        "Add", "And", "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Div", "Equal", "Greater",
        "GreaterOrEqual", "Less", "LessOrEqual", "Max", "Mean", "Min", "Mod", "Mul", "Or", "Pow", "PRelu",
        "Sub", "Sum", "Where", "Xor",
    }
)  # fmt: skip
# Computed per sample (over its channels and spatial axes) with constant weights: rank unchanged.
PER_SAMPLE = frozenset(
    {
        "AveragePool", "Conv", "ConvTranspose", "DepthToSpace", "GlobalAveragePool", "GlobalLpPool",
        "GlobalMaxPool", "GroupNormalization", "InstanceNormalization", "LpPool", "LRN", "MaxPool",
        "SpaceToDepth",
    }
)  # fmt: skip
REDUCTIONS = frozenset(
    {
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
        "ReduceProd", "ReduceSum", "ReduceSumSquare",
    }
)  # fmt: skip
RANDOM = frozenset(
    {"Bernoulli", "Multinomial", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike"}
)


def _sliced(length: int, start: int, end: int, step: int) -> list[int]:
    """The positions ONNX's Slice takes from an axis of `length` entries (negative bounds count from the end,
    then clamp: to [0, length] going forward, to [0, length - 1] and [-1, length - 1] going backward)."""
    start, end = start + length if start < 0 else start, end + length if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), length), min(max(end, 0), length)
    else:
        start, end = min(max(start, 0), length - 1), min(max(end, -1), length - 1)
    return list(range(start, end, step))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- the rules for nodes reading the samples -----------------------------------------------------------------


def elementwise(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    data = node.input[0]
    if node.op_type == "CastLike":  # the second input lends its element type only
        return flow.same(node, flow.rank(data)) if flow.is_batch(data) else None
    if node.op_type == "Dropout":
        training = flow.operand(node, 2)
        if (training and flow.ints(training) != [0]) or (
            flow.g.opset < 7 and not int(node_attribute(node, "is_test", 0))
        ):
            return "may run in training mode, dropping values at random"
    return flow.parameters(node) or flow.same(node, flow.rank(data))


def broadcasting(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    operands = [name for name in node.input if name]
    ranks = [flow.rank(name) for name in operands]
    if any(rank is None for rank in ranks):
        return "cannot tell how its operands broadcast against the batch axis (rank unknown)"
    out = max(rank for rank in ranks if rank is not None)
    for name, rank in zip(operands, ranks, strict=True):
        if not flow.is_batch(name):
            reason = flow.broadcast_free(name, out)
            if reason:
                return reason
        elif rank != out:
            return f"broadcasting moves the batch axis of {name!r} (rank {rank}) to axis {out - (rank or 0)}"
    return flow.same(node, out)


def batch_normalization(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    if int(node_attribute(node, "training_mode", 0)):
        return "training_mode=1 normalizes with batch statistics"
    if len([name for name in node.output if name]) > 1:
        return "running-statistics outputs: it updates statistics from the batch (training mode)"
    dynamic = [name for name in node.input[1:5] if flow.is_batch(name)]
    if dynamic:
        return DataParameters(f"statistics computed from the data ({', '.join(dynamic)}): batch statistics")
    return flow.same(node, flow.rank(node.input[0]))


def per_sample(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    if not flow.is_batch(node.input[0]):
        return DataParameters("its weights are computed from the data")
    if node.op_type == "MaxPool" and flow.operand_output(node, 1):
        return "its Indices output counts positions across the whole batch (flattened over N)"
    return flow.parameters(node) or flow.same(node, flow.rank(node.input[0]))


def normalization_along(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    """LayerNormalization (from `axis` on), LpNormalization, MeanVarianceNormalization (`axes`), Softmax,
    LogSoftmax, Hardmax (opset 13+: along `axis`; before: over the axes from `axis` on)."""
    data = node.input[0]
    rank = flow.rank(data)
    if node.op_type == "MeanVarianceNormalization":
        axes = [int(a) for a in node_attribute(node, "axes", [0, 2, 3])]
    else:
        default = 1 if node.op_type in ("Softmax", "LogSoftmax", "Hardmax") and flow.g.opset < 13 else -1
        axes = [int(node_attribute(node, "axis", default))]
    reason = flow.spares_batch(axes, rank, "normalizes over")
    if reason:
        return reason
    if not flow.is_batch(data):
        return DataParameters("its scale or bias is computed from the data")
    for name in node.input[1:]:
        if name:
            reason = flow.parameters(node) or flow.broadcast_free(name, rank)
            if reason:
                return reason
    return flow.same(node, rank)


def reduction(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    rank = flow.rank(node.input[0])
    given, axes = flow.axes_operand(node, 1, "axes")
    if given and axes is None:
        return "reduction axes computed at run time"
    if not axes:
        if int(node_attribute(node, "noop_with_empty_axes", 0)):
            return flow.same(node, rank)
        return "reduces every axis, the batch axis included"
    reason = flow.spares_batch(axes, rank, "reduces over")
    if reason:
        return reason
    if int(node_attribute(node, "keepdims", 1)) or rank is None:
        return flow.same(node, rank)
    return flow.same(node, rank - len(set(normalized_axes(axes, rank) or [])))


def arg_reduction(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    rank = flow.rank(node.input[0])
    reason = flow.spares_batch([int(node_attribute(node, "axis", 0))], rank, "reduces over")
    if reason:
        return reason
    keep = int(node_attribute(node, "keepdims", 1))
    return flow.same(node, rank if keep or rank is None else rank - 1)


def cumulative(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    axis = flow.ints(flow.operand(node, 1))
    if axis is None:
        return "accumulation axis computed at run time"
    return flow.spares_batch(axis, flow.rank(node.input[0]), "accumulates along") or flow.same(
        node, flow.rank(node.input[0])
    )


def top_k(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    rank = flow.rank(node.input[0])
    reason = flow.spares_batch([int(node_attribute(node, "axis", -1))], rank, "sorts along")
    return reason or flow.parameters(node) or flow.same(node, rank)


def matmul(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    a, b = node.input[0], node.input[1]
    ra, rb = flow.rank(a), flow.rank(b)
    if ra is None or rb is None:
        return "cannot tell which axes it contracts (rank unknown)"
    if flow.is_batch(a) and flow.is_batch(b):
        # Both stacks of matrices: a batched product pairs sample i with sample i when the ranks agree.
        fits = ra == rb >= 3
    elif flow.is_batch(a):
        fits = ra >= 2 and _stacks_apart(flow, b, rb, ra)
    else:
        fits = rb >= 3 and _stacks_apart(flow, a, ra, rb)
    if not fits:
        return f"contracts or broadcasts the batch axis (ranks {ra} @ {rb}): it sums or pairs samples"
    out = max(ra, rb) - (1 if 1 in (ra, rb) else 0)
    return flow.same(node, out)


def _stacks_apart(flow: Dataflow, free: str, free_rank: int, batch_rank: int) -> bool:
    """Whether a FREE MatMul operand's stacking axes cannot line up with the other's batch axis."""
    if free_rank <= 2 or free_rank < batch_rank:
        return True
    shape = flow.shape(free)
    return free_rank == batch_rank and bool(shape) and shape is not None and shape[0] == 1


def gemm(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    a, b, c = node.input[0], node.input[1], flow.operand(node, 2)
    if not flow.is_batch(a) or flow.is_batch(b) or int(node_attribute(node, "transA", 0)):
        return "contracts the batch axis (only A's rows, untransposed, may carry the samples)"
    if c and flow.is_batch(c):  # per-sample biases, one (N, M) row each
        return flow.same(node, 2) if flow.rank(c) == 2 else "its bias C carries the samples off axis 0"
    if c:
        reason = flow.broadcast_free(c, 2)
        if reason:
            return reason
    return flow.same(node, 2)


def transpose(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    rank = flow.rank(node.input[0])
    perm = node_attribute(node, "perm")
    if perm is None:
        if rank is None:
            return "reverses the axes of a tensor of unknown rank"
        perm = list(reversed(range(rank)))
    if int(perm[0]) != 0:
        return f"moves the batch axis to axis {list(perm).index(0) if 0 in perm else '?'}"
    return flow.same(node, len(perm))


def reshape(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    data, target = node.input[0], node.input[1]
    if not flow.is_batch(data) or flow.is_batch(target):
        return "target shape computed from the data"
    shape = flow.ints(target)
    if shape is None:
        return "target shape computed at run time: cannot prove it keeps axis 0 as the batch"
    allowzero = int(node_attribute(node, "allowzero", 0))
    if shape and shape[0] == 0 and not allowzero:
        return flow.same(node, len(shape))
    if shape and shape[0] == -1:
        full = flow.shape(data)
        sample = full[1:] if full is not None else None
        rest: list[int | None] = []
        for position, size in enumerate(shape[1:], start=1):
            copies = size == 0 and not allowzero
            fits = sample is not None and position - 1 < len(sample)
            rest.append((sample[position - 1] if sample is not None and fits else None) if copies else size)
        if (
            sample is not None
            and all(d is not None for d in sample)
            and all(r is not None and r >= 0 for r in rest)
            and int(np.prod([d or 0 for d in sample])) > 0
            and int(np.prod([r or 0 for r in rest])) == int(np.prod([d or 0 for d in sample]))
        ):
            return flow.same(node, len(shape))
        return f"target shape {shape} puts -1 on axis 0, but the rest is not provably one sample's size"
    return (
        f"target shape {shape} does not keep axis 0 as the batch (its first entry must be 0, or -1 with "
        "the rest one sample's size): samples would be merged or split"
    )


def flatten(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    axis = int(node_attribute(node, "axis", 1))
    normalized = normalized_axes([axis], flow.rank(node.input[0]))
    if normalized is None:
        return f"flattens at axis {axis} of a tensor of unknown rank"
    if normalized[0] == 0:
        return "flattens the batch axis into the features"
    if normalized[0] > 1:
        return f"flattens at axis {axis}: axis 0 would hold samples times the axes before it"
    return flow.same(node, 2)


def squeeze(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    rank = flow.rank(node.input[0])
    given, axes = flow.axes_operand(node, 1, "axes")
    if not given:
        return "squeezes every size-1 axis: the batch axis too, for a batch of one"
    if axes is None:
        return "squeeze axes computed at run time"
    reason = flow.spares_batch(axes, rank, "squeezes")
    if reason:
        return reason
    return flow.same(node, None if rank is None else rank - len(set(normalized_axes(axes, rank) or [])))


def unsqueeze(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    rank = flow.rank(node.input[0])
    given, axes = flow.axes_operand(node, 1, "axes")
    if not given or axes is None:
        return "unsqueeze axes computed at run time"
    out = None if rank is None else rank + len(axes)
    reason = flow.spares_batch(axes, out, "inserts an axis at")
    return reason or flow.same(node, out)


def concat(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    operands = [name for name in node.input if name]
    free = [name for name in operands if not flow.is_batch(name)]
    if free:
        return f"joins {free[0]!r}, which does not carry the samples: it fits one batch size only"
    rank = flow.rank(operands[0])
    return flow.spares_batch([int(node_attribute(node, "axis", 0))], rank, "concatenates along") or flow.same(
        node, rank
    )


def split(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    rank = flow.rank(node.input[0])
    reason = flow.spares_batch([int(node_attribute(node, "axis", 0))], rank, "splits")
    return reason or flow.parameters(node) or flow.same(node, rank)


def slice_rule(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    rank = flow.rank(node.input[0])
    reason = flow.parameters(node)
    if reason:
        return reason
    given, axes = flow.axes_operand(node, 3, "axes")
    if not given:
        return "slices from axis 0 on (no axes given): it cuts the batch"
    if axes is None:
        return "slice axes computed at run time"
    return flow.spares_batch(axes, rank, "slices") or flow.same(node, rank)


def gather(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    data, indices = node.input[0], node.input[1]
    axis = int(node_attribute(node, "axis", 0))
    rank_data, rank_indices = flow.rank(data), flow.rank(indices)
    out = None if rank_data is None or rank_indices is None else rank_data + rank_indices - 1
    if flow.is_batch(indices):
        if flow.is_batch(data):
            return "indexes the data with values computed from the data: it picks among the samples"
        # A constant table looked up by the samples: row i of the result is sample i's lookup.
        normalized = normalized_axes([axis], rank_data)
        if normalized != [0]:
            return f"places the samples of its indices on axis {axis}"
        return flow.same(node, out)
    reason = flow.spares_batch([axis], rank_data, "picks samples along")
    return reason or flow.same(node, out)


def gather_elements(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    data, indices = node.input[0], node.input[1]
    if not (flow.is_batch(data) and flow.is_batch(indices)):
        return "one of data and indices does not carry the samples: it fits one batch size only"
    rank = flow.rank(data)
    return flow.spares_batch([int(node_attribute(node, "axis", 0))], rank, "picks along") or flow.same(
        node, rank
    )


def pad(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    rank = flow.rank(node.input[0])
    reason = flow.parameters(node)
    if reason:
        return reason
    pads: list[int] | None
    if flow.g.opset < 11:
        pads = [int(p) for p in node_attribute(node, "pads", [])]
    else:
        pads = flow.ints(flow.operand(node, 1))
    if pads is None:
        return "pads computed at run time"
    axes_name = flow.operand(node, 3)
    axes = flow.ints(axes_name) if axes_name else list(range(len(pads) // 2))
    if axes is None:
        return "pad axes computed at run time"
    normalized = normalized_axes(axes, rank)
    if normalized is None:
        return "pads axes of a tensor of unknown rank"
    half = len(pads) // 2
    for i, axis in enumerate(normalized):
        if axis == 0 and i + half < len(pads) and (pads[i] or pads[i + half]):
            return "pads the batch axis: it adds rows that belong to no sample"
    return flow.same(node, rank)


def tile(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    repeats = flow.ints(flow.operand(node, 1))
    if repeats is None:
        return "repeats computed at run time"
    if not repeats or repeats[0] != 1:
        return "repeats the batch axis"
    return flow.same(node, flow.rank(node.input[0]))


def expand(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    rank = flow.rank(node.input[0])
    shape = flow.ints(flow.operand(node, 1))
    if shape is None or rank is None:
        return "target shape computed at run time" if shape is None else "expands a tensor of unknown rank"
    if len(shape) > rank:
        return "adds axes in front of the batch axis"
    if len(shape) == rank and shape[0] != 1:
        return f"expands the batch axis to {shape[0]}"
    return flow.same(node, rank)


def resize(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    rank = flow.rank(node.input[0])
    reason = flow.parameters(node)
    if reason:
        return reason
    axes = node_attribute(node, "axes")
    resized = list(range(rank)) if axes is None and rank is not None else normalized_axes(axes or [], rank)
    if resized is None or (axes is None and rank is None):
        return "cannot tell which axes it resizes (rank unknown)"
    if 0 not in resized:
        return flow.same(node, rank)
    position = resized.index(0)
    sizes = ""
    if node.op_type == "Upsample" and flow.g.opset < 9:
        scales = [float(s) for s in node_attribute(node, "scales", [])]
    else:
        newer = node.op_type == "Resize" and flow.g.opset >= 11
        scales_name = flow.operand(node, 2 if newer else 1)
        sizes = flow.operand(node, 3) if newer else ""
        found = flow.floats(scales_name)
        if scales_name and found is None:
            return "scales computed at run time"
        scales = found or []
    if not scales:
        return "sets the batch axis to a fixed size" if sizes else "resize scales computed at run time"
    if position >= len(scales) or scales[position] != 1.0:
        return "rescales the batch axis"
    mode = _text(node_attribute(node, "coordinate_transformation_mode", "half_pixel"))
    if mode == "tf_crop_and_resize":
        roi = flow.floats(flow.operand(node, 1))
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
    return flow.same(node, rank)


def quantization(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    rank = flow.rank(node.input[0])
    reason = flow.parameters(node)
    if reason:
        return reason
    scale = flow.shape(node.input[1])
    if scale is None:
        return "cannot tell how its scale lines up with the data (shape unknown)"
    if len(scale) >= 2:  # blocked quantization: a scale shaped like the data, one row per sample
        return flow.broadcast_free(node.input[1], rank) or flow.same(node, rank)
    if len(scale) == 1 and scale[0] != 1:  # per-axis: one scale per slice along `axis`
        reason = flow.spares_batch([int(node_attribute(node, "axis", 1))], rank, "quantizes per slice along")
    return reason or flow.same(node, rank)


def recurrent(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    if int(node_attribute(node, "layout", 0)) != 1:
        return "layout=0 reads axis 0 as the sequence: the samples would be steps of one sequence"
    if not flow.is_batch(node.input[0]):
        return "its sequence input does not carry the samples"
    for index in (1, 2, 3, 7):  # W, R, B, P (peepholes)
        name = flow.operand(node, index)
        if flow.is_batch(name):
            return DataParameters(f"its parameter {name!r} is computed from the data")
    for index in (4, 5, 6):  # sequence_lens, initial_h, initial_c: one row per sample with layout=1
        name = flow.operand(node, index)
        if name and not flow.is_batch(name):
            return f"{name!r} does not carry the samples: it fits one batch size only"
    return (4, 3, 3)[: len(node.output)]


def shape_of(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    data = node.input[0]
    rank = flow.rank(data)
    start = normalized_axes([int(node_attribute(node, "start", 0))], rank)
    if start is None:
        return "reads the batch size"
    if start[0] >= 1:
        return None  # one sample's shape: the same alone and in any batch
    end = node_attribute(node, "end")
    length = rank
    if end is not None:
        stop = normalized_axes([int(end)], rank)
        if stop is not None and stop[0] <= 0:
            return None  # no entries at all
        length = None if stop is None or rank is None else min(stop[0], rank)
    return BatchSize(data, node_label(node), vector=True, length=length)


def size(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    return "reads the batch size"


# -- the rules for a batch size: only what leads it into a Reshape of a tensor carrying the samples -------


def size_pass_through(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    """Identity, and Cast to int64: the value unchanged (a narrower or float type could round it)."""
    size = flow.sizes.get(node.input[0])
    if size is None or (node.op_type == "Cast" and node_attribute(node, "to") != onnx.TensorProto.INT64):
        return flow.reads_batch_size(node)
    return size


def size_gather(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    """Constant entries of a shape vector: N alone (index 0 as a scalar), a vector still led by N, or
    per-sample entries only (FREE)."""
    size = flow.sizes.get(node.input[0])
    indices = flow.g.constants.get(node.input[1])
    if size is None or not size.vector or indices is None or not flow.others_free(node, 1):
        return flow.reads_batch_size(node)
    if normalized_axes([int(node_attribute(node, "axis", 0))], 1) != [0] or np.ndim(indices) > 1:
        return flow.reads_batch_size(node)
    positions = normalized_axes([int(i) for i in np.asarray(indices).reshape(-1)], size.length)
    if positions is None:
        return flow.reads_batch_size(node)
    if 0 not in positions:
        return None
    if np.ndim(indices) == 0:
        return replace(size, vector=False, length=None)
    if positions[0] == 0 and positions.count(0) == 1:
        return replace(size, length=len(positions))
    return flow.reads_batch_size(node)


def size_slice(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    """A constant slice of a shape vector: still led by N when it starts at entry 0, FREE when it skips
    it."""
    size = flow.sizes.get(node.input[0])
    if size is None or not size.vector or not flow.others_free(node, 1):
        return flow.reads_batch_size(node)
    bounds: list[list[int] | None]
    if flow.g.opset < 10:
        bounds = [node_attribute(node, "starts"), node_attribute(node, "ends"), [1]]
        axes = node_attribute(node, "axes")
    else:
        given, axes = flow.axes_operand(node, 3, "axes")
        if given and axes is None:
            return flow.reads_batch_size(node)
        steps = flow.operand(node, 4)
        bounds = [flow.ints(flow.operand(node, 1)), flow.ints(flow.operand(node, 2))]
        bounds.append(flow.ints(steps) if steps else [1])
    found = [values for values in bounds if values is not None and len(values) == 1]
    if len(found) != 3 or (axes is not None and normalized_axes([int(a) for a in axes], 1) != [0]):
        return flow.reads_batch_size(node)
    start, end, step = (int(values[0]) for values in found)
    positions: list[int]
    if size.length is not None and step != 0:
        positions = _sliced(size.length, start, end, step)
        if positions != list(range(size.length))[start:end:step]:
            # Past -length, numpy's clamping (which onnx's reference evaluator follows) takes other
            # entries than the standard's: refused unless both agree.
            return flow.reads_batch_size(node)
    elif step > 0 and start >= 1:
        positions = []  # the first entry skipped, whatever the length
    elif step > 0 and start == 0 and end >= 0:
        positions = [0] if end > 0 else []  # led by entry 0; how many more is not known
    else:
        return flow.reads_batch_size(node)
    if 0 not in positions:
        return None
    if positions[0] != 0:
        return flow.reads_batch_size(node)
    return replace(size, length=len(positions) if size.length is not None else None)


def size_unsqueeze(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    """N as the one-entry vector [N]."""
    size = flow.sizes.get(node.input[0])
    _, axes = flow.axes_operand(node, 1, "axes")
    if size is None or size.vector or axes is None or not flow.others_free(node, 1):
        return flow.reads_batch_size(node)
    if normalized_axes(axes, 1) != [0]:
        return flow.reads_batch_size(node)
    return replace(size, vector=True, length=1)


def size_squeeze(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    """The one-entry vector [N] as N."""
    size = flow.sizes.get(node.input[0])
    given, axes = flow.axes_operand(node, 1, "axes")
    if size is None or not size.vector or not flow.others_free(node, 1) or (given and axes is None):
        return flow.reads_batch_size(node)
    if (axes is not None and normalized_axes(axes, 1) != [0]) or (axes is None and size.length != 1):
        return flow.reads_batch_size(node)
    return replace(size, vector=False, length=None)


def size_concat(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    """A shape vector led by N, then FREE entries: still led by N."""
    operands = [name for name in node.input if name]
    size = flow.sizes.get(operands[0])
    if size is None or not size.vector or not flow.others_free(node, 1):
        return flow.reads_batch_size(node)
    if normalized_axes([int(node_attribute(node, "axis", 0))], 1) != [0]:
        return flow.reads_batch_size(node)
    lengths = [size.length, *(flow.vector_length(name) for name in operands[1:])]
    known = [length for length in lengths if length is not None]
    return replace(size, length=sum(known) if len(known) == len(lengths) else None)


def size_reshape(flow: Dataflow, node: onnx.NodeProto) -> Verdict:
    """Reshape(y, [N of x, FREE...]) with y and x both carrying the samples: every such tensor has the
    batch's N rows, so this is N rows of one sample's elements each, sample i's on row i (PyTorch's
    `x.view(x.size(0), -1)`, and GroupNorm's reshape back to `Shape(x)` after InstanceNormalization)."""
    data, target = node.input[0], node.input[1]
    size = flow.sizes.get(target)
    if size is None or not size.vector or not flow.is_batch(data) or not flow.others_free(node, 2):
        return flow.reads_batch_size(node)
    return flow.same(node, size.length)


RULES: Mapping[str, Rule] = {
    **dict.fromkeys(ELEMENTWISE, elementwise),
    **dict.fromkeys(BROADCASTING, broadcasting),
    **dict.fromkeys(PER_SAMPLE, per_sample),
    **dict.fromkeys(REDUCTIONS, reduction),
    **dict.fromkeys(
        (
            "LayerNormalization",
            "LpNormalization",
            "MeanVarianceNormalization",
            "Softmax",
            "LogSoftmax",
            "Hardmax",
        ),
        normalization_along,
    ),
    **dict.fromkeys(("ArgMax", "ArgMin"), arg_reduction),
    **dict.fromkeys(("QuantizeLinear", "DequantizeLinear"), quantization),
    **dict.fromkeys(("RNN", "GRU", "LSTM"), recurrent),
    **dict.fromkeys(("Resize", "Upsample"), resize),
    "BatchNormalization": batch_normalization,
    "Concat": concat,
    "CumSum": cumulative,
    "Expand": expand,
    "Flatten": flatten,
    "Gather": gather,
    "GatherElements": gather_elements,
    "Gemm": gemm,
    "MatMul": matmul,
    "Pad": pad,
    "Reshape": reshape,
    "Shape": shape_of,
    "Size": size,
    "Slice": slice_rule,
    "Split": split,
    "Squeeze": squeeze,
    "Tile": tile,
    "TopK": top_k,
    "Transpose": transpose,
    "Unsqueeze": unsqueeze,
}

# What a batch size may flow through: the spellings of PyTorch's `x.view(x.size(0), -1)` and its kin.
BATCH_SIZE_RULES: Mapping[str, Rule] = {
    "Cast": size_pass_through,
    "Concat": size_concat,
    "Gather": size_gather,
    "Identity": size_pass_through,
    "Reshape": size_reshape,
    "Slice": size_slice,
    "Squeeze": size_squeeze,
    "Unsqueeze": size_unsqueeze,
}
