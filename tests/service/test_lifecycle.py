"""Triton's repository extension: atomic reloads, refused versions that change nothing, unload, files on disk.

Each test gets its own repository on disk (model "m", version 1 with statistics A) and rewrites it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from service.app import create_app
from tests.service.conftest import (
    FrozenParams,
    InProcess,
    batch_statistics_model,
    frozen_model,
    frozen_params,
    start_server,
    stop_server,
)
from tests.service.conftest import test_settings as settings_for

A, B = frozen_params(11), frozen_params(12)
X = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
INFER = "/v2/models/m/infer"
BODY = {"inputs": [{"name": "input", "shape": list(X.shape), "datatype": "FP32", "data": X.tolist()}]}


def write(root: Path, name: str, version: int, model: onnx.ModelProto | bytes) -> Path:
    path = root / name / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(model, bytes):
        path.write_bytes(model)
    else:
        onnx.save(model, path)
    return path


@pytest.fixture
def models(tmp_path: Path) -> Path:
    write(tmp_path, "m", 1, frozen_model(A))
    return tmp_path


@pytest.fixture
def serve(models: Path) -> Iterator[Callable[..., InProcess]]:
    started: list[InProcess] = []

    def run(**overrides: Any) -> InProcess:
        server = InProcess(create_app(settings_for(models, **overrides)))
        started.append(server)
        server.wait_ready()
        return server

    yield run
    for server in started:
        server.close()


def output_of(client: Any) -> np.ndarray:
    response = client.post(INFER, json=BODY)
    assert response.status_code == 200, response.text
    (out,) = [o for o in response.json()["outputs"] if o["name"] == "output"]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def serves(client: Any, params: FrozenParams) -> bool:
    return np.allclose(output_of(client), params.output(X), rtol=1e-5, atol=1e-5)


def test_load_swaps_in_the_new_file_and_the_index_reports_it(serve: Any, models: Path) -> None:
    client = serve()
    assert serves(client, A)
    write(models, "m", 1, frozen_model(B))
    assert client.post("/v2/repository/models/m/load").json() == {}
    assert serves(client, B)
    assert client.post("/v2/repository/index", json={"ready": True}).json() == [
        {"name": "m", "version": "1", "state": "READY", "reason": ""}
    ]


@pytest.mark.parametrize(
    ("replacement", "reason"),
    [
        (b"not a protobuf at all", "onnx"),
        (batch_statistics_model(), "frozen"),
        (b"", "onnx"),
    ],
    ids=["corrupt", "batch_statistics", "empty"],
)
def test_a_refused_reload_changes_nothing_and_the_old_version_serves_on(
    serve: Any, models: Path, replacement: Any, reason: str
) -> None:
    client = serve()
    write(models, "m", 1, replacement)
    response = client.post("/v2/repository/models/m/load")
    assert response.status_code == 400
    assert reason in response.json()["error"].lower()
    assert "keeps serving" in response.json()["error"]
    assert serves(client, A)
    assert client.get("/v2/models/m/ready").status_code == 200


def ready_gauge(client: Any) -> list[float]:
    """The values of `bn_serve_model_ready{model="m",version="1"}` in a scrape ([] when not exported)."""
    families = text_string_to_metric_families(client.get("/metrics").text)
    labels = {"model": "m", "version": "1"}
    return [
        s.value
        for f in families
        for s in f.samples
        if s.name == "bn_serve_model_ready" and s.labels == labels
    ]


def test_after_a_refused_reload_the_model_stays_ready_and_its_drift_measured(
    serve: Any, models: Path
) -> None:
    client = serve()
    output_of(client)
    path = models / "m" / "1" / "model.onnx"
    path.write_bytes(path.read_bytes()[:200])  # truncated
    assert client.post("/v2/repository/models/m/load").status_code == 400
    assert ready_gauge(client) == [1.0]
    assert client.get("/v2/health/ready").status_code == 200
    output_of(client)
    drift = client.get("/v2/models/m/stats").json()["drift"]
    assert drift is not None
    assert drift["samples"] == 2 * len(X)


def test_after_unload_the_ready_gauge_is_gone(serve: Any) -> None:
    client = serve()
    assert ready_gauge(client) == [1.0]
    assert client.post("/v2/repository/models/m/unload").status_code == 200
    assert ready_gauge(client) == []
    assert client.post("/v2/repository/models/m/load").status_code == 200
    assert ready_gauge(client) == [1.0]


def test_a_bad_config_json_refuses_the_load_with_400_and_the_old_version_serves_on(
    serve: Any, models: Path
) -> None:
    client = serve()
    (models / "m" / "config.json").write_text('{"max_batch_size": "lots"}')
    response = client.post("/v2/repository/models/m/load")
    assert response.status_code == 400
    assert "m/config.json" in response.json()["error"]
    assert str(models) not in response.json()["error"]
    assert serves(client, A)  # and on every request: the file is not read per request
    assert client.post(INFER, json=BODY).status_code == 200


def test_a_reload_refused_in_one_version_keeps_every_old_version(serve: Any, models: Path) -> None:
    write(models, "m", 2, frozen_model(B))
    client = serve()
    write(models, "m", 3, b"corrupt")
    assert client.post("/v2/repository/models/m/load").status_code == 400
    assert client.get("/v2/models/m").json()["versions"] == ["1", "2"]
    assert serves(client, B)  # version 2 is still the default


def test_unload_answers_503_with_the_reason_until_loaded_again(serve: Any) -> None:
    client = serve()
    assert client.post("/v2/repository/models/m/unload").json() == {}
    response = client.post(INFER, json=BODY)
    assert response.status_code == 503
    assert "unloaded" in response.json()["error"]
    assert client.get("/v2/models/m/ready").status_code == 503
    assert client.post("/v2/repository/index").json() == [
        {"name": "m", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}
    ]
    assert client.post("/v2/repository/index", json={"ready": True}).json() == []
    assert client.post("/v2/repository/models/m/load").status_code == 200
    assert serves(client, A)


def test_a_model_added_on_disk_is_indexed_then_loaded(serve: Any, models: Path) -> None:
    client = serve()
    write(models, "fresh", 1, frozen_model(B))
    assert {"name": "fresh", "state": "UNAVAILABLE", "reason": "not loaded"} in client.post(
        "/v2/repository/index"
    ).json()
    assert client.post("/v2/models/fresh/infer", json=BODY).status_code == 404
    assert client.post("/v2/repository/models/fresh/load").status_code == 200
    response = client.post("/v2/models/fresh/infer", json=BODY)
    assert response.status_code == 200


def test_names_outside_the_repository_are_not_loaded(serve: Any, models: Path) -> None:
    outside = models.parent / f"{models.name}-outside"
    write(outside, "evil", 1, frozen_model(B))
    client = serve()
    for name in ("%2E%2E", "..", ".hidden", f"..%2F{outside.name}%2Fevil", "m%00"):
        response = client.post(f"/v2/repository/models/{name}/load")
        assert response.status_code == 404, name
    (models / ".hidden" / "1").mkdir(parents=True)
    assert client.post("/v2/repository/models/.hidden/load").status_code == 404


def test_deleting_or_truncating_a_served_file_does_not_break_requests(serve: Any, models: Path) -> None:
    client = serve()
    path = models / "m" / "1" / "model.onnx"
    path.write_bytes(path.read_bytes()[:10])
    assert serves(client, A)
    path.unlink()
    assert serves(client, A)
    # A reload from the broken disk is refused and the loaded version goes on serving.
    assert client.post("/v2/repository/models/m/load").status_code == 400
    assert serves(client, A)


def test_requests_during_reloads_all_succeed_on_one_version_or_the_other(serve: Any, models: Path) -> None:
    client = serve(inference_threads=2)
    expected = [p.output(X).astype(np.float32) for p in (A, B)]
    failures: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            got = output_of(client)
            if not any(np.allclose(got, e, rtol=1e-5, atol=1e-5) for e in expected):
                failures.append(f"an answer from neither version: {got}")

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for i in range(6):
            write(models, "m", 1, frozen_model(B if i % 2 == 0 else A))
            assert client.post("/v2/repository/models/m/load").status_code == 200
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not failures, failures[:3]


def test_a_single_file_server_reloads_its_file(tmp_path: Path) -> None:
    path = write(tmp_path, "single", 1, frozen_model(A))
    server = InProcess(create_app(settings_for(None, model_repository=None, model=path)))
    try:
        server.wait_ready()
        path.write_bytes(frozen_model(B).SerializeToString())
        assert server.post("/v2/repository/models/model/load").status_code == 200
        assert server.post("/v2/repository/models/other/load").status_code == 404
        response = server.post("/v2/models/model/infer", json=BODY)
        out = np.asarray(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(X.shape)
        np.testing.assert_allclose(out, B.output(X), rtol=1e-5, atol=1e-5)
    finally:
        server.close()


@pytest.mark.slow
def test_tritons_client_drives_the_repository_of_a_real_process(models: Path) -> None:
    server = start_server("--model-repository", str(models), "--device", "cpu")
    client = triton.InferenceServerClient(server.host_port, network_timeout=60)
    try:
        assert [m["name"] for m in client.get_model_repository_index()] == ["m"]
        write(models, "m", 1, frozen_model(B))
        client.load_model("m")
        tensor = triton.InferInput("input", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X)
        result = client.infer("m", [tensor])
        np.testing.assert_allclose(result.as_numpy("output"), B.output(X), rtol=1e-5, atol=1e-5)
        write(models, "m", 1, b"corrupt")
        with pytest.raises(InferenceServerException, match="keeps serving"):
            client.load_model("m")
        (models / "m" / "1" / "model.onnx").unlink()
        result = client.infer("m", [tensor])
        np.testing.assert_allclose(result.as_numpy("output"), B.output(X), rtol=1e-5, atol=1e-5)
        client.unload_model("m")
        assert not client.is_model_ready("m")
    finally:
        client.close()
        assert stop_server(server) == 0
