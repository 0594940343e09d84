"""Triton Inference Server as a peer: the `tritonserver` binary that the `nvidia-pytriton` wheel bundles, run
directly on a model repository of its own, each model a python-backend model running the same ONNX file in
onnxruntime (`peers/triton_onnx.py`).

PyTriton's Python API is not used: only the server binary, the python backend and the backend's stub for
the running Python. Three details make the stub work from a virtual environment:

- the stub embeds the libpython it finds first, and takes the standard library of that build: the LIBDIR of
  the interpreter that built the venv goes first on `LD_LIBRARY_PATH` (else the system's libpython may
  load, with another interpreter's standard library);
- the stub runs isolated from the environment (no `PYTHONPATH`), with its working folder on `sys.path`: the
  server runs from the venv's site-packages, so the stub imports the venv's numpy and onnxruntime rather
  than any installed beside the base interpreter (a numpy 2 there makes the stub send wrong sizes);
- the stub is copied out of the wheel, so the wheel's bundled libraries (`nvidia_pytriton.libs`) go on
  `LD_LIBRARY_PATH` too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import onnx

from benchmarks.serving.servers import ServerSpec, free_port

SERVING = Path(__file__).resolve().parent
MODEL_SOURCE = SERVING / "peers" / "triton_onnx.py"
# Triton refuses a request with more samples than max_batch_size: room for W2's 256 samples in one request.
MAX_BATCH_SIZE = 256
# ONNX element types that the benchmark's models use, as Triton names them.
TRITON_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32"}


class TritonUnavailableError(Exception):
    """The wheel's server, python backend or a stub for the running Python is missing; the row is skipped."""


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces are in a venv holding nvidia-pytriton, and the interpreter the stub must embed."""

    server: Path
    backend_files: tuple[Path, ...]
    site_packages: Path
    library_path: tuple[Path, ...]

    @classmethod
    def locate(cls, python: Path) -> TritonInstall:
        """Find the server, the python backend and the stub matching `python`'s version in its venv."""
        probe = (
            "import json, sys, sysconfig; print(json.dumps({'libdir': sysconfig.get_config_var('LIBDIR'), "
            "'shared': sysconfig.get_config_var('Py_ENABLE_SHARED'), "
            "'purelib': sysconfig.get_paths()['purelib'], "
            "'version': '%d.%d' % sys.version_info[:2]}))"
        )
        completed = subprocess.run(
            [str(python), "-c", probe], capture_output=True, text=True, check=False, timeout=60
        )
        if completed.returncode != 0:
            raise TritonUnavailableError(f"{python} did not run: {completed.stderr[-500:]}")
        facts = json.loads(completed.stdout)
        if not facts["shared"]:
            raise TritonUnavailableError(
                f"{python} is not built with --enable-shared: the python backend's stub needs its libpython"
            )
        site_packages = Path(facts["purelib"])
        root = site_packages / "pytriton" / "tritonserver"
        stub = root / "python_backend_stubs" / facts["version"] / "triton_python_backend_stub"
        backend = root / "backends" / "python"
        files = (
            backend / "libtriton_python.so",
            backend / "triton_python_backend_utils.py",
            stub,
        )
        server = root / "bin" / "tritonserver"
        missing = [str(p) for p in (server, *files) if not p.is_file()]
        if missing:
            raise TritonUnavailableError(f"not in the nvidia-pytriton wheel: {', '.join(missing)}")
        return cls(
            server, files, site_packages, (Path(facts["libdir"]), site_packages / "nvidia_pytriton.libs")
        )

    def write_backends(self, folder: Path) -> Path:
        """A `--backend-directory` holding `python/` with the backend, its utilities and the stub."""
        python = folder / "python"
        python.mkdir(parents=True, exist_ok=True)
        for source in self.backend_files:
            shutil.copy2(source, python / source.name)
        return folder


def _dims(value: onnx.ValueInfoProto) -> tuple[str, list[int]]:
    """(Triton type, dims without the batch axis) of an ONNX graph input or output `(N, *sample)`."""
    tensor = value.type.tensor_type
    if tensor.elem_type not in TRITON_TYPES:
        raise ValueError(f"{value.name}: ONNX element type {tensor.elem_type} has no Triton type here")
    dims = [d.dim_value for d in tensor.shape.dim[1:]]
    if any(d <= 0 for d in dims):
        raise ValueError(f"{value.name}: every axis but the batch axis needs a fixed size, got {dims}")
    return TRITON_TYPES[tensor.elem_type], dims


def model_config(name: str, graph: onnx.ModelProto, max_batch_size: int = MAX_BATCH_SIZE) -> str:
    """config.pbtxt of a python-backend model serving `graph`: its tensors, dynamic batching with no delay,
    one instance on the CPU."""

    def tensors(values: list[onnx.ValueInfoProto]) -> str:
        entries = []
        for value in values:
            data_type, dims = _dims(value)
            entries.append(f'  {{ name: "{value.name}" data_type: {data_type} dims: {dims} }}')
        return ",\n".join(entries)

    initializers = {i.name for i in graph.graph.initializer}
    inputs = [v for v in graph.graph.input if v.name not in initializers]
    return (
        f'name: "{name}"\n'
        'backend: "python"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"input [\n{tensors(inputs)}\n]\n"
        f"output [\n{tensors(list(graph.graph.output))}\n]\n"
        "dynamic_batching { }\n"
        "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
    )


def write_repository(repository: Path, target: Path) -> list[str]:
    """Triton's model repository at `target` for each `repository/<name>/1/model.onnx`: config.pbtxt, the ONNX
    file and `model.py`; returns the model names."""
    names = []
    for path in sorted(repository.glob("*/1/model.onnx")):
        name = path.parts[-3]
        version = target / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, version / "model.onnx")
        shutil.copy2(MODEL_SOURCE, version / "model.py")
        (target / name / "config.pbtxt").write_text(model_config(name, onnx.load(path)))
        names.append(name)
    return names


def server_spec(install: TritonInstall, repository: Path, workdir: Path) -> ServerSpec:
    """The Triton row: HTTP (V2 REST, JSON and binary tensors) on a free port, gRPC on another, no metrics.

    Dynamic batching, one model instance and one onnxruntime thread: on one pinned core, as bn-serve runs.
    """
    models = write_repository(repository, workdir / "triton-models")
    if not models:
        raise TritonUnavailableError(f"no */1/model.onnx in {repository}")
    backends = install.write_backends(workdir / "triton-backends")
    http_port = free_port()
    inherited = os.environ.get("LD_LIBRARY_PATH", "")
    library_path = os.pathsep.join([*(str(p) for p in install.library_path), *filter(None, [inherited])])
    argv = (
        str(install.server),
        "--model-repository", str(workdir / "triton-models"),
        "--backend-directory", str(backends),
        "--http-port", str(http_port),
        "--grpc-port", str(free_port()),
        "--allow-metrics", "false",
        "--exit-timeout-secs", "5",
    )  # fmt: skip
    return ServerSpec(
        "triton",
        "peer",
        argv,
        http_port,
        True,
        env={"LD_LIBRARY_PATH": library_path},
        # The stub puts its working folder on sys.path (see the module docstring).
        cwd=install.site_packages,
        start_timeout_s=120.0,
    )
