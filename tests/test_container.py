"""The serving image, built from ./Dockerfile and run for real with podman.

The image is built on the registry-free base that `scripts/container-tools.sh base` makes (Debian bookworm's
Python 3.11), so no registry is needed; layers are cached between runs. The container serves its built-in
demo model; its answers are checked against the BatchNorm inference formula in float64 numpy, computed from a
checkpoint fitted on the host with the same command and seed as the image's build:

    y = gamma * (x - moving_mean) / sqrt(moving_var + eps) + beta        x: (N, 64)
    logits = y @ head_weight + head_bias                                 logits: (N, 10)

Skipped with the reason where podman or the base image cannot be had; `.ci/run` installs both.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from numpy.typing import NDArray

from bn_export.checkpoint import Checkpoint, load_checkpoint

pytestmark = [pytest.mark.container, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "scripts" / "container-tools.sh"
DIGITS = ROOT / "bn_export" / "demo_data" / "digits.npz"
IMAGE = os.environ.get("FROZEN_BN_IMAGE", "localhost/frozen-bn:test")
BASE_IMAGE = os.environ.get("FROZEN_BN_BASE_IMAGE", "localhost/py-base:bookworm")
# The runtimes this machine's kernel accepts (crun's cgroup setup is refused); see container-tools.sh.
PODMAN = ("podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs")
# The uid the Dockerfile's USER names.
SERVER_UID = 10001
# Bound on the image's size, documented in the README's Deployment section: the bookworm base (~130 MB)
# plus the venv (numpy, onnx, onnxruntime, the web stack) and the demo model.
IMAGE_SIZE_BOUND_MB = 450
READY_TIMEOUT_S = 60.0
# Start to ready with a warm machine is a few seconds; this bound catches a server that hangs on start.
STARTUP_BOUND_S = 30.0
# Well under `podman stop`'s own timeout: the server must shut down on SIGTERM, not wait to be killed.
STOP_TIMEOUT_S = 40
STOP_BOUND_S = 20.0
# The same fit as the Dockerfile's builder stage.
FIT_ARGS = (
    "--targets", str(DIGITS), "--head", "linear", "--loss", "cross-entropy",
    "--stats", "population", "--epochs", "3", "--seed", "0",
)  # fmt: skip


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        pytest.fail(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result


def tools(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FROZEN_BN_IMAGE": IMAGE, "FROZEN_BN_BASE_IMAGE": BASE_IMAGE}
    return subprocess.run(
        ["bash", str(TOOLS), *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class Running:
    name: str
    port: int
    startup_s: float

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def wait_ready(name: str, port: int) -> float:
    """Seconds until `/v2/health/ready` answers 200; fails with the container's log if it exits or stalls."""
    start = time.monotonic()
    while time.monotonic() - start < READY_TIMEOUT_S:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        if state not in ("created", "running"):
            logs = podman("logs", name, check=False)
            pytest.fail(
                f"container {name} is {state} before ready:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}"
            )
        time.sleep(0.2)
    logs = podman("logs", name, check=False)
    pytest.fail(f"container {name} not ready after {READY_TIMEOUT_S} s:\n{logs.stderr[-3000:]}")


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("podman") is None:
        pytest.skip(
            "podman is not installed (`scripts/container-tools.sh install` installs it; .ci/run does)"
        )
    if podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        made = tools("base", timeout=600)
        if made.returncode != 0:
            pytest.skip(f"base image {BASE_IMAGE} cannot be made here:\n{made.stderr[-2000:]}")
    # A failed build is a broken Dockerfile, not a missing tool: it fails the test.
    built = tools("build", IMAGE, timeout=1500)
    if built.returncode != 0:
        pytest.fail(f"building {IMAGE} failed:\n{built.stdout[-4000:]}\n{built.stderr[-4000:]}")
    return IMAGE


@pytest.fixture(scope="module")
def start(image: str) -> Iterator[Callable[..., Running]]:
    """Starts containers of the image (host network, read-only root, the CI's ulimits) and removes them."""
    names: list[str] = []

    def run(*extra: str) -> Running:
        name = f"frozen-bn-test-{uuid.uuid4().hex[:8]}"
        port, grpc_port = free_port(), free_port()
        names.append(name)
        began = time.monotonic()
        podman(
            "run", "--detach", "--name", name, "--network=host", "--read-only",
            "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096",
            # Loopback only: with the host network, the image default 0.0.0.0 would be every interface.
            "-e", "BN_SERVE_HOST=127.0.0.1", "-e", f"BN_SERVE_PORT={port}",
            # Each container its own gRPC port too: on the host network, two would both want 8001.
            "-e", f"BN_SERVE_GRPC_PORT={grpc_port}",
            *extra, image,
        )  # fmt: skip
        wait_ready(name, port)
        return Running(name, port, time.monotonic() - began)

    yield run
    for name in names:
        podman("rm", "--force", "--volumes", name, check=False)


@pytest.fixture(scope="module")
def demo(start: Callable[..., Running]) -> Running:
    return start()


def bn_export(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "bn_export.cli", *args], check=True, capture_output=True, timeout=300
    )


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo checkpoint, fitted on the host exactly as the image's builder stage fits it."""
    path = tmp_path_factory.mktemp("fit") / "digits.ckpt.npz"
    bn_export("fit", str(DIGITS), *FIT_ARGS, "--out", str(path))
    return path


