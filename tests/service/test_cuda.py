"""bn-serve on the CUDA execution provider: skipped where onnxruntime-gpu or a CUDA device is missing."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

from service.runtime import cuda_usable

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def cuda_server(repository: Any) -> Any:
    usable, reason = cuda_usable()
    if not usable:
        pytest.skip(f"CUDA is not usable here: {reason}")
    from tests.service.conftest import start_server, stop_server

    running = start_server("--model-repository", str(repository.root), "--device", "cuda")
    try:
        yield running
    finally:
        stop_server(running)


def _infer(url: str, x: np.ndarray) -> dict[str, np.ndarray]:
    body = {
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
    }
    response = httpx.post(f"{url}/v2/models/frozen/versions/1/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return {
        o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in response.json()["outputs"]
    }


def test_cuda_model_reports_the_cuda_provider_in_its_metadata(cuda_server: Any) -> None:
    metadata = httpx.get(f"{cuda_server.url}/v2/models/frozen/versions/1", timeout=30).json()
    assert "CUDAExecutionProvider" in str(metadata["parameters"])


def test_cuda_output_equals_the_inference_formula(cuda_server: Any, repository: Any) -> None:
    x = np.random.default_rng(11).standard_normal((64, 4)).astype(np.float32) * np.float32(5)
    outputs = _infer(cuda_server.url, x)
    np.testing.assert_allclose(outputs["output"], repository.params[1].output(x), rtol=1e-5, atol=1e-5)


def test_cuda_output_of_a_sample_alone_equals_its_output_in_a_batch_bitwise(cuda_server: Any) -> None:
    batch = np.random.default_rng(12).standard_normal((33, 4)).astype(np.float32)
    batch[3] = np.float32(1e6)
    together = _infer(cuda_server.url, batch)["output"]
    for i in (0, 3, 32):
        alone = _infer(cuda_server.url, batch[i : i + 1])["output"]
        assert together[i].tobytes() == alone[0].tobytes(), i
