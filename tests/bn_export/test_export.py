"""export_onnx: graphs equal the float64 inference formula, are deterministic, are never half-written."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

from bn_export.checkpoint import Checkpoint, save_checkpoint
from bn_export.cli import main
from bn_export.errors import ExportError
from bn_export.export import export_onnx
from tests.bn_export.graphs import LAYOUTS, make_checkpoint, samples_like

# Max |graph - formula| relative to the magnitude of the summed terms (|x·s| + |mean·s| + |beta|): a few
# units of roundoff of each dtype, set here independently of the code under test.
TOLERANCE = {"float64": 1e-13, "float32": 4e-6, "float16": 4e-3}


def formula(checkpoint: Checkpoint, x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """gamma*(x - mean)/sqrt(var + eps) + beta along the channel axis, in float64; and the magnitude."""
    along = [1] * x.ndim
    along[checkpoint.axis] = -1
    g, b, m, v = (np.asarray(a, np.float64).reshape(along) for a in (
        checkpoint.gamma, checkpoint.beta, checkpoint.moving_mean, checkpoint.moving_var))  # fmt: skip
    s = g / np.sqrt(v + eps)
    x = x.astype(np.float64)
    return (x - m) * s + b, np.abs(x * s) + np.abs(m * s) + np.abs(b)


def logits_formula(checkpoint: Checkpoint, y: np.ndarray) -> np.ndarray:
    assert checkpoint.head is not None
    spatial = tuple(a for a in range(1, y.ndim) if a != checkpoint.axis)
    pooled = y.mean(axis=spatial) if spatial else y
    return pooled @ checkpoint.head.weight + checkpoint.head.bias


def run_both(path: Path, x: np.ndarray) -> list[dict[str, np.ndarray]]:
    """The model's outputs from onnxruntime and from onnx's reference evaluator, both `run(None, feeds)`."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    results = []
    for runner in (session, ReferenceEvaluator(str(path))):
        results.append(dict(zip(names, runner.run(None, {"input": x}), strict=True)))
    return results


@pytest.mark.parametrize(("sample_shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("form", ["batchnorm", "folded"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_exported_graph_equals_the_float64_formula(
    tmp_path: Path, sample_shape: tuple[int, ...], axis: int, form: str, dtype: str
) -> None:
    checkpoint = make_checkpoint(sample_shape, axis, classes=3)
    path = tmp_path / "model.onnx"
    result = export_onnx(checkpoint, path, form=form, dtype=dtype, with_head=True)  # type: ignore[arg-type]
    assert result.error_ratio <= 1.0
    # ONNX keeps BatchNormalization's epsilon as a float32 attribute: the batchnorm form holds that value.
    eps = float(np.float32(checkpoint.eps)) if form == "batchnorm" else checkpoint.eps
    for n, spatial in ((1, None), (9, None), (4, 2)):
        x = samples_like(checkpoint, n, seed=n, spatial=spatial).astype(dtype)
        expected, magnitude = formula(checkpoint, x, eps)
        for outputs in run_both(path, x):
            assert outputs["output"].dtype == np.dtype(dtype)
            assert outputs["output"].shape == x.shape
            error = np.abs(outputs["output"].astype(np.float64) - expected)
            assert np.all(error <= TOLERANCE[dtype] * magnitude + 1e-30)
            logits = logits_formula(checkpoint, expected)
            assert outputs["logits"].shape == (n, 3)
            scale = np.abs(logits_formula(checkpoint, magnitude)).max() + np.abs(logits).max()
            np.testing.assert_allclose(outputs["logits"], logits, rtol=0, atol=20 * TOLERANCE[dtype] * scale)


def test_batchnorm_form_is_one_inference_mode_node_with_transposes_for_channels_last(tmp_path: Path) -> None:
    export_onnx(make_checkpoint((4, 5, 3), 3), tmp_path / "m.onnx")
    model = onnx.load(tmp_path / "m.onnx")
    ops = [node.op_type for node in model.graph.node]
    assert ops == ["Transpose", "BatchNormalization", "Transpose"]
    bn = model.graph.node[1]
    assert len(bn.output) == 1
    assert all(attr.name != "training_mode" for attr in bn.attribute)


def test_folded_form_has_no_batchnorm_and_no_transpose(tmp_path: Path) -> None:
    export_onnx(make_checkpoint((4, 5, 3), 3), tmp_path / "m.onnx", form="folded")
    model = onnx.load(tmp_path / "m.onnx")
    assert [node.op_type for node in model.graph.node] == ["Mul", "Add"]
    scale = next(t for t in model.graph.initializer if t.name == "scale")
    assert list(scale.dims) == [3]  # broadcasts along the last axis of (N, 4, 5, 3)


def test_graph_has_dynamic_batch_and_spatial_dims_and_pinned_versions(tmp_path: Path) -> None:
    export_onnx(make_checkpoint((3, 4, 5), 1), tmp_path / "m.onnx", opset=18)
    model = onnx.load(tmp_path / "m.onnx")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "spatial_2", "spatial_3"]
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 18)]
    assert model.ir_version == 8
    assert model.producer_name == "frozen-bn"


