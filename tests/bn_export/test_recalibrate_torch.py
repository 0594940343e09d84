"""Recalibration of PyTorch networks exported with their BatchNorm layers kept, against PyTorch itself
(skipped without torch): exact mode against forward hooks on the torch model recalibrated layer after
layer, one-pass against torch's train-mode cumulative average (momentum=None) over the same batches, and
the recalibrated graph's outputs against the recalibrated torch model in eval mode."""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bn_export.graph_surgery import find_batchnorm_layers
from bn_export.recalibrate import recalibrate

torch = pytest.importorskip("torch")
nn = torch.nn

BATCH = 32


class ResidualCnn(nn.Module):
    """conv-bn-relu, then a block whose two branches (conv-bn, 1x1 conv-bn shortcut) add, then conv-bn."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.shortcut = nn.Sequential(nn.Conv2d(6, 8, 1), nn.BatchNorm2d(8))
        self.head = nn.Sequential(
            nn.Conv2d(8, 5, 1), nn.BatchNorm2d(5), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.fc = nn.Linear(5, 4)

    def forward(self, x: Any) -> Any:
        h = self.stem(x)
        h = torch.relu(self.branch(h) + self.shortcut(h))
        return self.fc(self.head(h))


def mlp() -> Any:
    return nn.Sequential(
        nn.Linear(7, 12),
        nn.BatchNorm1d(12),
        nn.ReLU(),
        nn.Linear(12, 9),
        nn.BatchNorm1d(9),
        nn.ReLU(),
        nn.Linear(9, 3),
    )


def _randomize(model: Any, seed: int) -> Any:
    """Statistics and affine parameters that are not a fresh layer's, so recalibration has work to do."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                c = module.num_features
                module.weight.copy_(0.5 + torch.rand(c, generator=generator))
                module.bias.copy_(torch.randn(c, generator=generator))
                module.running_mean.copy_(torch.randn(c, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(c, generator=generator))
    return model.eval()


def _export(model: Any, sample: Any, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buffer = io.BytesIO()
        torch.onnx.export(
            model.eval(),
            sample,
            buffer,
            dynamo=False,
            do_constant_folding=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
        )
    path.write_bytes(buffer.getvalue())
    return path


def _module_name(node_name: str) -> str:
    """PyTorch's exporter names a node `/stem/stem.1/BatchNormalization` for the module `stem.1`."""
    return node_name.strip("/").split("/")[-2]


def _assert_mean_close(actual: np.ndarray, expected: np.ndarray, var: np.ndarray, rtol: float) -> None:
    """Relative to the mean, or to the channel's standard deviation where the mean is near 0."""
    error = np.abs(actual - expected)
    bound = rtol * np.maximum(np.abs(expected), np.sqrt(var))
    assert np.all(error <= bound), f"error up to {np.max(error / bound):.3g} times the bound"


def _batchnorms(model: Any) -> dict[str, Any]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _batches(x: np.ndarray) -> list[Any]:
    return [torch.from_numpy(x[i : i + BATCH]) for i in range(0, len(x), BATCH)]


def _hooked_population(model: Any, module: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and biased variance of `module`'s input over all of `x`, by a forward hook."""
    seen: list[np.ndarray] = []
    handle = module.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].double().numpy()))
    with torch.no_grad():
        for batch in _batches(x):
            model(batch)
    handle.remove()
    values = np.concatenate(seen)
    values = np.moveaxis(values, 1, 0).reshape(values.shape[1], -1)
    return values.mean(axis=1), values.var(axis=1)


