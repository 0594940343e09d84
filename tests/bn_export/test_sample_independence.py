"""The samples_independent proof on the batch size: PyTorch's flatten-by-batch-size passes in each of its
spellings, every other use of the batch size is refused, and onnxruntime agrees on which graphs mix."""

from __future__ import annotations

import importlib.util
import inspect
import io
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from bn_export.providers import CPU
from bn_export.sample_independence import prove_samples_independent
from bn_export.verify import verify_model
from tests.bn_export.graphs import data_graph

SAMPLE = (3, 4, 5)
I64 = np.int64


def batch_deviation(model: onnx.ModelProto, n: int = 7) -> float:
    """onnxruntime's answer, independent of the proof: how far some sample's outputs inside one batch of `n`
    move from its outputs alone (infinite when their shapes differ, a batch-sized output)."""
    session = ort.InferenceSession(model.SerializeToString(), providers=[CPU])
    x = np.random.default_rng(0).standard_normal((n, *SAMPLE)).astype(np.float32)
    together = session.run(None, {"input": x})
    worst = 0.0
    for i in range(n):
        alone = session.run(None, {"input": x[i : i + 1]})
        for one, batch in zip(alone, together, strict=True):
            if one.shape[1:] != batch.shape[1:] or len(batch) != n:
                return float("inf")
            worst = max(worst, float(np.max(np.abs(one[0].astype(np.float64) - batch[i]), initial=0.0)))
    return worst


def problems(model: onnx.ModelProto) -> str:
    proof = prove_samples_independent(model)
    return "; ".join(proof.problems)


def unsqueeze(data: str, out: str, opset: int) -> onnx.NodeProto:
    """Unsqueeze at axis 0: axes as an attribute before opset 13, as an input from it on."""
    if opset < 13:
        return helper.make_node("Unsqueeze", [data], [out], axes=[0])
    return helper.make_node("Unsqueeze", [data, "axis0"], [out])


def squeeze(data: str, out: str, opset: int) -> onnx.NodeProto:
    if opset < 13:
        return helper.make_node("Squeeze", [data], [out], axes=[0])
    return helper.make_node("Squeeze", [data, "axis0"], [out])


# Each spelling computes `lead`, a shape vector whose first entry is N of `input`, from `Shape(input)`.
Spelling = Callable[[int], list[onnx.NodeProto]]


