"""The pure-ASGI front: the one infer route and its error answers, request ids, access records, the schema
that documents the route, and a root_path."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from service.app import create_app
from service.front import INFER_PATH, ServingApp
from tests.service import conftest
from tests.service.conftest import InProcess, Repository

X = np.array([[0.5, -1.0, 2.0, 0.25], [1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
JSON = {"Content-Type": "application/json"}


def json_body(x: np.ndarray = X, **extra: Any) -> bytes:
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return orjson.dumps({"inputs": [tensor], **extra})


def binary_body(x: np.ndarray = X) -> tuple[bytes, dict[str, str]]:
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "input", "shape": list(x.shape), "datatype": "FP32",
                 "parameters": {"binary_data_size": x.nbytes}}
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}, {"name": "output"}],
        }
    )  # fmt: skip
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


BINARY, BINARY_HEADERS = binary_body()
# (case, path, body, headers, status): every outcome the infer route has, on both of its paths.
CASES = [
    ("json", "/v2/models/frozen/infer", json_body(), JSON, 200),
    ("version", "/v2/models/frozen/versions/1/infer", json_body(id="r-1"), JSON, 200),
    ("binary", "/v2/models/frozen/infer", BINARY, BINARY_HEADERS, 200),
    ("not_json", "/v2/models/frozen/infer", b"{not json", JSON, 400),
    ("wrong_shape", "/v2/models/frozen/infer", json_body(X[:, :3]), JSON, 400),
    ("unknown_model", "/v2/models/nope/infer", json_body(), JSON, 404),
    ("unknown_version", "/v2/models/frozen/versions/9/infer", json_body(), JSON, 404),
    ("too_large", "/v2/models/frozen/infer", b" " * ((1 << 20) + 1), JSON, 413),
    ("media_type", "/v2/models/frozen/infer", json_body(), {"Content-Type": "text/plain"}, 415),
    ("not_ready", "/v2/models/batchstat/infer", json_body(), JSON, 503),
]
COMPARED_HEADERS = ("content-type", "content-length", "inference-header-content-length", "retry-after")


@pytest.fixture(scope="module")
def app_and_server(repository: Repository) -> Iterator[tuple[ServingApp, InProcess]]:
    app = create_app(conftest.test_settings(repository.root, max_request_bytes=1 << 20))
    assert isinstance(app, ServingApp)
    server = InProcess(app)
    try:
        server.wait_ready()
        yield app, server
    finally:
        server.close()


@pytest.mark.parametrize(
    ("path", "body", "headers", "status"), [pytest.param(*case[1:], id=case[0]) for case in CASES]
)
def test_every_outcome_of_infer_has_its_status_and_a_v2_body(
    app_and_server: tuple[ServingApp, InProcess], path: str, body: bytes, headers: dict[str, str], status: int
) -> None:
    _, server = app_and_server
    response = server.post(path, content=body, headers={**headers, "X-Request-ID": "outcome"})
    assert response.status_code == status, response.text
    assert response.headers["x-request-id"] == "outcome"
    assert int(response.headers["content-length"]) == len(response.content)
    if status != 200:
        assert response.headers["content-type"] == "application/json"
        assert set(response.json()) == {"error"}
        assert "/tmp" not in response.text  # no path on the server reaches a client


def test_binary_outputs_from_the_front_match_the_json_ones(app_and_server: tuple[ServingApp, Any]) -> None:
    _, server = app_and_server
    response = server.post("/v2/models/frozen/infer", content=BINARY, headers=BINARY_HEADERS)
    length = int(response.headers["inference-header-content-length"])
    logits = orjson.loads(response.content[:length])["outputs"][0]
    binary = np.frombuffer(response.content[length:], dtype="<f4").reshape(logits["shape"])
    reference = server.post("/v2/models/frozen/infer", content=json_body(), headers=JSON).json()
    as_json = next(o for o in reference["outputs"] if o["name"] == "logits")
    np.testing.assert_array_equal(binary, np.float32(as_json["data"]).reshape(as_json["shape"]))


def test_the_infer_pattern_matches_the_routes_fastapi_declares(
    app_and_server: tuple[ServingApp, InProcess],
) -> None:
    app, _ = app_and_server
    schema = app.openapi()
    for path in ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer"):
        assert "post" in schema["paths"][path]  # still documented: clients and the fuzz test read it
    for path, groups in (("/v2/models/m/infer", ("m", None)), ("/v2/models/m/versions/3/infer", ("m", "3"))):
        match = INFER_PATH.fullmatch(path)
        assert match is not None, path
        assert match.groups() == groups
    for other in ("/v2/models/m/infer/", "/v2/models/a/b/infer", "/v2/models//infer", "/v2/models/m/ready"):
        assert INFER_PATH.fullmatch(other) is None, other


def test_every_request_leaves_one_access_record_with_its_status_and_id(
    app_and_server: tuple[ServingApp, InProcess], caplog: pytest.LogCaptureFixture
) -> None:
    _, server = app_and_server
    sent = [
        ("POST", "/v2/models/frozen/infer", json_body(), "fast-ok", 200),
        ("POST", "/v2/models/frozen/infer", b"[]", "fast-bad", 400),
        ("GET", "/v2/health/live", b"", "framework-ok", 200),
        ("GET", "/v2/nothing/here", b"", "framework-missing", 404),
    ]
    with caplog.at_level(logging.INFO, logger="bn_serve.access"):
        for method, path, body, rid, status in sent:
            response = server.request(method, path, content=body, headers={**JSON, "X-Request-ID": rid})
            assert response.status_code == status
            assert response.headers["x-request-id"] == rid
    records = [r for r in caplog.records if r.name == "bn_serve.access"]
    got = [(r.method, r.path, r.request_id, r.status) for r in records]  # type: ignore[attr-defined]
    assert got == [(method, path, rid, status) for method, path, _, rid, status in sent]
    assert all(r.duration_ms >= 0 for r in records)  # type: ignore[attr-defined]


def test_behind_a_root_path_the_front_answers_infer_the_same(
    app_and_server: tuple[ServingApp, InProcess],
) -> None:
    app, server = app_and_server
    prefixed = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, root_path="/api"), base_url="http://test"
    )
    try:
        response = server._call(
            prefixed.post("/api/v2/models/frozen/infer", content=json_body(), headers=JSON)
        )
    finally:
        server._call(prefixed.aclose())
    assert response.status_code == 200, response.text
    assert len(response.headers["x-request-id"]) == 32
    direct = server.post("/v2/models/frozen/infer", content=json_body(), headers=JSON)
    assert response.content == direct.content
