"""Property-based fuzzing: the binary framing with hypothesis, and the HTTP API from its OpenAPI schema with
schemathesis against a real `bn-serve` on 127.0.0.1. Bounded in count; the property is zero 5xx."""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import hypothesis.strategies as st
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from service.codec import decode_request
from service.datatypes import V2_TO_NUMPY
from service.errors import InvalidInput
from service.protocol import InferenceRequest
from tests.service.conftest import Server, start_server, stop_server

DATATYPES = [*V2_TO_NUMPY, "BYTES", "FP8", ""]


@st.composite
def framed_bodies(draw: st.DrawFn) -> tuple[bytes, int]:
    """Binary-extension bodies whose declared sizes, shapes and lengths may each tell the truth or lie."""
    inputs = []
    payloads = []
    for i in range(draw(st.integers(1, 3))):
        datatype = draw(st.sampled_from(DATATYPES))
        shape = draw(st.lists(st.integers(-2, 6) | st.sampled_from([2**31, 2**62, 2**63 - 1]), max_size=4))
        itemsize = V2_TO_NUMPY[datatype].itemsize if datatype in V2_TO_NUMPY else 1
        true_size = math.prod(max(d, 0) for d in shape) * itemsize
        size = draw(st.sampled_from([true_size, true_size + 1, max(true_size - 1, 0), 0, -1, 2**40]))
        payloads.append(draw(st.binary(min_size=0, max_size=min(max(size, 0), 256))))
        parameters = draw(
            st.sampled_from(
                [{"binary_data_size": size}, {"binary_data_size": str(size)}, {"binary_data_size": None}, {}]
            )
        )
        inputs.append({"name": f"in{i}", "shape": shape, "datatype": datatype, "parameters": parameters})
    header = json.dumps({"inputs": inputs}).encode()  # json, not orjson: sizes may pass 64 bits
    body = header + b"".join(payloads) + draw(st.binary(max_size=8))
    lengths = [len(header), len(header) - 1, len(header) + 1, 0, len(body), len(body) + 1]
    return body, max(draw(st.sampled_from(lengths)), 0)


@settings(max_examples=300, deadline=None)
@given(framed_bodies())
def test_binary_framing_either_decodes_to_the_stated_shapes_or_says_what_is_wrong(
    framed: tuple[bytes, int],
) -> None:
    body, header_length = framed
    try:
        request, _ = decode_request(body, header_length)
    except InvalidInput:
        return  # refused, with a message for the client
    header = InferenceRequest.model_validate(orjson.loads(body[:header_length]))
    for (name, array), tensor in zip(request.inputs, header.inputs, strict=True):
        assert name == tensor.name
        assert list(array.shape) == tensor.shape
        assert array.dtype == V2_TO_NUMPY[tensor.datatype]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512), st.integers(0, 600))
def test_arbitrary_bytes_with_any_header_length_decode_or_raise_invalid_input(
    body: bytes, length: int
) -> None:
    with contextlib.suppress(InvalidInput):
        decode_request(body, length)


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                  max_size=4),
                    max_leaves=30))  # fmt: skip
def test_any_json_document_is_decoded_or_refused_as_invalid_input(document: Any) -> None:
    candidates = [document, {"inputs": document}, {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                                                               "data": document}]}]  # fmt: skip
    for candidate in candidates:
        try:
            encoded = orjson.dumps(candidate)
        except orjson.JSONEncodeError:  # an integer past 64 bits, which orjson cannot write: skipped
            continue
        with contextlib.suppress(InvalidInput):
            decode_request(encoded)


# --- schemathesis against a real process ------------------------------------------------------------------

_INFER_PATHS = ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer")


def _with_request_bodies(raw: dict[str, Any]) -> dict[str, Any]:
    """The app's schema, with the V2 inference body declared on the infer routes (they read raw bytes, so
    FastAPI cannot see their body) so that schemathesis generates bodies from it."""
    schema = copy.deepcopy(raw)
    body = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    definitions = body.pop("$defs", {})
    schema.setdefault("components", {}).setdefault("schemas", {}).update(
        {**definitions, "InferenceRequest": body}
    )
    for path in _INFER_PATHS:
        # The served model, so that bodies reach its validation (random names stop at the lookup).
        for parameter in schema["paths"][path]["post"]["parameters"]:
            if parameter["name"] == "model_name":
                parameter["schema"] = {"type": "string", "enum": ["frozen"]}
            if parameter["name"] == "model_version":
                parameter["schema"] = {"type": "string", "enum": ["1", "2"]}
        schema["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}}},
        }
    return schema


@pytest.fixture(scope="module")
def fuzzed_server(repository: Any) -> Iterator[Server]:
    running = start_server(
        "--model-repository", str(repository.root), "--device", "cpu", "--log-level", "error"
    )
    try:
        yield running
    finally:
        stop_server(running)


@pytest.fixture(scope="module")
def api_schema(fuzzed_server: Server) -> Any:
    import httpx

    raw = httpx.get(f"{fuzzed_server.url}/openapi.json", timeout=30).json()
    return schemathesis.openapi.from_dict(_with_request_bodies(raw))


def _is_v2_error_body(response: Any) -> bool:
    """Whether an error answer is the V2 body `{"error": "<message>"}`."""
    try:
        document = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return False
    return isinstance(document, dict) and set(document) == {"error"} and isinstance(document["error"], str)