def gather_unsqueeze(opset: int) -> list[onnx.NodeProto]:
    """The TorchScript exporter's `x.size(0)`: Gather(Shape(x), 0) -> Unsqueeze."""
    return [
        helper.make_node("Shape", ["input"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        unsqueeze("n", "lead", opset),
    ]


def slice_first(opset: int) -> list[onnx.NodeProto]:
    """Slice(Shape(x), 0, 1), as `x.shape[:1]` exports."""
    return [
        helper.make_node("Shape", ["input"], ["shape"]),
        helper.make_node("Slice", ["shape", "start0", "end1", "axis0"], ["lead"]),
    ]


def shape_start_end(opset: int) -> list[onnx.NodeProto]:
    """Shape(x, start=0, end=1) (opset 15 on)."""
    return [helper.make_node("Shape", ["input"], ["lead"], start=0, end=1)]


def casts_and_identities(opset: int) -> list[onnx.NodeProto]:
    """Cast to int64 and Identity between the steps, and a Squeeze/Unsqueeze round trip."""
    return [
        helper.make_node("Shape", ["input"], ["shape"]),
        helper.make_node("Cast", ["shape"], ["shape64"], to=TensorProto.INT64),
        helper.make_node("Slice", ["shape64", "start0", "end1"], ["first"]),
        squeeze("first", "n", opset),
        helper.make_node("Identity", ["n"], ["same_n"]),
        helper.make_node("Cast", ["same_n"], ["n64"], to=TensorProto.INT64),
        unsqueeze("n64", "lead", opset),
    ]


def leading_entries_of_the_shape(opset: int) -> list[onnx.NodeProto]:
    """Gather(Shape(x), [0]) and Slice(Shape(x), -4, 2) (= entries 0 and 1), as `torch.flatten(x, 2)`
    takes them; the first keeps only N."""
    return [
        helper.make_node("Shape", ["input"], ["shape"]),
        helper.make_node("Slice", ["shape", "minus4", "end2", "axis0"], ["two"]),
        helper.make_node("Gather", ["two", "index_list0"], ["lead"], axis=0),
    ]


SPELLINGS: dict[str, tuple[Spelling, int]] = {
    "Gather + Unsqueeze": (gather_unsqueeze, 11),
    "Slice": (slice_first, 11),
    "Shape(start=0, end=1)": (shape_start_end, 15),
    "Cast, Identity, Squeeze": (casts_and_identities, 11),
    "Gather of a Slice": (leading_entries_of_the_shape, 11),
}
CONSTANTS: dict[str, np.ndarray] = {
    "zero": np.array(0, I64),
    "axis0": np.array([0], I64),
    "start0": np.array([0], I64),
    "end1": np.array([1], I64),
    "end2": np.array([2], I64),
    "minus4": np.array([-4], I64),
    "index_list0": np.array([0], I64),
    "one": np.array([1], I64),
    "rest": np.array([-1], I64),
    "channels": np.array([3], I64),
    "lower": np.array([1], I64),
    "upper": np.array([2], I64),
}


def flattened(spelling: Spelling, opset: int, rest: list[str], rank: int = 2) -> onnx.ModelProto:
    """input (N, 3, 4, 5) -> Reshape(input, Concat(lead, *rest)) -> Softmax along each row (of `rank` axes),
    which would mix samples if the Reshape merged or split them."""
    nodes = [
        *spelling(opset),
        helper.make_node("Concat", ["lead", *rest], ["target"], axis=0),
        helper.make_node("Reshape", ["input", "target"], ["rows"]),
        helper.make_node("Softmax", ["rows"], ["output"], axis=-1),
    ]
    return data_graph(nodes, {"output": rank}, CONSTANTS, opset=opset)


CASES = [
    pytest.param(spelling, opset, id=f"{name}, opset {opset}")
    for name, (spelling, oldest) in SPELLINGS.items()
    for opset in (11, 13, 18)
    if opset >= oldest
]


@pytest.mark.parametrize(("spelling", "opset"), CASES)
def test_flatten_by_batch_size_keeps_samples_apart_in_every_spelling(spelling: Spelling, opset: int) -> None:
    model = flattened(spelling, opset, ["rest"])
    assert batch_deviation(model) == 0.0  # onnxruntime: each row is its own sample's, bit for bit
    proof = prove_samples_independent(model)
    assert proof.proved, proof.problems


@pytest.mark.parametrize(("spelling", "opset"), CASES)
def test_per_sample_entries_after_the_batch_size_keep_samples_apart(spelling: Spelling, opset: int) -> None:
    # x.view(x.size(0), x.size(1), -1): the channel count read from the shape at run time, then -1.
    per_sample = [
        helper.make_node("Shape", ["input"], ["full"]),
        helper.make_node("Slice", ["full", "lower", "upper", "axis0"], ["channel_count"]),
    ]
    model = flattened(lambda o: spelling(o) + per_sample, opset, ["channel_count", "rest"], rank=3)
    assert batch_deviation(model) == 0.0
    assert prove_samples_independent(model).proved, problems(model)


def test_reshape_to_its_own_shape_keeps_samples_apart() -> None:
    nodes = [
        helper.make_node("Shape", ["input"], ["shape"]),
        helper.make_node("Reshape", ["input", "shape"], ["same"]),
        helper.make_node("Softmax", ["same"], ["output"], axis=-1),
    ]
    model = data_graph(nodes, {"output": 4})
    assert batch_deviation(model) == 0.0
    assert prove_samples_independent(model).proved, problems(model)


def test_reshape_of_another_tensor_by_the_batch_size_keeps_samples_apart() -> None:
    # Every tensor carrying the samples has the batch's N rows: N of `input` leads a Reshape of `activated`.
    nodes = [
        *gather_unsqueeze(17),
        helper.make_node("Relu", ["input"], ["activated"]),
        helper.make_node("Concat", ["lead", "rest"], ["target"], axis=0),
        helper.make_node("Reshape", ["activated", "target"], ["rows"]),
        helper.make_node("Softmax", ["rows"], ["output"], axis=-1),
    ]
    model = data_graph(nodes, {"output": 2}, CONSTANTS)
    assert batch_deviation(model) == 0.0
    assert prove_samples_independent(model).proved, problems(model)


def test_group_norm_as_torch_exports_it_keeps_samples_apart() -> None:
    """torch's GroupNorm: Reshape to (N, G, -1) -> InstanceNormalization -> Reshape back to Shape(x)."""
    nodes = [
        helper.make_node("Reshape", ["input", "groups_shape"], ["grouped"]),
        helper.make_node("InstanceNormalization", ["grouped", "ones", "zeros"], ["normalized"], epsilon=1e-5),
        helper.make_node("Shape", ["input"], ["shape"]),
        helper.make_node("Reshape", ["normalized", "shape"], ["restored"]),
        helper.make_node("Mul", ["restored", "weight"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["output"]),
    ]
    constants = {
        "groups_shape": np.array([0, 3, -1], I64),
        "ones": np.ones(3, np.float32),
        "zeros": np.zeros(3, np.float32),
        "weight": np.full((3, 1, 1), 1.5, np.float32),
        "bias": np.full((3, 1, 1), 0.25, np.float32),
    }
    model = data_graph(nodes, {"output": 4}, constants)
    assert batch_deviation(model) == 0.0
    assert prove_samples_independent(model).proved, problems(model)


def test_batch_size_of_another_input_leads_a_reshape() -> None:
    """Shape(mask) -> Gather(0) -> Unsqueeze feeding Reshape(input, [N, -1]): the inputs share one batch."""
    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["mask"], ["shape"]),
            helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
            helper.make_node("Unsqueeze", ["n", "axis0"], ["lead"]),
            helper.make_node("Concat", ["lead", "rest"], ["target"], axis=0),
            helper.make_node("Reshape", ["input", "target"], ["rows"]),
            helper.make_node("Mul", ["rows", "mask"], ["output"]),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *SAMPLE]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 60]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 60])],
        initializer=[
            onnx.numpy_helper.from_array(value, name)
            for name, value in {
                "zero": np.array(0, I64),
                "axis0": np.array([0], I64),
                "rest": np.array([-1], I64),
            }.items()
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    assert prove_samples_independent(model).proved, problems(model)
    report = verify_model(model)
    assert report.passed, report.render()


# -- every other use of the batch size is refused ----------------------------------------------------------


def batch_size() -> list[onnx.NodeProto]:
    """N of `input` as a scalar, `n`, and as the shape vector [N], `lead`: both accepted so far."""
    return [
        helper.make_node("Shape", ["input"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axis0"], ["lead"]),
    ]


def branches() -> dict[str, onnx.GraphProto]:
    def branch(op: str, name: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node(op, ["input"], [name])],
            name,
            [],
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)],
        )

    return {"then_branch": branch("Neg", "negated"), "else_branch": branch("Identity", "kept")}