def _sequentially_recalibrated(
    model: Any, x: np.ndarray
) -> tuple[Any, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The torch model with each BatchNorm, in forward order, set to its input's population statistics
    with every earlier one already set (float32, as the ONNX file stores them)."""
    model = copy.deepcopy(model).eval()
    found = {}
    for name, module in _batchnorms(model).items():
        mean, var = _hooked_population(model, module, x)
        with torch.no_grad():
            module.running_mean.copy_(torch.from_numpy(mean))
            module.running_var.copy_(torch.from_numpy(var))
        found[name] = (mean, var)
    return model, found


NETWORKS = {
    "residual_cnn": (ResidualCnn, (3, 10, 9), 3),  # stem; branch with shortcut; head
    "mlp": (mlp, (7,), 2),
}


@pytest.fixture(params=sorted(NETWORKS))
def network(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Any, Path, Path, np.ndarray, int]:
    build, sample_shape, passes = NETWORKS[request.param]
    torch.manual_seed(0)
    model = _randomize(build(), seed=1)
    x = np.random.default_rng(2).normal(0.7, 1.5, size=(200, *sample_shape)).astype(np.float32)
    data = tmp_path / "x.npy"
    np.save(data, x)
    onnx_path = _export(model, torch.from_numpy(x[:2]), tmp_path / "net.onnx")
    return model, onnx_path, data, x, passes


def test_exact_mode_equals_hooks_on_the_sequentially_recalibrated_torch_model(
    network: tuple[Any, Path, Path, np.ndarray, int],
) -> None:
    model, onnx_path, data, x, passes = network
    result = recalibrate(onnx_path, data, batch_size=BATCH)
    reference_model, reference = _sequentially_recalibrated(model, x)
    assert {_module_name(name) for name in result.statistics} == set(reference)
    assert result.passes == passes
    for name, (mean, var) in result.statistics.items():
        expected_mean, expected_var = reference[_module_name(name)]
        _assert_mean_close(mean, expected_mean, expected_var, rtol=1e-6)
        np.testing.assert_allclose(var, expected_var, rtol=1e-6)
    # The recalibrated graph computes what the recalibrated torch model computes in eval mode.
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(["y"], {"x": x})
    with torch.no_grad():
        torch_out = reference_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(onnx_out, torch_out, rtol=1e-5, atol=1e-5 * np.abs(torch_out).max())


def test_one_pass_equals_torch_train_mode_cumulative_average_over_the_same_batches(
    network: tuple[Any, Path, Path, np.ndarray, int],
) -> None:
    model, onnx_path, data, x, _ = network
    result = recalibrate(onnx_path, data, mode="one-pass", batch_size=BATCH)
    reference = copy.deepcopy(model)
    for module in _batchnorms(reference).values():
        module.reset_running_stats()
        module.momentum = None
    reference.train()
    with torch.no_grad():
        for batch in _batches(x):
            reference(batch)
    modules = _batchnorms(reference)
    assert result.passes == 1
    for name, (mean, var) in result.statistics.items():
        module = modules[_module_name(name)]
        expected_mean, expected_var = (
            module.running_mean.double().numpy(),
            module.running_var.double().numpy(),
        )
        _assert_mean_close(mean, expected_mean, expected_var, rtol=1e-5)
        np.testing.assert_allclose(var, expected_var, rtol=1e-5)


def test_a_fresh_torch_network_whose_equal_statistics_are_shared_recalibrates(tmp_path: Path) -> None:
    """A fresh BatchNorm's weight and running_var are equal (ones): the exporter may store them once."""
    torch.manual_seed(3)
    model = mlp().eval()
    x = np.random.default_rng(4).normal(2.0, 1.0, size=(64, 7)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    onnx_path = _export(model, torch.from_numpy(x[:2]), tmp_path / "fresh.onnx")
    result = recalibrate(onnx_path, tmp_path / "x.npy", batch_size=BATCH)
    _, reference = _sequentially_recalibrated(model, x)
    for layer in find_batchnorm_layers(result.model):
        np.testing.assert_allclose(layer.gamma, 1.0)
        np.testing.assert_allclose(layer.var, reference[_module_name(layer.name)][1], rtol=1e-6)


def test_the_default_export_folds_batchnorm_away_and_recalibrate_says_how_to_keep_it(tmp_path: Path) -> None:
    model = _randomize(ResidualCnn(), seed=5)
    x = np.zeros((4, 3, 6, 6), np.float32)
    np.save(tmp_path / "x.npy", x)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.from_numpy(x), buffer, dynamo=False, input_names=["x"])
    (tmp_path / "folded.onnx").write_bytes(buffer.getvalue())
    assert not [
        n for n in onnx.load(tmp_path / "folded.onnx").graph.node if n.op_type == "BatchNormalization"
    ]
    with pytest.raises(Exception, match=r"nothing to recalibrate.*do_constant_folding=False"):
        recalibrate(tmp_path / "folded.onnx", tmp_path / "x.npy")
