"""Build the frozen inference-mode ONNX graph of a fitted BatchNorm layer with `onnx.helper`, and read graphs.

Two forms, both taking `input` in the layout the data was fitted on, `(N, *sample_shape)` with the channel at
`checkpoint.axis`, and producing `output` of the same shape:

- `batchnorm`: one `BatchNormalization` node in inference mode (no `training_mode`, one output), which reads
  the channel at axis 1; data fitted with the channel elsewhere gets a Transpose pair around it;
- `folded`: `output = input*scale + shift` with `scale = gamma/sqrt(moving_var + eps)` and
  `shift = beta - moving_mean*scale`, computed in float64 then cast, shaped `(C, 1, ..., 1)` to broadcast
  along the fitted channel axis. The statistics themselves go into `metadata_props["statistics"]` (JSON,
  float64 reprs, exact) so `verify` can check the folded constants against them.

With a head, `logits = mean_spatial(output) @ head_weight + head_bias` is appended (ReduceMean over the
spatial axes when rank > 2).

`float16` models take and return float16 but compute in float32: onnxruntime's CPU provider has no float16
BatchNormalization, Mul, Add, MatMul or ReduceMean kernels, and float32 arithmetic rounded once at the end is
also the more accurate choice. Parameters are then stored in float32.

`GraphIndex`, `node_attribute` and `constant_ints` read any graph (ours or not) for the checks that inspect
it: `verify` and the `sample_independence` proof.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from bn_export import __version__
from bn_export.checkpoint import Checkpoint
from bn_export.errors import ExportError
from bn_export.layer import folded_scale_shift

Form = Literal["batchnorm", "folded"]
Dtype = Literal["float32", "float16", "float64"]

PRODUCER_NAME = "frozen-bn"
DEFAULT_OPSET = 17  # BatchNormalization-15, ReduceMean-13: loads in every onnxruntime since 1.13
MIN_OPSET = 13  # ReduceMean-13 / Transpose-13 semantics; BatchNormalization's inference mode is the default
FORMS: tuple[Form, ...] = ("batchnorm", "folded")
DTYPES: tuple[Dtype, ...] = ("float32", "float16", "float64")

INPUT_NAME = "input"
OUTPUT_NAME = "output"
LOGITS_NAME = "logits"
BATCH_DIM = "batch"

_ONNX_TYPE = {
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float64): TensorProto.DOUBLE,
}


def compute_dtype(dtype: Dtype) -> np.dtype[np.floating[Any]]:
    """The dtype the graph computes in: `dtype` itself, except float16 which computes in float32."""
    return np.dtype(np.float32) if dtype == "float16" else np.dtype(dtype)


def ir_version_for(opset: int) -> int:
    """The oldest IR version that can carry `opset` (pinned so older runtimes accept the file)."""
    return int(helper.find_min_ir_version_for([helper.make_opsetid("", opset)]))


def folded_parameters(checkpoint: Checkpoint) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The checkpoint's frozen formula as `scale`, `shift` (C,) float64 (`layer.folded_scale_shift`)."""
    c = checkpoint
    return folded_scale_shift(c.gamma, c.beta, c.moving_mean, c.moving_var, c.eps)


def layout_name(axis: int, rank: int) -> str:
    """`channels_first` (axis 1), `channels_last` (axis rank-1, rank > 2) or `channel_axis_<k>`."""
    if axis == 1:
        return "channels_first"
    if axis == rank - 1:
        return "channels_last"
    return f"channel_axis_{axis}"


