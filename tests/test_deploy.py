"""The Dockerfiles and deployment manifests agree with each other and with the server they run.

Both Dockerfiles are parsed (the CUDA one cannot be built here: no registry) and must declare the same
stages, user, port, volume, health check and entry point; every probe in `deploy/` must hit a GET route
of the real app on the port the container listens on; every `BN_SERVE_` variable must name a setting.
"""

from __future__ import annotations

import http.server
import re
import shlex
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.routing import APIRoute

from service.app import create_app
from service.grpc_server import LIVE_SERVICE, READY_SERVICES
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = {"cpu": ROOT / "Dockerfile", "cuda": ROOT / "Dockerfile.cuda"}
DEPLOY = ROOT / "deploy"
ENV_PREFIX = "BN_SERVE_"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions per stage: continuation lines joined, comment lines dropped (also inside a
    continuation, as Docker does), keywords upper-cased."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        logical.append(pending + line)
        pending = ""
    if pending:
        raise ValueError(f"{path}: ends inside a line continuation")
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args, flags=re.IGNORECASE)
            if match is None:
                raise ValueError(f"{path}: cannot read FROM {args!r}")
            stages.append(Stage(name=match.group(2) or str(len(stages)), base=match.group(1)))
        elif not stages:
            if keyword != "ARG":
                raise ValueError(f"{path}: {keyword} before the first FROM")
            name, _, default = args.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append((keyword, args))
    return Dockerfile(global_args, stages)


