"""Find the BatchNormalization layers of any ONNX network and derive the graphs recalibration runs.

A *layer* is an inference-mode `BatchNormalization` node of the main graph whose four statistics inputs
(gamma, beta, mean, var) are constants. The channel is axis 1 of its input `X: (N, C, *spatial)`.

Three derived graphs, each a copy; the network given is never modified:

- `with_statistics`: the network with new `mean`/`var` for some layers. An initializer read by that one
  layer slot alone is replaced in place (same name, same position, same dtype), so nothing else in the
  file changes; one shared with other readers (PyTorch shares a fresh layer's equal `weight` and
  `running_var` through an Identity) is left alone and the layer gets a new initializer of its own.
- `probe_model`: the network cut down to what computes some tensors, each exposed as an output through an
  Identity (so a graph input or an existing output can be exposed too).
- `batch_statistics_model`: every chosen layer normalizes with its batch's statistics, as PyTorch's
  train-mode forward does (biased variance), and exposes them: `mean` and `var` `(1, C, 1)` and the shape
  `(N, C, S)` of its input seen as three axes, from which the count per channel `N·S` follows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from bn_export.errors import InvalidInputError
from bn_export.onnx_graph import GraphIndex, node_attribute

F64 = NDArray[np.float64]

#: How to export a PyTorch network so that its BatchNorm layers stay nodes of the graph.
KEEP_BN_HINT = (
    "export with the BatchNorm layers kept as nodes: in PyTorch, "
    "torch.onnx.export(model.eval(), ..., do_constant_folding=False) or "
    "training=torch.onnx.TrainingMode.PRESERVE with the model in eval mode (the default export folds "
    "each BatchNorm into the Conv before it)"
)


@dataclass(frozen=True)
class BatchNormLayer:
    """One BatchNormalization node: its name, its data input, its statistics and where they are stored.

    `depends_on` names the layers upstream of it (whose outputs reach its input).
    """

    name: str
    node_index: int
    input: str
    mean_name: str
    var_name: str
    gamma: F64
    beta: F64
    mean: F64
    var: F64
    eps: float
    depends_on: frozenset[str]

    @property
    def num_channels(self) -> int:
        return int(self.mean.shape[0])


def find_batchnorm_layers(model: onnx.ModelProto) -> list[BatchNormLayer]:
    """Every BatchNormalization layer of the main graph, in graph (topological) order.

    Raises `InvalidInputError` when there is none (with how to export with them kept), or when one is in
    training mode or reads statistics that are not constants.
    """
    g = GraphIndex(model)
    layers: list[BatchNormLayer] = []
    upstream: dict[str, frozenset[str]] = {}
    for index, node in enumerate(model.graph.node):
        above = frozenset().union(*(upstream.get(name, frozenset()) for name in _reads(node)))
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
            layer = _layer(g, node, index, above)
            layers.append(layer)
            above = above | {layer.name}
        for out in node.output:
            if out:
                upstream[out] = above
    if not layers:
        raise InvalidInputError(
            f"the network has no BatchNormalization node: nothing to recalibrate; {KEEP_BN_HINT}"
        )
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise InvalidInputError("two BatchNormalization nodes share a name; layers must be named uniquely")
    return layers


def _layer(g: GraphIndex, node: onnx.NodeProto, index: int, above: frozenset[str]) -> BatchNormLayer:
    name = node.name or node.output[0]
    if int(node_attribute(node, "training_mode", 0)) != 0 or len([o for o in node.output if o]) > 1:
        raise InvalidInputError(
            f"layer {name!r} is in training mode; export the network in eval mode ({KEEP_BN_HINT})"
        )
    if len(node.input) != 5:
        raise InvalidInputError(
            f"layer {name!r} has {len(node.input)} inputs, expected X, scale, B, mean, var"
        )
    values = []
    for role, tensor in zip(("scale", "B", "mean", "var"), node.input[1:], strict=True):
        if tensor not in g.constants:
            raise InvalidInputError(f"layer {name!r}: its {role} {tensor!r} is not a constant of the graph")
        values.append(np.asarray(g.constants[tensor], dtype=np.float64).reshape(-1))
    gamma, beta, mean, var = values
    if len({v.shape for v in values}) != 1:
        raise InvalidInputError(f"layer {name!r}: scale, B, mean and var differ in length")
    return BatchNormLayer(
        name=name,
        node_index=index,
        input=node.input[0],
        mean_name=node.input[3],
        var_name=node.input[4],
        gamma=gamma,
        beta=beta,
        mean=mean,
        var=var,
        eps=float(node_attribute(node, "epsilon", 1e-5)),
        depends_on=above,
    )


def depth_groups(layers: Sequence[BatchNormLayer]) -> list[list[BatchNormLayer]]:
    """`layers` grouped by depth among themselves: a layer's group comes after the group of every layer in
    `layers` it depends on (layers not listed keep their statistics and impose no order)."""
    chosen = {layer.name for layer in layers}
    depth: dict[str, int] = {}
    for layer in sorted(layers, key=lambda item: item.node_index):
        above = [depth[name] for name in layer.depends_on & chosen]
        depth[layer.name] = 1 + max(above) if above else 0
    groups: list[list[BatchNormLayer]] = [[] for _ in range(1 + max(depth.values(), default=-1))]
    for layer in sorted(layers, key=lambda item: item.node_index):
        groups[depth[layer.name]].append(layer)
    return groups


def with_statistics(
    model: onnx.ModelProto, layers: Iterable[BatchNormLayer], statistics: Mapping[str, tuple[F64, F64]]
) -> onnx.ModelProto:
    """A copy of `model` in which each layer named in `statistics` holds the `(mean, var)` given, stored in
    the dtype of the initializer it replaces (see the module docstring)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    readers = _reader_counts(graph)
    # An initializer that is also a graph output would change what the network returns; one that is also
    # a graph input (older IR versions list every initializer there) is only a default, replaced in place.
    outputs = {value.name for value in graph.output}
    by_name = {tensor.name: position for position, tensor in enumerate(graph.initializer)}
    taken = set(by_name) | {name for node in graph.node for name in node.output}
    for layer in layers:
        if layer.name not in statistics:
            continue
        node = graph.node[layer.node_index]
        for slot, value in zip((3, 4), statistics[layer.name], strict=True):
            tensor_name = node.input[slot]
            position = by_name.get(tensor_name)
            own = position is not None and readers.get(tensor_name, 0) == 1 and tensor_name not in outputs
            dtype = _stored_dtype(graph, tensor_name, position)
            array = np.asarray(value, dtype=np.float64).astype(dtype)
            if own and position is not None:
                original = graph.initializer[position]
                replacement = numpy_helper.from_array(array.reshape(tuple(original.dims)), tensor_name)
                graph.initializer[position].CopyFrom(replacement)
            else:
                fresh = _fresh_name(f"{layer.name}.{'running_mean' if slot == 3 else 'running_var'}", taken)
                taken.add(fresh)
                graph.initializer.append(numpy_helper.from_array(array, fresh))
                node.input[slot] = fresh
    return out


