"""The workloads, the exact bytes each one sends, and the check that a server's answer to them is right.

Every server receives byte-identical requests, written once to files that the wrk script posts:

- JSON: `{"inputs": [{"name": "x", "shape": [...], "datatype": "FP32", "data": [flat, row-major]}]}`;
- Triton's binary tensor extension: the JSON header (with `"parameters": {"binary_data_size": n}` in place of
  `data`, and the output requested as binary) followed by the tensor's raw little-endian bytes, its length
  in the `Inference-Header-Content-Length` HTTP header.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray

from benchmarks.serving.models import INPUT_NAME, OUTPUT_NAME, BatchNormModel

JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"
HEADER_LENGTH = "Inference-Header-Content-Length"
# Loose enough for float32 rounding in any order of operations, tight enough to catch a wrong statistic.
RTOL = 1e-5
ATOL = 1e-5


class ResponseMismatchError(Exception):
    """A server's answer to a workload's request is not the V2 response it should be."""


@dataclass(frozen=True)
class Workload:
    """One load pattern: `batch` samples of `model` per request, over `connections` keep-alive connections."""

    name: str
    group: str
    model: str
    batch: int
    connections: int
    binary: bool


WORKLOADS: tuple[Workload, ...] = (
    Workload("W1-c1", "W1", "bn_features", batch=1, connections=1, binary=False),
    Workload("W1-c32", "W1", "bn_features", batch=1, connections=32, binary=False),
    Workload("W2", "W2", "bn_features", batch=256, connections=8, binary=False),
    Workload("W3-json", "W3", "bn_images", batch=8, connections=1, binary=False),
    Workload("W3-binary", "W3", "bn_images", batch=8, connections=1, binary=True),
)


def select_workloads(groups: str) -> tuple[Workload, ...]:
    """The workloads of the comma-separated groups (`"W1,W3"`) or names (`"W1-c32"`), in table order."""
    wanted = {g.strip() for g in groups.split(",") if g.strip()}
    known = {w.group for w in WORKLOADS} | {w.name for w in WORKLOADS}
    unknown = sorted(wanted - known)
    if unknown or not wanted:
        raise ValueError(
            f"unknown workloads {unknown or groups!r}; expected a comma-separated subset of {sorted(known)}"
        )
    return tuple(w for w in WORKLOADS if w.group in wanted or w.name in wanted)


@dataclass(frozen=True)
class RequestFiles:
    """Where a workload's request body lies, and the headers that go with it."""

    body: Path
    content_type: str
    header_length: int | None

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": self.content_type}
        if self.header_length is not None:
            headers[HEADER_LENGTH] = str(self.header_length)
        return headers


def sample_input(model: BatchNormModel, batch: int, seed: int = 0) -> NDArray[np.float32]:
    """Standard-normal input `x: (batch, *model.sample_shape)`, the same for every server."""
    return np.random.default_rng(seed).standard_normal((batch, *model.sample_shape), dtype=np.float32)