def env_of(stage: Stage) -> dict[str, str]:
    """The stage's ENV settings (`ENV K=V K2=V2` form)."""
    env: dict[str, str] = {}
    for args in stage.args("ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def exposed_ports(dockerfile: Dockerfile) -> list[int]:
    return [int(port.split("/")[0]) for port in dockerfile.final.args("EXPOSE")]


def exposed_port(dockerfile: Dockerfile) -> int:
    """The REST port: the first one exposed (the gRPC one follows it)."""
    return exposed_ports(dockerfile)[0]


def healthcheck_command(dockerfile: Dockerfile) -> str:
    (check,) = dockerfile.final.args("HEALTHCHECK")
    _, _, command = check.partition(" CMD ")
    return command


def load_manifests(*parts: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(DEPLOY.joinpath(*parts).glob("*.yaml")):
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [doc for doc in docs if doc["kind"] == kind]
    return doc


def probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        key: container[key]["httpGet"]
        for key in ("readinessProbe", "livenessProbe", "startupProbe")
        if key in container
    }


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(number)


def named_port(container: dict[str, Any], name: str) -> dict[str, Any]:
    (port,) = [p for p in container["ports"] if p.get("name") == name]
    return port


def env_list(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: str(item["value"]) for item in container.get("env", [])}


@pytest.fixture(scope="module")
def get_routes(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The GET paths of the real app (built, not started: no model is loaded, so none needs to exist)."""
    repository = tmp_path_factory.mktemp("models")
    (repository / "m" / "1").mkdir(parents=True)
    settings = Settings(model_repository=repository)
    app = create_app(settings)
    return {route.path for route in app.routes if isinstance(route, APIRoute) and "GET" in route.methods}


@pytest.fixture(scope="module")
def dockerfiles() -> dict[str, Dockerfile]:
    return {variant: parse_dockerfile(path) for variant, path in DOCKERFILES.items()}


def test_both_dockerfiles_build_a_runtime_stage_from_a_builder_stage(
    dockerfiles: dict[str, Dockerfile],
) -> None:
    for variant, dockerfile in dockerfiles.items():
        assert [stage.name for stage in dockerfile.stages] == ["builder", "runtime"], variant
        assert all(stage.base == "${BASE}" for stage in dockerfile.stages), variant
        copied_from = [args for args in dockerfile.final.args("COPY") if args.startswith("--from=")]
        assert copied_from == ["--from=builder /opt/venv /opt/venv", "--from=builder /models /models"], (
            variant
        )


def test_base_images_are_build_args_with_documented_defaults(dockerfiles: dict[str, Dockerfile]) -> None:
    assert dockerfiles["cpu"].global_args["BASE"] == "python:3.11-slim"
    assert re.fullmatch(
        r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", dockerfiles["cuda"].global_args["BASE"]
    )


def test_cuda_variant_matches_the_cpu_image_in_everything_users_touch(
    dockerfiles: dict[str, Dockerfile],
) -> None:
    cpu, cuda = dockerfiles["cpu"].final, dockerfiles["cuda"].final
    for keyword in ("USER", "EXPOSE", "VOLUME", "HEALTHCHECK", "ENTRYPOINT"):
        assert cpu.args(keyword) == cuda.args(keyword), keyword
    assert env_of(cpu) == env_of(cuda)


def test_cuda_variant_installs_onnxruntime_gpu_in_place_of_the_cpu_build(
    dockerfiles: dict[str, Dockerfile],
) -> None:
    runs = " ".join(dockerfiles["cuda"].stages[0].args("RUN"))
    assert "pip uninstall --yes onnxruntime " in runs
    assert '--force-reinstall --no-deps "${ONNXRUNTIME_GPU}"' in runs


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_image_runs_as_a_numeric_non_root_user(dockerfiles: dict[str, Dockerfile], variant: str) -> None:
    (user,) = dockerfiles[variant].final.args("USER")
    uid, _, gid = user.partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can verify it without reading the image's /etc/passwd.
    assert uid.isdigit()
    assert gid.isdigit()
    assert int(uid) != 0
    assert int(gid) != 0
    assert f"--uid {uid} " in " ".join(dockerfiles[variant].final.args("RUN"))


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_image_serves_the_model_volume_on_all_interfaces_at_the_exposed_port(
    dockerfiles: dict[str, Dockerfile], variant: str
) -> None:
    dockerfile = dockerfiles[variant]
    env = env_of(dockerfile.final)
    assert env["BN_SERVE_HOST"] == "0.0.0.0"
    assert int(env["BN_SERVE_PORT"]) == exposed_port(dockerfile) == 8000
    assert [int(env["BN_SERVE_PORT"]), int(env["BN_SERVE_GRPC_PORT"])] == exposed_ports(dockerfile)
    assert dockerfile.final.args("VOLUME") == ['["/models"]']
    assert env["BN_SERVE_MODEL_REPOSITORY"] == "/models"
    assert dockerfile.final.args("ENTRYPOINT") == ['["bn-serve"]']
    assert "--out /models/digits/1/model.onnx" in " ".join(dockerfile.stages[0].args("RUN"))


def test_healthcheck_probes_a_ready_route_of_the_app(
    dockerfiles: dict[str, Dockerfile], get_routes: set[str]
) -> None:
    command = healthcheck_command(dockerfiles["cpu"])
    (path,) = re.findall(r"/v2/[\w/]+", command)
    assert path == "/v2/health/ready"
    assert path in get_routes


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(type(self).status if self.path == "/v2/health/ready" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def health_server() -> Iterator[tuple[int, type[_Health]]]:
    handler = type("Health", (_Health,), {"status": 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_healthcheck_exits_zero_only_while_the_server_is_ready(
    dockerfiles: dict[str, Dockerfile], health_server: tuple[int, type[_Health]]
) -> None:
    """Runs the HEALTHCHECK's own command on the host, against a stand-in that answers 200, then 503."""
    command = healthcheck_command(dockerfiles["cpu"])
    argv = [sys.executable if word == "python" else word for word in shlex.split(command)]
    port, handler = health_server

    def check(env_port: int) -> int:
        return subprocess.run(
            argv, env={"BN_SERVE_PORT": str(env_port)}, capture_output=True, timeout=30
        ).returncode

    assert check(port) == 0
    handler.status = 503
    assert check(port) != 0
    handler.status = 200
    assert check(port) == 0
    # Nothing listening on the port: the check must fail, not hang or pass.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    assert check(free_port) != 0


def test_every_bn_serve_variable_names_a_setting(dockerfiles: dict[str, Dockerfile]) -> None:
    names = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    used = {
        key
        for dockerfile in dockerfiles.values()
        for key in env_of(dockerfile.final)
        if key.startswith(ENV_PREFIX)
    }
    for doc in load_manifests("kubernetes") + load_manifests("kserve") + load_manifests("kserve", "grpc"):
        for container in _containers(doc):
            used |= {key for key in env_list(container) if key.startswith(ENV_PREFIX)}
    assert used, "no BN_SERVE_ variable found: the parsers are broken"
    assert used <= names, sorted(used - names)


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "Deployment":
        return list(doc["spec"]["template"]["spec"]["containers"])
    if doc["kind"] == "ServingRuntime":
        return list(doc["spec"]["containers"])
    return []


def test_kubernetes_probes_hit_app_routes_on_the_container_port(
    dockerfiles: dict[str, Dockerfile], get_routes: set[str]
) -> None:
    deployment = only(load_manifests("kubernetes"), "Deployment")
    (container,) = _containers(deployment)
    port, grpc_port = (named_port(container, name) for name in ("http", "grpc"))
    assert [port["containerPort"], grpc_port["containerPort"]] == exposed_ports(dockerfiles["cpu"])
    assert int(env_list(container)["BN_SERVE_PORT"]) == port["containerPort"]
    assert int(env_list(container)["BN_SERVE_GRPC_PORT"]) == grpc_port["containerPort"]
    found = probes(container)
    assert found["readinessProbe"]["path"] == "/v2/health/ready"
    assert found["livenessProbe"]["path"] == "/v2/health/live"
    for name, probe in found.items():
        assert probe["path"] in get_routes, name
        assert resolve_port(container, probe["port"]) == port["containerPort"], name


def test_deployment_runs_as_the_image_user_with_requests_and_a_grace_period(
    dockerfiles: dict[str, Dockerfile],
) -> None:
    pod = only(load_manifests("kubernetes"), "Deployment")["spec"]["template"]["spec"]
    (user,) = dockerfiles["cpu"].final.args("USER")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user.partition(":")[0]
    (container,) = pod["containers"]
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The kubelet's SIGKILL must come after the server's own graceful shutdown has had its time.
    assert pod["terminationGracePeriodSeconds"] > Settings.model_fields["graceful_shutdown_s"].default


def test_service_selects_the_deployment_pods_and_targets_the_container_port() -> None:
    docs = load_manifests("kubernetes")
    deployment, service = only(docs, "Deployment"), only(docs, "Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = _containers(deployment)
    for port in service["spec"]["ports"]:
        assert (
            resolve_port(container, port["targetPort"])
            == named_port(container, port["name"])["containerPort"]
        )
    assert {port["name"] for port in service["spec"]["ports"]} == {"http", "grpc"}


def test_kserve_inference_service_runs_the_image_runtime_with_protocol_v2(get_routes: set[str]) -> None:
    docs = load_manifests("kserve")
    runtime, isvc = only(docs, "ServingRuntime"), only(docs, "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2"
    assert model["runtime"] == runtime["metadata"]["name"]
    assert "v2" in runtime["spec"]["protocolVersions"]
    assert model["modelFormat"]["name"] in {fmt["name"] for fmt in runtime["spec"]["supportedModelFormats"]}
    (container,) = _containers(runtime)
    assert container["name"] == "kserve-container"
    env = env_list(container)
    # KServe's storage initializer puts the storageUri's content here.
    assert env["BN_SERVE_MODEL_REPOSITORY"] == "/mnt/models"
    (port,) = container["ports"]
    assert int(env["BN_SERVE_PORT"]) == port["containerPort"]
    for name, probe in probes(container).items():
        assert probe["path"] in get_routes, name
        assert resolve_port(container, probe["port"]) == port["containerPort"], name


def test_manifests_name_the_same_image() -> None:
    images = {
        container["image"]
        for doc in load_manifests("kubernetes") + load_manifests("kserve") + load_manifests("kserve", "grpc")
        for container in _containers(doc)
    }
    assert len(images) == 1


def test_kserve_grpc_inference_service_routes_to_the_grpc_port_with_grpc_health_probes() -> None:
    docs = load_manifests("kserve", "grpc")
    runtime, isvc = only(docs, "ServingRuntime"), only(docs, "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "grpc-v2"
    assert model["runtime"] == runtime["metadata"]["name"]
    assert "grpc-v2" in runtime["spec"]["protocolVersions"]
    (container,) = _containers(runtime)
    env = env_list(container)
    # KServe sends gRPC to the container's one port, named h2c.
    (port,) = container["ports"]
    assert port["name"] == "h2c"
    assert int(env["BN_SERVE_GRPC_PORT"]) == port["containerPort"] != int(env["BN_SERVE_PORT"])
    readiness, liveness = (container[key]["grpc"] for key in ("readinessProbe", "livenessProbe"))
    assert readiness["port"] == liveness["port"] == port["containerPort"]
    assert readiness.get("service", "") in READY_SERVICES
    assert liveness["service"] == LIVE_SERVICE


def test_dockerignore_admits_exactly_what_the_dockerfiles_copy(dockerfiles: dict[str, Dockerfile]) -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # An allowlist: everything is excluded first (.venv, .git, demo/, benchmark results, caches ...).
    assert lines[0] == "*"
    admitted = {line[1:] for line in lines if line.startswith("!")}
    copied: set[str] = set()
    for dockerfile in dockerfiles.values():
        for args in dockerfile.stages[0].args("COPY"):
            *sources, _ = args.split()
            copied |= set(sources)
    assert {source.removeprefix("./").rstrip("/") for source in copied} == admitted
    assert all((ROOT / path).exists() for path in admitted)
