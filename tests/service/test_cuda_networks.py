"""Real networks (tests/data/networks) served on the CUDA execution provider: verified at load on CUDA,
answers within float32 rounding of onnxruntime on the CPU, requests merged only where that is bitwise
exact (cuBLAS and cuDNN pick kernels by batch size), so an answer never depends on the requests it arrived
with. Skipped where onnxruntime-gpu or a CUDA device is missing."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
def test_cuda_merges_requests_only_where_merging_is_bitwise(cuda_network_server: Server, name: str) -> None:
    parameters = httpx.get(f"{cuda_network_server.url}/v2/models/{name}", timeout=30).json()["parameters"]
    check = next(c for c in parameters["verification"]["checks"] if c["name"] == "batch_invariance")
    batching = parameters["batching"]
    if check["figure"] == 0:
        assert batching["max_batch_size"] > 1
        assert batching["note"] is None
    else:
        assert batching["max_batch_size"] == 1
        assert "adaptive batching is off" in batching["note"]


@pytest.mark.parametrize("name", SERVED)
def test_cuda_concurrent_requests_get_the_bits_they_get_alone(cuda_network_server: Server, name: str) -> None:
    feeds: dict[str, Any] = example_inputs(NETWORKS[name], 16, seed=22)
    singles = [{key: value[i : i + 1] for key, value in feeds.items()} for i in range(16)]
    alone = [infer(cuda_network_server, name, one) for one in singles]
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(lambda one: infer(cuda_network_server, name, one), singles))
    for first, second in zip(alone, concurrent, strict=True):
        for out, value in first.items():
            assert value.tobytes() == second[out].tobytes(), out


@pytest.mark.parametrize("name", SERVED)
def test_cuda_batch_of_a_client_equals_its_samples_alone_within_rounding(
    cuda_network_server: Server, name: str
) -> None:
    feeds: dict[str, Any] = example_inputs(NETWORKS[name], 33, seed=23)
    together = infer(cuda_network_server, name, feeds)
    for i in (0, 17, 32):
        alone = infer(cuda_network_server, name, {key: value[i : i + 1] for key, value in feeds.items()})
        for out, value in alone.items():
            np.testing.assert_allclose(value[0], together[out][i], rtol=1e-5, atol=1e-6, err_msg=out)
