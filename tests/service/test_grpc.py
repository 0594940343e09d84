"""The gRPC inference service of a real `bn-serve` process, through unmodified `tritonclient.grpc` and
KServe's gRPC client, compared with the same server's REST answers."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from numpy.typing import NDArray
from prometheus_client.parser import text_string_to_metric_families

from service.cli import build_parser
from service.proto import grpc_service_pb2 as pb
from service.settings import Settings
from tests.service.conftest import (
    CHANNELS,
    Repository,
    Server,
    binary_infer_body,
    binary_outputs,
    start_server,
    stop_server,
)

tritongrpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

SERVICE = "/inference.GRPCInferenceService/"
StatusCode = grpc.StatusCode


@pytest.fixture(scope="module")
def served(repository: Repository) -> Iterator[Server]:
    running = start_server(
        "--model-repository", str(repository.root), "--device", "cpu", "--intra-op-threads", "1"
    )
    try:
        yield running
    finally:
        stop_server(running)


def call(server: Server, method: str, request: Any, response_type: Any, **kwargs: Any) -> Any:
    """One unary call with the project's own messages on a fresh channel; raises `grpc.RpcError`."""
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = channel.unary_unary(
            SERVICE + method,
            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            response_deserializer=response_type.FromString,
        )
        return stub(request, timeout=30, **kwargs)


def refused(server: Server, method: str, request: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(server, method, request, pb.ModelInferResponse, **kwargs)
    return caught.value


def rest_error(server: Server, path: str, body: dict[str, Any]) -> tuple[int, str]:
    response = httpx.post(server.url + path, json=body, timeout=30)
    return response.status_code, response.json()["error"]


def triton_infer(server: Server, x: NDArray[Any], datatype: str = "FP32", model: str = "frozen") -> Any:
    client = tritongrpc.InferenceServerClient(server.grpc_target)
    tensor = tritongrpc.InferInput("input", list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor])


def rest_binary(server: Server, x: NDArray[Any], model: str = "frozen") -> dict[str, NDArray[Any]]:
    body, length = binary_infer_body(x)
    response = httpx.post(
        f"{server.url}/v2/models/{model}/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(length)},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return binary_outputs(response)


def typed_request(x: NDArray[Any], datatype: str = "FP32", field: str = "fp32_contents") -> Any:
    request = pb.ModelInferRequest(model_name="frozen", id="typed-1")
    tensor = request.inputs.add(name="input", datatype=datatype, shape=list(x.shape))
    getattr(tensor.contents, field).extend(x.reshape(-1).tolist())
    return request


def samples(n: int, seed: int = 0) -> NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal((n, CHANNELS)).astype(np.float32)


# -- metadata and health ---------------------------------------------------------------------------------


def test_tritonclient_reads_health_and_metadata_as_rest_states_them(served: Server) -> None:
    client = tritongrpc.InferenceServerClient(served.grpc_target)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("frozen")
    assert client.is_model_ready("frozen", "1")
    assert not client.is_model_ready("batchstat")
    rest = httpx.get(f"{served.url}/v2/models/frozen", timeout=30).json()
    metadata = client.get_model_metadata("frozen", as_json=True)
    assert metadata["name"] == rest["name"]
    assert metadata["versions"] == rest["versions"]
    assert metadata["platform"] == rest["platform"]
    for kind in ("inputs", "outputs"):
        got = [{**t, "shape": [int(d) for d in t["shape"]]} for t in metadata[kind]]
        assert got == rest[kind]
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == httpx.get(f"{served.url}/v2", timeout=30).json()["name"]


def test_health_service_follows_readiness_and_knows_its_names(served: Server) -> None:
    with grpc.insecure_channel(served.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "live"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(service="nothing"), timeout=10)
    assert caught.value.code() is StatusCode.NOT_FOUND


# -- inference -------------------------------------------------------------------------------------------


def test_raw_infer_is_bitwise_rest_and_close_to_the_formula(served: Server, repository: Repository) -> None:
    x = samples(5)
    result = triton_infer(served, x)
    response = result.get_response()
    assert len(response.raw_output_contents) == 2  # raw asked, raw answered
    rest = rest_binary(served, x)
    for name in ("output", "logits"):
        assert result.as_numpy(name).tobytes() == rest[name].tobytes()
    reference = repository.params[2].logits(x)  # the latest version serves when none is named
    np.testing.assert_allclose(result.as_numpy("logits"), reference, rtol=1e-5, atol=1e-5)


def test_typed_contents_are_answered_typed_with_the_raw_answers_values(served: Server) -> None:
    x = samples(3, seed=1)
    answer = call(served, "ModelInfer", typed_request(x), pb.ModelInferResponse)
    assert len(answer.raw_output_contents) == 0
    assert answer.id == "typed-1"
    raw = triton_infer(served, x)
    for output in answer.outputs:
        typed = np.array(output.contents.fp32_contents, np.float32).reshape(list(output.shape))
        assert typed.tobytes() == raw.as_numpy(output.name).tobytes()


def test_fp16_and_integer_inputs_convert_as_over_rest(served: Server) -> None:
    x16 = samples(4, seed=2).astype(np.float16)
    as_fp32 = triton_infer(served, x16.astype(np.float32)).as_numpy("logits")
    assert triton_infer(served, x16, "FP16").as_numpy("logits").tobytes() == as_fp32.tobytes()
    ints = np.array([[1, -2, 3, 4], [16777216, 0, -7, 5]], np.int32)
    typed = call(served, "ModelInfer", typed_request(ints, "INT32", "int_contents"), pb.ModelInferResponse)
    logits = next(o for o in typed.outputs if o.name == "logits")
    expected = triton_infer(served, ints.astype(np.float32)).as_numpy("logits")
    assert np.array(logits.contents.fp32_contents, np.float32).tobytes() == expected.tobytes()
    # 2^24 + 1 has no FP32: refused over both transports with the same message.
    ints[0, 0] = 16777217
    error = refused(served, "ModelInfer", typed_request(ints, "INT32", "int_contents"))
    body = {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "INT32", "data": ints.tolist()}]}
    status, message = rest_error(served, "/v2/models/frozen/infer", body)
    assert (error.code(), status) == (StatusCode.INVALID_ARGUMENT, 400)
    assert error.details() == message


