"""A real `bn-serve` process on 127.0.0.1: Triton's HTTP client, batch invariance over the wire, SIGTERM."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as triton

from tests.service.conftest import binary_infer_body, binary_outputs

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("binary", [False, True])
def test_triton_client_works_unchanged(server: Any, repository: Any, binary: bool) -> None:
    client = triton.InferenceServerClient(server.host_port, network_timeout=30)
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("frozen")
        assert not client.is_model_ready("batchstat")
        metadata = client.get_model_metadata("frozen")
        assert metadata["inputs"][0]["shape"] == [-1, 4]
        x = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        requested = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("output", "logits")]
        result = client.infer("frozen", [tensor], outputs=requested, model_version="1")
        params = repository.params[1]
        np.testing.assert_allclose(result.as_numpy("output"), params.output(x), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.as_numpy("logits"), params.logits(x), rtol=1e-5, atol=1e-5)
    finally:
        client.close()


def test_a_sample_alone_equals_itself_inside_a_batch_bitwise_over_http(server: Any) -> None:
    import httpx

    rng = np.random.default_rng(4)
    batch = rng.standard_normal((16, 4)).astype(np.float32) * np.float32(10)
    batch[5] = np.float32(1e6)  # a wild companion must not move anyone's output

    def infer(x: np.ndarray) -> dict[str, np.ndarray]:
        body, header_length = binary_infer_body(x)
        response = httpx.post(
            f"{server.url}/v2/models/frozen/infer",
            content=body,
            headers={"Inference-Header-Content-Length": str(header_length)},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        return binary_outputs(response)

    together = infer(batch)
    for i in (0, 7, 15):
        alone = infer(batch[i : i + 1])
        for name in ("output", "logits"):
            assert together[name][i].tobytes() == alone[name][0].tobytes(), (name, i)


def test_sigterm_finishes_the_request_in_flight_then_exits_0(repository: Any, launch: Any) -> None:
    server = launch("--model", str(repository.root / "frozen" / "2" / "model.onnx"), "--device", "cpu")
    payload = orjson.dumps(
        {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}
    )
    host, port = server.host_port.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (
            f"POST /v2/models/model/infer HTTP/1.1\r\nHost: {server.host_port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        sock.sendall(head.encode() + payload[:10])  # the request is now in flight
        time.sleep(0.3)
        server.process.terminate()
        time.sleep(0.3)
        assert server.process.poll() is None, "the server exited with a request in flight"
        sock.sendall(payload[10:])
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 200"), response[:200]
    assert b'"model_name":"model"' in response
    server.process.wait(20)
    assert server.process.returncode == 0


def test_device_cuda_refuses_to_start_without_cuda(repository: Any, tmp_path: Path) -> None:
    from service.runtime import cuda_usable

    if cuda_usable()[0]:
        pytest.skip("CUDA is usable here")
    model = repository.root / "frozen" / "1" / "model.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "--model", str(model), "--device", "cuda", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "CUDA is not usable" in result.stderr
