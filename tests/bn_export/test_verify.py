"""verify_model and `bn-export verify`: pass every export, fail each kind of batch-statistics graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from bn_export.cli import main
from bn_export.errors import ModelFileError
from bn_export.export import export_onnx
from bn_export.verify import verify_model
from tests.bn_export.graphs import (
    LAYOUTS,
    batch_statistics_model,
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
    "no_batch_reductions",
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
    assert {"no_batch_reductions", "batch_invariance", "statistics_valid", "formula"} <= failed(report)
    reductions = next(c for c in report.checks if c.name == "no_batch_reductions")
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
    assert "reduces every axis" in next(c.detail for c in report.checks if c.name == "no_batch_reductions")
    model = batch_statistics_model(rank=3, opset=18)  # opset 18: axes as an input
    axes = onnx.numpy_helper.from_array(np.array([-3, 2], np.int64), "axes")
    model.graph.initializer.append(axes)
    for node in model.graph.node:
        if node.op_type == "ReduceMean":
            del node.attribute[:]
            node.input.append("axes")
    assert "no_batch_reductions" in failed(verify_model(model))


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
