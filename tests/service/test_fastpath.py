"""The inline fast path: bodies decoded and encoded on the event loop answer as those handled in the pool."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from service.app import INLINE_BODY_BYTES
from service.batching import INLINE_MAX_ELEMENTS
from tests.service.conftest import binary_infer_body

INFER = "/v2/models/frozen/versions/1/infer"


def json_body(x: np.ndarray) -> bytes:
    inputs = [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel()}]
    return orjson.dumps({"inputs": inputs}, option=orjson.OPT_SERIALIZE_NUMPY)


# Rows of 4 floats: a few (inline everywhere), and enough that the body and the run exceed the inline limits.
SMALL, LARGE = 3, max(INLINE_MAX_ELEMENTS // 4, INLINE_BODY_BYTES // 16) + 5


@pytest.mark.parametrize("rows", [SMALL, LARGE])
def test_json_answers_equal_the_float64_formula_on_both_paths(
    client: Any, repository: Any, rows: int
) -> None:
    x = np.random.default_rng(rows).standard_normal((rows, 4)).astype(np.float32)
    body = json_body(x)
    assert (len(body) <= INLINE_BODY_BYTES) == (rows == SMALL)
    response = client.post(INFER, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in orjson.loads(response.content)["outputs"]}
    got = np.asarray(outputs["output"]["data"], dtype=np.float32).reshape(outputs["output"]["shape"])
    np.testing.assert_allclose(got, repository.params[1].output(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [SMALL, LARGE])
def test_binary_answers_are_bitwise_the_same_on_both_paths(client: Any, rows: int) -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((rows, 4)).astype(np.float32)
    body, length = binary_infer_body(x)
    response = client.post(INFER, content=body, headers={"Inference-Header-Content-Length": str(length)})
    assert response.status_code == 200, response.text
    header_length = int(response.headers["inference-header-content-length"])
    raw = response.content[header_length:]
    output = np.frombuffer(raw[: rows * 16], "<f4").reshape(rows, 4)
    # The same samples sent a few at a time (inline path) give the same bits as sent all at once.
    for start in (0, rows // 2, rows - 1):
        part = x[start : start + 1]
        small, small_length = binary_infer_body(part)
        answer = client.post(
            INFER, content=small, headers={"Inference-Header-Content-Length": str(small_length)}
        )
        small_raw = answer.content[int(answer.headers["inference-header-content-length"]) :]
        assert small_raw[:16] == output[start].tobytes()


def test_errors_on_the_inline_path_keep_the_v2_body(client: Any) -> None:
    body = orjson.dumps(
        {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    )
    assert len(body) <= INLINE_BODY_BYTES
    response = client.post(INFER, content=body)
    assert response.status_code == 400
    assert set(response.json()) == {"error"}
    assert "3 channels" in response.json()["error"]
