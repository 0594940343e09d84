"""The committed gRPC modules are protoc's output for the `.proto`, and speak Triton's wire format."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import descriptor as _descriptor

from service.proto import grpc_service_pb2
from service.proto.generate import OUTPUTS, PROTO, generate

triton = pytest.importorskip("tritonclient.grpc.service_pb2")


def test_committed_modules_are_what_the_generator_writes(tmp_path: Path) -> None:
    for written in generate(tmp_path):
        committed = PROTO.with_name(written.name)
        assert written.read_text() == committed.read_text(), (
            f"{committed} differs from protoc's output: run python -m service.proto.generate"
        )
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(OUTPUTS)


def fields(message: _descriptor.Descriptor) -> dict[str, tuple[object, ...]]:
    """Every field, nested messages' included, as the wire sees it: number, type, label, message type."""
    found: dict[str, tuple[object, ...]] = {}
    for field in message.fields:
        kind = field.message_type.full_name if field.message_type is not None else None
        oneof = field.containing_oneof.name if field.containing_oneof is not None else None
        repeated = field.label == _descriptor.FieldDescriptor.LABEL_REPEATED
        found[f"{message.full_name}.{field.name}"] = (field.number, field.type, repeated, kind, oneof)
    for nested in message.nested_types:
        found.update(fields(nested))
    return found


@pytest.mark.parametrize("name", sorted(grpc_service_pb2.DESCRIPTOR.message_types_by_name))
def test_message_matches_tritons_field_for_field(name: str) -> None:
    ours = grpc_service_pb2.DESCRIPTOR.message_types_by_name[name]
    theirs = triton.DESCRIPTOR.message_types_by_name[name]
    assert fields(ours) == fields(theirs)


def test_every_call_has_tritons_path_and_types() -> None:
    ours = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        assert method.input_type.full_name == other.input_type.full_name
        assert method.output_type.full_name == other.output_type.full_name
        assert (method.client_streaming, method.server_streaming) == (
            other.client_streaming,
            other.server_streaming,
        )
