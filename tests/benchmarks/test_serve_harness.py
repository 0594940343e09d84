"""The serving benchmark's parts that can be proven fast: its models, the exact bytes it sends, the wrk
script, the baseline server's answers and the report's arithmetic. Load runs are benchmarks, not tests."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from google.protobuf import text_format
from numpy.typing import NDArray
from onnx.reference import ReferenceEvaluator

from benchmarks.serving import (
    asgi_floor,
    baseline_app,
    floor_app,
    load,
    report,
    sequential,
    triton_peer,
    workloads,
)
from benchmarks.serving.models import (
    INPUT_NAME,
    OUTPUT_NAME,
    BatchNormModel,
    build_graph,
    make_model,
    write_repository,
)


def closed_form(model: BatchNormModel, x: NDArray[np.float32]) -> NDArray[np.float64]:
    """gamma*(x - mean)/sqrt(var + eps) + beta on axis 1, in float64, written out independently."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    g, b = model.gamma.astype(np.float64).reshape(shape), model.beta.astype(np.float64).reshape(shape)
    m, v = (
        model.moving_mean.astype(np.float64).reshape(shape),
        model.moving_var.astype(np.float64).reshape(shape),
    )
    return g * (x.astype(np.float64) - m) / np.sqrt(v + model.eps) + b


def call(app: Any, requests: Sequence[tuple[str, str, dict[str, Any]]]) -> list[httpx.Response]:
    """Send each `(method, url, httpx keyword arguments)` to `app` in-process, in order (ASGI transport)."""

    async def send() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.request(method, url, **kwargs) for method, url, kwargs in requests]

    return asyncio.run(send())


@pytest.fixture(scope="module")
def small_models() -> dict[str, BatchNormModel]:
    return {
        "bn_features": make_model("bn_features", (6,), seed=3),
        "bn_images": make_model("bn_images", (3, 4, 5), seed=4),
    }


