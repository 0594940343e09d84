"""Tiny ONNX models built with onnx.helper, a model repository on disk, and servers (in-process and real)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import orjson
import pytest
from fastapi import FastAPI
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from service.app import create_app
from service.settings import Settings

OPSET = 15
IR_VERSION = 8
EPS = 1e-5
CHANNELS = 4


def validated_decode(body: bytes) -> Any:
    """What `service.codec`'s schema-validating path decodes a JSON `body` to, (request, format), no
    shortcut taken: the reference the shortcuts (its plain path, `service.large_json`) are held to."""
    from service import codec

    header = memoryview(body)
    request = codec._validated(codec.json_object(header))
    inputs = codec._decode_inputs(request.inputs, header[:0], may_hold_booleans=True)
    return codec._to_core(request, inputs)


CLASSES = 3


@dataclass(frozen=True)
class FrozenParams:
    """The statistics and head of a frozen test model, for the float64 reference formula."""

    gamma: NDArray[np.float32]
    beta: NDArray[np.float32]
    mean: NDArray[np.float32]
    var: NDArray[np.float32]
    weight: NDArray[np.float32]
    bias: NDArray[np.float32]

    def output(self, x: NDArray[Any]) -> NDArray[np.float64]:
        """`gamma*(x - mean)/sqrt(var + eps) + beta` in float64, x: (N, C)."""
        g, b, m, v = (np.float64(p) for p in (self.gamma, self.beta, self.mean, self.var))
        return g * (np.asarray(x, np.float64) - m) / np.sqrt(v + np.float64(np.float32(EPS))) + b

    def logits(self, x: NDArray[Any]) -> NDArray[np.float64]:
        """`output(x) @ weight + bias` in float64: (N, K)."""
        return self.output(x) @ self.weight.astype(np.float64) + self.bias.astype(np.float64)


def frozen_params(seed: int) -> FrozenParams:
    rng = np.random.default_rng(seed)

    def f32(*shape: int) -> NDArray[np.float32]:
        return rng.standard_normal(shape).astype(np.float32)

    return FrozenParams(
        gamma=f32(CHANNELS),
        beta=f32(CHANNELS),
        mean=f32(CHANNELS),
        var=(rng.random(CHANNELS) + 0.5).astype(np.float32),
        weight=f32(CHANNELS, CLASSES),
        bias=f32(CLASSES),
    )


def frozen_model(params: FrozenParams) -> onnx.ModelProto:
    """input (N, C) float32 -> inference-mode BatchNormalization -> output (N, C) -> linear head -> logits."""
    inits = [
        numpy_helper.from_array(getattr(params, name), name) for name in ("gamma", "beta", "mean", "var")
    ]
    inits += [
        numpy_helper.from_array(params.weight, "head_weight"),
        numpy_helper.from_array(params.bias, "head_bias"),
    ]
    nodes = [
        helper.make_node(
            "BatchNormalization", ["input", "gamma", "beta", "mean", "var"], ["output"], epsilon=EPS
        ),
        helper.make_node("MatMul", ["output", "head_weight"], ["product"]),
        helper.make_node("Add", ["product", "head_bias"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "frozen_bn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", CHANNELS])],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", CHANNELS]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model


def batch_statistics_model() -> onnx.ModelProto:
    """input (N, C) -> (x - mean over the batch) / sqrt(var over the batch + eps): batch statistics."""
    eps = numpy_helper.from_array(np.array(EPS, dtype=np.float32), "eps")
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mu"], axes=[0], keepdims=1),
        helper.make_node("Sub", ["input", "mu"], ["centered"]),
        helper.make_node("Mul", ["centered", "centered"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["var"], axes=[0], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Div", ["centered", "std"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "batch_statistics",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", CHANNELS])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", CHANNELS])],
        initializer=[eps],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model


@dataclass(frozen=True)
class Repository:
    root: Path
    params: dict[int, FrozenParams]  # version of model "frozen" -> its parameters


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    """frozen/{1,2} (two versions, different statistics), batchstat/1 (refused), corrupt/1 (not ONNX)."""
    root = tmp_path_factory.mktemp("models")
    params = {1: frozen_params(1), 2: frozen_params(2)}
    for version, p in params.items():
        (root / "frozen" / str(version)).mkdir(parents=True)
        onnx.save(frozen_model(p), root / "frozen" / str(version) / "model.onnx")
    (root / "batchstat" / "1").mkdir(parents=True)
    onnx.save(batch_statistics_model(), root / "batchstat" / "1" / "model.onnx")
    (root / "corrupt" / "1").mkdir(parents=True)
    (root / "corrupt" / "1" / "model.onnx").write_bytes(b"this is not an ONNX protobuf")
    return Repository(root=root, params=params)


def test_settings(root: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "model_repository": root,
        "device": "cpu",
        "intra_op_threads": 1,
        "inference_threads": 2,
        "grpc_port": 0,  # in-process apps serve REST only; tests/service/test_grpc.py starts real servers
        **overrides,
    }
    return Settings(**values)


class InProcess:
    """The app served in-process through httpx's ASGI transport, with its lifespan (model loading) run on a
    private event loop in a thread, as a server would; synchronous `get`/`post` for the tests."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._lifespan = app.router.lifespan_context(app)
        self._call(self._lifespan.__aenter__())
        self._client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=60)

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        response: httpx.Response = self._call(self._client.request(method, url, **kwargs))
        return response

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.get("/v2/health/ready").status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not become ready")
            time.sleep(0.02)

    def close(self) -> None:
        try:
            self._call(self._client.aclose())
            self._call(self._lifespan.__aexit__(None, None, None))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