def test_a_sample_is_bitwise_the_same_alone_and_merged_across_transports(repository: Repository) -> None:
    server = start_server(
        "--model-repository", str(repository.root), "--device", "cpu", "--intra-op-threads", "1",
        "--max-batch-delay-us", "50000",
    )  # fmt: skip
    try:
        x = samples(16, seed=3)
        alone = [rest_binary(server, x[i : i + 1])["logits"].tobytes() for i in range(len(x))]
        got: dict[tuple[str, int], bytes] = {}

        def over_grpc(i: int) -> None:
            got["grpc", i] = triton_infer(server, x[i : i + 1]).as_numpy("logits").tobytes()

        def over_rest(i: int) -> None:
            got["rest", i] = rest_binary(server, x[i : i + 1])["logits"].tobytes()

        # Merging depends on the requests' timing (a loaded machine may serve them one by one): rounds are
        # repeated, each checked bitwise, until one merged some requests.
        merged = False
        for _ in range(5):
            got.clear()
            before = _batch_runs(server)
            threads = [
                threading.Thread(target=f, args=(i,)) for i in range(len(x)) for f in (over_grpc, over_rest)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert len(got) == 2 * len(x)
            assert all(got[transport, i] == alone[i] for transport, i in got)
            merged = _batch_runs(server) - before < 2 * len(x)
            if merged:
                break
        assert merged  # some requests did merge
    finally:
        stop_server(server)


def _batch_runs(server: Server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    lines = [line for line in text.splitlines() if line.startswith("bn_serve_batch_size_samples_count")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_requests_are_counted_with_their_protocol(served: Server) -> None:
    triton_infer(served, samples(1))
    text = httpx.get(f"{served.url}/metrics", timeout=30).text
    assert any(
        line.startswith("bn_serve_requests_total{") and 'protocol="grpc"' in line and 'status="200"' in line
        for line in text.splitlines()
    )


def request_counts(server: Server) -> dict[tuple[str, ...], float]:
    """`bn_serve_requests_total` and the request histograms' counts, by their labels."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    counts = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("bn_serve_requests_total", "bn_serve_request_seconds_count"):
                labels = sample.labels
                key = (sample.name, labels["model"], labels["version"], labels.get("status", ""))
                counts[(*key, labels["protocol"])] = sample.value
    return counts


def counted(before: dict[tuple[str, ...], float], after: dict[tuple[str, ...], float]) -> dict[Any, float]:
    return {key: n - before.get(key, 0) for key, n in after.items() if n != before.get(key, 0)}


def test_calls_are_counted_by_version_status_and_protocol_as_rest_counts_requests(served: Server) -> None:
    # An answer, a refused input to a named version, an unknown model and an unready one: over gRPC they
    # move the series that REST's requests move, with protocol="grpc".
    right, wrong = samples(1), np.zeros((1, CHANNELS - 1), dtype=np.float32)
    calls = [("frozen", "", right), ("frozen", "1", wrong), ("nope", "", right), ("batchstat", "", right)]
    before = request_counts(served)
    for model, version, x in calls:
        request = typed_request(x)
        request.model_name, request.model_version = model, version
        with contextlib.suppress(grpc.RpcError):
            call(served, "ModelInfer", request, pb.ModelInferResponse)
    grpc_counts = counted(before, after := request_counts(served))
    for model, version, x in calls:
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}
        httpx.post(served.url + path, json={"inputs": [tensor]}, timeout=30)
    rest_counts = counted(after, request_counts(served))

    assert grpc_counts == {(*key[:-1], "grpc"): n for key, n in rest_counts.items()}
    assert grpc_counts[("bn_serve_requests_total", "frozen", "2", "200", "grpc")] == 1
    assert grpc_counts[("bn_serve_requests_total", "frozen", "1", "400", "grpc")] == 1
    assert grpc_counts[("bn_serve_requests_total", "_unknown", "_unknown", "404", "grpc")] == 1
    assert grpc_counts[("bn_serve_request_seconds_count", "frozen", "2", "", "grpc")] == 1


def test_stream_infer_answers_each_request_and_reports_errors_in_place(served: Server) -> None:
    client = tritongrpc.InferenceServerClient(served.grpc_target)
    answers: list[tuple[Any, Any]] = []
    done = threading.Event()

    def collect(result: Any, error: Any) -> None:
        answers.append((result, error))
        if len(answers) == 2:
            done.set()

    client.start_stream(callback=collect)
    try:
        x = samples(2, seed=4)
        tensor = tritongrpc.InferInput("input", [2, CHANNELS], "FP32")
        tensor.set_data_from_numpy(x)
        client.async_stream_infer("frozen", [tensor])
        client.async_stream_infer("nope", [tensor])
        assert done.wait(30)
    finally:
        client.stop_stream()
    (result, ok), (_, error) = answers
    assert ok is None
    assert result.as_numpy("logits").tobytes() == triton_infer(served, x).as_numpy("logits").tobytes()
    assert "no model named 'nope'" in str(error)


# -- errors ----------------------------------------------------------------------------------------------


def test_unknown_and_unready_models_have_rests_messages(served: Server) -> None:
    x = samples(1)
    for model, code, status in (
        ("nope", StatusCode.NOT_FOUND, 404),
        ("batchstat", StatusCode.UNAVAILABLE, 503),
    ):
        request = typed_request(x)
        request.model_name = model
        error = refused(served, "ModelInfer", request)
        body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": x.tolist()}]}
        assert (error.code(), error.details()) == (
            code,
            rest_error(served, f"/v2/models/{model}/infer", body)[1],
        )
        assert rest_error(served, f"/v2/models/{model}/infer", body)[0] == status


def raw(entries: int, size: int) -> Any:
    def build(request: Any) -> None:
        request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
        request.raw_input_contents.extend([b"\0" * size] * entries)

    return build


def typed(
    datatype: str, shape: list[int], field: str = "", values: list[Any] | None = None, **kw: Any
) -> Any:
    def build(request: Any) -> None:
        tensor = request.inputs.add(name=kw.get("name", "input"), datatype=datatype, shape=shape)
        if field:
            getattr(tensor.contents, field).extend(values or [])
        if "output" in kw:
            request.outputs.add(name=kw["output"])

    return build


ZEROS = [0.0] * 4
HOSTILE: dict[str, Any] = {
    "raw bytes shorter than the shape": raw(1, 12),
    "raw bytes longer than the shape": raw(1, 20),
    "more raw entries than inputs": raw(2, 16),
    "a shape past int64 in elements": typed("FP32", [2**62, 2**62]),
    "a negative dimension": typed("FP32", [-1, 4]),
    "no input at all": lambda request: None,
    "an unknown input": typed("FP32", [1, 4], "fp32_contents", ZEROS, name="other"),
    "an unknown datatype": typed("FP8", [1, 4]),
    "BYTES": typed("BYTES", [1, 4], "bytes_contents", [b"a"] * 4),
    "FP16 typed (it has no field)": typed("FP16", [1, 4]),
    "contents in another datatype's field": typed("FP32", [1, 4], "int_contents", [0] * 4),
    "too few typed elements": typed("FP32", [2, 4], "fp32_contents", ZEROS),
    "a wrong channel count": typed("FP32", [1, 3], "fp32_contents", ZEROS[:3]),
    "INT8 out of range": typed("INT8", [1, 4], "int_contents", [300, 0, 0, 0]),
    "NaN": typed("FP32", [1, 4], "fp32_contents", [float("nan")] * 4),
    "an unknown output": typed("FP32", [1, 4], "fp32_contents", ZEROS, output="nothing"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_requests_are_invalid_argument_and_the_server_stays_up(served: Server, case: str) -> None:
    request = pb.ModelInferRequest(model_name="frozen")
    HOSTILE[case](request)
    error = refused(served, "ModelInfer", request)
    assert error.code() is StatusCode.INVALID_ARGUMENT, error.details()
    assert call(served, "ServerLive", pb.ServerLiveRequest(), pb.ServerLiveResponse).live


def test_bytes_that_are_no_message_are_invalid_argument(served: Server) -> None:
    error = refused(served, "ModelInfer", b"\xff\xff\xff\xff not protobuf")
    assert error.code() is StatusCode.INVALID_ARGUMENT


def test_limits_answer_resource_exhausted_and_deadline_exceeded(repository: Repository) -> None:
    server = start_server(
        "--model-repository", str(repository.root), "--device", "cpu", "--max-request-bytes", "4096",
        env={"BN_SERVE_REQUEST_TIMEOUT_S": "0.000001"},
    )  # fmt: skip
    try:
        big = refused(server, "ModelInfer", typed_request(samples(300)))
        assert big.code() is StatusCode.RESOURCE_EXHAUSTED
        late = refused(server, "ModelInfer", typed_request(samples(1)))
        assert late.code() is StatusCode.DEADLINE_EXCEEDED
        assert "request_timeout_s" in late.details()
    finally:
        stop_server(server)


def test_bearer_keys_guard_every_call_but_liveness_and_readiness(repository: Repository) -> None:
    key = "grpc-test-key"
    server = start_server(
        "--model-repository", str(repository.root), "--device", "cpu", env={"BN_SERVE_API_KEY": key}
    )
    try:
        assert call(server, "ServerLive", pb.ServerLiveRequest(), pb.ServerLiveResponse).live
        assert call(server, "ServerReady", pb.ServerReadyRequest(), pb.ServerReadyResponse).ready
        request = typed_request(samples(1))
        missing = refused(server, "ModelInfer", request)
        wrong = refused(server, "ModelInfer", request, metadata=(("authorization", "Bearer nope"),))
        assert (missing.code(), wrong.code()) == (StatusCode.UNAUTHENTICATED, StatusCode.PERMISSION_DENIED)
        rest = httpx.post(f"{server.url}/v2/models/frozen/infer", json={}, timeout=30).json()["error"]
        assert missing.details() == rest
        good = call(
            server,
            "ModelInfer",
            request,
            pb.ModelInferResponse,
            metadata=(("authorization", f"Bearer {key}"),),
        )
        assert good.model_name == "frozen"
        client = tritongrpc.InferenceServerClient(server.grpc_target)
        assert (
            client.get_model_metadata("frozen", headers={"authorization": f"Bearer {key}"}).name == "frozen"
        )
    finally:
        stop_server(server)


def test_unload_then_load_over_the_repository_calls(repository: Repository) -> None:
    server = start_server("--model-repository", str(repository.root), "--device", "cpu")
    try:
        client = tritongrpc.InferenceServerClient(server.grpc_target)
        index = {(m.name, m.version): m.state for m in client.get_model_repository_index().models}
        assert index[("frozen", "1")] == "READY"
        assert index[("batchstat", "1")] == "UNAVAILABLE"
        client.unload_model("frozen")
        assert not client.is_model_ready("frozen")
        with pytest.raises(InferenceServerException, match="unloaded"):
            triton_infer(server, samples(1))
        client.load_model("frozen")
        assert client.is_model_ready("frozen")
        assert triton_infer(server, samples(1)).as_numpy("logits").shape == (1, 3)
        with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT"):
            client.load_model("batchstat")
        with pytest.raises(InferenceServerException, match="NOT_FOUND"):
            client.load_model("nothing")
    finally:
        stop_server(server)


def test_shutdown_lets_a_call_in_flight_finish(repository: Repository) -> None:
    """A stream open when SIGTERM arrives is still answered, then the server exits 0 once it closes."""
    server = start_server("--model-repository", str(repository.root), "--device", "cpu")
    client = tritongrpc.InferenceServerClient(server.grpc_target)
    answers: list[Any] = []
    answered = threading.Condition()

    def collect(result: Any, error: Any) -> None:
        with answered:
            answers.append(error or result.as_numpy("logits"))
            answered.notify_all()

    tensor = tritongrpc.InferInput("input", [1, CHANNELS], "FP32")
    tensor.set_data_from_numpy(samples(1))
    client.start_stream(callback=collect)
    try:
        client.async_stream_infer("frozen", [tensor])
        with answered:
            assert answered.wait_for(lambda: len(answers) == 1, 30)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # HTTP has drained (nothing in flight): the gRPC server is stopping, the stream open
        assert server.process.poll() is None
        client.async_stream_infer("frozen", [tensor])
        with answered:
            assert answered.wait_for(lambda: len(answers) == 2, 30)
    finally:
        client.stop_stream()
        status = stop_server(server)
    assert all(isinstance(answer, np.ndarray) for answer in answers), answers
    assert answers[0].tobytes() == answers[1].tobytes()
    assert status == 0


# -- KServe's client ---------------------------------------------------------------------------------------

# KServe's and Triton's clients register the same protobuf names, so one process cannot import both.
KSERVE_SCRIPT = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest

async def main():
    client = InferenceGRPCClient(sys.argv[1])
    x = np.array(json.loads(sys.argv[2]), np.float32)
    tensor = InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=False)
    answer = await client.infer(InferRequest("frozen", [tensor]))
    live = await client.is_server_live()
    ready = await client.is_model_ready("frozen")
    logits = next(o for o in answer.outputs if o.name == "logits").as_numpy().tolist()
    print(json.dumps({"live": live, "ready": ready, "logits": logits}))
    await client.close()

asyncio.run(main())
"""


def test_kserves_grpc_client_gets_rests_answer(served: Server) -> None:
    if importlib.util.find_spec("kserve") is None:  # found, not imported: see KSERVE_SCRIPT
        pytest.skip("kserve is not installed")
    x = samples(2, seed=5)
    run = subprocess.run(
        [sys.executable, "-c", KSERVE_SCRIPT, served.grpc_target, json.dumps(x.tolist())],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout.strip().splitlines()[-1])
    assert answer["live"]
    assert answer["ready"]
    assert np.array(answer["logits"], np.float32).tobytes() == rest_binary(served, x)["logits"].tobytes()


# -- settings --------------------------------------------------------------------------------------------


def test_grpc_port_comes_from_flags_or_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    parser = build_parser()
    assert parser.parse_args(["--no-grpc"]).grpc_port == 0
    assert parser.parse_args(["--grpc-port", "9001"]).grpc_port == 9001
    assert parser.parse_args([]).grpc_port is None  # not given: the setting's default or environment
    with pytest.raises(SystemExit):
        parser.parse_args(["--no-grpc", "--grpc-port", "9001"])
    assert Settings(model=tmp_path / "m.onnx").grpc_port == 8001
    monkeypatch.setenv("BN_SERVE_GRPC_PORT", "0")
    assert Settings(model=tmp_path / "m.onnx").grpc_port == 0


def test_no_grpc_serves_rest_only(repository: Repository) -> None:
    server = start_server("--model-repository", str(repository.root), "--device", "cpu", "--no-grpc")
    try:
        assert server.grpc_target == ""
        assert httpx.get(f"{server.url}/v2/health/live", timeout=30).status_code == 200
    finally:
        stop_server(server)


def test_a_taken_grpc_port_stops_the_server_with_a_clear_error(repository: Repository) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=r"cannot listen for gRPC on 127\.0\.0\.1:"):
            start_server(
                "--model-repository", str(repository.root), "--device", "cpu", "--grpc-port", str(port)
            )


def test_a_full_gate_is_unavailable_with_retry_after(repository: Repository) -> None:
    server = start_server(
        "--model-repository", str(repository.root), "--device", "cpu", "--inference-threads", "1",
        "--intra-op-threads", "1", env={"BN_SERVE_MAX_QUEUED_REQUESTS": "0"},
    )  # fmt: skip
    try:
        request = typed_request(samples(20_000)).SerializeToString()
        outcomes: list[grpc.RpcError | None] = []

        def one() -> None:
            try:
                call(server, "ModelInfer", request, pb.ModelInferResponse)
                outcomes.append(None)
            except grpc.RpcError as error:
                outcomes.append(error)

        threads = [threading.Thread(target=one) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        refusals = [error for error in outcomes if error is not None]
        assert refusals, "twelve concurrent calls all found the one place free"
        assert None in outcomes
        for error in refusals:
            assert error.code() is StatusCode.UNAVAILABLE
            assert "at capacity" in error.details()
            assert dict(error.trailing_metadata() or ())["retry-after"] == "1"
    finally:
        stop_server(server)
