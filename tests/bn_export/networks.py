"""Small networks with BatchNormalization nodes, built with `onnx.helper`, for the recalibration tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}


@dataclass
class BnParams:
    """One layer's gamma, beta, mean, var and eps."""

    gamma: NDArray[np.float64]
    beta: NDArray[np.float64]
    mean: NDArray[np.float64]
    var: NDArray[np.float64]
    eps: float = 1e-3

    @classmethod
    def random(cls, channels: int, rng: np.random.Generator) -> BnParams:
        return cls(
            rng.uniform(0.5, 2.0, channels),
            rng.normal(size=channels),
            rng.normal(size=channels),
            rng.uniform(0.5, 2.0, channels),
        )


@dataclass
class Mlp:
    """`x (N, D) -> Gemm -> bn1 -> Relu -> Gemm -> bn2 -> y`, parameters kept for numpy references."""

    w1: NDArray[np.float64]
    b1: NDArray[np.float64]
    w2: NDArray[np.float64]
    b2: NDArray[np.float64]
    bns: list[BnParams] = field(default_factory=list)

    @classmethod
    def random(cls, features: int = 5, hidden: int = 6, out: int = 4, seed: int = 0) -> Mlp:
        rng = np.random.default_rng(seed)
        return cls(
            rng.normal(size=(hidden, features)),
            rng.normal(size=hidden),
            rng.normal(size=(out, hidden)) / 2,
            rng.normal(size=out),
            [BnParams.random(hidden, rng), BnParams.random(out, rng)],
        )

    def bn_inputs(self, x: NDArray[Any], bns: list[BnParams] | None = None) -> list[NDArray[np.float64]]:
        """Each layer's input for `x` in float64 with the statistics of `bns` (inference mode)."""
        bns = self.bns if bns is None else bns
        h1 = np.asarray(x, np.float64) @ self.w1.T + self.b1
        a1 = np.maximum(_bn(h1, bns[0]), 0.0)
        h2 = a1 @ self.w2.T + self.b2
        return [h1, h2]

    def model(self, dtype: Any = np.float32, bns: list[BnParams] | None = None) -> onnx.ModelProto:
        bns = self.bns if bns is None else bns
        elem = _TYPES[np.dtype(dtype)]
        inits = _arrays(dtype, w1=self.w1, b1=self.b1, w2=self.w2, b2=self.b2)
        for number, bn in enumerate(bns, start=1):
            inits += _bn_arrays(dtype, f"bn{number}", bn)
        nodes = [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1", transB=1),
            _bn_node("bn1", "h1", "n1", bns[0]),
            helper.make_node("Relu", ["n1"], ["a1"], name="relu"),
            helper.make_node("Gemm", ["a1", "w2", "b2"], ["h2"], name="fc2", transB=1),
            _bn_node("bn2", "h2", "y", bns[1]),
        ]
        graph = helper.make_graph(
            nodes,
            "mlp",
            [helper.make_tensor_value_info("x", elem, ["N", self.w1.shape[1]])],
            [helper.make_tensor_value_info("y", elem, ["N", self.w2.shape[0]])],
            initializer=inits,
        )
        return _model(graph)


def _bn(x: NDArray[np.float64], bn: BnParams) -> NDArray[np.float64]:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    scale = bn.gamma / np.sqrt(bn.var + bn.eps)
    return (x - bn.mean.reshape(shape)) * scale.reshape(shape) + bn.beta.reshape(shape)


def conv_net(seed: int = 0, bns: list[BnParams] | None = None, dtype: Any = np.float32) -> onnx.ModelProto:
    """`x (N, 3, H, W) -> Conv -> bn1 -> Relu -> Conv -> bn2 -> y`."""
    rng = np.random.default_rng(seed)
    weights = _arrays(
        dtype,
        w1=rng.normal(size=(4, 3, 3, 3)) / 3,
        c1=rng.normal(size=4),
        w2=rng.normal(size=(5, 4, 3, 3)) / 4,
        c2=rng.normal(size=5),
    )
    if bns is None:
        bns = [BnParams.random(4, rng), BnParams.random(5, rng)]
    elem = _TYPES[np.dtype(dtype)]
    inits = weights + _bn_arrays(dtype, "bn1", bns[0]) + _bn_arrays(dtype, "bn2", bns[1])
    nodes = [
        helper.make_node("Conv", ["x", "w1", "c1"], ["h1"], name="conv1", pads=[1, 1, 1, 1]),
        _bn_node("bn1", "h1", "n1", bns[0]),
        helper.make_node("Relu", ["n1"], ["a1"], name="relu"),
        helper.make_node("Conv", ["a1", "w2", "c2"], ["h2"], name="conv2"),
        _bn_node("bn2", "h2", "y", bns[1]),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", elem, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", elem, ["N", 5, "H2", "W2"])],
        initializer=inits,
    )
    return _model(graph)


def _arrays(dtype: Any, **arrays: NDArray[Any]) -> list[onnx.TensorProto]:
    return [numpy_helper.from_array(np.asarray(v, dtype=dtype), k) for k, v in arrays.items()]


def _bn_arrays(dtype: Any, name: str, bn: BnParams) -> list[onnx.TensorProto]:
    return _arrays(
        dtype,
        **{f"{name}.weight": bn.gamma, f"{name}.bias": bn.beta, f"{name}.running_mean": bn.mean},
        **{f"{name}.running_var": bn.var},
    )


def _bn_node(name: str, x: str, y: str, bn: BnParams) -> onnx.NodeProto:
    inputs = [x] + [f"{name}.{p}" for p in ("weight", "bias", "running_mean", "running_var")]
    return helper.make_node("BatchNormalization", inputs, [y], name=name, epsilon=bn.eps)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=int(helper.find_min_ir_version_for([helper.make_opsetid("", OPSET)])),
    )
    onnx.checker.check_model(model, full_check=True)
    return model