def json_request(x: NDArray[np.float32]) -> bytes:
    """The V2 JSON request for `x`; orjson writes each float32 in its shortest round-tripping form."""
    body = {"inputs": [{"name": INPUT_NAME, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel()}]}
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def binary_request(x: NDArray[np.float32]) -> tuple[bytes, int]:
    """The V2 binary-extension request for `x` and the length of its JSON header."""
    raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
    header = {
        "inputs": [
            {
                "name": INPUT_NAME,
                "shape": list(x.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [{"name": OUTPUT_NAME, "parameters": {"binary_data": True}}],
    }
    head = orjson.dumps(header)
    return head + raw, len(head)


def json_response(model_name: str, y: NDArray[np.float32]) -> bytes:
    """The V2 JSON response a server should give for output `y` (the floor servers return it verbatim)."""
    body = {
        "model_name": model_name,
        "outputs": [{"name": OUTPUT_NAME, "shape": list(y.shape), "datatype": "FP32", "data": y.ravel()}],
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def binary_response(model_name: str, y: NDArray[np.float32]) -> tuple[bytes, int]:
    """The V2 binary-extension response for output `y` and the length of its JSON header."""
    raw = np.ascontiguousarray(y, dtype="<f4").tobytes()
    header = {
        "model_name": model_name,
        "outputs": [
            {
                "name": OUTPUT_NAME,
                "shape": list(y.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
    }
    head = orjson.dumps(header)
    return head + raw, len(head)


def write_bodies(
    directory: Path, workloads: tuple[Workload, ...], models: Mapping[str, BatchNormModel]
) -> tuple[dict[str, RequestFiles], Path]:
    """Write each workload's request and its right response; returns workload -> request files, and manifest.

    The constant-response servers must not parse what they receive, so the manifest keys each canned
    response by the byte length of the request it answers: `{"<length>": {"file": ..., "header_length": n |
    null}}`. Workloads with the same request share one entry; different requests of equal length would be
    ambiguous and are refused.
    """
    directory.mkdir(parents=True, exist_ok=True)
    requests: dict[str, RequestFiles] = {}
    manifest: dict[str, dict[str, Any]] = {}
    for workload in workloads:
        model = models[workload.model]
        x = sample_input(model, workload.batch)
        y = model.reference(x)
        request_path = directory / f"{workload.name}.request"
        response_path = directory / f"{workload.name}.response"
        if workload.binary:
            request, request_header = binary_request(x)
            response, response_header = binary_response(model.name, y)
            requests[workload.name] = RequestFiles(request_path, BINARY_CONTENT_TYPE, request_header)
        else:
            request, response, response_header = json_request(x), json_response(model.name, y), None
            requests[workload.name] = RequestFiles(request_path, JSON_CONTENT_TYPE, None)
        request_path.write_bytes(request)
        response_path.write_bytes(response)
        key = str(len(request))
        previous = manifest.get(key)
        if previous is not None and Path(previous["file"]).read_bytes() != response:
            raise ValueError(f"two workloads send {key}-byte requests that need different responses")
        manifest[key] = {"file": str(response_path), "header_length": response_header}
    manifest_path = directory / "canned.json"
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return requests, manifest_path


def decode_response(headers: Mapping[str, str], body: bytes) -> dict[str, NDArray[Any]]:
    """Output name -> array of a V2 response, JSON or binary extension; raises on anything malformed."""
    lowered = {k.lower(): v for k, v in headers.items()}
    length_header = lowered.get(HEADER_LENGTH.lower())
    header_length = len(body) if length_header is None else int(length_header)
    try:
        document = json.loads(body[:header_length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResponseMismatchError(f"response is not V2 JSON: {exc}: {body[:200]!r}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("outputs"), list):
        raise ResponseMismatchError(f"response has no 'outputs' list: {body[:200]!r}")
    arrays: dict[str, NDArray[Any]] = {}
    offset = header_length
    for output in document["outputs"]:
        if output.get("datatype") != "FP32":
            raise ResponseMismatchError(
                f"output {output.get('name')!r} has datatype {output.get('datatype')!r}"
            )
        shape = tuple(int(d) for d in output["shape"])
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            data = np.frombuffer(body, dtype="<f4", count=int(size) // 4, offset=offset)
            offset += int(size)
        else:
            data = np.asarray(output["data"], dtype=np.float32)
        if data.size != int(np.prod(shape)):
            raise ResponseMismatchError(f"output {output['name']!r}: {data.size} values for shape {shape}")
        arrays[output["name"]] = data.reshape(shape)
    if offset != len(body):
        raise ResponseMismatchError(f"response has {len(body) - offset} bytes after its declared tensors")
    return arrays


def check_response(
    status: int, headers: Mapping[str, str], body: bytes, expected: NDArray[np.float32]
) -> None:
    """Raise `ResponseMismatchError` unless the response is a 200 whose output `y` equals `expected`."""
    if status != 200:
        raise ResponseMismatchError(f"status {status}, expected 200: {body[:300]!r}")
    outputs = decode_response(headers, body)
    if OUTPUT_NAME not in outputs:
        raise ResponseMismatchError(f"no output {OUTPUT_NAME!r} in response, got {sorted(outputs)}")
    y = outputs[OUTPUT_NAME]
    if y.shape != expected.shape:
        raise ResponseMismatchError(f"output shape {y.shape}, expected {expected.shape}")
    if not np.allclose(y, expected, rtol=RTOL, atol=ATOL):
        worst = float(np.max(np.abs(y.astype(np.float64) - expected)))
        raise ResponseMismatchError(f"output differs from the closed-form reference by up to {worst:.3g}")
