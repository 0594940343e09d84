"""`recalibrate` and `bn-export recalibrate` on graphs built with onnx.helper, against float64 numpy and
onnx's reference evaluator recomputing each layer's input with the layers upstream already recalibrated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from bn_export.cli import main
from bn_export.commands.recalibrate import data_specs
from bn_export.errors import BnExportError, DataError, ExportError, InvalidInputError
from bn_export.graph_surgery import depth_groups, find_batchnorm_layers
from bn_export.onnx_graph import build_model
from bn_export.recalibrate import recalibrate, write_recalibrated
from tests.bn_export.graphs import make_checkpoint
from tests.bn_export.networks import OPSET, BnParams, Mlp, conv_net


def _save(tmp_path: Path, name: str, array: np.ndarray) -> Path:
    path = tmp_path / name
    np.save(path, array)
    return path


def _population(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance of `x: (N, C, *)` in float64, two-pass."""
    values = np.moveaxis(np.asarray(x, np.float64), 1, 0).reshape(x.shape[1], -1)
    return values.mean(axis=1), values.var(axis=1)


def test_exact_mode_on_an_mlp_equals_float64_population_statistics_layer_after_layer(tmp_path: Path) -> None:
    mlp = Mlp.random()
    x = np.random.default_rng(1).normal(2.0, 3.0, size=(1000, 5))
    result = recalibrate(mlp.model(np.float64), _save(tmp_path, "x.npy", x), batch_size=64)
    h1, _ = mlp.bn_inputs(x)
    mean1, var1 = h1.mean(axis=0), h1.var(axis=0)
    _, h2 = mlp.bn_inputs(x, [BnParams(mlp.bns[0].gamma, mlp.bns[0].beta, mean1, var1), mlp.bns[1]])
    expected = {"bn1": (mean1, var1), "bn2": (h2.mean(axis=0), h2.var(axis=0))}
    for name, (mean, var) in expected.items():
        np.testing.assert_allclose(result.statistics[name][0], mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(result.statistics[name][1], var, rtol=1e-10)
    assert result.passes == 2
    assert [layer.group for layer in result.layers] == [0, 1]


def test_exact_mode_on_a_cnn_equals_the_reference_evaluator_layer_after_layer(tmp_path: Path) -> None:
    x = np.random.default_rng(2).normal(0.5, 2.0, size=(96, 3, 7, 6)).astype(np.float32)
    result = recalibrate(conv_net(), _save(tmp_path, "x.npy", x), batch_size=40)
    original = find_batchnorm_layers(conv_net())
    mean1, var1 = _population(ReferenceEvaluator(conv_net()).run(["h1"], {"x": x})[0])
    first = BnParams(original[0].gamma, original[0].beta, mean1, var1)
    second = BnParams(original[1].gamma, original[1].beta, original[1].mean, original[1].var)
    updated = conv_net(bns=[first, second])
    mean2, var2 = _population(ReferenceEvaluator(updated).run(["h2"], {"x": x})[0])
    for name, (mean, var) in {"bn1": (mean1, var1), "bn2": (mean2, var2)}.items():
        scale = np.sqrt(var)
        np.testing.assert_allclose(result.statistics[name][0], mean, rtol=1e-5, atol=1e-5 * scale.max())
        np.testing.assert_allclose(result.statistics[name][1], var, rtol=1e-5)


def test_exact_statistics_do_not_depend_on_the_batch_size(tmp_path: Path) -> None:
    path = _save(tmp_path, "x.npy", np.random.default_rng(3).normal(size=(301, 5)))
    model = Mlp.random().model(np.float64)
    small = recalibrate(model, path, batch_size=7)
    whole = recalibrate(model, path, batch_size=1000)
    for name in ("bn1", "bn2"):
        for a, b in zip(small.statistics[name], whole.statistics[name], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_one_pass_averages_batch_means_and_unbiased_batch_variances_with_batch_statistics_upstream(
    tmp_path: Path,
) -> None:
    mlp = Mlp.random(seed=4)
    x = np.random.default_rng(4).normal(1.0, 2.0, size=(250, 5))
    result = recalibrate(mlp.model(np.float64), _save(tmp_path, "x.npy", x), mode="one-pass", batch_size=64)
    means: dict[str, list[np.ndarray]] = {"bn1": [], "bn2": []}
    variances: dict[str, list[np.ndarray]] = {"bn1": [], "bn2": []}
    for start in range(0, len(x), 64):
        batch = x[start : start + 64]
        h1 = batch @ mlp.w1.T + mlp.b1
        bn1 = mlp.bns[0]
        a1 = np.maximum((h1 - h1.mean(0)) / np.sqrt(h1.var(0) + bn1.eps) * bn1.gamma + bn1.beta, 0.0)
        h2 = a1 @ mlp.w2.T + mlp.b2
        for name, h in (("bn1", h1), ("bn2", h2)):
            means[name].append(h.mean(axis=0))
            variances[name].append(h.var(axis=0, ddof=1))
    for name in ("bn1", "bn2"):
        np.testing.assert_allclose(result.statistics[name][0], np.mean(means[name], axis=0), rtol=1e-10)
        np.testing.assert_allclose(result.statistics[name][1], np.mean(variances[name], axis=0), rtol=1e-10)
    assert result.passes == 1


def test_only_the_statistics_initializers_and_metadata_change(tmp_path: Path) -> None:
    model = conv_net()
    path = _save(tmp_path, "x.npy", np.random.default_rng(5).normal(size=(50, 3, 6, 6)).astype(np.float32))
    result = recalibrate(model, path).model
    statistics = {f"bn{i}.running_{s}" for i in (1, 2) for s in ("mean", "var")}
    changed = {
        new.name
        for old, new in zip(model.graph.initializer, result.graph.initializer, strict=True)
        if old.SerializeToString() != new.SerializeToString()
    }
    assert changed == statistics
    restored = onnx.ModelProto()
    restored.CopyFrom(result)
    for position, tensor in enumerate(model.graph.initializer):
        restored.graph.initializer[position].CopyFrom(tensor)
    keys = [prop.key for prop in result.metadata_props]
    assert all(key.startswith("recalibration_") for key in keys)
    del restored.metadata_props[:]
    assert restored.SerializeToString(deterministic=True) == model.SerializeToString(deterministic=True)
    meta = {prop.key: prop.value for prop in result.metadata_props}
    assert meta["recalibration_mode"] == "exact"
    assert json.loads(meta["recalibration_data_fingerprint"])["x"].startswith("sha256:")
    assert [layer["name"] for layer in json.loads(meta["recalibration_layers"])] == ["bn1", "bn2"]
    assert result.graph.initializer[4].data_type == onnx.TensorProto.FLOAT


def test_the_same_model_and_data_give_the_same_bytes(tmp_path: Path) -> None:
    model = tmp_path / "cnn.onnx"
    onnx.save(conv_net(), model)
    path = _save(tmp_path, "x.npy", np.random.default_rng(6).normal(size=(70, 3, 5, 5)).astype(np.float32))
    for mode in ("exact", "one-pass"):
        first = write_recalibrated(recalibrate(model, path, mode=mode), tmp_path / "a.onnx")
        second = write_recalibrated(recalibrate(model, path, mode=mode), tmp_path / "b.onnx")
        assert first.read_bytes() == second.read_bytes()


def test_layers_option_recalibrates_only_the_named_layers_in_one_pass(tmp_path: Path) -> None:
    mlp = Mlp.random()
    x = np.random.default_rng(7).normal(size=(120, 5))
    result = recalibrate(mlp.model(np.float64), _save(tmp_path, "x.npy", x), layers=["bn2"])
    _, h2 = mlp.bn_inputs(x)  # bn1 keeps its statistics
    np.testing.assert_allclose(result.statistics["bn2"][0], h2.mean(axis=0), rtol=1e-10)
    assert list(result.statistics) == ["bn2"]
    assert result.passes == 1
    layers = find_batchnorm_layers(result.model)
    np.testing.assert_array_equal(layers[0].mean, mlp.bns[0].mean)


def test_parallel_branches_share_a_pass() -> None:
    """x -> bnA; x -> Relu -> bnB; bnA + bnB -> bnC: two groups, {bnA, bnB} then {bnC}."""
    rng = np.random.default_rng(8)
    inits = []
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu")]
    for name, source, out in (("bnA", "x", "a"), ("bnB", "r", "b"), ("bnC", "s", "y")):
        bn = BnParams.random(3, rng)
        for role, value in (("g", bn.gamma), ("b", bn.beta), ("m", bn.mean), ("v", bn.var)):
            inits.append(numpy_helper.from_array(value.astype(np.float32), f"{name}.{role}"))
        inputs = [source] + [f"{name}.{role}" for role in "gbmv"]
        nodes.append(helper.make_node("BatchNormalization", inputs, [out], name=name))
        if name == "bnB":
            nodes.append(helper.make_node("Add", ["a", "b"], ["s"], name="add"))
    graph = helper.make_graph(
        nodes,
        "branches",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    groups = depth_groups(find_batchnorm_layers(model))
    assert [[layer.name for layer in group] for group in groups] == [["bnA", "bnB"], ["bnC"]]


def test_a_statistic_shared_with_gamma_gets_an_initializer_of_its_own(tmp_path: Path) -> None:
    """PyTorch exports a fresh layer's equal weight and running_var as one initializer read twice."""
    model = Mlp.random().model(np.float64)
    node = model.graph.node[1]
    node.input[4] = node.input[1]  # running_var read from the weight's initializer
    x = np.random.default_rng(9).normal(size=(64, 5))
    result = recalibrate(model, _save(tmp_path, "x.npy", x))
    layer = find_batchnorm_layers(result.model)[0]
    np.testing.assert_array_equal(layer.gamma, find_batchnorm_layers(model)[0].gamma)
    np.testing.assert_allclose(layer.var, result.statistics["bn1"][1], rtol=0)
    assert result.model.graph.node[1].input[4] == "bn1.running_var_2"  # bn1.running_var is taken


def test_several_inputs_take_one_dataset_each_by_name(tmp_path: Path) -> None:
    inits = [
        numpy_helper.from_array(np.full(2, v, np.float32), n)
        for n, v in zip("gbmv", (1, 0, 0, 1), strict=True)
    ]
    nodes = [
        helper.make_node("Sub", ["left", "right"], ["d"], name="sub"),
        helper.make_node("BatchNormalization", ["d", "g", "b", "m", "v"], ["y"], name="bn"),
    ]
    inputs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["N", 2]) for n in ("left", "right")]
    output = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 2])
    graph = helper.make_graph(nodes, "two_inputs", inputs, [output], initializer=inits)
    model_path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), model_path)
    rng = np.random.default_rng(10)
    left, right = rng.normal(3.0, 1.0, (90, 2)), rng.normal(size=(90, 2))
    specs = {"left": _save(tmp_path, "l.npy", left), "right": _save(tmp_path, "r.npy", right)}
    result = recalibrate(model_path, specs)
    np.testing.assert_allclose(
        result.statistics["bn"][0], (left - right).astype(np.float32).mean(0), rtol=1e-6
    )
    with pytest.raises(InvalidInputError, match="give one dataset per input as NAME=FILE"):
        recalibrate(model_path, specs["left"], verify=True)
    with pytest.raises(InvalidInputError, match="no input 'middle'"):
        recalibrate(model_path, {**specs, "middle": specs["left"]}, verify=True)


