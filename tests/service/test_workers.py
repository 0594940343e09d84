"""`bn-serve --workers 2` as real processes: both workers answer correctly; SIGTERM ends them all with 0."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import httpx
import numpy as np
import pytest
from numpy.typing import NDArray

from tests.service.conftest import CHANNELS, Repository, start_server, stop_server

WORKERS = 2
REQUESTS = 240


def worker_of(response: httpx.Response) -> str:
    """The worker that answered: a generated request id starts with its process's random 64-bit prefix."""
    return response.headers["x-request-id"][:16]


def wait_all_ready(url: str, timeout: float = 60.0, in_a_row: int = 20) -> None:
    """Until `in_a_row` readiness probes on fresh connections answer 200: each worker loads its own models,
    and the first 200 may come from one of them while the other still loads."""
    deadline = time.monotonic() + timeout
    streak = 0
    while streak < in_a_row:
        streak = streak + 1 if httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200 else 0
        if time.monotonic() > deadline:
            raise TimeoutError("not every worker became ready")
        time.sleep(0.01)


@pytest.mark.slow
def test_two_workers_answer_inference_correctly_and_exit_0_on_sigterm(repository: Repository) -> None:
    server = start_server(
        "--model-repository",
        str(repository.root),
        "--device",
        "cpu",
        "--intra-op-threads",
        "1",
        "--inference-threads",
        "1",
        "--workers",
        str(WORKERS),
    )
    try:
        wait_all_ready(server.url)
        rng = np.random.default_rng(21)
        inputs = [
            rng.standard_normal((int(rng.integers(1, 6)), CHANNELS)).astype(np.float32)
            for _ in range(REQUESTS)
        ]

        def call(x: NDArray[np.float32]) -> tuple[str, NDArray[np.float64], Any]:
            # No shared client: every request opens its own connection, which either worker may accept.
            response = httpx.post(
                f"{server.url}/v2/models/frozen/versions/1/infer",
                json={
                    "inputs": [
                        {
                            "name": "input",
                            "shape": list(x.shape),
                            "datatype": "FP32",
                            "data": x.ravel().tolist(),
                        }
                    ]
                },
                timeout=30,
            )
            assert response.status_code == 200, response.text
            outputs = {o["name"]: o for o in response.json()["outputs"]}
            return (
                worker_of(response),
                np.array(outputs["output"]["data"]).reshape(x.shape),
                outputs["output"]["shape"],
            )

        with concurrent.futures.ThreadPoolExecutor(8) as clients:
            answers = list(clients.map(call, inputs))
        for x, (_, output, shape) in zip(inputs, answers, strict=True):
            assert shape == list(x.shape)
            np.testing.assert_allclose(output, repository.params[1].output(x), rtol=1e-6, atol=1e-5)
        workers = {worker for worker, _, _ in answers}
        assert len(workers) == WORKERS, f"{REQUESTS} requests were answered by {len(workers)} worker(s)"
    finally:
        started = time.monotonic()
        status = stop_server(server, timeout=20)
        elapsed = time.monotonic() - started
    assert status == 0
    assert elapsed < 15, f"SIGTERM took {elapsed:.1f} s"
