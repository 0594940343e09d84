"""verify_model and `bn-export verify`: pass every export, fail each kind of batch-statistics graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bn_export.cli import main
from bn_export.errors import ModelFileError
from bn_export.export import export_onnx
from bn_export.providers import CPU
from bn_export.verify import verify_model
from tests.bn_export.graphs import (
    LAYOUTS,
    batch_statistics_model,
    data_graph,
    make_checkpoint,
    samples_like,
    set_initializer,
    set_metadata_statistic,
    with_bn_attributes,
)

CHECKS = [
    "onnx_checker",
    "opset_supported",
    "inference_mode",
    "samples_independent",
    "statistics_valid",
    "formula",
    "batch_invariance",
]


def failed(report) -> set[str]:
    return {check.name for check in report.checks if not check.passed}


def exported(tmp_path: Path, form: str = "batchnorm", **kwargs) -> onnx.ModelProto:
    checkpoint = make_checkpoint((3, 4, 5), 1, **kwargs)
    export_onnx(checkpoint, tmp_path / f"{form}.onnx", form=form)  # type: ignore[arg-type]
    return onnx.load(tmp_path / f"{form}.onnx")


@pytest.mark.parametrize(("sample_shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("form", ["batchnorm", "folded"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_every_export_passes_every_check(
    tmp_path: Path, sample_shape: tuple[int, ...], axis: int, form: str, dtype: str
) -> None:
    path = tmp_path / "m.onnx"
    checkpoint = make_checkpoint(sample_shape, axis, classes=4)
    export_onnx(checkpoint, path, form=form, dtype=dtype, with_head=True)  # type: ignore[arg-type]
    report = verify_model(path)
    assert [check.name for check in report.checks] == CHECKS
    assert report.passed, report.render()
    # `output` is elementwise: bit for bit whatever the batch; only pooled logits may move by rounding.
    assert "output bitwise equal" in report.checks[-1].detail or report.checks[-1].figure == 0.0


def test_output_alone_is_bitwise_equal_to_output_in_any_batch(tmp_path: Path) -> None:
    for form in ("batchnorm", "folded"):
        report = verify_model(exported(tmp_path, form))
        assert report.checks[-1].figure == 0.0
        assert "bitwise" in report.checks[-1].detail


def test_training_mode_graph_fails(tmp_path: Path) -> None:
    report = verify_model(with_bn_attributes(exported(tmp_path), training_mode=1))
    assert "inference_mode" in failed(report)
    assert not report.passed


def test_batchnorm_with_extra_outputs_fails(tmp_path: Path) -> None:
    report = verify_model(with_bn_attributes(exported(tmp_path), extra_outputs=True))
    assert "inference_mode" in failed(report)
    assert "3 outputs" in next(c.detail for c in report.checks if c.name == "inference_mode")


def test_batch_statistics_from_primitive_ops_fail_structure_and_invariance() -> None:
    report = verify_model(batch_statistics_model())
    # No BatchNormalization node: nothing for the statistics and formula checks; the mixing is caught twice.
    assert failed(report) == {"samples_independent", "batch_invariance"}
    reductions = next(c for c in report.checks if c.name == "samples_independent")
    assert reductions.figure == 2.0  # the mean and the variance
    invariance = next(c for c in report.checks if c.name == "batch_invariance")
    assert invariance.figure is not None
    assert invariance.figure > 1e-3


def test_batch_statistics_over_negative_axes_and_all_axes_are_flagged() -> None:
    model = batch_statistics_model(rank=4, opset=17)
    for node in model.graph.node:
        if node.op_type == "ReduceMean":
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("keepdims", 1))  # no axes: reduce everything
    report = verify_model(model)
    assert "reduces every axis" in next(c.detail for c in report.checks if c.name == "samples_independent")
    model = batch_statistics_model(rank=3, opset=18)  # opset 18: axes as an input
    axes = onnx.numpy_helper.from_array(np.array([-3, 2], np.int64), "axes")
    model.graph.initializer.append(axes)
    for node in model.graph.node:
        if node.op_type == "ReduceMean":
            del node.attribute[:]
            node.input.append("axes")
    assert "samples_independent" in failed(verify_model(model))


@pytest.mark.parametrize("bad", [np.nan, -1.0, np.inf])
def test_non_finite_or_negative_variance_fails_in_both_forms(tmp_path: Path, bad: float) -> None:
    model = exported(tmp_path)
    var = onnx.numpy_helper.to_array(
        next(t for t in model.graph.initializer if t.name == "moving_var")
    ).copy()
    var[1] = bad
    assert "statistics_valid" in failed(verify_model(set_initializer(model, "moving_var", var)))
    folded = exported(tmp_path, "folded")
    broken = set_metadata_statistic(folded, "moving_var", [1.0, bad, 1.0])
    report = verify_model(broken)
    assert {"statistics_valid", "formula"} <= failed(report)


def test_folded_constants_that_disagree_with_the_statistics_fail_the_formula(tmp_path: Path) -> None:
    folded = exported(tmp_path, "folded")
    shift = onnx.numpy_helper.to_array(next(t for t in folded.graph.initializer if t.name == "shift")) + 0.01
    assert failed(verify_model(set_initializer(folded, "shift", shift))) == {"formula"}


def test_zero_variance_channel_is_valid(tmp_path: Path) -> None:
    report = verify_model(exported(tmp_path, moving_var=np.array([0.0, 1.0, 2.0])))
    assert report.passed, report.render()


def test_verify_with_data_feeds_those_samples(tmp_path: Path) -> None:
    checkpoint = make_checkpoint((4, 5, 3), 3, classes=2)
    export_onnx(checkpoint, tmp_path / "m.onnx", with_head=True)
    report = verify_model(tmp_path / "m.onnx", data=samples_like(checkpoint, 10, spatial=6))
    assert report.passed, report.render()
    assert "10 samples" in next(c.detail for c in report.checks if c.name == "formula")
    wrong = verify_model(tmp_path / "m.onnx", data=np.zeros((4, 4, 5, 7)))
    assert {"formula", "batch_invariance"} <= failed(wrong)


def test_verify_model_never_prints(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    verify_model(exported(tmp_path))
    verify_model(batch_statistics_model())
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty file"), (b"not a model at all\n", "not an ONNX model"), (None, "no such file")],
)
def test_non_onnx_files_raise_model_file_error(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "m.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelFileError, match=message):
        verify_model(path)


def test_truncated_model_is_not_onnx(tmp_path: Path) -> None:
    exported(tmp_path)
    data = (tmp_path / "batchnorm.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelFileError, match="not an ONNX model"):
        verify_model(tmp_path / "cut.onnx")


def test_cli_exit_codes_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exported(tmp_path)
    assert main(["verify", str(tmp_path / "batchnorm.onnx")]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "batchnorm.onnx"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is True
    assert [c["name"] for c in report["checks"]] == CHECKS
    assert report["metadata"]["form"] == "batchnorm"
    onnx.save(batch_statistics_model(), tmp_path / "bad.onnx")
    assert main(["verify", str(tmp_path / "bad.onnx"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False
    (tmp_path / "text.onnx").write_text("hello\n")
    assert main(["verify", str(tmp_path / "text.onnx")]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    assert "not an ONNX model" in captured.err
    assert "Traceback" not in captured.err


def test_cli_reads_npy_and_npz_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = make_checkpoint((3, 4, 5), 1)
    export_onnx(checkpoint, tmp_path / "m.onnx")
    x = samples_like(checkpoint, 6)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", data=x, other=x[:1])
    np.savez(tmp_path / "ambiguous.npz", a=x, b=x)
    assert main(["verify", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "x.npy")]) == 0
    assert main(["verify", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "x.npz")]) == 0
    assert "6 samples" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "ambiguous.npz")]) == 2
    assert "expected one named `data`" in capsys.readouterr().err


# -- samples_independent: the proof, against what onnxruntime does -----------------------------------------

SAMPLE = (3, 4, 5)
BN_PARAMETERS = {
    "gamma": np.array([1.5, 0.5, 2.0], np.float32),
    "beta": np.array([0.1, -0.2, 0.3], np.float32),
    "mean": np.array([0.2, -0.1, 0.05], np.float32),
    "var": np.array([1.2, 0.8, 2.0], np.float32),
}


def frozen_bn(x: str, out: str) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, "gamma", "beta", "mean", "var"], [out], epsilon=1e-3)


def mixes_samples(model: onnx.ModelProto, n: int = 70) -> bool:
    """onnxruntime's answer, independent of verify: does some sample's output inside one batch of `n` (past
    64, where the gated graphs below start mixing) differ from its output alone?"""
    session = ort.InferenceSession(model.SerializeToString(), providers=[CPU])
    x = np.random.default_rng(0).standard_normal((n, *SAMPLE)).astype(np.float32)
    together = session.run(None, {"input": x})
    for i in range(n):
        alone = session.run(None, {"input": x[i : i + 1]})
        for one, batch in zip(alone, together, strict=True):
            if one.shape[1:] != batch.shape[1:] or not np.allclose(one[0], batch[i], rtol=1e-5, atol=1e-6):
                return True
    return False


def structure(report) -> str:
    return next(check.detail for check in report.checks if check.name == "samples_independent")


def where_gated_past_64() -> onnx.ModelProto:
    """`Where(N > 64, x - x[0], x)` after a frozen BatchNormalization, N read from Shape."""
    nodes = [
        frozen_bn("input", "t"),
        helper.make_node("Shape", ["t"], ["n"], start=0, end=1),
        helper.make_node("Greater", ["n", "threshold"], ["larger"]),
        helper.make_node("Squeeze", ["larger"], ["condition"]),
        helper.make_node("Gather", ["t", "zero"], ["first"], axis=0),
        helper.make_node("Sub", ["t", "first"], ["centered"]),
        helper.make_node("Where", ["condition", "centered", "t"], ["output"]),
    ]
    constants = {"threshold": np.array([64], np.int64), "zero": np.array(0, np.int64), **BN_PARAMETERS}
    return data_graph(nodes, {"output": 4}, constants)


def if_branch_reduce_mean() -> onnx.ModelProto:
    """`If(N > 64, x - ReduceMean(x, batch axis), x)`: the reduction in a branch that reads x from outside."""
    then_branch = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["t"], ["batch_mean"], axes=[0], keepdims=1),
            helper.make_node("Sub", ["t", "batch_mean"], ["then_out"]),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["t"], ["else_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)],
    )
    nodes = [
        frozen_bn("input", "t"),
        helper.make_node("Size", ["t"], ["size"]),
        helper.make_node("Greater", ["size", "threshold"], ["condition"]),
        helper.make_node("If", ["condition"], ["output"], then_branch=then_branch, else_branch=else_branch),
    ]
    threshold = np.array(64 * int(np.prod(SAMPLE)), np.int64)
    return data_graph(nodes, {"output": 4}, {"threshold": threshold, **BN_PARAMETERS})


def reshape_merging_samples() -> onnx.ModelProto:
    """Every sample in one row, L2-normalized along it, and back: the samples share one norm."""
    nodes = [
        frozen_bn("input", "t"),
        helper.make_node("Reshape", ["t", "one_row"], ["row"]),
        helper.make_node("LpNormalization", ["row"], ["normalized"], axis=1, p=2),
        helper.make_node("Reshape", ["normalized", "per_sample"], ["output"]),
    ]
    constants = {
        "one_row": np.array([1, -1], np.int64),
        "per_sample": np.array([-1, *SAMPLE], np.int64),
        **BN_PARAMETERS,
    }
    return data_graph(nodes, {"output": 4}, constants)


def matmul_contracting_the_batch() -> onnx.ModelProto:
    """Each sample's row times the Gram matrix of the batch's rows, `rows @ (rowsᵀ @ rows)`."""
    nodes = [
        frozen_bn("input", "t"),
        helper.make_node("Flatten", ["t"], ["rows"], axis=1),
        helper.make_node("Transpose", ["rows"], ["columns"], perm=[1, 0]),
        helper.make_node("MatMul", ["columns", "rows"], ["gram"]),
        helper.make_node("Mul", ["gram", "scale"], ["scaled"]),
        helper.make_node("MatMul", ["rows", "scaled"], ["mixed"]),
        helper.make_node("Reshape", ["mixed", "per_sample"], ["output"]),
    ]
    constants = {
        "scale": np.array(1e-3, np.float32),
        "per_sample": np.array([-1, *SAMPLE], np.int64),
        **BN_PARAMETERS,
    }
    return data_graph(nodes, {"output": 4}, constants)


def batch_norm_fed_run_time_statistics() -> onnx.ModelProto:
    """An inference-mode BatchNormalization whose mean and variance are the batch's, computed in the graph."""
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["batch_mean"], axes=[0, 2, 3], keepdims=0),
        helper.make_node("ReduceMean", ["input"], ["keep_mean"], axes=[0, 2, 3], keepdims=1),
        helper.make_node("Sub", ["input", "keep_mean"], ["centered"]),
        helper.make_node("Mul", ["centered", "centered"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["batch_var"], axes=[0, 2, 3], keepdims=0),
        helper.make_node(
            "BatchNormalization",
            ["input", "gamma", "beta", "batch_mean", "batch_var"],
            ["output"],
            epsilon=1e-3,
        ),
    ]
    constants = {name: BN_PARAMETERS[name] for name in ("gamma", "beta")}
    return data_graph(nodes, {"output": 4}, constants)


