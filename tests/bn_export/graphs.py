"""Builders for the export/verify/inspect tests: checkpoints made directly, and graphs broken on purpose."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bn_export.checkpoint import Checkpoint, LinearHead

# (sample_shape, channel axis of the full input): ranks 2 to 5, channels first and channels last.
LAYOUTS = [
    ((5,), 1),
    ((3, 4), 1),
    ((4, 3), 2),
    ((3, 4, 5), 1),
    ((4, 5, 3), 3),
    ((2, 3, 4, 5), 1),
    ((3, 4, 5, 2), 4),
]


def make_checkpoint(
    sample_shape: tuple[int, ...] = (3, 4, 5),
    axis: int = 1,
    *,
    classes: int = 0,
    seed: int = 0,
    **overrides: Any,
) -> Checkpoint:
    """A fitted-looking checkpoint: means far from 0 (to exercise cancellation), variances in [0.1, 5]."""
    rng = np.random.default_rng(seed)
    channels = sample_shape[axis - 1]
    head = None
    if classes:
        head = LinearHead(
            rng.standard_normal((channels, classes)), rng.standard_normal(classes), "cross-entropy"
        )
    fields: dict[str, Any] = {
        "gamma": rng.uniform(0.5, 2.0, channels),
        "beta": rng.standard_normal(channels),
        "moving_mean": 10 * rng.standard_normal(channels),
        "moving_var": rng.uniform(0.1, 5.0, channels),
        "eps": 1e-3,
        "momentum": 0.9,
        "axis": axis,
        "sample_shape": tuple(sample_shape),
        "stats": "population",
        "samples_seen": 1000,
        "batches_seen": 10,
        "data_fingerprint": "sha256:0123456789abcdef",
        "created": "2024-05-01T12:00:00+00:00",
        "version": "0.1.0",
        "head": head,
    }
    fields.update(overrides)
    return Checkpoint(**fields)


def samples_like(checkpoint: Checkpoint, n: int, seed: int = 1, spatial: int | None = None) -> np.ndarray:
    """(n, *sample_shape) float64 samples around the statistics; `spatial` resizes the spatial dims."""
    rng = np.random.default_rng(seed)
    shape = [
        size if a == checkpoint.axis or spatial is None else spatial
        for a, size in enumerate(checkpoint.sample_shape, start=1)
    ]
    along = [1] * checkpoint.rank
    along[checkpoint.axis] = -1
    mean = np.asarray(checkpoint.moving_mean).reshape(along)
    std = np.sqrt(np.asarray(checkpoint.moving_var)).reshape(along)
    return mean + 2 * std * rng.standard_normal((n, *shape))


def set_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> onnx.ModelProto:
    """A copy of `model` with initializer `name` replaced (same dtype)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, init in enumerate(out.graph.initializer):
        if init.name == name:
            dtype = numpy_helper.to_array(init).dtype
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
            return out
    raise KeyError(name)


def set_metadata_statistic(model: onnx.ModelProto, key: str, values: list[float]) -> onnx.ModelProto:
    """A copy of a folded `model` whose metadata statistic `key` is replaced."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for prop in out.metadata_props:
        if prop.key == "statistics":
            stats = json.loads(prop.value)
            stats[key] = values
            prop.value = json.dumps(stats)
            return out
    raise KeyError("statistics")


def with_bn_attributes(
    model: onnx.ModelProto, *, training_mode: int | None = None, extra_outputs: bool = False
):
    """A copy of a batchnorm-form `model` with its BatchNormalization switched to training mode or given the
    running-mean/var outputs (exported as graph outputs too, as a training export would)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    node = next(n for n in out.graph.node if n.op_type == "BatchNormalization")
    if training_mode is not None:
        node.attribute.append(helper.make_attribute("training_mode", training_mode))
    if extra_outputs:
        node.output.extend(["running_mean", "running_var"])
        channels = numpy_helper.to_array(out.graph.initializer[0]).shape[0]
        for name in ("running_mean", "running_var"):
            out.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [channels]))
    return out


def batch_statistics_model(channels: int = 3, rank: int = 4, opset: int = 17) -> onnx.ModelProto:
    """Training-style BatchNorm from primitive ops: mean and variance over the batch and spatial axes.

    `output = gamma*(x - mean_b(x))/sqrt(mean_b((x - mean_b(x))^2) + eps) + beta`, the graph a careless
    export of a training-mode layer produces, and exactly what `verify` must refuse.
    """
    axes = [0, *range(2, rank)]
    shape: list[int | str] = ["batch", channels, *[f"s{i}" for i in range(2, rank)]]
    along = (channels,) + (1,) * (rank - 2)
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.uniform(0.5, 2, along).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(along).astype(np.float32), "beta"),
        numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], axes=axes, keepdims=1),
        helper.make_node("Sub", ["input", "mean"], ["centered"]),
        helper.make_node("Mul", ["centered", "centered"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["var"], axes=axes, keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Div", ["centered", "std"], ["normalized"]),
        helper.make_node("Mul", ["normalized", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "batch_statistics",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def data_graph(
    nodes: list[onnx.NodeProto],
    outputs: dict[str, int],
    initializers: dict[str, np.ndarray] | None = None,
    *,
    input_dims: tuple[int | str, ...] = ("N", 3, 4, 5),
    opset: int = 17,
) -> onnx.ModelProto:
    """A checked model from float32 `input` (dims as given, names symbolic) through `nodes` to the float32
    graph `outputs` (name: rank, dims left to inference), with `initializers` as constants."""
    graph = helper.make_graph(
        nodes,
        "data_graph",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(input_dims))],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * rank)
            for name, rank in outputs.items()
        ],
        initializer=[numpy_helper.from_array(value, name) for name, value in (initializers or {}).items()],
    )
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    onnx.checker.check_model(model, full_check=True)
    return model
