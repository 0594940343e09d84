"""Resource limits: tensor elements per request (413), request deadline (504), bounded queue (503 +
Retry-After), each with a V2 error body, and the server serving normally afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
import pytest

from service.admission import AdmissionGate, Deadline
from service.errors import Overloaded, RequestTimeout

INFER = "/v2/models/frozen/infer"
JSON = {"Content-Type": "application/json"}


def body(rows: int) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": [rows, 4], "datatype": "FP32", "data": [0.5] * rows * 4}]}


def test_requests_over_max_request_elements_get_413_and_smaller_ones_pass(serve_in_process: Any) -> None:
    server = serve_in_process(max_request_elements=40)
    try:
        assert server.post(INFER, json=body(10)).status_code == 200
        response = server.post(INFER, json=body(11))
        assert response.status_code == 413
        assert "max_request_elements" in response.json()["error"]
        assert server.post(INFER, json=body(10)).status_code == 200
    finally:
        server.close()


async def _stalled_body(release: asyncio.Event, payload: bytes) -> AsyncIterator[bytes]:
    """A body whose first bytes arrive at once and the rest only when `release` is set."""
    yield payload[:10]
    await release.wait()
    yield payload[10:]


def test_a_request_past_its_deadline_gets_504_with_the_reason(serve_in_process: Any) -> None:
    server = serve_in_process(request_timeout_s=0.3)
    try:
        payload = orjson.dumps(body(1))

        async def scenario() -> Any:
            release = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.call_later(2.0, release.set)  # the client would finish sending long after the deadline
            return await server._client.post(
                INFER, content=_stalled_body(release, payload), headers={"Content-Type": "application/json"}
            )

        response = server._call(scenario())
        assert response.status_code == 504
        assert "request_timeout_s" in response.json()["error"]
        assert server.post(INFER, json=body(2)).status_code == 200
    finally:
        server.close()


def _held_and_other(server: Any, payload: bytes) -> tuple[Any, Any]:
    """A request whose body stalls until another request (sent meanwhile) is answered: both answers."""

    async def scenario() -> tuple[Any, Any]:
        release = asyncio.Event()
        held = asyncio.ensure_future(
            server._client.post(
                INFER, content=_stalled_body(release, payload), headers={"Content-Type": "application/json"}
            )
        )
        await asyncio.sleep(0.2)  # the first request waits for the rest of its body
        other = await server._client.post(INFER, json=body(1))
        release.set()
        return other, await held

    result: tuple[Any, Any] = server._call(scenario())
    return result


def test_a_body_still_arriving_holds_no_inference_place(serve_in_process: Any) -> None:
    # One inference thread and no queue: one request admitted at a time; the stalled one is not admitted.
    server = serve_in_process(inference_threads=1, max_queued_requests=0)
    try:
        other, held = _held_and_other(server, orjson.dumps(body(1)))
        assert other.status_code == 200, other.text
        assert held.status_code == 200
    finally:
        server.close()


def test_full_uploads_answer_503_with_retry_after_and_recover(serve_in_process: Any) -> None:
    server = serve_in_process(max_uploading_requests=1)
    try:
        refused, held = _held_and_other(server, orjson.dumps(body(1)))
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert "still sending their body" in refused.json()["error"]
        assert held.status_code == 200
        assert server.post(INFER, json=body(1)).status_code == 200  # the place was given back
    finally:
        server.close()


def test_the_gate_admits_up_to_capacity_and_frees_places_on_leave() -> None:
    gate = AdmissionGate(2, retry_after_s=3)
    gate.enter()
    gate.enter()
    with pytest.raises(Overloaded) as refused:
        gate.enter()
    assert refused.value.retry_after_s == 3
    gate.leave()
    gate.enter()
    with pytest.raises(ValueError, match="capacity"):
        AdmissionGate(0)


def test_a_deadline_does_not_cancel_the_work_it_stops_waiting_for() -> None:
    async def scenario() -> tuple[bool, int]:
        loop = asyncio.get_running_loop()
        work: asyncio.Future[int] = loop.create_future()
        loop.call_later(0.2, work.set_result, 7)
        timed_out = False
        try:
            await Deadline(0.05).wait(work)
        except RequestTimeout:
            timed_out = True
        return timed_out, await work

    assert asyncio.run(scenario()) == (True, 7)


@pytest.mark.slow
def test_memory_stays_bounded_when_every_request_is_over_a_limit(serve_in_process: Any) -> None:
    """Many refused requests in a row (too many elements, too large a body) leave no growth behind."""
    import resource

    server = serve_in_process(max_request_elements=1000, max_request_bytes=1 << 20)
    try:
        big = np.zeros((300, 4), np.float32)
        tensor = {
            "name": "input",
            "shape": [300, 4],
            "datatype": "FP32",
            "parameters": {"binary_data_size": 4800},
        }
        header = orjson.dumps({"inputs": [tensor]})
        headers = {"Inference-Header-Content-Length": str(len(header))}

        def burst() -> None:
            for _ in range(200):
                assert server.post(INFER, content=header + big.tobytes(), headers=headers).status_code == 413
                assert server.post(INFER, content=b" " * (2 << 20)).status_code == 413

        burst()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        burst()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert after - before < 64 * 1024, (before, after)  # KiB: the peak did not climb by 64 MiB
    finally:
        server.close()