def test_a_frozen_single_layer_export_recalibrates_through_the_cli_and_passes_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = make_checkpoint((3, 4, 5), 1)
    model = build_model(checkpoint, metadata={"producer": "frozen-bn"})
    onnx.save(model, tmp_path / "bn.onnx")
    x = np.random.default_rng(11).normal(-4.0, 0.5, size=(33, 3, 4, 5)).astype(np.float32)
    data = _save(tmp_path, "x.npy", x)
    out = tmp_path / "new.onnx"
    status = main(
        ["recalibrate", str(tmp_path / "bn.onnx"), "--data", str(data), "--out", str(out), "--json"]
    )
    report = json.loads(capsys.readouterr().out)
    assert status == 0
    assert out.exists()
    assert (report["mode"], report["passes"], report["samples"]) == ("exact", 1, 33)
    [layer] = find_batchnorm_layers(onnx.load(out))
    mean, var = _population(x)
    np.testing.assert_allclose(layer.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(layer.var, var, rtol=1e-6)
    assert report["layers"][0]["mean_shift_max"] == pytest.approx(
        float(
            np.max(np.abs(mean - checkpoint.moving_mean) / np.sqrt(checkpoint.moving_var + checkpoint.eps))
        ),
        rel=1e-5,
    )
    status = main(["recalibrate", str(tmp_path / "bn.onnx"), "--data", str(data), "--out", str(out)])
    table = capsys.readouterr().out
    assert status == 0
    assert "1 pass(es)" in table


def test_multi_layer_network_passes_the_verify_gate(tmp_path: Path) -> None:
    path = _save(tmp_path, "x.npy", np.random.default_rng(12).normal(size=(40, 3, 5, 5)).astype(np.float32))
    recalibrate(conv_net(), path)


def _batch_mixing_model() -> onnx.ModelProto:
    """bn, then each sample minus the batch mean: fails verify's samples_independent, whatever verify's
    scope."""
    inits = [
        numpy_helper.from_array(np.full(2, v, np.float32), n)
        for n, v in zip("gbmv", (1, 0, 0, 1), strict=True)
    ]
    nodes = [
        helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["n"], name="bn"),
        helper.make_node("ReduceMean", ["n"], ["batch_mean"], name="mix", axes=[0], keepdims=1),
        helper.make_node("Sub", ["n", "batch_mean"], ["y"], name="sub"),
    ]
    graph = helper.make_graph(
        nodes,
        "mixing",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 2])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _fused_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "fused",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


