"""bn-serve on real networks (tests/data/networks, exported by torch.onnx.export): a real server process
verifies them at load, answers V2 requests equal to PyTorch's eval output (onnxruntime run directly where
PyTorch is absent), bitwise the same for a sample alone and in batches, with metadata from the graph; bad
models are reported not ready with their reason while the others keep serving."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy.typing import NDArray
from onnx import TensorProto, helper

from bn_export.providers import CPU
from tests.fixtures.make_networks import NETWORKS, OUT, example_inputs
from tests.service.conftest import Server, start_server, stop_server

SERVED = ["resnet_bn", "resnet_fused", "mlp_bn1d", "norms", "channels_last", "two_inputs"]
DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}


def unknown_operator_model() -> onnx.ModelProto:
    """A graph whose operator no onnxruntime has: Relu of a custom domain."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], domain="com.example.missing")],
        "missing_op",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example.missing", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


@pytest.fixture(scope="module")
def network_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("networks")
    for name in SERVED:
        (root / name / "1").mkdir(parents=True)
        shutil.copy(OUT / f"{name}.onnx", root / name / "1" / "model.onnx")
    (root / "train_mode" / "1").mkdir(parents=True)
    shutil.copy(OUT / "resnet_train_mode.onnx", root / "train_mode" / "1" / "model.onnx")
    (root / "not_onnx" / "1").mkdir(parents=True)
    (root / "not_onnx" / "1" / "model.onnx").write_bytes(b"\x00 definitely not a protobuf")
    (root / "missing_op" / "1").mkdir(parents=True)
    onnx.save(unknown_operator_model(), root / "missing_op" / "1" / "model.onnx")
    running = start_server(
        "--model-repository", str(root), "--device", "cpu", "--intra-op-threads", "1", timeout=240.0
    )
    try:
        yield running
    finally:
        stop_server(running)


def infer(server: Server, name: str, feeds: dict[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
    body = {
        "inputs": [
            {
                "name": key,
                "shape": list(value.shape),
                "datatype": DATATYPES[value.dtype],
                "data": value.reshape(-1).tolist(),
            }
            for key, value in feeds.items()
        ]
    }
    response = httpx.post(f"{server.url}/v2/models/{name}/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return {
        out["name"]: np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
        for out in response.json()["outputs"]
    }


def reference(name: str, feeds: dict[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
    """PyTorch's eval output where PyTorch is installed, else onnxruntime run directly on the file."""
    network = NETWORKS[name]
    try:
        import torch
    except ImportError:
        session = ort.InferenceSession(str(OUT / f"{name}.onnx"), providers=[CPU])
        return dict(zip(network.outputs, session.run(None, feeds), strict=True))
    from tests.fixtures.make_networks import module

    with torch.no_grad():
        result = module(name)(*(torch.from_numpy(x) for x in feeds.values()))
    values = result if isinstance(result, tuple) else (result,)
    return {out: value.numpy() for out, value in zip(network.outputs, values, strict=True)}


@pytest.mark.parametrize("name", SERVED)
def test_served_network_answers_equal_pytorch_eval_output(network_server: Server, name: str) -> None:
    feeds = example_inputs(NETWORKS[name], 5, seed=11)
    answered = infer(network_server, name, feeds)
    expected = reference(name, feeds)
    assert set(answered) == set(expected)
    for out, value in expected.items():
        assert np.max(np.abs(answered[out] - value)) < 1e-5, out


@pytest.mark.parametrize("name", ["resnet_bn", "two_inputs", "norms"])
def test_a_sample_is_bitwise_equal_alone_and_in_batches(network_server: Server, name: str) -> None:
    feeds = example_inputs(NETWORKS[name], 7, seed=12)
    together = infer(network_server, name, feeds)
    for i in (0, 3, 6):
        alone = infer(network_server, name, {key: value[i : i + 1] for key, value in feeds.items()})
        pair = infer(network_server, name, {key: value[[i, (i + 1) % 7]] for key, value in feeds.items()})
        for out, value in alone.items():
            assert np.array_equal(value[0], together[out][i]), out
            assert np.array_equal(value[0], pair[out][0]), out


@pytest.mark.parametrize("name", ["resnet_bn", "two_inputs"])
def test_concurrent_requests_merged_by_adaptive_batching_answer_as_alone(
    network_server: Server, name: str
) -> None:
    feeds = example_inputs(NETWORKS[name], 12, seed=13)
    samples = [{key: value[i : i + 1] for key, value in feeds.items()} for i in range(12)]
    alone = [infer(network_server, name, sample) for sample in samples]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda sample: infer(network_server, name, sample), samples * 3))
    for i, answer in enumerate(together):
        for out, value in answer.items():
            assert np.array_equal(value, alone[i % 12][out]), (i, out)


def test_metadata_lists_every_input_and_output_from_the_graph(network_server: Server) -> None:
    metadata = httpx.get(f"{network_server.url}/v2/models/two_inputs", timeout=10).json()
    inputs = {tensor["name"]: tensor for tensor in metadata["inputs"]}
    outputs = {tensor["name"]: tensor for tensor in metadata["outputs"]}
    assert set(inputs) == {"image", "tokens"}
    assert set(outputs) == {"scores", "features"}
    assert inputs["image"]["datatype"] == "FP32"
    assert inputs["tokens"]["datatype"] == "INT64"
    assert inputs["image"]["shape"][1:] == [3, 8, 8]
    assert inputs["image"]["shape"][0] == -1
    assert outputs["scores"]["shape"][1:] == [3]
    norms = httpx.get(f"{network_server.url}/v2/models/norms", timeout=10).json()
    assert norms["inputs"][0]["shape"] == [-1, 3, -1, -1]  # height and width left dynamic


@pytest.mark.parametrize(
    ("name", "reason"),
    # The session or the check may be the first to refuse a file that is not ONNX: either says so.
    [
        ("not_onnx", r"not an ONNX model|protobuf parsing failed"),
        ("missing_op", r"com\.example\.missing"),
        ("train_mode", r"inference_mode: .*training_mode=1"),
    ],
)
def test_a_bad_model_is_not_ready_with_its_reason_and_the_others_serve(
    network_server: Server, name: str, reason: str
) -> None:
    ready = httpx.get(f"{network_server.url}/v2/models/{name}/ready", timeout=10)
    assert ready.status_code == 503
    assert re.search(reason, ready.json()["reason"]), ready.json()
    index = httpx.post(f"{network_server.url}/v2/repository/index", json={}, timeout=10).json()
    entry = next(item for item in index if item["name"] == name)
    assert entry["state"] != "READY"
    assert re.search(reason, entry["reason"]), entry
    assert httpx.get(f"{network_server.url}/v2/health/ready", timeout=10).status_code == 200
    assert httpx.get(f"{network_server.url}/v2/models/mlp_bn1d/ready", timeout=10).status_code == 200


def test_fixture_directory_is_the_one_served() -> None:
    assert all((OUT / f"{name}.onnx").is_file() for name in SERVED)
    assert Path(OUT).name == "networks"