# name: (nodes after batch_size(), output ranks, extra constants, the node refused for using N, whether
# onnxruntime shows samples mixing)
Misuse = tuple[list[onnx.NodeProto], dict[str, int], dict[str, np.ndarray], str, bool]
MISUSES: dict[str, Misuse] = {
    "arithmetic": (
        [
            helper.make_node("Cast", ["n"], ["count"], to=TensorProto.FLOAT),
            helper.make_node("Div", ["input", "count"], ["output"]),
        ],
        {"output": 4},
        {},
        "Cast 'count'",
        True,
    ),
    "a Where condition": (
        [
            helper.make_node("Greater", ["n", "four"], ["larger"]),
            helper.make_node("Neg", ["input"], ["negated"]),
            helper.make_node("Where", ["larger", "negated", "input"], ["output"]),
        ],
        {"output": 4},
        {"four": np.array(4, I64)},
        "Greater 'larger'",
        True,
    ),
    "an If condition": (
        [
            helper.make_node("Greater", ["n", "four"], ["larger"]),
            helper.make_node("If", ["larger"], ["output"], **branches()),
        ],
        {"output": 4},
        {"four": np.array(4, I64)},
        "Greater 'larger'",
        True,
    ),
    "Range": (
        [
            helper.make_node("Range", ["zero", "n", "one_step"], ["positions"]),
            helper.make_node("Cast", ["positions"], ["float_positions"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", ["float_positions", "column"], ["per_row"]),
            helper.make_node("Add", ["input", "per_row"], ["output"]),
        ],
        {"output": 4},
        {"one_step": np.array(1, I64), "column": np.array([-1, 1, 1, 1], I64)},
        "Range 'positions'",
        True,
    ),
    "Tile": (
        [
            helper.make_node("Concat", ["lead", "ones"], ["repeats"], axis=0),
            helper.make_node("Tile", ["input", "repeats"], ["output"]),
        ],
        {"output": 4},
        {"ones": np.array([1, 1, 1], I64)},
        "Tile 'output'",
        True,
    ),
    "N after another entry of a Reshape": (
        [
            helper.make_node("Concat", ["rest", "lead"], ["target"], axis=0),
            helper.make_node("Reshape", ["input", "target"], ["output"]),
        ],
        {"output": 2},
        {"rest": np.array([-1], I64)},
        "Concat 'target'",
        True,
    ),
    "Expand": (
        [
            helper.make_node("Concat", ["lead", "sample"], ["target"], axis=0),
            helper.make_node("Expand", ["offset", "target"], ["offsets"]),
            helper.make_node("Add", ["input", "offsets"], ["output"]),
        ],
        {"output": 4},
        {"sample": np.array(SAMPLE, I64), "offset": np.full((1, *SAMPLE), 0.5, np.float32)},
        "Expand 'offsets'",
        False,
    ),
    "ConstantOfShape": (
        [
            helper.make_node("Concat", ["lead", "sample"], ["target"], axis=0),
            helper.make_node("ConstantOfShape", ["target"], ["zeros"]),
            helper.make_node("Add", ["input", "zeros"], ["output"]),
        ],
        {"output": 4},
        {"sample": np.array(SAMPLE, I64)},
        "ConstantOfShape 'zeros'",
        False,
    ),
    "N last, the shape reversed": (
        [
            helper.make_node("Slice", ["shape", "minus1", "minus5", "axis0", "minus1"], ["reversed"]),
            helper.make_node("Reshape", ["input", "reversed"], ["output"]),
        ],
        {"output": 4},
        {"minus1": np.array([-1], I64), "minus5": np.array([-5], I64)},
        "Slice 'reversed'",
        True,
    ),
    "N twice in a Reshape": (
        [
            helper.make_node("Concat", ["lead", "lead"], ["target"], axis=0),
            helper.make_node("Reshape", ["input", "target"], ["output"]),
        ],
        {"output": 2},
        {},
        "Concat 'target'",
        False,
    ),
    "a float round trip": (
        [
            helper.make_node("Cast", ["lead"], ["float_lead"], to=TensorProto.FLOAT16),
            helper.make_node("Cast", ["float_lead"], ["rounded_lead"], to=TensorProto.INT64),
            helper.make_node("Concat", ["rounded_lead", "rest"], ["target"], axis=0),
            helper.make_node("Reshape", ["input", "target"], ["output"]),
        ],
        {"output": 2},
        {"rest": np.array([-1], I64)},
        "Cast 'float_lead'",
        False,
    ),
}


@pytest.mark.parametrize("case", MISUSES)
def test_every_other_use_of_the_batch_size_is_refused(case: str) -> None:
    nodes, outputs, constants, user, mixes = MISUSES[case]
    base = {"zero": np.array(0, I64), "axis0": np.array([0], I64)}
    model = data_graph(batch_size() + nodes, outputs, {**base, **constants})
    if mixes:
        assert batch_deviation(model) > 0.0  # onnxruntime: a sample's output depends on its batch
    detail = problems(model)
    assert f"Shape 'shape': reads the batch size, which {user} uses other than" in detail, detail


def test_the_refusal_names_the_shape_node_and_the_use() -> None:
    base = {"zero": np.array(0, I64), "axis0": np.array([0], I64)}
    model = data_graph(batch_size() + MISUSES["arithmetic"][0], {"output": 4}, base)
    assert prove_samples_independent(model).problems == (
        "Shape 'shape': reads the batch size, which Cast 'count' uses other than as the first entry of a "
        "Reshape of 'input'",
    )


def test_a_batch_size_returned_as_an_output_is_refused() -> None:
    graph = helper.make_graph(
        [helper.make_node("Shape", ["input"], ["shape"], start=0, end=1)],
        "batch_size_out",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *SAMPLE])],
        [helper.make_tensor_value_info("shape", TensorProto.INT64, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert problems(model) == "Shape 'shape': reads the batch size, which output 'shape' returns"


def test_size_is_refused_outright() -> None:
    nodes = [
        helper.make_node("Size", ["input"], ["size"]),
        helper.make_node("Unsqueeze", ["size", "axis0"], ["lead"]),
        helper.make_node("Concat", ["lead", "rest"], ["target"], axis=0),
        helper.make_node("Reshape", ["input", "target"], ["output"]),
    ]
    model = data_graph(nodes, {"output": 2}, {"axis0": np.array([0], I64), "rest": np.array([-1], I64)})
    assert batch_deviation(model) == float("inf")  # every sample's elements on one row
    assert "Size 'size': reads the batch size" in problems(model)


def test_a_batch_size_read_after_a_refused_node_is_not_reported_again() -> None:
    # The batch mean is the problem; the Shape of it and the division by its N follow from it.
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], axes=[0], keepdims=1),
        helper.make_node("Shape", ["mean"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Cast", ["n"], ["count"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["input", "count"], ["output"]),
    ]
    model = data_graph(nodes, {"output": 4}, {"zero": np.array(0, I64)})
    assert prove_samples_independent(model).problems == ("ReduceMean 'mean': reduces over the batch axis",)


# -- real PyTorch exports ------------------------------------------------------------------------------------


def torch_export(module: Any, sample: Any, outputs: list[str], opset: int) -> onnx.ModelProto:
    """`module` exported by torch.onnx with a dynamic batch axis: the TorchScript exporter, which works
    offline; the dynamo exporter only where that one is gone, and only with onnxscript installed."""
    torch = pytest.importorskip("torch")
    names = ["input", *outputs]
    options: dict[str, Any] = {
        "input_names": ["input"],
        "output_names": outputs,
        "dynamic_axes": {name: {0: "N"} for name in names},
        "opset_version": opset,
    }
    dynamo = "dynamo" in inspect.signature(torch.onnx.export).parameters
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch deprecates the TorchScript exporter, loudly
        try:
            torch.onnx.export(module, (sample,), buffer, **options, **({"dynamo": False} if dynamo else {}))
        except Exception as exc:  # a torch without the TorchScript exporter
            if not dynamo or importlib.util.find_spec("onnxscript") is None:
                pytest.skip(f"the TorchScript exporter failed ({exc}) and the dynamo one needs onnxscript")
            buffer = io.BytesIO()
            torch.onnx.export(module, (sample,), buffer, **options, dynamo=True)
    return onnx.load_from_string(buffer.getvalue())


def trained_looking(bn: Any, torch: Any, seed: int) -> None:
    """Statistics and affine parameters away from their initial values (a fresh layer's equal ones would
    be exported as one initializer behind Identity nodes)."""
    generator = torch.Generator().manual_seed(seed)
    channels = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=generator))
        bn.running_mean.copy_(torch.randn(channels, generator=generator) * 5)
        bn.running_var.copy_(torch.rand(channels, generator=generator) * 4 + 0.1)


