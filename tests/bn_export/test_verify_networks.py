"""verify on real networks exported by torch.onnx.export (tests/data/networks, made by
tests/fixtures/make_networks.py): every frozen one passes every check, the train-mode export fails, and where
PyTorch is installed, onnxruntime on each file equals PyTorch's eval output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from bn_export.cli import main
from bn_export.providers import CPU
from bn_export.verify import verify_model
from tests.fixtures.make_networks import NETWORKS, OUT, example_inputs

FROZEN = ["resnet_bn", "resnet_fused", "mlp_bn1d", "norms", "channels_last", "two_inputs", "opset7_batchnorm"]


def checks(report) -> dict[str, object]:
    return {check.name: check for check in report.checks}


def failed(report) -> set[str]:
    return {check.name for check in report.checks if not check.passed}


def test_every_fixture_is_committed_and_small() -> None:
    for name in [*FROZEN, "resnet_train_mode"]:
        path = OUT / f"{name}.onnx"
        assert path.is_file(), f"{path} missing: run tests/fixtures/make_networks.py"
        assert path.stat().st_size < 32 * 1024


@pytest.mark.parametrize("name", FROZEN)
def test_every_frozen_network_passes_every_check(name: str) -> None:
    report = verify_model(OUT / f"{name}.onnx")
    assert report.passed, report.render()
    invariance = checks(report)["batch_invariance"]
    assert "16 batches" in invariance.detail  # a few-KB network: the budget affords every batch


def test_train_mode_export_fails_inference_mode_and_batch_invariance() -> None:
    report = verify_model(OUT / "resnet_train_mode.onnx")
    assert {"inference_mode", "batch_invariance"} <= failed(report)
    assert "training_mode=1" in checks(report)["inference_mode"].detail


def test_bn_fused_into_convolutions_has_nothing_to_check() -> None:
    model = onnx.load(OUT / "resnet_fused.onnx")
    assert "BatchNormalization" not in {node.op_type for node in model.graph.node}
    found = checks(verify_model(model))
    assert found["statistics_valid"].detail.startswith("no BatchNormalization layers (absent or fused")
    assert found["formula"].detail.startswith("not applicable")


def test_formula_checks_each_layer_on_its_real_input_and_names_the_worst() -> None:
    formula = checks(verify_model(OUT / "resnet_bn.onnx"))["formula"]
    assert formula.passed
    assert "6 BatchNormalization layer(s)" in formula.detail
    assert "worst /" in formula.detail
    assert "of the float32 tolerance" in formula.detail


def test_a_negative_variance_deep_in_a_network_is_named_with_its_node_and_channel() -> None:
    model = onnx.load(OUT / "resnet_bn.onnx")
    bn = [node for node in model.graph.node if node.op_type == "BatchNormalization"][3]
    var_name = bn.input[4]
    tensor = next(t for t in model.graph.initializer if t.name == var_name)
    var = numpy_helper.to_array(tensor).copy()
    var[2] = -0.5
    tensor.CopyFrom(numpy_helper.from_array(var, var_name))
    report = verify_model(model)
    detail = checks(report)["statistics_valid"].detail
    assert "statistics_valid" in failed(report)
    assert f"{bn.name}: moving_var has 1 negative value(s) (channel 2: -0.5)" in detail


def test_dynamic_dimensions_take_the_default_or_a_given_shape() -> None:
    path = OUT / "norms.onnx"
    assert verify_model(path).passed
    report = verify_model(path, shapes={"input": (1, 3, 12, 10)})
    assert report.passed, report.render()
    wrong = verify_model(path, shapes={"input": (1, 4, 12, 10)})
    assert {"formula", "batch_invariance"} <= failed(wrong)
    assert "does not fit" in checks(wrong)["formula"].detail


def test_several_inputs_with_integers_take_data_per_input_name() -> None:
    data = example_inputs(NETWORKS["two_inputs"], 9, seed=3)
    report = verify_model(OUT / "two_inputs.onnx", data=data)
    assert report.passed, report.render()
    assert "9 samples" in checks(report)["formula"].detail
    single = verify_model(OUT / "two_inputs.onnx", data=data["image"])
    assert "give one array per name" in checks(single)["formula"].detail


def test_the_budget_sizes_the_empirical_checks_and_the_report_says_so() -> None:
    report = verify_model(OUT / "resnet_bn.onnx", budget_s=0.0)
    assert report.passed, report.render()
    found = checks(report)
    assert "budget allowed 1 of the 16 planned batches" in found["batch_invariance"].detail
    assert "budget allowed 3 of 64 samples" in found["formula"].detail


def test_cli_shape_and_budget_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(OUT / "norms.onnx")
    assert main(["verify", path, "--shape", "input:1x3x9x7", "--budget", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is True
    assert main(["verify", path, "--shape", "nope:1x3x9x7"]) == 1
    assert "the model's inputs are input" in capsys.readouterr().out
    data = example_inputs(NETWORKS["two_inputs"], 4)
    np.savez(tmp_path / "two.npz", **data)
    assert main(["verify", str(OUT / "two_inputs.onnx"), "--data", str(tmp_path / "two.npz")]) == 0
    assert "4 samples" in capsys.readouterr().out


def test_inspect_lists_every_layer_with_its_ranges(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(OUT / "resnet_bn.onnx"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    model = onnx.load(OUT / "resnet_bn.onnx")
    nodes = [node for node in model.graph.node if node.op_type == "BatchNormalization"]
    assert [layer["node"] for layer in summary["layers"]] == [node.name for node in nodes]
    first = summary["layers"][0]
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    gamma, _, _, var = (constants[name].astype(np.float64) for name in nodes[0].input[1:5])
    assert first["input"] == nodes[0].input[0]
    assert first["channels"] == 8
    assert first["min_var"] == pytest.approx(float(var.min()))
    assert first["var_range"] == pytest.approx([float(var.min()), float(var.max())])
    assert first["largest_abs_scale"] == pytest.approx(float(np.max(np.abs(gamma / np.sqrt(var + 1e-5)))))
    assert main(["inspect", str(OUT / "resnet_bn.onnx")]) == 0
    text = capsys.readouterr().out
    assert "BatchNormalization layers: 6" in text
    assert all(node.name in text for node in nodes)


def test_inspect_says_when_batch_norm_was_fused_away(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(OUT / "resnet_fused.onnx")]) == 0
    assert "no BatchNormalization layers: fused into other operators" in capsys.readouterr().out


# -- against PyTorch, where it is installed ------------------------------------------------------------------


@pytest.mark.parametrize("name", [name for name in FROZEN if name in NETWORKS])
def test_onnxruntime_on_each_fixture_equals_pytorch_eval_output(name: str) -> None:
    torch = pytest.importorskip("torch")
    from tests.fixtures.make_networks import module

    network = NETWORKS[name]
    feeds = example_inputs(network, 6, seed=5)
    with torch.no_grad():
        expected = module(name)(*(torch.from_numpy(x) for x in feeds.values()))
    expected = expected if isinstance(expected, tuple) else (expected,)
    session = ort.InferenceSession(str(OUT / f"{name}.onnx"), providers=[CPU])
    for got, want in zip(session.run(None, feeds), expected, strict=True):
        assert np.max(np.abs(got - want.numpy())) < 1e-5


@pytest.mark.parametrize("name", ["resnet_bn", "norms", "two_inputs"])
def test_networks_exported_on_the_fly_pass_every_check(name: str) -> None:
    pytest.importorskip("torch")
    from tests.fixtures.make_networks import export

    report = verify_model(onnx.load_from_string(export(name)))
    assert report.passed, report.render()


def test_a_pytorch_network_that_mixes_samples_is_refused() -> None:
    torch = pytest.importorskip("torch")
    import io
    import warnings

    class Centered(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x - x.mean(dim=0, keepdim=True)  # the batch mean: every sample moves with its company

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Centered().eval(),
            (torch.randn(2, 4),),
            buffer,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    report = verify_model(onnx.load_from_string(buffer.getvalue()))
    assert {"samples_independent", "batch_invariance"} <= failed(report)
    assert "reduces over the batch axis" in checks(report)["samples_independent"].detail


def test_a_fixed_batch_dimension_is_checked_whole_and_fails_batch_invariance() -> None:
    model = onnx.load(OUT / "mlp_bn1d.onnx")
    for value in (model.graph.input[0], model.graph.output[0]):
        batch = value.type.tensor_type.shape.dim[0]
        batch.ClearField("dim_param")
        batch.dim_value = 4
    report = verify_model(model)
    assert failed(report) == {"batch_invariance"}
    assert "on 4 samples" in checks(report)["formula"].detail
    assert "the batch dimension is fixed to 4" in checks(report)["batch_invariance"].detail
