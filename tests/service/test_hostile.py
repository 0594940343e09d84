"""Malformed and hostile requests each get a 4xx with a V2 error body, and the server stays up.

In-process for the app's own answers (every case below), then over raw sockets against a real process for
what only a real HTTP server sees: bodies shorter than their Content-Length, garbage framing, clients that
vanish mid-request.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import numpy as np
import orjson
import pytest

INFER = "/v2/models/frozen/infer"
JSON = {"Content-Type": "application/json"}
X = np.arange(8, dtype=np.float32).reshape(2, 4)


def tensor(**fields: Any) -> dict[str, Any]:
    return {"name": "input", "shape": [2, 4], "datatype": "FP32", "data": X.ravel().tolist(), **fields}


def request(*inputs: dict[str, Any], **fields: Any) -> bytes:
    return orjson.dumps({"inputs": list(inputs) or [tensor()], **fields})


def binary(shape: list[int], payload: bytes, size: Any = None, extra: bytes = b"") -> tuple[bytes, int]:
    """A binary-extension body: JSON header declaring `size` (default: len(payload)), then the payload."""
    declared = len(payload) if size is None else size
    header = json.dumps(
        {"inputs": [{"name": "input", "shape": shape, "datatype": "FP32",
                     "parameters": {"binary_data_size": declared}}]}
    ).encode()  # fmt: skip
    return header + payload + extra, len(header)


def header_length(value: str) -> dict[str, str]:
    return {"Inference-Header-Content-Length": value, "Content-Type": "application/octet-stream"}


def framed(
    shape: list[int], payload: bytes, size: Any = None, extra: bytes = b""
) -> tuple[bytes, dict[str, str]]:
    """`binary(...)` with the header-length header that tells the truth about it."""
    body, length = binary(shape, payload, size, extra)
    return body, header_length(str(length))


BIN_OK, BIN_HEADER = binary([2, 4], X.tobytes())

# (case, method, path, body, headers, expected status)
CASES: list[tuple[str, str, str, bytes, dict[str, str], int]] = [
    ("empty_body", "POST", INFER, b"", JSON, 400),
    ("truncated_json", "POST", INFER, request()[:25], JSON, 400),
    ("not_utf8", "POST", INFER, b'{"inputs": [\xff\xfe]}', JSON, 400),
    ("lone_surrogate", "POST", INFER, b'{"id": "\\ud800", "inputs": []}', JSON, 400),
    ("top_level_array", "POST", INFER, b"[1, 2, 3]", JSON, 400),
    ("top_level_string", "POST", INFER, b'"inputs"', JSON, 400),
    ("inputs_not_a_list", "POST", INFER, b'{"inputs": {"name": "input"}}', JSON, 400),
    ("inputs_empty", "POST", INFER, b'{"inputs": []}', JSON, 400),
    ("input_not_an_object", "POST", INFER, b'{"inputs": [7]}', JSON, 400),
    ("name_missing", "POST", INFER, b'{"inputs": [{"shape": [1], "datatype": "FP32"}]}', JSON, 400),
    ("name_not_a_string", "POST", INFER, request(tensor(name=["input"])), JSON, 400),
    ("shape_a_string", "POST", INFER, request(tensor(shape="2,4")), JSON, 400),
    ("shape_floats", "POST", INFER, request(tensor(shape=[2.5, 4])), JSON, 400),
    ("shape_negative", "POST", INFER, request(tensor(shape=[-2, -4])), JSON, 400),
    ("shape_huge", "POST", INFER, request(tensor(shape=[2**62, 2**62])), JSON, 400),
    ("shape_beyond_int64", "POST", INFER, b'{"inputs": [{"name": "input", "datatype": "FP32", '
     b'"shape": [18446744073709551616, 0], "data": []}]}', JSON, 400),
    ("shape_product_overflows_int64_times_zero", "POST", INFER,
     request(tensor(shape=[0, 2**62, 2**62], data=[])), JSON, 400),
    ("shape_zero_sized", "POST", INFER, request(tensor(shape=[0, 2**40], data=[])), JSON, 400),
    ("shape_1e400", "POST", INFER, b'{"inputs": [{"name": "input", "shape": [1e400], "datatype": "FP32", '
     b'"data": [1]}]}', JSON, 400),
    ("shape_booleans", "POST", INFER, request(tensor(shape=[True, 4])), JSON, 400),
    ("shape_numeric_strings", "POST", INFER, request(tensor(shape=[2, "4"])), JSON, 400),
    ("shape_integral_float", "POST", INFER, request(tensor(shape=[2, 4.0])), JSON, 400),
    ("shape_underscored_string", "POST", INFER, request(tensor(shape=["0_2", 4])), JSON, 400),
    ("shape_rank_65", "POST", INFER, request(tensor(shape=[1] * 65, data=[1.0])), JSON, 400),
    ("shape_rank_33", "POST", INFER, request(tensor(shape=[1] * 33, data=[1.0])), JSON, 400),
    ("binary_shape_rank_65", "POST", INFER, *framed([1] * 65, X.tobytes()[:4]), 400),
    ("rank_zero", "POST", INFER, request(tensor(shape=[], data=[1.0])), JSON, 400),
    ("datatype_unknown", "POST", INFER, request(tensor(datatype="FP128")), JSON, 400),
    ("datatype_bytes", "POST", INFER, request(tensor(datatype="BYTES", data=["a"] * 8)), JSON, 400),
    ("datatype_not_a_string", "POST", INFER, request(tensor(datatype=32)), JSON, 400),
    ("data_strings", "POST", INFER, request(tensor(data=["1"] * 8)), JSON, 400),
    ("data_null", "POST", INFER, request(tensor(data=None)), JSON, 400),
    ("data_objects", "POST", INFER, request(tensor(data=[{"a": 1}] * 8)), JSON, 400),
    ("data_boolean_among_floats", "POST", INFER, request(tensor(data=[True, *X.ravel().tolist()[1:]])),
     JSON, 400),
    ("data_nested_boolean_among_floats", "POST", INFER,
     request(tensor(data=[[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, False]])), JSON, 400),
    ("data_booleans_for_fp32", "POST", INFER, request(tensor(data=[True] * 8)), JSON, 400),
    ("data_ragged", "POST", INFER, request(tensor(data=[[1, 2, 3, 4], [5, 6]])), JSON, 400),
    ("data_too_short", "POST", INFER, request(tensor(data=[1.0])), JSON, 400),
    ("deep_nesting_100k", "POST", INFER, b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", '
     b'"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}", JSON, 400),
    ("deep_nesting_unclosed", "POST", INFER, b"[" * 200_000, JSON, 400),
    ("nesting_deeper_than_shape", "POST", INFER, request(tensor(data=[[[[[[1.0]]]]]] * 8)), JSON, 400),
    ("huge_float_literal", "POST", INFER, request()[:-4].replace(b"0.0", b"1e999", 1) + b"}]}", JSON, 400),
    ("huge_integer_literal_into_int_range", "POST", INFER, b'{"inputs": [{"name": "input", "shape": [1, 4], '
     b'"datatype": "INT64", "data": [1, 2, 3, 123456789012345678901234567890]}]}', JSON, 400),
    ("nan_literal", "POST", INFER, request()[:-4].replace(b"0.0", b"NaN", 1) + b"}]}", JSON, 400),
    ("infinity_literal", "POST", INFER, request()[:-4].replace(b"0.0", b"Infinity", 1) + b"}]}", JSON, 400),
    ("duplicate_inputs", "POST", INFER, request(tensor(), tensor()), JSON, 400),
    ("unknown_input", "POST", INFER, request(tensor(name="other")), JSON, 400),
    ("wrong_channels", "POST", INFER, request(tensor(shape=[1, 8])), JSON, 400),
    ("unknown_output", "POST", INFER, request(outputs=[{"name": "nope"}]), JSON, 400),
    ("duplicate_outputs", "POST", INFER, request(outputs=[{"name": "output"}] * 2), JSON, 400),
    ("outputs_empty", "POST", INFER, request(outputs=[]), JSON, 400),
    ("outputs_name_not_a_string", "POST", INFER, request(outputs=[{"name": 1}]), JSON, 400),
    ("outputs_not_a_list", "POST", INFER, request(outputs="output"), JSON, 400),
    ("binary_flag_a_string", "POST", INFER, request(parameters={"binary_data_output": "true"}), JSON, 400),
    ("parameters_not_an_object", "POST", INFER, request(parameters=[1]), JSON, 400),
    ("id_not_a_string", "POST", INFER, request(id=5), JSON, 400),
    ("duplicate_json_keys", "POST", INFER, b'{"inputs": 1, "inputs": [' + orjson.dumps(tensor()) + b"]}",
     JSON, 200),
    ("header_length_past_body", "POST", INFER, BIN_OK, header_length(str(len(BIN_OK) + 1)), 400),
    ("header_length_huge", "POST", INFER, BIN_OK, header_length(str(2**70)), 400),
    ("header_length_negative", "POST", INFER, BIN_OK, header_length("-1"), 400),
    ("header_length_not_a_number", "POST", INFER, BIN_OK, header_length("12a"), 400),
    ("header_length_empty", "POST", INFER, BIN_OK, header_length(""), 400),
    ("header_length_superscript_digit", "POST", INFER, BIN_OK, {**header_length("0"),
     "Inference-Header-Content-Length": "\u00b2".encode("latin-1")}, 400),
    ("header_length_non_ascii", "POST", INFER, BIN_OK, {**header_length("0"),
     "Inference-Header-Content-Length": "1\u0663".encode()}, 400),
    ("header_length_float", "POST", INFER, BIN_OK, header_length("1.0"), 400),
    ("content_type_non_ascii", "POST", INFER, request(),
     {"Content-Type": "application/js\u00f6n".encode("latin-1")}, 415),
    ("content_encoding_non_ascii", "POST", INFER, request(), {**JSON, "Content-Encoding": b"gz\xffip"}, 415),
    ("request_id_non_ascii", "POST", INFER, request(), {**JSON, "X-Request-ID": b"id-\xff\xfe"}, 200),
    ("authorization_non_ascii_on_an_open_server", "POST", INFER, request(),
     {**JSON, "Authorization": b"Bearer \xff"}, 200),
    ("header_length_cuts_the_json", "POST", INFER, BIN_OK, header_length(str(BIN_HEADER - 3)), 400),
    ("header_length_zero", "POST", INFER, BIN_OK, header_length("0"), 400),
    ("binary_size_too_small", "POST", INFER, *framed([2, 4], X.tobytes()[:-4]), 400),
    ("binary_size_past_body", "POST", INFER, *framed([2, 4], X.tobytes(), size=1000), 400),
    ("binary_size_negative", "POST", INFER, *framed([2, 4], X.tobytes(), size=-32), 400),
    ("binary_size_huge", "POST", INFER, *framed([2, 4], X.tobytes(), size=2**70), 400),
    ("binary_size_float", "POST", INFER, *framed([2, 4], X.tobytes(), size=32.0), 400),
    ("binary_size_bool", "POST", INFER, *framed([2, 4], X.tobytes(), size=True), 400),
    ("binary_trailing_bytes", "POST", INFER, *framed([2, 4], X.tobytes(), extra=b"junk"), 400),
    ("binary_shape_lies", "POST", INFER, *framed([2**31, 2**31], X.tobytes()), 400),
    ("binary_odd_bytes", "POST", INFER, *framed([2, 4], X.tobytes() + b"\x00"), 400),
    ("octet_stream_without_header_length", "POST", INFER, BIN_OK,
     {"Content-Type": "application/octet-stream"}, 400),
    ("content_type_text", "POST", INFER, request(), {"Content-Type": "text/plain"}, 415),
    ("content_type_form", "POST", INFER, b"a=1", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ("content_type_json_with_header_length", "POST", INFER, BIN_OK,
     {**header_length(str(BIN_HEADER)), "Content-Type": "application/json"}, 415),
    ("content_encoding_gzip", "POST", INFER, request(), {**JSON, "Content-Encoding": "gzip"}, 415),
    ("wrong_method_get_infer", "GET", INFER, b"", {}, 405),
    ("wrong_method_put_infer", "PUT", INFER, request(), JSON, 405),
    ("wrong_method_delete_model", "DELETE", "/v2/models/frozen", b"", {}, 405),
    ("wrong_method_post_health", "POST", "/v2/health/ready", b"", {}, 405),
    ("wrong_method_get_load", "GET", "/v2/repository/models/frozen/load", b"", {}, 405),
    ("unknown_route", "GET", "/v3/models", b"", {}, 404),
    ("unknown_model", "POST", "/v2/models/nope/infer", request(), JSON, 404),
    ("unknown_version", "POST", "/v2/models/frozen/versions/9/infer", request(), JSON, 404),
    ("version_not_a_number", "POST", "/v2/models/frozen/versions/latest/infer", request(), JSON, 404),
    ("version_leading_zero", "POST", "/v2/models/frozen/versions/01/infer", request(), JSON, 404),
    ("version_huge", "POST", f"/v2/models/frozen/versions/{10**40}/infer", request(), JSON, 404),
    ("path_traversal_dots", "POST", "/v2/models/../infer", request(), JSON, 404),
    ("path_traversal_encoded", "POST", "/v2/models/..%2F..%2Fetc%2Fpasswd/infer", request(), JSON, 404),
    ("path_traversal_load", "POST", "/v2/repository/models/..%2Fbatchstat/load", b"", {}, 404),
    ("path_traversal_load_dotdot", "POST", "/v2/repository/models/../load", b"", {}, 404),
    ("path_traversal_unload", "POST", "/v2/repository/models/%2E%2E/unload", b"", {}, 404),
    ("model_name_nul", "POST", "/v2/models/frozen%00/infer", request(), JSON, 404),
    ("model_name_huge", "GET", "/v2/models/" + "a" * 5000, b"", {}, 404),
    ("repository_index_not_json", "POST", "/v2/repository/index", b"{", JSON, 400),
    ("repository_index_ready_string", "POST", "/v2/repository/index", b'{"ready": "yes"}', JSON, 400),
    ("repository_load_array_body", "POST", "/v2/repository/models/frozen/load", b"[]", JSON, 400),
    ("repository_load_parameters", "POST", "/v2/repository/models/frozen/load",
     b'{"parameters": {"config": "{}"}}', JSON, 400),
    ("repository_load_unknown_model", "POST", "/v2/repository/models/nope/load", b"", {}, 404),
    ("repository_unload_unknown_model", "POST", "/v2/repository/models/nope/unload", b"", {}, 404),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_malformed_request_gets_a_client_error_with_a_v2_body(
    client: Any, method: str, path: str, body: bytes, headers: dict[str, str], expected: int
) -> None:
    response = client.request(method, path, content=body, headers=headers)
    assert response.status_code == expected, response.text[:500]
    document = response.json()
    if expected == 200:
        assert document["outputs"]
    else:
        assert set(document) == {"error"}, document
        assert isinstance(document["error"], str)
        assert document["error"]
    assert client.get("/v2/health/live").status_code == 200


def test_a_body_over_the_limit_is_refused_with_413_before_it_is_read(client: Any) -> None:
    response = client.post(INFER, content=b"[" * (2 << 20), headers=JSON)  # the client fixture allows 1 MiB
    assert response.status_code == 413
    assert "max_request_bytes" in response.json()["error"]


def test_a_chunked_body_over_the_limit_is_refused_with_413(client: Any) -> None:
    async def chunks() -> Any:
        for _ in range(64):
            yield b" " * 65536

    response = client.post(INFER, content=chunks(), headers=JSON)
    assert response.status_code == 413
    assert set(response.json()) == {"error"}


def test_a_model_that_cannot_serve_answers_503_with_its_reason(client: Any) -> None:
    response = client.post("/v2/models/batchstat/infer", content=request(), headers=JSON)
    assert response.status_code == 503
    assert "frozen" in response.json()["error"]


# --- a real process: what only a real HTTP server sees -----------------------------------------------------


def _raw(host_port: str, data: bytes, *, half_close: bool = False, timeout: float = 10.0) -> bytes:
    host, port = host_port.split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        response = b""
        try:
            while chunk := sock.recv(65536):
                response += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return response


def _live(server: Any) -> None:
    import httpx

    assert httpx.get(f"{server.url}/v2/health/live", timeout=10).status_code == 200
    ok = httpx.post(f"{server.url}{INFER}", content=request(), headers=JSON, timeout=10)
    assert ok.status_code == 200, ok.text


def _head(host_port: str, length: int | str, extra: str = "") -> bytes:
    return (
        f"POST {INFER} HTTP/1.1\r\nHost: {host_port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        "body_shorter_than_content_length",
        "content_length_not_a_number",
        "content_length_negative",
        "two_content_lengths",
        "chunked_garbage",
        "request_line_garbage",
        "header_too_large",
        "vanishing_client",
    ],
)
def test_broken_http_framing_is_refused_and_the_server_stays_up(server: Any, case: str) -> None:
    host_port = server.host_port
    body = request()
    if case == "body_shorter_than_content_length":
        response = _raw(host_port, _head(host_port, len(body) + 100) + body, half_close=True)
        assert response == b"" or response.startswith(b"HTTP/1.1 4"), response[:200]
    elif case == "content_length_not_a_number":
        assert _raw(host_port, _head(host_port, "12abc") + body).startswith(b"HTTP/1.1 400")
    elif case == "content_length_negative":
        assert _raw(host_port, _head(host_port, "-5") + body).startswith(b"HTTP/1.1 400")
    elif case == "two_content_lengths":
        extra = f"Content-Length: {len(body) + 1}\r\n"
        assert _raw(host_port, _head(host_port, len(body), extra) + body).startswith(b"HTTP/1.1 400")
    elif case == "chunked_garbage":
        head = f"POST {INFER} HTTP/1.1\r\nHost: {host_port}\r\nTransfer-Encoding: chunked\r\n\r\n"
        assert _raw(host_port, head.encode() + b"zz\r\nnot hex\r\n0\r\n\r\n").startswith(b"HTTP/1.1 400")
    elif case == "request_line_garbage":
        assert _raw(host_port, b"\x16\x03\x01\x02\x00 hello\r\n\r\n").startswith(b"HTTP/1.1 400")
    elif case == "header_too_large":
        extra = "X-Junk: " + "a" * 200_000 + "\r\n"
        # Past max_header_bytes: 431 before the rest is read (or a reset, when the rest was still in flight).
        response = _raw(host_port, _head(host_port, len(body), extra) + body)
        assert response == b"" or response.startswith(b"HTTP/1.1 431"), response[:200]
    elif case == "vanishing_client":
        host, port = host_port.split(":")
        for _ in range(20):
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(_head(host_port, len(body)) + body[:10])
    _live(server)