def shape_reads_the_batch_size() -> onnx.ModelProto:
    """The normalized data divided by the batch size, read from Shape."""
    nodes = [
        frozen_bn("input", "t"),
        helper.make_node("Shape", ["t"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Cast", ["n"], ["count"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["t", "count"], ["output"]),
    ]
    return data_graph(nodes, {"output": 4}, {"zero": np.array(0, np.int64), **BN_PARAMETERS})


@pytest.mark.parametrize(
    ("build", "reasons"),
    [
        (
            where_gated_past_64,
            ["Shape 'n': reads the batch size", "Gather 'first': picks samples along the batch axis"],
        ),
        (
            if_branch_reduce_mean,
            ["Size 'size': reads the batch size", "If 'output': control flow over the data"],
        ),
        (reshape_merging_samples, ["Reshape 'row': target shape [1, -1] does not keep axis 0 as the batch"]),
        (
            matmul_contracting_the_batch,
            [
                "Transpose 'columns': moves the batch axis to axis 1",
                "MatMul 'gram': contracts or broadcasts the batch",
            ],
        ),
        (
            batch_norm_fed_run_time_statistics,
            [
                "ReduceMean 'batch_mean': reduces over the batch axis",
                "ReduceMean 'keep_mean': reduces over the batch axis",
                "ReduceMean 'batch_var': reduces over the batch axis",
                "BatchNormalization 'output': statistics computed from the data (batch_mean, batch_var)",
            ],
        ),
        (shape_reads_the_batch_size, ["Shape 'shape': reads the batch size"]),
    ],
)
def test_graphs_that_mix_samples_fail_the_proof_where_they_mix(build, reasons: list[str]) -> None:
    model = build()
    assert mixes_samples(model)  # onnxruntime: a sample's output depends on its batch
    report = verify_model(model)
    assert "samples_independent" in failed(report), report.render()
    detail = structure(report)
    for reason in reasons:
        assert reason in detail, detail
    # Each problem is reported where it is, not again at every node downstream of it.
    assert len(detail.split("; ")) == len(reasons), detail


def user_style_classifier() -> onnx.ModelProto:
    """Conv -> frozen BatchNormalization -> Relu -> GlobalAveragePool -> Flatten -> Gemm: per sample."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["features"], pads=[1, 1, 1, 1]),
        frozen_bn("features", "normalized"),
        helper.make_node("Relu", ["normalized"], ["activated"]),
        helper.make_node("GlobalAveragePool", ["activated"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    constants = {
        "conv_w": rng.standard_normal((3, 3, 3, 3)).astype(np.float32),
        "conv_b": rng.standard_normal(3).astype(np.float32),
        "fc_w": rng.standard_normal((10, 3)).astype(np.float32),
        "fc_b": rng.standard_normal(10).astype(np.float32),
        **BN_PARAMETERS,
    }
    return data_graph(nodes, {"logits": 2}, constants)


def per_sample_operations() -> onnx.ModelProto:
    """Rows kept apart by operations that look batch-wide: a channels-last Transpose pair around a
    LayerNormalization, a per-sample Reshape with Softmax over each sample, a per-sample batched MatMul, a
    constant table looked up by the data, and zeros shaped like one sample from Shape(start=1)."""
    table = np.linspace(-1.0, 1.0, 10, dtype=np.float32)
    nodes = [
        frozen_bn("input", "t"),
        helper.make_node("Transpose", ["t"], ["last"], perm=[0, 2, 3, 1]),
        helper.make_node("LayerNormalization", ["last", "ln_scale"], ["layer_normed"], axis=-1),
        helper.make_node("Transpose", ["layer_normed"], ["first"], perm=[0, 3, 1, 2]),
        helper.make_node("Reshape", ["first", "rows"], ["row"]),
        helper.make_node("Softmax", ["row"], ["soft"], axis=1),
        helper.make_node("Reshape", ["soft", "per_sample"], ["softened"]),
        helper.make_node("Reshape", ["t", "matrices"], ["matrix"]),
        helper.make_node("Transpose", ["matrix"], ["matrix_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["matrix", "matrix_t"], ["gram"]),
        helper.make_node("Abs", ["t"], ["magnitude"]),
        helper.make_node("Clip", ["magnitude", "low", "high"], ["clipped"]),
        helper.make_node("Cast", ["clipped"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "index"], ["looked_up"], axis=0),
        helper.make_node("Shape", ["t"], ["sample_shape"], start=1),
        helper.make_node("ConstantOfShape", ["sample_shape"], ["zeros"]),
        helper.make_node("Add", ["softened", "zeros"], ["shifted"]),
        helper.make_node("Add", ["shifted", "looked_up"], ["output"]),
    ]
    constants = {
        "ln_scale": np.ones(3, np.float32),
        "rows": np.array([0, -1], np.int64),
        "per_sample": np.array([-1, *SAMPLE], np.int64),
        "matrices": np.array([0, 3, 20], np.int64),
        "low": np.array(0.0, np.float32),
        "high": np.array(9.0, np.float32),
        "table": table,
        **BN_PARAMETERS,
    }
    return data_graph(nodes, {"output": 4, "gram": 3}, constants)


@pytest.mark.parametrize("build", [user_style_classifier, per_sample_operations])
def test_per_sample_graphs_pass_the_proof_and_the_invariance_check(build) -> None:
    model = build()
    assert not mixes_samples(model)  # onnxruntime: each sample's output is its own
    report = verify_model(model)
    checks = {check.name: check for check in report.checks}
    assert checks["samples_independent"].passed, report.render()
    assert checks["samples_independent"].detail.startswith("proved by dataflow"), report.render()
    assert checks["batch_invariance"].passed, report.render()
    assert checks["inference_mode"].passed, report.render()


def chain(*nodes: onnx.NodeProto, outputs: dict[str, int] | None = None, **constants: np.ndarray):
    """A graph from `input` (N, 3, 4, 5) through `nodes` to `output` (rank 4) or `outputs`."""
    return data_graph(list(nodes), outputs or {"output": 4}, constants)


def node(op: str, inputs: list[str], output: str = "output", **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], **attrs)


I64 = np.int64
REFUSED_AND_MIXING = {
    "a constant spanning axis 0 pairs rows with samples": (
        chain(node("Add", ["input", "offset"]), offset=np.arange(70, dtype=np.float32).reshape(70, 1, 1, 1)),
        "'offset' spans axis 0 (size 70)",
    ),
    "MaxPool indices count across the batch": (
        chain(
            helper.make_node("MaxPool", ["input"], ["pooled", "indices"], kernel_shape=[2, 2]),
            node("Cast", ["indices"], "output", to=TensorProto.FLOAT),
            outputs={"pooled": 4, "output": 4},
        ),
        "its Indices output counts positions across the whole batch",
    ),
    "Slice along the batch axis": (
        chain(
            node("Slice", ["input", "start", "end", "axis"], "first"),
            node("Sub", ["input", "first"]),
            start=np.array([0], I64),
            end=np.array([1], I64),
            axis=np.array([-4], I64),
        ),
        "Slice 'first': slices the batch axis",
    ),
    "TopK along the batch axis": (
        chain(
            helper.make_node("TopK", ["input", "k"], ["top", "where"], axis=0),
            node("Sub", ["input", "top"]),
            k=np.array([1], I64),
        ),
        "TopK 'top': sorts along the batch axis",
    ),
    "Pad on the batch axis": (
        chain(node("Pad", ["input", "pads"]), pads=np.array([1, 0, 0, 0, 0, 0, 0, 0], I64)),
        "pads the batch axis",
    ),
    "Resize of the batch axis": (
        chain(node("Resize", ["input", "", "scales"]), scales=np.array([2, 1, 1, 1], np.float32)),
        "rescales the batch axis",
    ),
    "Unsqueeze in front of the batch axis": (
        chain(
            node("Unsqueeze", ["input", "zero"], "lifted"),
            node("ReduceMean", ["lifted"], "mean", axes=[1], keepdims=1),
            node("Squeeze", ["mean", "zero"], "squeezed"),
            node("Sub", ["input", "squeezed"]),
            zero=np.array([0], I64),
        ),
        "Unsqueeze 'lifted': inserts an axis at the batch axis",
    ),
    "random numbers": (
        chain(node("RandomNormalLike", ["input"], "noise"), node("Add", ["input", "noise"])),
        "draws random numbers",
    ),
}


@pytest.mark.parametrize("case", REFUSED_AND_MIXING)
def test_the_proof_refuses_operations_that_mix_samples(case: str) -> None:
    model, reason = REFUSED_AND_MIXING[case]
    assert mixes_samples(model)
    detail = structure(verify_model(model))
    assert reason in detail, detail


PER_SAMPLE = {
    "reshapes keeping axis 0": chain(
        node("Reshape", ["input", "flat"], "rows"),
        node("Softmax", ["rows"], "soft", axis=-1),
        node("Reshape", ["soft", "back"]),
        flat=np.array([-1, 60], I64),
        back=np.array([0, 3, 4, 5], I64),
    ),
    "spatial pads, slices, splits and concatenation": chain(
        node("Pad", ["input", "pads"], "padded", mode="reflect"),
        node("Slice", ["padded", "start", "end", "axes"], "cropped"),
        helper.make_node("Split", ["cropped", "sizes"], ["left", "right"], axis=1),
        node("Concat", ["right", "left"], axis=1),
        pads=np.array([0, 0, 1, 1, 0, 0, 1, 1], I64),
        start=np.array([1, 1], I64),
        end=np.array([5, 6], I64),
        axes=np.array([2, -1], I64),
        sizes=np.array([1, 2], I64),
    ),
    "per-channel quantization and a spatial resize": chain(
        node("QuantizeLinear", ["input", "scale", "zero_point"], "quantized", axis=1),
        node("DequantizeLinear", ["quantized", "scale", "zero_point"], "restored", axis=1),
        node("Resize", ["restored", "", "scales"], mode="nearest"),
        scale=np.array([0.01, 0.02, 0.05], np.float32),
        zero_point=np.zeros(3, np.uint8),
        scales=np.array([1, 1, 2, 2], np.float32),
    ),
}


@pytest.mark.parametrize("case", PER_SAMPLE)
def test_the_proof_accepts_operations_that_keep_samples_apart(case: str) -> None:
    model = PER_SAMPLE[case]
    assert not mixes_samples(model)
    report = verify_model(model)
    assert "samples_independent" not in failed(report), structure(report)
    assert "batch_invariance" not in failed(report), report.render()


def custom_domain_gelu() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Gelu", ["input"], ["output"], domain="com.microsoft")],
        "custom",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *SAMPLE])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", *SAMPLE])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (chain(node("Einsum", ["input"], equation="nchw->nchw")), "cannot prove Einsum keeps samples apart"),
        (custom_domain_gelu(), "cannot prove com.microsoft.Gelu keeps samples apart (not an ONNX operator)"),
    ],
)
def test_the_proof_refuses_operators_it_has_no_rule_for(model: onnx.ModelProto, reason: str) -> None:
    # An allowlist: this Einsum is harmless, but no rule shows it, so it is refused rather than assumed.
    detail = structure(verify_model(model))
    assert reason in detail, detail


def test_statistics_shared_through_identity_are_frozen_statistics() -> None:
    # A fresh torch BatchNorm2d exports weight and running_var (both ones) as one initializer, the second
    # as Identity of the first: still constants, so still frozen statistics.
    ones = numpy_helper.from_array(np.ones(3, dtype=np.float32), "ones")
    zeros = numpy_helper.from_array(np.zeros(3, dtype=np.float32), "zeros")
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["ones"], ["running_var"]),
            helper.make_node("Identity", ["zeros"], ["running_mean"]),
            helper.make_node(
                "BatchNormalization", ["input", "ones", "zeros", "running_mean", "running_var"], ["output"]
            ),
        ],
        "shared",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3, 4, 4])],
        initializer=[ones, zeros],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    report = verify_model(model)
    assert report.passed, report.render()