BAD_DATA = {
    "shape": (
        np.zeros((10, 3)),
        "samples of shape \\(3,\\) do not fit input 'input', which takes \\('N', 2\\)",
    ),
    "rank": (np.zeros((10, 2, 1)), "do not fit input 'input'"),
    "dtype": (np.zeros((10, 2), dtype=np.complex64), "dtype complex64"),
    "nan": (np.array([[0.0, 1.0]] * 5 + [[np.nan, 0.0]]), "sample 5 .* holds NaN or Inf"),
    "inf": (np.array([[0.0, 1.0]] * 3 + [[0.0, np.inf]]), "sample 3 .* holds NaN or Inf"),
    "empty": (np.zeros((0, 2)), "empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_named_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    array, message = BAD_DATA[case]
    model = tmp_path / "m.onnx"
    onnx.save(build_model(make_checkpoint((2,), 1)), model)
    out = tmp_path / "out.onnx"
    data = _save(tmp_path, "x.npy", array)
    assert main(["recalibrate", str(model), "--data", str(data), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("bn-export recalibrate: error:")
    assert len(error.strip().splitlines()) == 1
    with pytest.raises(DataError, match=message):
        recalibrate(model, data)
    assert set(tmp_path.iterdir()) == {model, data}  # no output, no temporary file left


def test_a_result_failing_verify_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    model = tmp_path / "mixing.onnx"
    onnx.save(_batch_mixing_model(), model)
    data = _save(tmp_path, "x.npy", np.random.default_rng(13).normal(size=(20, 2)).astype(np.float32))
    out = tmp_path / "out.onnx"
    assert main(["recalibrate", str(model), "--data", str(data), "--out", str(out)]) == 2
    assert not out.exists()
    with pytest.raises(ExportError, match="fails verify, nothing written: samples_independent"):
        recalibrate(model, data)


def test_unknown_layer_names_the_layers_there_are(tmp_path: Path) -> None:
    path = _save(tmp_path, "x.npy", np.zeros((4, 3, 5, 5), np.float32))
    with pytest.raises(
        InvalidInputError, match="no BatchNormalization layer named 'bn9'; the network has bn1, bn2"
    ):
        recalibrate(conv_net(), path, layers=["bn9"])


def test_a_network_whose_batchnorm_was_fused_says_how_to_keep_it(tmp_path: Path) -> None:
    path = _save(tmp_path, "x.npy", np.zeros((4, 2), np.float32))
    with pytest.raises(InvalidInputError, match=r"nothing to recalibrate.*do_constant_folding=False"):
        recalibrate(_fused_model(), path)


def test_one_pass_refuses_a_batch_of_one_value_per_channel(tmp_path: Path) -> None:
    path = _save(tmp_path, "x.npy", np.random.default_rng(14).normal(size=(9, 5)))
    with pytest.raises(InvalidInputError, match="batch 2 gives layer 'bn1' 1 value per channel"):
        recalibrate(Mlp.random().model(np.float64), path, mode="one-pass", batch_size=4)


def test_errors_are_bn_export_errors(tmp_path: Path) -> None:
    with pytest.raises(BnExportError):
        recalibrate(tmp_path / "missing.onnx", tmp_path / "x.npy")


def test_a_zarr_array_recalibrates_to_the_same_bytes_as_the_same_samples_in_npy(tmp_path: Path) -> None:
    zarr = pytest.importorskip("zarr")
    x = np.random.default_rng(15).normal(size=(130, 3, 5, 5)).astype(np.float32)
    store = tmp_path / "x.zarr"
    array = zarr.create_array(store=str(store), shape=x.shape, chunks=(16, 3, 5, 5), dtype="float32")
    array[:] = x
    from_zarr = recalibrate(conv_net(), store, batch_size=20)
    from_npy = recalibrate(conv_net(), _save(tmp_path, "x.npy", x), batch_size=20)
    assert from_zarr.model.SerializeToString(deterministic=True) == from_npy.model.SerializeToString(
        deterministic=True
    )
    (store / "c" / "1" / "0" / "0" / "0").unlink()
    with pytest.raises(DataError, match=r"chunk c/1/0/0/0 .* is missing"):
        recalibrate(conv_net(), store)


def test_report_of_a_recalibrated_network_plots_each_layers_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    x = np.random.default_rng(16).normal(3.0, 2.0, size=(80, 3, 5, 5)).astype(np.float32)
    result = recalibrate(conv_net(), _save(tmp_path, "x.npy", x))
    model = write_recalibrated(result, tmp_path / "new.onnx")
    pages = []
    for out in (tmp_path / "a", tmp_path / "b"):
        assert main(["report", str(model), "--out", str(out)]) == 0
        assert capsys.readouterr().out.split() == [str(out / "report.md"), str(out / "recalibration.png")]
        pages.append(out)
    plot = (pages[0] / "recalibration.png").read_bytes()
    assert plot.startswith(b"\x89PNG")
    assert len(plot) > 10_000
    assert plot == (pages[1] / "recalibration.png").read_bytes()
    text = (pages[0] / "report.md").read_text(encoding="utf-8")
    for layer in result.layers:
        assert f"| `{layer.name}` | {layer.mean_shift_max:.4g} |" in text
    assert "| recalibration_mode | `exact` |" in text


def test_data_options_name_each_input_of_a_network_with_several(tmp_path: Path) -> None:
    odd = tmp_path / "a=b.npy"
    odd.touch()
    assert data_specs(["x.npy"]) == "x.npy"
    assert data_specs([str(odd)]) == str(odd)  # an existing file whose name holds '='
    assert data_specs(["left=a.npy", "right=b.npy"]) == {"left": "a.npy", "right": "b.npy"}
    with pytest.raises(InvalidInputError, match="give each as NAME=DATA"):
        data_specs(["left=a.npy", "b.npy"])
    with pytest.raises(InvalidInputError, match="names input 'left' twice"):
        data_specs(["left=a.npy", "left=b.npy"])
