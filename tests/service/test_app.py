"""The V2 REST endpoints in-process (httpx ASGI transport): protocol bodies, every error's status and body."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import InProcess

DATA = Path(__file__).parents[1] / "data"
INFER = "/v2/models/frozen/infer"


def body(rows: list[list[float]], **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [{"name": "input", "shape": [len(rows), len(rows[0])], "datatype": "FP32", "data": rows}],
        **extra,
    }


def outputs(response: Any) -> dict[str, np.ndarray]:
    document = response.json()
    return {
        o["name"]: np.asarray(o["data"], dtype=np.float32).reshape(o["shape"]) for o in document["outputs"]
    }


def test_server_metadata_names_the_binary_extension(client: Any) -> None:
    response = client.get("/v2")
    assert response.status_code == 200
    document = response.json()
    assert document["name"] == "frozen-bn"
    assert "binary_tensor_data" in document["extensions"]


def test_live_and_ready_after_loading(client: Any) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}


def test_model_metadata_lists_dynamic_batch_as_minus_one_and_providers(client: Any) -> None:
    document = client.get("/v2/models/frozen").json()
    assert document["name"] == "frozen"
    assert document["versions"] == ["1", "2"]
    assert document["platform"] == "onnxruntime_onnx"
    assert document["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert document["outputs"] == [
        {"name": "output", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "logits", "datatype": "FP32", "shape": [-1, 3]},
    ]
    parameters = document["parameters"]
    assert parameters["version"] == "2"
    assert parameters["state"] == "READY"
    assert parameters["providers"] == ["CPUExecutionProvider"]
    assert parameters["verification"]["passed"] is True


def test_every_version_is_addressable_and_the_highest_is_the_default(client: Any, repository: Any) -> None:
    x = [[0.5, -1.0, 2.0, 0.25]]
    for version, params in repository.params.items():
        got = outputs(client.post(f"/v2/models/frozen/versions/{version}/infer", json=body(x)))["output"]
        np.testing.assert_allclose(got, params.output(np.float32(x)), rtol=1e-6, atol=1e-6)
        assert client.get(f"/v2/models/frozen/versions/{version}/ready").json()["ready"] is True
    default = client.post(INFER, json=body(x)).json()
    assert default["model_version"] == "2"


def test_outputs_equal_the_float64_formula_within_float32_rounding(client: Any, repository: Any) -> None:
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    response = client.post(INFER, json=body(x.tolist(), id="req-1"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    assert document["id"] == "req-1"
    assert (document["model_name"], document["model_version"]) == ("frozen", "2")
    got = outputs(response)
    params = repository.params[2]
    u = 2.0**-24
    for name, reference in (("output", params.output(x)), ("logits", params.logits(x))):
        magnitude = np.abs(reference) + 1.0
        assert np.all(np.abs(got[name] - reference) <= 64 * u * magnitude), name


def test_flat_and_nested_data_give_the_same_result(client: Any) -> None:
    x = [[0.5, -1.0, 2.0, 0.25], [1.0, 2.0, 3.0, 4.0]]
    flat = {
        "inputs": [
            {"name": "input", "shape": [2, 4], "datatype": "FP32", "data": [v for row in x for v in row]}
        ]
    }
    assert client.post(INFER, json=flat).json() == client.post(INFER, json=body(x)).json()


def test_requested_outputs_only_and_in_order(client: Any) -> None:
    response = client.post(INFER, json=body([[1.0, 2.0, 3.0, 4.0]], outputs=[{"name": "logits"}]))
    assert [o["name"] for o in response.json()["outputs"]] == ["logits"]


@pytest.mark.parametrize(
    ("datatype", "values"),
    [
        ("INT8", [-3, 0, 1, 127]),
        ("UINT16", [0, 1, 2, 65535]),
        ("INT32", [-(2**24), 0, 1, 2**24]),
        ("INT64", [5, -5, 7, 2**24]),
        ("UINT8", [0, 255, 3, 4]),
        ("FP16", [0.5, -1.5, 2.0, 1024.0]),
        ("FP64", [0.5, -0.25, 3.0, 1e3]),
        ("BOOL", [True, False, True, True]),
    ],
)
def test_lossless_datatypes_are_converted_to_the_models_fp32(
    client: Any, datatype: str, values: list[Any]
) -> None:
    request = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": datatype, "data": values}]}
    response = client.post(INFER, json=request)
    assert response.status_code == 200, response.text
    expected = outputs(client.post(INFER, json=body([[float(v) for v in values]])))["output"]
    np.testing.assert_array_equal(outputs(response)["output"], expected)


def test_golden_request_gives_golden_response(client: Any) -> None:
    request = json.loads((DATA / "v2_infer_request.json").read_text())
    golden = json.loads((DATA / "v2_infer_response.json").read_text())
    document = client.post("/v2/models/frozen/versions/1/infer", json=request).json()
    for key in ("id", "model_name", "model_version"):
        assert document[key] == golden[key]
    for got, want in zip(document["outputs"], golden["outputs"], strict=True):
        assert {k: got[k] for k in ("name", "datatype", "shape")} == {
            k: want[k] for k in ("name", "datatype", "shape")
        }
        np.testing.assert_allclose(got["data"], want["data"], rtol=1e-6)


def test_binary_request_and_binary_output_match_json(client: Any) -> None:
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [3, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}, {"name": "logits"}],
        }
    )
    response = client.post(
        INFER,
        content=header + x.tobytes(),
        headers={
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        },
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers["inference-header-content-length"])
    document = orjson.loads(response.content[:length])
    first, second = document["outputs"]
    assert first["parameters"] == {"binary_data_size": 3 * 4 * 4}
    binary = np.frombuffer(response.content[length:], dtype="<f4").reshape(first["shape"])
    reference = outputs(client.post(INFER, json=body(x.tolist())))
    np.testing.assert_array_equal(binary, reference["output"])
    np.testing.assert_array_equal(np.float32(second["data"]).reshape(3, 3), reference["logits"])


def error(response: Any, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    document = response.json()
    assert set(document) == {"error"}, document
    for word in words:
        assert word.lower() in document["error"].lower(), (word, document["error"])


ROW = [[0.5, -1.0, 2.0, 0.25]]


@pytest.mark.parametrize(
    ("request_body", "words"),
    [
        (b"{not json", ("not valid JSON",)),
        (b"[1, 2]", ("JSON object",)),
        (b'{"inputs": []}', ("inputs",)),
        (b'{"inputs": [{"name": "input", "shape": "1x4", "datatype": "FP32", "data": [1]}]}', ("shape",)),
        (orjson.dumps(body([[1.0, 2.0, 3.0]])), ("3 channels", "expects 4")),
        (orjson.dumps(body([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])), ("8 channels",)),
        (
            orjson.dumps(
                {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": [1.0] * 7}]}
            ),
            ("8 elements", "7"),
        ),
        (
            orjson.dumps(
                {
                    "inputs": [
                        {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [[1, 2], [3, 4, 5]]}
                    ]
                }
            ),
            ("ragged",),
        ),
        (
            orjson.dumps(
                {"inputs": [{"name": "input", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
            ),
            ("rank 2",),
        ),
        (
            orjson.dumps({"inputs": [{"name": "pixels", "shape": [1, 4], "datatype": "FP32", "data": ROW}]}),
            ("unknown input 'pixels'",),
        ),
        (
            orjson.dumps(
                {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ROW}] * 2}
            ),
            ("more than once",),
        ),
        (
            orjson.dumps(
                {
                    "inputs": [
                        {"name": "input", "shape": [1, 4], "datatype": "BYTES", "data": ["a", "b", "c", "d"]}
                    ]
                }
            ),
            ("BYTES",),
        ),
        (
            orjson.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP8", "data": ROW}]}),
            ("unknown datatype",),
        ),
        (
            orjson.dumps(
                {
                    "inputs": [
                        {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ["1", "2", "3", "4"]}
                    ]
                }
            ),
            ("must be numbers",),
        ),
        (
            orjson.dumps(
                {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "INT32", "data": [1.5, 2, 3, 4]}]}
            ),
            ("must be integers",),
        ),
        (
            orjson.dumps(
                {
                    "inputs": [
                        {"name": "input", "shape": [1, 4], "datatype": "INT32", "data": [2**24 + 1, 0, 0, 0]}
                    ]
                }
            ),
            ("16777217", "FP32"),
        ),
        (
            orjson.dumps(
                {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP64", "data": [0.1, 0, 0, 0]}]}
            ),
            ("0.1", "FP32"),
        ),
        (
            orjson.dumps(
                {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "INT8", "data": [300, 0, 0, 0]}]}
            ),
            ("INT8",),
        ),
        (
            orjson.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32"}]}),
            ("neither data",),
        ),
        (
            orjson.dumps(
                {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1e39, 0, 0, 0]}]}
            ),
            ("non-finite",),
        ),
        (
            orjson.dumps(
                {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP64", "data": [None] * 4}]}
            ),
            ("must be numbers",),
        ),
        (
            orjson.dumps({"inputs": [{"name": "input", "shape": [-1, 4], "datatype": "FP32", "data": ROW}]}),
            ("negative",),
        ),
        (orjson.dumps(body(ROW, outputs=[{"name": "probabilities"}])), ("unknown output",)),
        (orjson.dumps(body(ROW, parameters={"binary_data_output": "yes"})), ("binary_data_output",)),
    ],
)
def test_client_mistakes_are_400_with_a_reason(
    client: Any, request_body: bytes, words: tuple[str, ...]
) -> None:
    error(client.post(INFER, content=request_body, headers={"Content-Type": "application/json"}), 400, *words)


def test_nan_is_refused_by_default_and_names_its_index(client: Any) -> None:
    request = {
        "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]
    }
    payload = orjson.dumps(request).replace(b"4.0", b"NaN")
    error(client.post(INFER, content=payload), 400, "not valid JSON")  # JSON has no NaN literal
    x = np.array([[1.0, np.nan, 3.0, 4.0]], dtype=np.float32)
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}
            ]
        }
    )
    response = client.post(
        INFER, content=header + x.tobytes(), headers={"Inference-Header-Content-Length": str(len(header))}
    )
    error(response, 400, "nan", "[0, 1]", "allow_non_finite")


@pytest.mark.parametrize(
    ("headers", "content", "status", "words"),
    [
        ({"Inference-Header-Content-Length": "500"}, b"{}", 400, ("body has 2 bytes",)),
        ({"Inference-Header-Content-Length": "abc"}, b"{}", 400, ("non-negative integer",)),
        (
            {"Content-Type": "application/octet-stream"},
            b"\x00\x01",
            400,
            ("Inference-Header-Content-Length",),
        ),
        ({"Content-Type": "text/plain"}, b"{}", 415, ("text/plain",)),
        (
            {"Content-Type": "application/json", "Inference-Header-Content-Length": "2"},
            b"{}",
            415,
            ("octet-stream",),
        ),
        ({"Content-Encoding": "gzip"}, b"{}", 415, ("gzip",)),
    ],
)
def test_framing_and_media_type_mistakes(
    client: Any, headers: dict[str, str], content: bytes, status: int, words: tuple[str, ...]
) -> None:
    error(client.post(INFER, content=content, headers=headers), status, *words)


def test_binary_sizes_must_account_for_the_body(client: Any) -> None:
    x = np.zeros((1, 4), dtype=np.float32)
    for size, extra, words in (
        (8, b"", ("needs 16 bytes",)),
        (16, b"\x00", ("1 bytes after",)),
        (32, b"", ("runs past",)),
    ):
        header = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 4],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": size},
                    }
                ]
            }
        )
        response = client.post(
            INFER,
            content=header + x.tobytes() + extra,
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
        error(response, 400, *words)


def test_unknown_model_or_version_is_404(client: Any) -> None:
    error(client.post("/v2/models/nope/infer", json=body(ROW)), 404, "no model named 'nope'")
    error(client.get("/v2/models/nope"), 404, "nope")
    error(client.get("/v2/models/frozen/versions/7"), 404, "no version '7'", "1, 2")
    error(client.get("/v2/models/frozen/versions/..%2F..%2Fetc/ready"), 404)
    error(client.get("/v2/models/frozen/versions/01"), 404, "no version")
    error(client.get("/v2/nothing/here"), 404)


def test_wrong_method_is_405_with_the_v2_body(client: Any) -> None:
    error(client.post("/v2/health/live"), 405, "method not allowed")
    error(client.get(INFER), 405)


def test_body_over_the_limit_is_413_by_content_length_and_while_streaming(client: Any) -> None:
    big = b"x" * ((1 << 20) + 1)
    error(client.post(INFER, content=big), 413, "limit")

    async def chunks() -> Any:  # no Content-Length: the limit is enforced while reading
        for _ in range(20):
            yield b" " * 65536

    error(client.post(INFER, content=chunks()), 413, "exceeds")


def test_model_normalizing_with_batch_statistics_is_not_ready_with_its_reason(client: Any) -> None:
    response = client.get("/v2/models/batchstat/ready")
    assert response.status_code == 503
    assert response.json()["ready"] is False
    assert "batch axis" in response.json()["reason"]
    metadata = client.get("/v2/models/batchstat").json()
    assert metadata["parameters"]["state"] == "UNAVAILABLE"
    assert "frozen-statistics" in metadata["parameters"]["reason"]
    request = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ROW}]}
    error(client.post("/v2/models/batchstat/infer", json=request), 503, "not ready", "batch axis")


def test_corrupt_model_is_not_ready_and_the_others_serve(client: Any) -> None:
    response = client.get("/v2/models/corrupt/versions/1/ready")
    assert response.status_code == 503
    assert "model 'corrupt' version 1 is not an ONNX model" in response.json()["reason"]
    assert client.get("/v2/models/corrupt").json()["inputs"] == []
    assert client.get("/v2/health/ready").status_code == 200
    assert client.post(INFER, json=body(ROW)).status_code == 200


def test_non_finite_inputs_are_accepted_when_configured(serve_in_process: Any) -> None:
    server = serve_in_process(allow_non_finite=True)
    try:
        x = np.array([[np.inf, 0.0, 1.0, 2.0]], dtype=np.float32)
        header = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 4],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 16},
                    }
                ]
            }
        )
        response = server.post(
            INFER, content=header + x.tobytes(), headers={"Inference-Header-Content-Length": str(len(header))}
        )
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["data"][0] is None  # JSON has no infinity: null
    finally:
        server.close()


def test_a_server_whose_only_model_is_refused_is_not_ready_and_says_why(repository: Any) -> None:
    settings = Settings(
        model=repository.root / "batchstat" / "1" / "model.onnx",
        device="cpu",
        intra_op_threads=1,
        inference_threads=1,
        grpc_port=0,
    )
    server = InProcess(create_app(settings))
    try:
        deadline = time.monotonic() + 60
        while (body := server.get("/v2/health/ready").json()).get("reason") == "models are still loading":
            assert time.monotonic() < deadline, "loading never finished"
            time.sleep(0.02)
        response = server.get("/v2/health/ready")
        assert response.status_code == 503
        assert body["ready"] is False
        assert "no model is ready" in body["reason"]
        assert "batch" in body["reason"]  # the refusal's own reason is passed on
        assert server.get("/v2/health/live").status_code == 200
    finally:
        server.close()


def test_the_heap_alive_after_loading_is_frozen_out_of_collections(serve_in_process: Any) -> None:
    gc.unfreeze()  # whatever an earlier app in this process froze
    assert gc.get_freeze_count() == 0
    server = serve_in_process()
    try:
        # The freeze follows the end of loading on the event loop, a moment after readiness may show.
        deadline = time.monotonic() + 10
        while gc.get_freeze_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        # Startup objects (modules, routes, sessions) no longer cost every full collection a walk.
        assert gc.get_freeze_count() > 10_000
        assert server.post(INFER, json=body([[1.0, 2.0, 3.0, 4.0]])).status_code == 200
    finally:
        server.close()


@pytest.mark.parametrize(("grpc_port", "imported"), [(0, False), (18599, True)])
def test_grpcio_is_imported_only_when_grpc_is_served(repository: Any, grpc_port: int, imported: bool) -> None:
    # A fresh interpreter: this one has imported grpc for other tests. The app is built, not started.
    script = (
        "import sys\n"
        "from service.app import create_app\n"
        "from service.settings import Settings\n"
        f"root = {str(repository.root)!r}\n"
        f"create_app(Settings(model_repository=root, device='cpu', grpc_port={grpc_port}))\n"
        "print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ("'grpc'" in done.stdout) is imported