@pytest.fixture(scope="module")
def checkpoint(checkpoint_path: Path) -> Checkpoint:
    return load_checkpoint(checkpoint_path)


def reference(checkpoint: Checkpoint, x: NDArray[Any]) -> dict[str, NDArray[np.float64]]:
    """The frozen-statistics inference formula with the linear head, in float64."""
    c = checkpoint
    assert c.head is not None
    x64 = x.astype(np.float64)
    y = c.gamma.astype(np.float64) * (x64 - c.moving_mean) / np.sqrt(c.moving_var.astype(np.float64) + c.eps)
    y = y + c.beta
    return {"output": y, "logits": y @ c.head.weight.astype(np.float64) + c.head.bias}


def samples(n: int) -> NDArray[np.float32]:
    with np.load(DIGITS, allow_pickle=False) as data:
        return np.ascontiguousarray(data["data"][:n], dtype=np.float32)


def test_image_is_smaller_than_the_documented_bound(image: str) -> None:
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())
    assert size < IMAGE_SIZE_BOUND_MB * 1e6, f"{size / 1e6:.0f} MB"


def test_image_declares_port_user_volume_and_healthcheck(image: str) -> None:
    (inspected,) = json.loads(podman("image", "inspect", image).stdout)
    config = inspected["Config"]
    assert "8000/tcp" in config["ExposedPorts"]
    assert config["User"] == f"{SERVER_UID}:{SERVER_UID}"
    assert "/models" in config["Volumes"]
    # Kept only in the docker image format (OCI has no health check), hence `--format docker` when building.
    assert any("/v2/health/ready" in part for part in inspected["Healthcheck"]["Test"])


def test_container_is_ready_within_the_startup_bound(demo: Running) -> None:
    assert demo.startup_s < STARTUP_BOUND_S


def test_demo_model_answers_json_inference_with_the_frozen_formula(
    demo: Running, checkpoint: Checkpoint
) -> None:
    x = samples(7)
    body = {
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
    }
    response = httpx.post(f"{demo.url}/v2/models/digits/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    outputs = {out["name"]: out for out in response.json()["outputs"]}
    expected = reference(checkpoint, x)
    for name, want in expected.items():
        got = np.asarray(outputs[name]["data"], dtype=np.float64).reshape(outputs[name]["shape"])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)


def test_demo_model_answers_binary_inference_with_the_frozen_formula(
    demo: Running, checkpoint: Checkpoint
) -> None:
    import tritonclient.http as triton

    x = samples(33)
    client = triton.InferenceServerClient(f"127.0.0.1:{demo.port}")
    try:
        request = triton.InferInput("input", list(x.shape), "FP32")
        request.set_data_from_numpy(x, binary_data=True)
        wanted = [triton.InferRequestedOutput("logits", binary_data=True)]
        result = client.infer("digits", [request], outputs=wanted)
    finally:
        client.close()
    logits = result.as_numpy("logits")
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, reference(checkpoint, x)["logits"], rtol=1e-4, atol=1e-4)


def test_server_process_runs_as_the_unprivileged_user(demo: Running) -> None:
    host_pid = podman("inspect", "--format", "{{.State.Pid}}", demo.name).stdout.strip()
    status = Path(f"/proc/{host_pid}/status").read_text()
    (uids,) = [line.split()[1:] for line in status.splitlines() if line.startswith("Uid:")]
    # Real, effective, saved and filesystem uid: no way back to root.
    assert uids == [str(SERVER_UID)] * 4
    assert podman("exec", demo.name, "id", "-u").stdout.strip() == str(SERVER_UID)


def test_healthcheck_reports_healthy_once_ready(demo: Running) -> None:
    result = podman("healthcheck", "run", demo.name, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def mounted_repository(checkpoint_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository made on the host, holding the demo model under another name, readable by all."""
    root = tmp_path_factory.mktemp("repository")
    bn_export(
        "export", str(checkpoint_path), "--with-head", "--out", str(root / "mounted" / "1" / "model.onnx")
    )
    # The server runs as uid 10001, not as the owner of these files.
    for path in (root, *root.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def test_mounted_repository_replaces_the_demo_and_stop_exits_zero(
    start: Callable[..., Running], mounted_repository: Path
) -> None:
    running = start("--volume", f"{mounted_repository}:/models:ro")
    assert httpx.get(f"{running.url}/v2/models/mounted/ready", timeout=10).status_code == 200
    assert httpx.get(f"{running.url}/v2/models/digits/ready", timeout=10).status_code == 404

    began = time.monotonic()
    podman("stop", "--time", str(STOP_TIMEOUT_S), running.name, timeout=STOP_TIMEOUT_S + 30)
    stopped_in = time.monotonic() - began
    state = json.loads(podman("inspect", "--format", "{{json .State}}", running.name).stdout)
    assert state["Status"] == "exited"
    # 0: SIGTERM led to a clean shutdown; 137 would be the SIGKILL after the timeout.
    assert state["ExitCode"] == 0
    assert stopped_in < STOP_BOUND_S