def test_metadata_describes_the_fit_and_the_export_error(tmp_path: Path) -> None:
    checkpoint = make_checkpoint((4, 3), 2)
    result = export_onnx(checkpoint, tmp_path / "m.onnx")
    meta = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    assert meta["momentum"] == "0.9"
    assert float(meta["eps"]) == checkpoint.eps
    assert meta["axis"] == "2"
    assert meta["layout"] == "channels_last"
    assert meta["statistics_kind"] == "population"
    assert meta["samples_seen"] == "1000"
    assert meta["data_fingerprint"] == checkpoint.data_fingerprint
    assert meta["sample_shape"] == "[4, 3]"
    assert float(meta["export_max_error"]) == result.max_error
    assert meta["producer"] == "frozen-bn"


def test_head_with_opset_18_reduces_with_axes_as_input(tmp_path: Path) -> None:
    checkpoint = make_checkpoint((4, 5, 3), 3, classes=2)
    export_onnx(checkpoint, tmp_path / "m.onnx", opset=18, with_head=True, form="folded")
    x = samples_like(checkpoint, 5).astype(np.float32)
    expected, _ = formula(checkpoint, x, checkpoint.eps)
    for outputs in run_both(tmp_path / "m.onnx", x):
        np.testing.assert_allclose(
            outputs["logits"], logits_formula(checkpoint, expected), rtol=1e-4, atol=1e-4
        )


def test_same_checkpoint_exports_byte_identical_files(tmp_path: Path) -> None:
    checkpoint = make_checkpoint((3, 4, 5), 1, classes=2)
    for form in ("batchnorm", "folded"):
        a = export_onnx(checkpoint, tmp_path / f"a_{form}.onnx", form=form, with_head=True)  # type: ignore[arg-type]
        b = export_onnx(checkpoint, tmp_path / f"b_{form}.onnx", form=form, with_head=True)  # type: ignore[arg-type]
        assert a.path.read_bytes() == b.path.read_bytes()
        assert a.sha256 == b.sha256


@pytest.mark.parametrize(
    "overrides",
    [
        {"moving_var": np.array([1.0, np.nan, 1.0])},
        {"moving_mean": np.array([np.inf, 0.0, 0.0])},
        {"moving_var": np.array([1.0, -0.5, 1.0])},
        {"gamma": np.array([1.0, 1.0, np.nan])},
    ],
)
def test_export_refuses_unusable_statistics_and_writes_nothing(tmp_path: Path, overrides: dict) -> None:
    checkpoint = make_checkpoint((3, 4), 1, **overrides)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous model")
    with pytest.raises(ExportError, match=r"moving_var|moving_mean|gamma"):
        export_onnx(checkpoint, path)
    assert path.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary file left behind


def test_export_refuses_statistics_float16_cannot_hold(tmp_path: Path) -> None:
    checkpoint = make_checkpoint((3,), 1, moving_mean=np.array([1e6, 0.0, 0.0]))
    with pytest.raises(ExportError, match="float16"):
        export_onnx(checkpoint, tmp_path / "m.onnx", dtype="float16")
    assert not (tmp_path / "m.onnx").exists()


def test_export_refuses_head_the_checkpoint_lacks_and_bad_opset(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no trained head"):
        export_onnx(make_checkpoint(), tmp_path / "m.onnx", with_head=True)
    with pytest.raises(ExportError, match="opset 9"):
        export_onnx(make_checkpoint(), tmp_path / "m.onnx", opset=9)
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export_writes_the_model_and_reports_errors_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = save_checkpoint(make_checkpoint((4, 5, 3), 3, classes=2), tmp_path / "c.npz")
    out = tmp_path / "models" / "m.onnx"
    args = ["export", str(ckpt), "--out", str(out), "--form", "folded", "--with-head", "--dtype", "float64"]
    assert main(args) == 0
    assert "folded form" in capsys.readouterr().out
    model = onnx.load(out)
    assert [o.name for o in model.graph.output] == ["output", "logits"]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    assert main(["export", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no such checkpoint" in err


def test_torch_batchnorm2d_and_export_give_the_same_outputs(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    conventions = pytest.importorskip("bn_export.conventions")
    torch.manual_seed(0)
    layer = torch.nn.BatchNorm2d(3, momentum=0.1, eps=1e-5)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.normal_()
    layer.train()
    for _ in range(5):
        layer(3 + 2 * torch.randn(8, 3, 4, 5))
    layer.eval()
    state = {name: value.numpy() for name, value in layer.state_dict().items()}
    bn = conventions.from_torch_state_dict(state, eps=layer.eps, momentum=layer.momentum)
    checkpoint = make_checkpoint(
        (3, 4, 5),
        1,
        gamma=np.asarray(bn.gamma),
        beta=np.asarray(bn.beta),
        moving_mean=np.asarray(bn.moving_mean),
        moving_var=np.asarray(bn.moving_var),
        eps=float(bn.eps),
        momentum=bn.momentum,
    )
    x = 3 + 2 * torch.randn(6, 3, 4, 5)
    with torch.no_grad():
        expected = layer(x).numpy()
    for form in ("batchnorm", "folded"):
        export_onnx(checkpoint, tmp_path / f"{form}.onnx", form=form)  # type: ignore[arg-type]
        session = ort.InferenceSession(str(tmp_path / f"{form}.onnx"), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, rtol=1e-5, atol=1e-5)


def test_exported_file_is_readable_by_other_users_as_open_would_make_it(tmp_path: Path) -> None:
    """A model exported by one user must be readable by a server running as another (0666 less umask)."""
    previous = os.umask(0o022)
    try:
        result = export_onnx(make_checkpoint(), tmp_path / "m" / "model.onnx")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(result.path.stat().st_mode) == 0o644