@pytest.mark.parametrize("opset", [13, 17])
def test_torch_classifier_flattened_by_batch_size_is_proved_per_sample(opset: int) -> None:
    torch = pytest.importorskip("torch")

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(4)
            self.fc = torch.nn.Linear(4 * 4 * 5, 10)
            trained_looking(self.bn, torch, seed=opset)

        def forward(self, x: Any) -> Any:
            y = torch.relu(self.bn(self.conv(x)))
            return self.fc(y.view(y.size(0), -1))

    torch.manual_seed(0)
    model = torch_export(Classifier().eval(), torch.randn(2, *SAMPLE), ["logits"], opset)
    assert {"Shape", "Reshape"} <= {node.op_type for node in model.graph.node}  # flattened by N, not Flatten
    assert batch_deviation(model) < 1e-5  # onnxruntime: per sample, up to the GEMM's summation order
    report = verify_model(model)
    checks = {check.name: check for check in report.checks}
    assert checks["samples_independent"].passed, report.render()
    assert checks["samples_independent"].detail.startswith("proved by dataflow"), report.render()
    assert checks["batch_invariance"].passed, report.render()
    # Conv and Linear have no frozen-bn formula to be checked against; the exporter may also fold the
    # BatchNormalization into the Conv, leaving no statistics. Everything else passes.
    assert {name for name, check in checks.items() if not check.passed} <= {"formula", "statistics_valid"}


