"""The benchmark's models: frozen BatchNorm ONNX graphs in a model repository laid out as Triton's.

Each model computes `y = gamma*(x - moving_mean)/sqrt(moving_var + eps) + beta` on axis 1 of
`x: (N, C, *spatial)`, the batch axis dynamic, with fixed parameters drawn from a seeded generator so every
run, and every server, sees the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

# BatchNormalization-15 has inference mode as its default (training_mode=0); IR 8 is what opset 15 ships with,
# pinned so that an older onnxruntime in a peer's environment accepts the file.
OPSET = 15
IR_VERSION = 8
EPS = 1e-5
INPUT_NAME = "input"
OUTPUT_NAME = "output"


@dataclass(frozen=True)
class BatchNormModel:
    """A frozen BatchNorm layer: parameters of shape (C,); one sample is `(C, *spatial)` = `sample_shape`."""

    name: str
    sample_shape: tuple[int, ...]
    gamma: NDArray[np.float32]
    beta: NDArray[np.float32]
    moving_mean: NDArray[np.float32]
    moving_var: NDArray[np.float32]
    eps: float = EPS

    def reference(self, x: NDArray[Any]) -> NDArray[np.float32]:
        """The layer on `x: (N, C, *spatial)` in float64, rounded to float32 at the end."""
        x = np.asarray(x, dtype=np.float64)
        per_channel = (1, -1) + (1,) * (x.ndim - 2)

        def column(a: NDArray[np.float32]) -> NDArray[np.float64]:
            return a.astype(np.float64).reshape(per_channel)

        y = column(self.gamma) * (x - column(self.moving_mean)) / np.sqrt(column(self.moving_var) + self.eps)
        return (y + column(self.beta)).astype(np.float32)


def make_model(name: str, sample_shape: tuple[int, ...], seed: int) -> BatchNormModel:
    """Parameters for `sample_shape = (C, *spatial)`: gamma, moving_var > 0; beta, moving_mean centred."""
    if not sample_shape or any(d <= 0 for d in sample_shape):
        raise ValueError(f"sample_shape must be (C, *spatial) with positive sizes, got {sample_shape}")
    rng = np.random.default_rng(seed)
    channels = sample_shape[0]
    return BatchNormModel(
        name=name,
        sample_shape=sample_shape,
        gamma=rng.uniform(0.5, 1.5, channels).astype(np.float32),
        beta=rng.normal(0.0, 0.5, channels).astype(np.float32),
        moving_mean=rng.normal(0.0, 1.0, channels).astype(np.float32),
        moving_var=rng.uniform(0.5, 2.0, channels).astype(np.float32),
    )


def build_graph(model: BatchNormModel) -> onnx.ModelProto:
    """One BatchNormalization node in inference mode, input `x: (N, *sample_shape)` FP32 with N dynamic."""
    shape: list[int | str] = ["N", *model.sample_shape]
    initializers = [
        numpy_helper.from_array(model.gamma, "gamma"),
        numpy_helper.from_array(model.beta, "beta"),
        numpy_helper.from_array(model.moving_mean, "moving_mean"),
        numpy_helper.from_array(model.moving_var, "moving_var"),
    ]
    node = helper.make_node(
        "BatchNormalization",
        [INPUT_NAME, "gamma", "beta", "moving_mean", "moving_var"],
        [OUTPUT_NAME],
        epsilon=model.eps,
    )
    graph = helper.make_graph(
        [node],
        model.name,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, shape)],
        initializer=initializers,
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="frozen-bn-benchmarks",
    )
    onnx.checker.check_model(proto, full_check=True)
    return proto


def benchmark_models() -> tuple[BatchNormModel, BatchNormModel]:
    """The two models the workloads use: 64 features (W1, W2) and NCHW images with 3 channels (W3)."""
    return make_model("bn_features", (64,), seed=1), make_model("bn_images", (3, 224, 224), seed=2)


def write_repository(root: Path, models: tuple[BatchNormModel, ...]) -> dict[str, Path]:
    """Write each model to `root/<name>/1/model.onnx` (Triton's layout); returns name -> model file."""
    paths: dict[str, Path] = {}
    for model in models:
        path = root / model.name / "1" / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(build_graph(model), path)
        paths[model.name] = path
    return paths