def _stored_dtype(graph: onnx.GraphProto, name: str, position: int | None) -> np.dtype[np.floating]:
    if position is not None:
        return np.dtype(helper.tensor_dtype_to_np_dtype(graph.initializer[position].data_type))
    return np.dtype(np.float32)


def _fresh_name(base: str, taken: set[str]) -> str:
    name, suffix = base, 1
    while name in taken:
        suffix += 1
        name = f"{base}_{suffix}"
    return name


def _reader_counts(graph: onnx.GraphProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.node:
        for name in _reads(node):
            counts[name] = counts.get(name, 0) + 1
    return counts


def _reads(node: onnx.NodeProto) -> list[str]:
    """The tensors `node` reads: its inputs and any outer-scope name its subgraphs mention."""
    names = [name for name in node.input if name]
    for attr in node.attribute:
        subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in subgraphs:
            for inner in sub.node:
                names.extend(_reads(inner))
    return names


PROBE_SUFFIX = "__recalibration_probe"


def probe_model(
    model: onnx.ModelProto, tensors: Sequence[str], types: Mapping[str, int] | None = None
) -> tuple[onnx.ModelProto, list[str]]:
    """`model` cut down to the nodes that compute `tensors`, each exposed as an output; returns the model
    and the output names, one per tensor in order. `types`: `element_types(model)` where the caller has
    it already (shape inference over a large network is not free)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    types = element_types(model) if types is None else types
    names = []
    for tensor in tensors:
        probe = tensor + PROBE_SUFFIX
        names.append(probe)
        graph.node.append(helper.make_node("Identity", [tensor], [probe], name=probe))
    _set_outputs(
        graph,
        [
            helper.make_tensor_value_info(n, types.get(t, TensorProto.FLOAT), None)
            for n, t in zip(names, tensors, strict=True)
        ],
    )
    return out, names


def batch_statistics_model(
    model: onnx.ModelProto, layers: Sequence[BatchNormLayer]
) -> tuple[onnx.ModelProto, dict[str, tuple[str, str, str]]]:
    """`model` with each of `layers` normalizing with its batch's mean and biased variance (PyTorch's
    train-mode forward), cut down to what computes them; returns the model and, per layer, the output
    names of its batch `mean (1, C, 1)`, `var (1, C, 1)` and input shape `(N, C, S)`.

    Over `x` seen as `(N, C, S)` (a Reshape, whatever the input's rank): `mean = ReduceMean(x)`,
    `var = ReduceSumSquare(x - mean) / (N·S)`, both over axes 0 and 2; the layer's own node then reads
    them in place of its stored statistics, so it normalizes `(x - mean)/sqrt(var + eps)·gamma + beta` in
    one pass, with its own gamma, beta and eps. Four passes over each layer's input in all.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    opset = GraphIndex(model).opset
    types = element_types(model)
    added: dict[int, list[onnx.NodeProto]] = {}
    exposed: dict[str, tuple[str, str, str]] = {}
    outputs = []
    for layer in layers:
        node = graph.node[layer.node_index]
        elem = types.get(layer.input, TensorProto.FLOAT)
        stats_elem = types.get(layer.mean_name, elem)
        p = f"{layer.name}{PROBE_SUFFIX}/"
        inits = {
            "shape3": np.asarray([0, 0, -1], dtype=np.int64),
            "flat": np.asarray([-1], dtype=np.int64),
            "axes": np.asarray([0, 2], dtype=np.int64),
            "batch_axis": np.asarray(0, dtype=np.int64),
            "spatial_axis": np.asarray(2, dtype=np.int64),
        }
        for key, value in inits.items():
            graph.initializer.append(numpy_helper.from_array(value, p + key))

        def reduce(op: str, source: str, target: str, prefix: str = p) -> onnx.NodeProto:
            # ReduceSumSquare and ReduceMean take their axes as an input from opset 18 on.
            if opset >= 18:
                return helper.make_node(op, [source, prefix + "axes"], [target], keepdims=1)
            return helper.make_node(op, [source], [target], axes=[0, 2], keepdims=1)

        x3, mean, var, shape = p + "x3", p + "mean", p + "var", p + "shape"
        nodes = [
            helper.make_node("Reshape", [layer.input, p + "shape3"], [x3]),
            helper.make_node("Shape", [x3], [shape]),
            reduce("ReduceMean", x3, mean),
            helper.make_node("Sub", [x3, mean], [p + "centred"]),
            reduce("ReduceSumSquare", p + "centred", p + "sum_squares"),
            helper.make_node("Gather", [shape, p + "batch_axis"], [p + "n"]),
            helper.make_node("Gather", [shape, p + "spatial_axis"], [p + "s"]),
            helper.make_node("Mul", [p + "n", p + "s"], [p + "count_int"]),
            helper.make_node("Cast", [p + "count_int"], [p + "count"], to=elem),
            helper.make_node("Div", [p + "sum_squares", p + "count"], [var]),
            helper.make_node("Reshape", [mean, p + "flat"], [p + "mean_c"]),
            helper.make_node("Reshape", [var, p + "flat"], [p + "var_c"]),
        ]
        statistics = [p + "mean_c", p + "var_c"]
        if stats_elem != elem:
            nodes += [
                helper.make_node("Cast", [name], [name + "_cast"], to=stats_elem) for name in statistics
            ]
            statistics = [name + "_cast" for name in statistics]
        for position, item in enumerate(nodes):
            item.name = f"{p}{position}"
        node.input[3], node.input[4] = statistics
        added[layer.node_index] = nodes
        exposed[layer.name] = (mean, var, shape)
        outputs += [
            helper.make_tensor_value_info(mean, elem, None),
            helper.make_tensor_value_info(var, elem, None),
            helper.make_tensor_value_info(shape, TensorProto.INT64, None),
        ]
    rebuilt: list[onnx.NodeProto] = []
    for index, node in enumerate(graph.node):
        rebuilt.extend([*added.get(index, []), node])
    del graph.node[:]
    graph.node.extend(rebuilt)
    _set_outputs(graph, outputs)
    return out, exposed


def _set_outputs(graph: onnx.GraphProto, outputs: Sequence[onnx.ValueInfoProto]) -> None:
    """Make `outputs` the graph's only outputs and drop the nodes and initializers they do not need."""
    del graph.output[:]
    graph.output.extend(outputs)
    producer = {name: position for position, node in enumerate(graph.node) for name in node.output if name}
    needed: set[int] = set()
    pending = [value.name for value in outputs]
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        position = producer.get(name)
        if position is not None and position not in needed:
            needed.add(position)
            pending.extend(_reads(graph.node[position]))
    kept = [node for position, node in enumerate(graph.node) if position in needed]
    initializers = [tensor for tensor in graph.initializer if tensor.name in seen]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    # Shapes recorded for tensors that no longer exist would only confuse the runtime's checks.
    values = [value for value in graph.value_info if value.name in seen]
    del graph.value_info[:]
    graph.value_info.extend(values)


def element_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type of every tensor whose type the model states or onnx can infer."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is best effort; unknown types fall back to float
        inferred = model
    graph = inferred.graph
    types = {t.name: int(t.data_type) for t in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = int(value.type.tensor_type.elem_type)
    return types