@pytest.fixture(scope="session")
def client(repository: Repository) -> Iterator[InProcess]:
    """An in-process server over the test repository (1 MiB request limit), ready."""
    app = create_app(test_settings(repository.root, max_request_bytes=1 << 20))
    in_process = InProcess(app)
    try:
        in_process.wait_ready()
        yield in_process
    finally:
        in_process.close()


@pytest.fixture
def serve_in_process(repository: Repository) -> Callable[..., InProcess]:
    """A factory of ready in-process servers over the test repository with the given settings overrides."""

    def serve(**overrides: Any) -> InProcess:
        server = InProcess(create_app(test_settings(repository.root, **overrides)))
        try:
            server.wait_ready()
        except BaseException:
            server.close()
            raise
        return server

    return serve


class CollectingTransport:
    """An in-memory transport for driving the HTTP protocol without sockets: the calls the protocol
    makes, keeping what is written. `deliver` hands bytes to the protocol holding it, as a socket would."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False
        self.protocol: Any = None
        self.protocols: list[Any] = []  # every protocol `set_protocol` gave the transport, in order

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol
        self.protocols.append(protocol)

    def deliver(self, data: bytes) -> None:
        """`data` read from the socket: a buffered protocol is given at most its buffer's size per read
        (asyncio's and uvloop's `get_buffer`/`buffer_updated`), what is left goes to the protocol holding
        the transport then; any other gets it in one `data_received`."""
        while data and not self.closing:
            protocol = self.protocol
            if not isinstance(protocol, asyncio.BufferedProtocol):
                protocol.data_received(data)
                return
            buffer = protocol.get_buffer(len(data))
            size = min(len(buffer), len(data))
            assert size > 0, "get_buffer gave an empty buffer"
            buffer[:size] = data[:size]
            protocol.buffer_updated(size)
            data = data[size:]


ONE_MODEL_SEED = 3


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository of one model, `m` version 1 (`frozen_params(ONE_MODEL_SEED)`), for `protocol_answers`."""
    root = tmp_path_factory.mktemp("one-model")
    (root / "m" / "1").mkdir(parents=True)
    onnx.save(frozen_model(frozen_params(ONE_MODEL_SEED)), root / "m" / "1" / "model.onnx")
    return root