def checkpoint_metadata(checkpoint: Checkpoint, form: Form, dtype: Dtype) -> dict[str, str]:
    """The `metadata_props` describing the fit: all from the checkpoint, nothing from the clock.

    `eps` is written with `repr`, so it is exact even where the graph can only hold a float32 attribute.
    """
    meta: dict[str, str] = {
        "producer": PRODUCER_NAME,
        "producer_version": __version__,
        "form": form,
        "dtype": dtype,
        "compute_dtype": str(compute_dtype(dtype)),
        "eps": repr(float(checkpoint.eps)),
        "momentum": "none" if checkpoint.momentum is None else repr(float(checkpoint.momentum)),
        "momentum_convention": "moving = moving*momentum + batch*(1 - momentum)",
        "axis": str(checkpoint.axis),
        "layout": layout_name(checkpoint.axis, checkpoint.rank),
        "sample_shape": json.dumps(list(checkpoint.sample_shape)),
        "statistics_kind": checkpoint.stats,
        "unbiased_moving_var": str(bool(checkpoint.unbiased_moving_var)).lower(),
        "samples_seen": str(int(checkpoint.samples_seen)),
        "batches_seen": str(int(checkpoint.batches_seen)),
        "data_fingerprint": checkpoint.data_fingerprint,
        "fit_created": checkpoint.created,
        "fit_version": checkpoint.version,
    }
    if checkpoint.head is not None:
        meta["head_loss"] = checkpoint.head.loss
    if form == "folded":
        meta["statistics"] = json.dumps(
            {
                name: [float(v) for v in np.asarray(getattr(checkpoint, name), dtype=np.float64)]
                for name in ("gamma", "beta", "moving_mean", "moving_var")
            }
        )
    return meta


def build_model(
    checkpoint: Checkpoint,
    *,
    form: Form = "batchnorm",
    opset: int = DEFAULT_OPSET,
    dtype: Dtype = "float32",
    with_head: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> onnx.ModelProto:
    """The frozen graph of `checkpoint` as a `ModelProto` (opset and IR version pinned, not yet checked).

    Input `input`: (batch, *sample_shape) with the batch and spatial dimensions symbolic, the channel fixed.
    Outputs `output` (same shape) and, with `with_head`, `logits`: (batch, K).
    """
    if form not in FORMS:
        raise ExportError(f"unknown form {form!r}, expected one of {', '.join(FORMS)}")
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}, expected one of {', '.join(DTYPES)}")
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ExportError(f"opset {opset} is not supported, expected {MIN_OPSET} <= opset <= {newest}")
    if with_head and checkpoint.head is None:
        raise ExportError("--with-head asked for, but the checkpoint has no trained head")

    rank, axis, channels = checkpoint.rank, checkpoint.axis, checkpoint.num_channels
    io_type = _ONNX_TYPE[np.dtype(dtype)]
    work = compute_dtype(dtype)
    work_type = _ONNX_TYPE[work]
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, value: NDArray[Any]) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=work), name))
        return name

    x = INPUT_NAME
    if dtype == "float16":
        nodes.append(helper.make_node("Cast", [x], ["input_compute"], name="cast_input", to=work_type))
        x = "input_compute"
    # The last node of the normalization writes `output` itself unless a float16 cast must follow.
    y = "normalized" if dtype == "float16" else OUTPUT_NAME

    if form == "batchnorm":
        perm = [0, axis, *(a for a in range(1, rank) if a != axis)]
        inverse = [perm.index(a) for a in range(rank)]
        if axis != 1:
            nodes.append(
                helper.make_node("Transpose", [x], ["input_nc"], name="to_channels_first", perm=perm)
            )
        bn_in = "input_nc" if axis != 1 else x
        bn_out = "normalized_nc" if axis != 1 else y
        bn_attrs: dict[str, Any] = {"epsilon": float(checkpoint.eps)}
        if checkpoint.momentum is not None:
            # ONNX's momentum attribute uses our convention; it has no effect in inference mode.
            bn_attrs["momentum"] = float(checkpoint.momentum)
        params = [const(n, getattr(checkpoint, n)) for n in ("gamma", "beta", "moving_mean", "moving_var")]
        nodes.append(
            helper.make_node("BatchNormalization", [bn_in, *params], [bn_out], name="bn", **bn_attrs)
        )
        if axis != 1:
            nodes.append(helper.make_node("Transpose", [bn_out], [y], name="to_fitted_layout", perm=inverse))
    else:
        scale, shift = folded_parameters(checkpoint)
        bshape = (channels,) + (1,) * (rank - 1 - axis)
        nodes.append(
            helper.make_node("Mul", [x, const("scale", scale.reshape(bshape))], ["scaled"], name="mul")
        )
        nodes.append(
            helper.make_node("Add", ["scaled", const("shift", shift.reshape(bshape))], [y], name="add")
        )

    if dtype == "float16":
        nodes.append(helper.make_node("Cast", [y], [OUTPUT_NAME], name="cast_output", to=io_type))

    outputs = [helper.make_tensor_value_info(OUTPUT_NAME, io_type, _dims(checkpoint))]
    if with_head and checkpoint.head is not None:
        spatial = [a for a in range(1, rank) if a != axis]
        pooled = y
        if spatial:
            pooled = "pooled"
            if opset >= 18:
                axes = numpy_helper.from_array(np.asarray(spatial, dtype=np.int64), "pool_axes")
                inits.append(axes)
                nodes.append(
                    helper.make_node("ReduceMean", [y, "pool_axes"], [pooled], name="pool", keepdims=0)
                )
            else:
                nodes.append(
                    helper.make_node("ReduceMean", [y], [pooled], name="pool", axes=spatial, keepdims=0)
                )
        weight = const("head_weight", checkpoint.head.weight)
        bias = const("head_bias", checkpoint.head.bias)
        logits = "logits_compute" if dtype == "float16" else LOGITS_NAME
        nodes.append(helper.make_node("MatMul", [pooled, weight], ["head_matmul"], name="head_matmul"))
        nodes.append(helper.make_node("Add", ["head_matmul", bias], [logits], name="head_add"))
        if dtype == "float16":
            nodes.append(helper.make_node("Cast", [logits], [LOGITS_NAME], name="cast_logits", to=io_type))
        classes = int(checkpoint.head.weight.shape[1])
        outputs.append(helper.make_tensor_value_info(LOGITS_NAME, io_type, [BATCH_DIM, classes]))

    graph = helper.make_graph(
        nodes,
        "frozen_batchnorm",
        [helper.make_tensor_value_info(INPUT_NAME, io_type, _dims(checkpoint))],
        outputs,
        initializer=inits,
        doc_string=f"Inference-mode BatchNorm ({form}) with frozen {checkpoint.stats} statistics.",
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=ir_version_for(opset),
        producer_name=PRODUCER_NAME,
        producer_version=__version__,
    )
    helper.set_model_props(model, dict(metadata or {}))
    return model