@pytest.mark.parametrize("name", ["bn_features", "bn_images"])
def test_benchmark_graph_computes_the_closed_form_in_reference_evaluator_and_onnxruntime(
    small_models: dict[str, BatchNormModel], name: str
) -> None:
    model = small_models[name]
    graph = build_graph(model)
    x = workloads.sample_input(model, batch=7)
    expected = closed_form(model, x)
    (by_reference,) = np.asarray(ReferenceEvaluator(graph).run(None, {INPUT_NAME: x}))
    (by_onnxruntime,) = ort.InferenceSession(graph.SerializeToString()).run(None, {INPUT_NAME: x})
    np.testing.assert_allclose(by_reference, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(by_onnxruntime, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.reference(x), expected, rtol=1e-6, atol=1e-6)
    assert graph.opset_import[0].version == 15
    assert graph.ir_version == 8


def test_benchmark_graph_has_a_dynamic_batch_axis(small_models: dict[str, BatchNormModel]) -> None:
    session = ort.InferenceSession(build_graph(small_models["bn_features"]).SerializeToString())
    for batch in (1, 33):
        (y,) = session.run(None, {INPUT_NAME: np.zeros((batch, 6), np.float32)})
        assert y.shape == (batch, 6)


def test_json_request_carries_the_input_bit_exactly() -> None:
    x = np.random.default_rng(5).standard_normal((3, 4), dtype=np.float32)
    document = json.loads(workloads.json_request(x))
    (tensor,) = document["inputs"]
    assert (tensor["name"], tensor["shape"], tensor["datatype"]) == (INPUT_NAME, [3, 4], "FP32")
    decoded = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
    assert decoded.tobytes() == x.tobytes()


def test_binary_request_is_what_tritonclient_sends() -> None:
    x = np.random.default_rng(6).standard_normal((2, 3, 4, 5), dtype=np.float32)
    body, header_length = workloads.binary_request(x)
    tensor = triton.InferInput(INPUT_NAME, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    theirs, their_header_length = triton.InferenceServerClient.generate_request_body(
        [tensor], outputs=[triton.InferRequestedOutput(OUTPUT_NAME, binary_data=True)]
    )
    assert json.loads(body[:header_length]) == json.loads(theirs[:their_header_length])
    assert body[header_length:] == theirs[their_header_length:] == x.tobytes()


def test_decode_response_reads_a_binary_response_built_by_the_canned_writer() -> None:
    y = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    body, header_length = workloads.binary_response("m", y)
    outputs = workloads.decode_response({"inference-header-content-length": str(header_length)}, body)
    np.testing.assert_array_equal(outputs[OUTPUT_NAME], y)


def test_check_response_rejects_an_answer_from_the_wrong_statistics(
    small_models: dict[str, BatchNormModel],
) -> None:
    model = small_models["bn_features"]
    x = workloads.sample_input(model, 4)
    right = model.reference(x)
    workloads.check_response(200, {}, workloads.json_response(model.name, right), right)
    wrong = right + np.float32(1e-3)
    with pytest.raises(workloads.ResponseMismatchError, match="reference"):
        workloads.check_response(200, {}, workloads.json_response(model.name, wrong), right)
    with pytest.raises(workloads.ResponseMismatchError, match="status 500"):
        workloads.check_response(500, {}, b'{"error": "x"}', right)


def test_select_workloads_takes_groups_and_names_and_refuses_unknown_ones() -> None:
    assert [w.name for w in workloads.select_workloads("W3,W1-c32")] == ["W1-c32", "W3-json", "W3-binary"]
    with pytest.raises(ValueError, match="W4"):
        workloads.select_workloads("W1,W4")


def test_bodies_and_canned_responses_agree(tmp_path: Path, small_models: dict[str, BatchNormModel]) -> None:
    selected = workloads.WORKLOADS[1:]  # W1 at 1 and 32 connections send one and the same request
    requests, manifest = workloads.write_bodies(tmp_path, selected, small_models)
    canned = json.loads(manifest.read_text())
    for workload in selected:
        model = small_models[workload.model]
        request = requests[workload.name]
        entry = canned[str(request.body.stat().st_size)]
        headers = (
            {}
            if entry["header_length"] is None
            else {"inference-header-content-length": str(entry["header_length"])}
        )
        expected = closed_form(model, workloads.sample_input(model, workload.batch)).astype(np.float32)
        workloads.check_response(200, headers, Path(entry["file"]).read_bytes(), expected)


def test_baseline_app_answers_a_v2_json_request_correctly(
    tmp_path: Path, small_models: dict[str, BatchNormModel]
) -> None:
    write_repository(tmp_path, tuple(small_models.values()))
    model = small_models["bn_images"]
    x = workloads.sample_input(model, 2)
    ready, response = call(
        baseline_app.create_app(tmp_path),
        [
            ("GET", "/v2/health/ready", {}),
            ("POST", f"/v2/models/{model.name}/infer", {"content": workloads.json_request(x)}),
        ],
    )
    assert (ready.status_code, response.status_code) == (200, 200)
    (output,) = response.json()["outputs"]
    assert (output["name"], output["shape"], output["datatype"]) == (OUTPUT_NAME, [2, 3, 4, 5], "FP32")
    got = np.asarray(output["data"], dtype=np.float64).reshape(output["shape"])
    np.testing.assert_allclose(got, closed_form(model, x), rtol=1e-5, atol=1e-6)


def test_floor_app_returns_the_canned_answer_for_each_workload(
    tmp_path: Path, small_models: dict[str, BatchNormModel]
) -> None:
    requests, manifest = workloads.write_bodies(tmp_path, workloads.WORKLOADS, small_models)
    sent = [
        ("POST", "/v2/models/any/infer", {"content": r.body.read_bytes(), "headers": r.headers()})
        for r in (requests[w.name] for w in workloads.WORKLOADS)
    ]
    responses = call(floor_app.create_app(manifest), sent)
    for workload, response in zip(workloads.WORKLOADS, responses, strict=True):
        model = small_models[workload.model]
        expected = closed_form(model, workloads.sample_input(model, workload.batch)).astype(np.float32)
        workloads.check_response(response.status_code, dict(response.headers), response.content, expected)


def test_asgi_floor_returns_the_canned_answer_for_each_workload_and_reports_ready(
    tmp_path: Path, small_models: dict[str, BatchNormModel]
) -> None:
    requests, manifest = workloads.write_bodies(tmp_path, workloads.WORKLOADS, small_models)
    sent = [
        ("POST", "/v2/models/any/infer", {"content": r.body.read_bytes(), "headers": r.headers()})
        for r in (requests[w.name] for w in workloads.WORKLOADS)
    ]
    app = asgi_floor.CannedApp(asgi_floor.load_canned(manifest))
    ready, unknown, *responses = call(
        app,
        [("GET", "/v2/health/ready", {}), ("POST", "/v2/models/any/infer", {"content": b"{}"}), *sent],
    )
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    assert unknown.status_code == 400
    assert "error" in unknown.json()
    for workload, response in zip(workloads.WORKLOADS, responses, strict=True):
        model = small_models[workload.model]
        expected = closed_form(model, workloads.sample_input(model, workload.batch)).astype(np.float32)
        workloads.check_response(response.status_code, dict(response.headers), response.content, expected)


_CAPTURE_UVICORN_OPTIONS = """
import functools, json, sys
import uvicorn
from service import cli

def encoded(value):
    if isinstance(value, functools.partial):
        return {"factory": value.func.__qualname__, **value.keywords}
    return value

def record(app, **options):
    print("OPTIONS " + json.dumps({key: encoded(value) for key, value in options.items()}))

uvicorn.run = record
cli.main(sys.argv[1:])
"""


def test_asgi_floor_runs_uvicorn_with_the_options_bn_serve_gives_it(
    tmp_path: Path, small_models: dict[str, BatchNormModel]
) -> None:
    """The floor is only bn-serve's floor while uvicorn runs both alike: read what `bn-serve` passes to
    `uvicorn.run` with its defaults, in a process of its own (it configures logging and signals)."""
    path = write_repository(tmp_path, (small_models["bn_features"],))["bn_features"]
    completed = subprocess.run(
        [sys.executable, "-c", _CAPTURE_UVICORN_OPTIONS, "--model", str(path), "--port", "4321"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("BN_SERVE_")},
    )
    (line,) = [x for x in completed.stdout.splitlines() if x.startswith("OPTIONS ")]
    expected = {
        key: {"factory": value.func.__qualname__, **value.keywords} if isinstance(value, partial) else value
        for key, value in asgi_floor.uvicorn_options(4321).items()
    }
    assert json.loads(line.removeprefix("OPTIONS ")) == expected


class _Recorder(BaseHTTPRequestHandler):
    """Keeps every request it receives and answers each with an empty 200, over keep-alive connections."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[dict[str, str], bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if len(self.seen) < 50:
            self.seen.append((dict(self.headers), body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[int, list[tuple[dict[str, str], bytes]]]]:
    seen: list[tuple[dict[str, str], bytes]] = []
    handler = type("Recorder", (_Recorder,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk (apt-get install wrk)")
@pytest.mark.parametrize("workload_name", ["W1-c1", "W3-binary"])
def test_lua_script_posts_the_request_file_verbatim_with_its_headers(
    tmp_path: Path,
    small_models: dict[str, BatchNormModel],
    recorder: tuple[int, list[tuple[dict[str, str], bytes]]],
    workload_name: str,
) -> None:
    port, seen = recorder
    (workload,) = workloads.select_workloads(workload_name)
    requests, _ = workloads.write_bodies(tmp_path, (workload,), small_models)
    request = requests[workload.name]
    cpu = min(os.sched_getaffinity(0))
    result = load.run_wrk(load.ensure_wrk(), f"http://127.0.0.1:{port}/v2/models/m/infer", request, 1, 1, cpu)
    assert result.requests >= len(seen) > 0
    assert result.errors == 0
    for headers, body in seen:
        assert body == request.body.read_bytes()
        assert headers["Content-Type"] == request.content_type
        assert headers.get("Inference-Header-Content-Length") == (
            None if request.header_length is None else str(request.header_length)
        )


class _SlowRecorder(_Recorder):
    """A `_Recorder` that answers each request 3 ms late, or with a 503 once `fail_after` were answered."""

    delay_s = 0.003
    fail_after: int | None = None
    answered: list[int]

    def do_POST(self) -> None:
        self.answered.append(1)
        if self.fail_after is not None and len(self.seen) >= self.fail_after:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(503)
            self.send_header("Content-Length", "7")
            self.end_headers()
            self.wfile.write(b"too bad")
            return
        time.sleep(self.delay_s)
        super().do_POST()


@contextlib.contextmanager
def _serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("workload_name", ["W1-c1", "W3-binary"])
def test_sequential_client_posts_the_request_file_verbatim_and_times_every_request(
    tmp_path: Path, small_models: dict[str, BatchNormModel], workload_name: str
) -> None:
    (workload,) = workloads.select_workloads(workload_name)
    requests, _ = workloads.write_bodies(tmp_path, (workload,), small_models)
    request = requests[workload.name]
    seen: list[tuple[dict[str, str], bytes]] = []
    answered: list[int] = []
    handler = type("Slow", (_SlowRecorder,), {"seen": seen, "answered": answered})
    cpu = min(os.sched_getaffinity(0))
    with _serving(handler) as port:
        result = load.run_sequential(f"http://127.0.0.1:{port}/v2/models/m/infer", request, 0.5, cpu)
    # One at a time: every request sent was answered and counted (the handler keeps the first 50).
    assert result.requests == len(answered) >= len(seen) > 0
    for headers, body in seen:
        assert body == request.body.read_bytes()
        assert headers["Content-Type"] == request.content_type
        assert headers.get("Inference-Header-Content-Length") == (
            None if request.header_length is None else str(request.header_length)
        )
    # Each answer came 3 ms after its request: so did every latency, and no more than ~0.5 s / 3 ms fit.
    assert 3.0 <= result.p50_ms <= result.p90_ms <= result.p99_ms <= result.max_ms
    assert result.requests <= 0.5 / 0.003
    assert result.errors == 0


def test_sequential_client_stops_at_an_answer_other_than_200(
    tmp_path: Path, small_models: dict[str, BatchNormModel]
) -> None:
    (workload,) = workloads.select_workloads("W1-c1")
    requests, _ = workloads.write_bodies(tmp_path, (workload,), small_models)
    seen: list[tuple[dict[str, str], bytes]] = []
    handler = type(
        "Failing", (_SlowRecorder,), {"seen": seen, "answered": [], "fail_after": 3, "delay_s": 0.0}
    )
    cpu = min(os.sched_getaffinity(0))
    with _serving(handler) as port:
        url = f"http://127.0.0.1:{port}/v2/models/m/infer"
        with pytest.raises(load.LoadGeneratorError, match="non-200"):
            load.run_sequential(url, requests[workload.name], 5.0, cpu)
    assert len(seen) == 3


def test_sequential_client_reads_an_answers_framing_from_its_head_and_refuses_what_it_cannot_frame() -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nContent-Length: 12\r\n\r\n"
    assert sequential.parse_head(head[:-2]) is None
    assert sequential.parse_head(head + b"{}") == sequential.Answer(200, len(head), 12)
    busy = b"HTTP/1.1 503 Busy\r\ncontent-length: 0\r\n\r\n"
    assert sequential.parse_head(busy) == sequential.Answer(503, len(busy), 0)
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert sequential.parse_head(chunked) == sequential.Answer(200, len(chunked), None)
    with pytest.raises(sequential.SequentialClientError, match="neither a Content-Length"):
        sequential.parse_head(b"HTTP/1.1 200 OK\r\n\r\n")
    with pytest.raises(sequential.SequentialClientError, match="status line"):
        sequential.parse_head(b"SSH-2.0-OpenSSH\r\n\r\n")
    assert [sequential.percentile([1, 2, 3, 4], p) for p in (25, 50, 99, 100)] == [1, 2, 4, 4]


def test_a_chunked_body_ends_after_its_last_chunk_and_not_before() -> None:
    body = b"5\r\nhello\r\n1a;ext=1\r\n" + b"x" * 26 + b"\r\n0\r\n\r\n"
    data = b"HEAD" + body
    assert sequential.chunked_end(data, 4) == len(data)
    for cut in range(4, len(data)):  # every prefix is incomplete
        assert sequential.chunked_end(data[:cut], 4) is None
    with pytest.raises(sequential.SequentialClientError, match="trailers"):
        sequential.chunked_end(b"0\r\nX-Checksum: 1\r\n\r\n", 0)


class _ChunkedRecorder(_Recorder):
    """Answers each request with a chunked body of three chunks, written one by one."""

    answered: list[int]

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.answered.append(1)
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for part in (b"{", b'"outputs":[]', b"}"):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")


def test_sequential_client_reads_chunked_answers(
    tmp_path: Path, small_models: dict[str, BatchNormModel]
) -> None:
    (workload,) = workloads.select_workloads("W1-c1")
    requests, _ = workloads.write_bodies(tmp_path, (workload,), small_models)
    answered: list[int] = []
    handler = type("Chunked", (_ChunkedRecorder,), {"seen": [], "answered": answered})
    with _serving(handler) as port:
        url = f"http://127.0.0.1:{port}/v2/models/m/infer"
        result = load.run_sequential(url, requests[workload.name], 0.3, min(os.sched_getaffinity(0)))
    assert result.requests == len(answered) > 1


def test_wrk_summary_line_becomes_a_load_result() -> None:
    line = (
        'WRK_JSON {"requests":2000,"duration_us":2000000,"bytes":1,"errors_connect":1,"errors_read":2,'
        '"errors_write":0,"errors_status":3,"errors_timeout":4,"latency_p50_us":1500,"latency_p90_us":2000,'
        '"latency_p99_us":9000,"latency_mean_us":1600.5,"latency_max_us":12000}'
    )
    result = load.parse_summary(f"Running 2s test\n{line}\n")
    assert result.requests_per_s == 1000.0
    assert (result.p50_ms, result.p99_ms) == (1.5, 9.0)
    assert (result.errors_status, result.errors_socket, result.errors) == (3, 7, 10)
    with pytest.raises(load.LoadGeneratorError):
        load.parse_summary("Running 2s test\n")


def test_ratios_compare_with_the_reference_servers_on_the_same_workload() -> None:
    def row(server: str, role: str, workload: str, rps: float) -> report.Row:
        return report.Row(
            server, role, workload, "ok", requests_per_s=rps, p50_ms=1.0, p99_ms=2.0, rss_mib=100.0
        )

    rows = [
        row("baseline", "baseline", "W1-c1", 100.0),
        row("floor", "floor", "W1-c1", 400.0),
        row("asgi-floor", "asgi", "W1-c1", 600.0),
        row("baseline", "baseline", "W2", 10.0),
        row("bn-serve", "subject", "W1-c1", 300.0),
        row("bn-serve", "subject", "W2", 50.0),
    ]
    report.add_ratios(rows)
    assert rows[4].ratios["baseline"]["requests_per_s"] == 3.0
    assert rows[4].ratios["floor"]["requests_per_s"] == 0.75
    assert rows[4].ratios["asgi"]["requests_per_s"] == 0.5
    assert rows[5].ratios["baseline"]["requests_per_s"] == 5.0
    assert "floor" not in rows[5].ratios  # no floor measured on W2 in this run
    assert "x asgi" in report.table(rows).splitlines()[0]


def _load_module(name: str, path: Path) -> Any:
    """The Python file at `path` imported as module `name`, outside any package."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _triton_model_config_schema() -> Any:
    """Triton's own ModelConfig message, from the generated module that tritonclient ships (its gRPC package
    needs grpcio to import, the message module only protobuf)."""
    return _load_module(
        "triton_model_config_pb2", Path(triton.__file__).parents[1] / "grpc" / "model_config_pb2.py"
    )


@pytest.mark.parametrize("name", ["bn_features", "bn_images"])
def test_triton_config_parses_as_a_python_backend_model_with_dynamic_batching_on_one_cpu_instance(
    small_models: dict[str, BatchNormModel], name: str
) -> None:
    schema = _triton_model_config_schema()
    model = small_models[name]
    text = triton_peer.model_config(name, build_graph(model), max_batch_size=256)
    config = text_format.Parse(text, schema.ModelConfig())
    assert (config.name, config.backend, config.max_batch_size) == (name, "python", 256)
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    (group,) = config.instance_group
    assert (group.count, group.kind) == (1, schema.ModelInstanceGroup.KIND_CPU)
    for tensors, tensor_name in ((config.input, INPUT_NAME), (config.output, OUTPUT_NAME)):
        (tensor,) = tensors
        assert tensor.name == tensor_name
        assert tensor.data_type == schema.TYPE_FP32
        assert tuple(tensor.dims) == model.sample_shape  # the batch axis is Triton's, from max_batch_size


def test_triton_config_refuses_a_graph_whose_sample_axes_are_not_fixed(
    small_models: dict[str, BatchNormModel],
) -> None:
    graph = build_graph(small_models["bn_features"])
    graph.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "C"
    with pytest.raises(ValueError, match="fixed size"):
        triton_peer.model_config("m", graph)


def test_triton_repository_holds_each_models_onnx_file_model_py_and_config(
    tmp_path: Path, small_models: dict[str, BatchNormModel]
) -> None:
    sources = write_repository(tmp_path / "models", tuple(small_models.values()))
    names = triton_peer.write_repository(tmp_path / "models", tmp_path / "triton")
    assert names == sorted(small_models)
    for name, source in sources.items():
        folder = tmp_path / "triton" / name
        assert (folder / "1" / "model.onnx").read_bytes() == source.read_bytes()
        assert (folder / "1" / "model.py").read_text() == triton_peer.MODEL_SOURCE.read_text()
        assert (folder / "config.pbtxt").read_text() == triton_peer.model_config(
            name, build_graph(small_models[name])
        )


@pytest.mark.skipif(importlib.util.find_spec("pytriton") is not None, reason="needs an env without the wheel")
def test_triton_locate_says_why_where_the_wheel_is_not_installed() -> None:
    # The project's own environment has no nvidia-pytriton; the harness skips the row with this message.
    with pytest.raises(triton_peer.TritonUnavailableError, match="not in the nvidia-pytriton wheel"):
        triton_peer.TritonInstall.locate(Path(sys.executable))


def test_triton_server_runs_the_interpreters_libpython_first_from_site_packages(tmp_path: Path) -> None:
    site_packages, libdir = tmp_path / "site-packages", tmp_path / "lib"
    files = tuple(
        tmp_path / "wheel" / n for n in ("libtriton_python.so", "triton_python_backend_utils.py", "stub")
    )
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(path.name.encode())
    install = triton_peer.TritonInstall(tmp_path / "tritonserver", files, site_packages, (libdir,))
    write_repository(tmp_path / "models", (make_model("bn_features", (4,), seed=1),))
    spec = triton_peer.server_spec(install, tmp_path / "models", tmp_path / "work")
    assert spec.env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == str(libdir)
    assert spec.cwd == site_packages
    argv = dict(zip(spec.argv[1::2], spec.argv[2::2], strict=True))
    assert argv["--http-port"] == str(spec.port)
    backends = Path(argv["--backend-directory"]) / "python"
    assert sorted(p.name for p in backends.iterdir()) == sorted(p.name for p in files)
    assert (Path(argv["--model-repository"]) / "bn_features" / "config.pbtxt").is_file()


class _TritonRequest:
    def __init__(self, x: NDArray[np.float32]) -> None:
        self.x = x


def _fake_backend_utils() -> Any:
    """The three calls of triton_python_backend_utils that model.py makes, over plain numpy arrays."""
    import types

    module = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name: str, array: NDArray[Any]) -> None:
            self.name, self.array = name, array

        def as_numpy(self) -> NDArray[Any]:
            return self.array

    class InferenceResponse:
        def __init__(self, output_tensors: list[Tensor]) -> None:
            self.output_tensors = output_tensors

    module.Tensor = Tensor  # type: ignore[attr-defined]
    module.InferenceResponse = InferenceResponse  # type: ignore[attr-defined]
    module.get_input_tensor_by_name = lambda r, name: Tensor(name, r.x)  # type: ignore[attr-defined]
    return module


def test_triton_model_py_gives_each_request_of_a_merged_batch_its_own_output(
    tmp_path: Path, small_models: dict[str, BatchNormModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = small_models["bn_features"]
    write_repository(tmp_path, (model,))
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_backend_utils())
    served = _load_module("triton_model_py", triton_peer.MODEL_SOURCE).TritonPythonModel()
    served.initialize(
        {"model_repository": str(tmp_path / model.name), "model_version": "1", "model_config": "{}"}
    )
    inputs = [workloads.sample_input(model, batch) + np.float32(i) for i, batch in enumerate((1, 3, 2))]
    responses = served.execute([_TritonRequest(x) for x in inputs])
    assert len(responses) == len(inputs)
    for x, response in zip(inputs, responses, strict=True):
        (tensor,) = response.output_tensors
        assert tensor.name == OUTPUT_NAME
        np.testing.assert_allclose(tensor.as_numpy(), closed_form(model, x), rtol=1e-5, atol=1e-6)


def test_collapsed_summary_counts_each_frame_once_per_stack_inclusive_and_at_the_leaf_as_own() -> None:
    from benchmarks.serve_cpu import collapsed_summary

    stacks = ["main;loop;handle;parse 6", "main;loop;handle;handle 2", "main;loop;idle 2", "garbage line"]
    summary = {frame: (inclusive, own) for frame, inclusive, own in collapsed_summary(stacks)}
    assert summary["main"] == (1.0, 0.0)
    assert summary["handle"] == (0.8, 0.2)  # recursion counted once per stack
    assert summary["parse"] == (0.6, 0.6)
    assert collapsed_summary([]) == []


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_thread_usage_bills_a_busy_thread_at_its_own_nice_value_apart_from_the_idle_main_thread() -> None:
    from benchmarks.serve_cpu import thread_usage

    # A child whose main thread sleeps while a thread at nice 19 spins for 0.6 s of CPU, then sleeps (a
    # thread's figures leave /proc with it).
    spin = (
        "import os, threading, time\n"
        "def spin():\n"
        "    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)\n"
        "    t = time.thread_time()\n"
        "    while time.thread_time() - t < 0.6: pass\n"
        "    time.sleep(30)\n"
        "threading.Thread(target=spin, daemon=True).start()\n"
        "time.sleep(30)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", spin])
    try:
        deadline = time.monotonic() + 20
        while True:
            usage = thread_usage(child.pid)
            busy = {key: spent for key, spent in usage.items() if key.endswith("nice 19")}
            if sum(busy.values()) >= 0.55 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert sum(busy.values()) >= 0.55  # clock ticks round it
        main = [spent for key, spent in usage.items() if key.endswith("(main)")]
        assert len(main) == 1
        assert main[0] < 0.5  # the interpreter's start-up only
    finally:
        child.kill()
        child.wait()


def test_bn_serve_variants_run_on_ports_of_their_own_with_the_settings_as_environment(tmp_path: Path) -> None:
    from benchmarks.serve_cpu import bn_serve_variants
    from benchmarks.serving import servers

    specs = servers.own_servers(tmp_path / "models", tmp_path / "canned.json", "/usr/bin/bn-serve")
    (base,) = [s for s in specs if s.name == "bn-serve"]
    (variant,) = bn_serve_variants(specs, ["lean:drift=false,MAX_BATCH_SIZE=1"])
    assert variant.name == "bn-serve lean"
    assert variant.env == {"BN_SERVE_DRIFT": "false", "BN_SERVE_MAX_BATCH_SIZE": "1"}
    assert variant.port != base.port
    assert variant.argv[variant.argv.index("--port") + 1] == str(variant.port)
    assert variant.argv[: base.argv.index("--port")] == base.argv[: base.argv.index("--port")]
    assert bn_serve_variants([s for s in specs if s.name != "bn-serve"], ["lean:drift=false"]) == []


def test_grpc_targets_compare_bn_serve_with_the_best_peer_and_the_transfer_floor() -> None:
    from benchmarks.serving.grpc_bench import target_lines
    from benchmarks.serving.grpc_load import GrpcLoadResult

    def result(calls: int, p50_ms: float) -> GrpcLoadResult:
        return GrpcLoadResult(calls, errors=0, duration_s=1.0, p50_ms=p50_ms, p90_ms=p50_ms, p99_ms=p50_ms)

    results = {
        ("bn-serve", "W1-c32"): result(1500, 20.0),
        ("kserve", "W1-c32"): result(1100, 30.0),
        ("mlserver", "W1-c32"): result(900, 40.0),
        ("bn-serve", "W3-raw"): result(20, 50.0),
        ("canned", "W3-raw"): result(30, 30.0),
    }
    assert target_lines(results) == [
        "MISSED  W1-c32 >= 1.5x the best peer: 1.36x kserve",
        "MET     W3-raw within 2x the loopback transfer floor: 1.50x its time per call, p50 1.67x",
    ]
    results[("kserve", "W1-c32")] = result(1000, 30.0)
    results[("canned", "W3-raw")] = result(41, 30.0)
    lines = target_lines(results)
    assert lines[0].startswith("MET ")
    assert lines[1].startswith("MISSED ")
    assert target_lines({})[0].startswith("n/a")


def test_rest_targets_are_set_against_triton_the_asgi_floor_loopback_and_the_naive_route() -> None:
    from benchmarks.serving.report import Row, targets

    def row(server: str, role: str, workload: str, rps: float, p50: float = 1.0, p99: float = 2.0) -> Row:
        return Row(server, role, workload, "ok", requests_per_s=rps, p50_ms=p50, p99_ms=p99, rss_mib=100)

    rows = [
        row("bn-serve", "subject", "W1-c32", 9000),
        row("asgi-floor", "asgi", "W1-c32", 16000),
        row("triton", "peer", "W1-c32", 6000),
        row("mlserver", "peer", "W1-c32", 8000),  # faster than Triton here: the targets still name Triton
        row("bn-serve", "subject", "W3-binary", 200, p50=4.0),
        row("loopback", "wire", "W3-binary", 300, p50=3.0),
        row("triton", "peer", "W3-binary", 90),
        row("bn-serve", "subject", "W1-c1", 3000, p50=0.30, p99=0.60),
        row("triton", "peer", "W1-c1", 2500, p50=0.33, p99=0.90),
        row("baseline", "baseline", "W1-c1", 2900, p50=0.31, p99=0.50),
    ]
    verdicts = {t["target"]: t["met"] for t in targets(rows)}
    assert verdicts == {
        "W1 c32 >= 1.5x Triton and >= 0.5x the bare-ASGI floor": True,
        "W3 binary >= 2x Triton and p50 within 1.5x loopback": True,
        "W1 c1 p50 and p99 <= Triton's and the naive route's": False,  # p99 0.60 > the naive route's 0.50
        "peak RSS <= leanest peer's": True,
    }
    rows[0] = row("bn-serve", "subject", "W1-c32", 7900)  # 1.32x Triton
    rows[4] = row("bn-serve", "subject", "W3-binary", 200, p50=4.6)  # p50 1.53x loopback
    verdicts = {t["target"]: t["met"] for t in targets(rows)}
    assert verdicts["W1 c32 >= 1.5x Triton and >= 0.5x the bare-ASGI floor"] is False
    assert verdicts["W3 binary >= 2x Triton and p50 within 1.5x loopback"] is False