def protocol_answers(
    model_root: Path, reads: list[list[bytes]], responses: int = 1
) -> list[tuple[bytes, CollectingTransport, Any]]:
    """Each list of reads delivered on a connection of its own to the app serving `model_root`, through
    bn-serve's HTTP protocol in-process; per connection, once `responses` answers are complete (or it
    closed): what was written, the transport and the protocol."""
    import uvicorn
    from uvicorn.server import ServerState

    from service.http_direct import serving_protocol

    async def run() -> list[tuple[bytes, CollectingTransport, Any]]:
        app = create_app(test_settings(model_root))
        config = uvicorn.Config(app, http=serving_protocol(32 * 1024, 100, 30.0, 30.0), log_config=None)
        config.load()
        state = ServerState()
        found = []
        async with app.router.lifespan_context(app):
            while app.state.core.unready_reason() is not None:
                await asyncio.sleep(0.01)
            for chunks in reads:
                protocol = config.http_protocol_class(
                    config=config, server_state=state, app_state={}, _loop=asyncio.get_running_loop()
                )
                transport = CollectingTransport()
                transport.protocol = protocol
                protocol.connection_made(transport)  # type: ignore[arg-type]
                before = state.total_requests
                for chunk in chunks:
                    transport.deliver(chunk)
                    await asyncio.sleep(0)  # a turn of the loop between reads, as between socket reads
                for _ in range(2000):
                    if state.total_requests >= before + responses or transport.closing:
                        break
                    await asyncio.sleep(0.001)
                found.append((b"".join(transport.written), transport, protocol))
                protocol.connection_lost(None)
        return found

    return asyncio.run(run())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    host_port: str
    # The server's output goes to a file, not a pipe: an undrained pipe fills up and blocks the server.
    log: Any = None
    grpc_target: str = ""  # host:port of its gRPC service; empty when it has none

    def output(self) -> str:
        """Everything the server has written to stdout and stderr so far."""
        if self.log is None:
            return ""
        self.log.flush()
        with open(self.log.name, encoding="utf-8", errors="replace") as reader:
            return reader.read()


def start_server(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> Server:
    """`bn-serve ARGS --port <free>` as a real process, returned once /v2/health/ready answers 200.

    Unless ARGS choose otherwise, its gRPC service listens on another free port (`--grpc-port`), never on
    the default 8001 that concurrent servers would contend for.
    """
    port = free_port()
    if not any(arg.startswith(("--grpc-port", "--no-grpc")) for arg in args):
        args = (*args, "--grpc-port", str(free_port()))
    grpc_port = args[args.index("--grpc-port") + 1] if "--grpc-port" in args else "0"
    grpc_target = f"127.0.0.1:{grpc_port}" if grpc_port != "0" else ""
    command = [sys.executable, "-m", "service.cli", *args, "--host", "127.0.0.1", "--port", str(port)]
    log = tempfile.NamedTemporaryFile(prefix="bn-serve-", suffix=".log")  # noqa: SIM115 (closed in stop_server)
    process = subprocess.Popen(
        command, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            output = Server(process, url, "", log).output()
            log.close()
            raise RuntimeError(f"bn-serve exited with {process.returncode}:\n{output}")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as response:
                if response.status == 200:
                    return Server(process, url, f"127.0.0.1:{port}", log, grpc_target)
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_server(Server(process, url, f"127.0.0.1:{port}", log))
            raise TimeoutError("bn-serve did not become ready")
        time.sleep(0.1)


def stop_server(server: Server, timeout: float = 20.0) -> int:
    """SIGTERM, then SIGKILL after `timeout`; the exit status."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    if server.log is not None:
        server.log.close()
    return int(server.process.returncode)


@pytest.fixture
def launch() -> Iterator[Callable[..., Server]]:
    """Start `bn-serve` processes with given arguments; each is stopped at the end of the test."""
    started: list[Server] = []

    def run(*args: str) -> Server:
        started.append(start_server(*args))
        return started[-1]

    yield run
    for running in started:
        stop_server(running)


@pytest.fixture(scope="session")
def server(repository: Repository) -> Iterator[Server]:
    """A real `bn-serve` process on a free loopback port, serving the test repository."""
    running = start_server(
        "--model-repository", str(repository.root), "--device", "cpu", "--intra-op-threads", "1"
    )
    try:
        yield running
    finally:
        stop_server(running)


def binary_infer_body(x: NDArray[Any]) -> tuple[bytes, int]:
    """A Triton binary-extension request for `x` on input `input`, asking every output back in binary:
    the body and the length of its JSON header (the `Inference-Header-Content-Length` value)."""
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "input", "shape": list(x.shape), "datatype": "FP32",
                 "parameters": {"binary_data_size": x.nbytes}}
            ],
            "parameters": {"binary_data_output": True},
        }
    )  # fmt: skip
    return header + np.ascontiguousarray(x, "<f4").tobytes(), len(header)


def binary_outputs(response: httpx.Response) -> dict[str, NDArray[Any]]:
    """Output name -> FP32 array of a binary-extension response."""
    length = int(response.headers["inference-header-content-length"])
    offset, arrays = length, {}
    for output in orjson.loads(response.content[:length])["outputs"]:
        size = output["parameters"]["binary_data_size"]
        raw = response.content[offset : offset + size]
        arrays[output["name"]] = np.frombuffer(raw, "<f4").reshape(output["shape"])
        offset += size
    return arrays