@pytest.mark.parametrize("opset", [13, 17])
def test_torch_frozen_batch_norm_with_a_head_on_flattened_features_passes_verify(opset: int) -> None:
    torch = pytest.importorskip("torch")

    class FrozenBatchNorm(torch.nn.Module):
        """A frozen-bn graph written in PyTorch: `output` = BatchNorm2d(eval), `logits` = the spatial mean
        flattened by `view(size(0), -1)` @ head_weight + head_bias."""

        def __init__(self) -> None:
            super().__init__()
            generator = torch.Generator().manual_seed(1)
            self.bn = torch.nn.BatchNorm2d(3, eps=1e-3)
            trained_looking(self.bn, torch, seed=opset)
            self.head_weight = torch.nn.Parameter(torch.randn(3, 4, generator=generator))
            self.head_bias = torch.nn.Parameter(torch.randn(4, generator=generator))

        def forward(self, x: Any) -> Any:
            y = self.bn(x)
            pooled = y.mean(dim=(2, 3))
            return y, pooled.view(pooled.size(0), -1) @ self.head_weight + self.head_bias

    model = torch_export(FrozenBatchNorm().eval(), torch.randn(2, *SAMPLE), ["output", "logits"], opset)
    assert "Shape" in {node.op_type for node in model.graph.node}
    assert batch_deviation(model) < 1e-5
    report = verify_model(model)
    assert report.passed, report.render()
