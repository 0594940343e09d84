"""Real networks (tests/data/networks) served on the CUDA execution provider: verified at load on CUDA,
answers within float32 rounding of onnxruntime on the CPU, and a sample bitwise the same alone and in
batches. Skipped where onnxruntime-gpu or a CUDA device is missing."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from bn_export.providers import CPU
from service.runtime import CUDA, cuda_usable
from tests.fixtures.make_networks import NETWORKS, OUT, example_inputs
from tests.service.conftest import Server, start_server, stop_server
from tests.service.test_real_networks import SERVED, infer

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def cuda_network_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    usable, reason = cuda_usable()
    if not usable:
        pytest.skip(f"CUDA is not usable here: {reason}")
    root = tmp_path_factory.mktemp("cuda-networks")
    for name in SERVED:
        (root / name / "1").mkdir(parents=True)
        shutil.copy(OUT / f"{name}.onnx", root / name / "1" / "model.onnx")
    running = start_server("--model-repository", str(root), "--device", "cuda", timeout=300.0)
    try:
        yield running
    finally:
        stop_server(running)


@pytest.mark.parametrize("name", SERVED)
def test_network_is_verified_and_served_on_cuda(cuda_network_server: Server, name: str) -> None:
    metadata = httpx.get(f"{cuda_network_server.url}/v2/models/{name}", timeout=30).json()
    assert metadata["parameters"]["state"] == "READY", metadata["parameters"].get("reason")
    assert CUDA in metadata["parameters"]["providers"]


@pytest.mark.parametrize("name", SERVED)
def test_cuda_answers_equal_the_cpu_within_float32_rounding(cuda_network_server: Server, name: str) -> None:
    feeds: dict[str, Any] = example_inputs(NETWORKS[name], 5, seed=21)
    answered = infer(cuda_network_server, name, feeds)
    session = ort.InferenceSession(str(OUT / f"{name}.onnx"), providers=[CPU])
    expected = dict(zip(NETWORKS[name].outputs, session.run(None, feeds), strict=True))
    for out, value in expected.items():
        np.testing.assert_allclose(answered[out], value, rtol=1e-4, atol=1e-5, err_msg=out)


@pytest.mark.parametrize("name", SERVED)
def test_cuda_sample_is_bitwise_equal_alone_and_in_batches(cuda_network_server: Server, name: str) -> None:
    feeds: dict[str, Any] = example_inputs(NETWORKS[name], 33, seed=22)
    together = infer(cuda_network_server, name, feeds)
    for i in (0, 17, 32):
        alone = infer(cuda_network_server, name, {key: value[i : i + 1] for key, value in feeds.items()})
        for out, value in alone.items():
            assert value[0].tobytes() == together[out][i].tobytes(), (out, i)
