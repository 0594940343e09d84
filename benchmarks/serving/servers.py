"""The table of servers under test and their lifecycle: start pinned to one core, wait ready, measure, stop.

A server is a row: the command that starts it (with its own interpreter or virtual environment), where it
says it is ready and where it takes inference. bn-serve is one row among the others; adding a server is
adding a row.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

SERVING = Path(__file__).resolve().parent
Role = Literal["subject", "baseline", "floor", "asgi", "wire", "peer"]


class ServerStartError(Exception):
    """A server exited or never became ready; the message holds the tail of its log."""


@dataclass(frozen=True)
class ServerSpec:
    """How to run one server on `port`. `infer_path` holds `{model}`; `binary` says if it speaks Triton's
    binary tensor extension (workloads that need it are skipped, not failed, where it does not)."""

    name: str
    role: Role
    argv: tuple[str, ...]
    port: int
    binary: bool
    ready_path: str = "/v2/health/ready"
    infer_path: str = "/v2/models/{model}/infer"
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    start_timeout_s: float = 60.0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def own_servers(repository: Path, canned: Path, bn_serve: str | None) -> list[ServerSpec]:
    """The loopback floor, uvicorn's floor, the framework floor, the naive baseline and, when installed,
    bn-serve."""
    python = sys.executable
    specs = [
        ServerSpec(
            "loopback", "wire", (python, str(SERVING / "wire_server.py"), "--canned", str(canned)), 0, True
        ),
        ServerSpec(
            "asgi-floor", "asgi", (python, str(SERVING / "asgi_floor.py"), "--canned", str(canned)), 0, True
        ),
        ServerSpec(
            "floor", "floor", (python, str(SERVING / "floor_app.py"), "--canned", str(canned)), 0, True
        ),
        ServerSpec(
            "baseline",
            "baseline",
            (python, str(SERVING / "baseline_app.py"), "--model-repository", str(repository)),
            0,
            False,
        ),
    ]
    if bn_serve is not None:
        specs.append(
            ServerSpec(
                "bn-serve",
                "subject",
                # REST only: these rows measure REST, and a gRPC port could clash with another server's.
                (bn_serve, "--model-repository", str(repository), "--host", "127.0.0.1", "--no-grpc"),
                0,
                True,
            )
        )
    return [_with_port(spec) for spec in specs]


def peer_servers(
    repository: Path,
    mlserver_python: Path,
    kserve_python: Path,
    workdir: Path,
    grpc_port: int | None = None,
) -> list[ServerSpec]:
    """Seldon MLServer and the KServe Python server, each in its own virtual environment.

    MLServer runs inference in its main process (`parallel_workers=0`): on one pinned core, its default
    worker process only adds a hop. Without `grpc_port`, MLServer's gRPC and metrics servers keep their
    defaults on spare ports (up to 64 MiB a gRPC message) and KServe's gRPC server is off; with it, both
    serve V2 gRPC on `grpc_port` (run one at a time).
    """
    mlserver_repo = workdir / "mlserver-models"
    for model in sorted(repository.glob("*/1/model.onnx")):
        folder = mlserver_repo / model.parts[-3]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model-settings.json").write_text(
            json.dumps(
                {
                    "name": model.parts[-3],
                    "implementation": "mlserver_onnx.OnnxModel",
                    "parameters": {"uri": str(model)},
                }
            )
        )
    http_port = free_port()
    mlserver = ServerSpec(
        "mlserver",
        "peer",
        (str(mlserver_python.parent / "mlserver"), "start", str(mlserver_repo)),
        http_port,
        False,
        env={
            "PYTHONPATH": str(SERVING / "peers"),
            "MLSERVER_HOST": "127.0.0.1",
            "MLSERVER_HTTP_PORT": str(http_port),
            "MLSERVER_GRPC_PORT": str(grpc_port if grpc_port is not None else free_port()),
            "MLSERVER_METRICS_PORT": str(free_port()),
            "MLSERVER_PARALLEL_WORKERS": "0",
            # W3's 4.8 MB gRPC requests exceed gRPC's default 4 MiB limit.
            "MLSERVER_GRPC_MAX_MESSAGE_LENGTH": str(64 * 1024 * 1024),
        },
        start_timeout_s=120.0,
    )
    kserve_port = free_port()
    kserve = ServerSpec(
        "kserve",
        "peer",
        (
            str(kserve_python),
            str(SERVING / "peers" / "kserve_onnx.py"),
            "--model-repository",
            str(repository),
            "--http_port",
            str(kserve_port),
            *(("--enable_grpc", "false") if grpc_port is None else ("--grpc_port", str(grpc_port))),
            "--workers",
            "1",
            "--enable_latency_logging",
            "false",
        ),
        kserve_port,
        True,
        start_timeout_s=120.0,
    )
    return [mlserver, kserve]


def _with_port(spec: ServerSpec) -> ServerSpec:
    port = free_port()
    return ServerSpec(
        spec.name, spec.role, (*spec.argv, "--port", str(port)), port, spec.binary, env=spec.env, cwd=spec.cwd
    )


def _get(url_host_port: int, path: str, timeout: float) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", url_host_port, timeout=timeout)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def _log_tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def running(spec: ServerSpec, log: Path, cpu: int) -> Iterator[subprocess.Popen[bytes]]:
    """Run `spec` pinned to `cpu` (taskset) in its own process group; stopped on exit, errors and Ctrl-C."""
    env = {**os.environ, **spec.env}
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            ["taskset", "-c", str(cpu), *spec.argv],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=spec.cwd,
            start_new_session=True,
        )
        try:
            _wait_ready(spec, process, log)
            yield process
        finally:
            stop(process)


def _wait_ready(spec: ServerSpec, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + spec.start_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerStartError(f"{spec.name} exited with status {process.returncode}:\n{_log_tail(log)}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if _get(spec.port, spec.ready_path, timeout=2.0) == 200:
                return
        time.sleep(0.2)
    raise ServerStartError(f"{spec.name} not ready after {spec.start_timeout_s:.0f} s:\n{_log_tail(log)}")


def stop(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL what is left after `grace_s`; the group dies with its leader."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_s)
    # Workers the server forked (MLServer's, uvicorn's) may outlive a leader that already exited.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name in field 2 may hold spaces; the parent pid is the 2nd field after its ')'.
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        tree.append(current)
        frontier.extend(children.get(current, []))
    return tree


def resident_memory(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MiB summed over the process tree of `pid`; PSS counts shared pages once."""
    rss_kib = pss_kib = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss_kib += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss_kib += int(line.split()[1])
    return rss_kib / 1024, pss_kib / 1024
