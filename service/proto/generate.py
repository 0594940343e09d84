"""Regenerate the modules beside this file from `grpc_service.proto` with grpcio-tools' bundled protoc.

`python -m service.proto.generate` rewrites them in place; `generate(directory)` writes them elsewhere (the
test that the committed modules match the `.proto` compares the two). Each module starts with a line naming
the grpcio-tools version that wrote it: another version may write different (equally valid) code.

One edit follows protoc: the messages are built in a descriptor pool of their own, not protobuf's default
one. Triton's and KServe's client packages register the same names (`inference.ModelInferRequest`, ...) in
the default pool, and a second registration there fails, so without it the server could not be imported in
a process that also imports one of those clients (a test, a notebook, an in-process benchmark).
"""

from __future__ import annotations

import sys
import tempfile
from importlib import metadata
from pathlib import Path

PROTO = Path(__file__).with_name("grpc_service.proto")
ROOT = PROTO.parents[2]  # the repository root: module names are then `service.proto.grpc_service_pb2`
RELATIVE = PROTO.relative_to(ROOT)
OUTPUTS = ("grpc_service_pb2.py", "grpc_service_pb2.pyi", "grpc_service_pb2_grpc.py")


DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
PRIVATE_POOL = "_descriptor_pool.DescriptorPool().AddSerializedFile("


def header() -> str:
    version = metadata.version("grpcio-tools")
    return (
        f"# Generated from grpc_service.proto by grpcio-tools {version} (service/proto/generate.py, which\n"
        "# builds the messages in a descriptor pool of their own); do not edit.\n"
    )


def generate(directory: Path) -> list[Path]:
    """Write the generated modules into `directory`; their paths. Raises `RuntimeError` if protoc fails."""
    from grpc_tools import protoc  # a build-time tool: only regenerating needs it

    with tempfile.TemporaryDirectory() as scratch:
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"--proto_path={ROOT}",
                f"--python_out={scratch}",
                f"--pyi_out={scratch}",
                f"--grpc_python_out={scratch}",
                str(PROTO),
            ]
        )
        if status != 0:
            raise RuntimeError(f"protoc failed on {PROTO} with status {status}")
        written = []
        for name in OUTPUTS:
            text = (Path(scratch) / RELATIVE.parent / name).read_text(encoding="utf-8")
            if name == "grpc_service_pb2.py":
                if text.count(DEFAULT_POOL) != 1:
                    raise RuntimeError(f"protoc's {name} no longer registers the file as expected")
                text = text.replace(DEFAULT_POOL, PRIVATE_POOL)
            target = directory / name
            target.write_text(header() + text, encoding="utf-8")
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate(PROTO.parent):
        print(path, file=sys.stderr)