def _dims(checkpoint: Checkpoint) -> list[int | str]:
    """(batch, *sample) with the batch and spatial dimensions symbolic and the channel fixed."""
    dims: list[int | str] = [BATCH_DIM]
    for a, size in enumerate(checkpoint.sample_shape, start=1):
        dims.append(int(size) if a == checkpoint.axis else f"spatial_{a}")
    return dims


# -- reading a graph ----------------------------------------------------------------------------------------


@dataclass
class GraphIndex:
    """Lookups over one model's main graph: its constants (initializers and Constant nodes, as arrays), the
    node producing each tensor, the metadata, the data inputs (those that are not initializers), the output
    names and the ai.onnx opset imported (0 when none)."""

    model: onnx.ModelProto

    def __post_init__(self) -> None:
        graph = self.model.graph
        self.constants: dict[str, NDArray[Any]] = {
            t.name: numpy_helper.to_array(t) for t in graph.initializer
        }
        for node in graph.node:  # in topological order, so an Identity's input is settled before it
            if node.op_type == "Constant" and node.output:
                value = _constant_value(node)
                if value is not None:
                    self.constants[node.output[0]] = value
            elif node.op_type == "Identity" and node.input and node.input[0] in self.constants:
                # PyTorch's exporter shares equal initializers through Identity (a fresh BatchNorm's
                # weight and running_var are both ones).
                self.constants[node.output[0]] = self.constants[node.input[0]]
        self.producer = {out: node for node in graph.node for out in node.output if out}
        self.metadata = {prop.key: prop.value for prop in self.model.metadata_props}
        initializers = {t.name for t in graph.initializer}
        self.inputs = [value for value in graph.input if value.name not in initializers]
        self.outputs = [value.name for value in graph.output]
        opsets = {o.domain or "ai.onnx": int(o.version) for o in self.model.opset_import}
        self.opset = opsets.get("ai.onnx", 0)


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


def node_attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of `node`'s attribute `name`, or `default` when it is absent."""
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def constant_ints(graph: GraphIndex, name: str) -> list[int] | None:
    """Constant tensor `name` flattened to ints, or None when it is not a constant."""
    value = graph.constants.get(name)
    return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]