@pytest.mark.slow
def test_no_request_generated_from_the_schema_gets_a_5xx(api_schema: Any, fuzzed_server: Server) -> None:
    # schemathesis' pytest plugin does not run under this pytest, so each operation's strategy is driven
    # by hypothesis directly: positive and negative cases, bounded per operation.
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert any(op.path.endswith("/infer") for op in operations)
    failures: list[str] = []
    statuses: Counter[tuple[str, int]] = Counter()
    for operation in operations:
        _fuzz(operation, fuzzed_server.url, statuses, failures)
    assert not failures, failures[:5]
    # The generated bodies reach the model: some are valid and answered, most are refused.
    infer = {status for (path, status), _ in statuses.items() if path == "/v2/models/{model_name}/infer"}
    assert 400 in infer, statuses
    assert _is_live(fuzzed_server)


def _fuzz(operation: Any, url: str, statuses: Counter[tuple[str, int]], failures: list[str]) -> None:
    """Call `operation` with up to 25 generated cases, recording statuses and any 5xx or non-V2 error body."""

    @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def call(case: Any) -> None:
        response = case.call(base_url=url, timeout=30)
        statuses[(operation.path, response.status_code)] += 1
        where = f"{case.method} {case.formatted_path}"
        if response.status_code >= 500:
            failures.append(f"{where} -> {response.status_code}: {response.text}")
        elif response.status_code >= 400 and not _is_v2_error_body(response):
            failures.append(f"{where}: not a V2 error body: {response.text}")

    call()


def _is_live(server: Server) -> bool:
    import httpx

    return httpx.get(f"{server.url}/v2/health/live", timeout=10).status_code == 200


# --- wrong JSON types, field by field, against a real process ---------------------------------------------

_JSON_KINDS: dict[str, st.SearchStrategy[Any]] = {
    "null": st.none(),
    "bool": st.booleans(),
    "int": st.integers(-(2**63), 2**63 - 1),
    "float": st.floats(allow_nan=False, allow_infinity=False),
    "str": st.text(max_size=8),
    "list": st.lists(st.integers(0, 3), max_size=3),
    "object": st.dictionaries(st.text(max_size=4), st.integers(-10, 10), max_size=2),
}
# Each field of a valid request to the served model, as a path into the document, with the JSON kinds the
# protocol accepts there; any other kind must be refused with 400.
_FIELD_KINDS: list[tuple[tuple[str | int, ...], set[str]]] = [
    (("id",), {"str", "null"}),
    (("parameters",), {"object", "null"}),
    (("parameters", "binary_data_output"), {"bool", "null"}),
    (("inputs",), {"list"}),
    (("inputs", 0), {"object"}),
    (("inputs", 0, "name"), {"str"}),
    (("inputs", 0, "shape"), {"list"}),
    (("inputs", 0, "shape", 0), {"int"}),
    (("inputs", 0, "shape", 1), {"int"}),
    (("inputs", 0, "datatype"), {"str"}),
    (("inputs", 0, "parameters"), {"object", "null"}),
    (("inputs", 0, "parameters", "binary_data_size"), {"int", "null"}),
    (("inputs", 0, "data"), {"list"}),
    (("inputs", 0, "data", 0), {"int", "float"}),
    (("inputs", 0, "data", 7), {"int", "float"}),
    (("outputs",), {"list", "null"}),
    (("outputs", 0), {"object"}),
    (("outputs", 0, "name"), {"str"}),
    (("outputs", 0, "parameters"), {"object", "null"}),
    (("outputs", 0, "parameters", "binary_data"), {"bool", "null"}),
]


def _valid_request() -> dict[str, Any]:
    return {
        "id": "r",
        "parameters": {"binary_data_output": False},
        "inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "parameters": {},
                    "data": [0.5, 1, 2, 3, 4, 5, 6, 7]}],
        "outputs": [{"name": "output", "parameters": {"binary_data": False}}],
    }  # fmt: skip


@st.composite
def wrongly_typed_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid request with one field replaced by a JSON value of a kind the protocol refuses there."""
    path, allowed = draw(st.sampled_from(_FIELD_KINDS))
    kind = draw(st.sampled_from(sorted(set(_JSON_KINDS) - allowed)))
    value = draw(_JSON_KINDS[kind])
    document = _valid_request()
    parent: Any = document
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return f"{'.'.join(map(str, path))} = {kind} {value!r}", orjson.dumps(document)


def test_the_valid_request_behind_the_wrong_type_cases_is_answered(fuzzed_server: Server) -> None:
    import httpx

    response = httpx.post(
        f"{fuzzed_server.url}/v2/models/frozen/infer", content=orjson.dumps(_valid_request()), timeout=30
    )
    assert response.status_code == 200, response.text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=wrongly_typed_requests())
def test_a_wrong_json_type_in_any_field_is_refused_with_400(
    fuzzed_server: Server, case: tuple[str, bytes]
) -> None:
    import httpx

    what, body = case
    response = httpx.post(
        f"{fuzzed_server.url}/v2/models/frozen/infer",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400, (what, response.status_code, response.text[:300])
    assert _is_v2_error_body(response), (what, response.text[:300])
