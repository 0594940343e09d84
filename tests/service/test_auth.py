"""Bearer-token access control, request ids, and logs that hold neither tokens nor tensor data."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.auth import Authenticator, load_api_keys
from service.errors import ConfigurationError, Forbidden, Unauthorized
from tests.service.conftest import start_server, stop_server

KEY = "s3cret-key-0123456789"
FILE_KEY = "another-key-from-the-file"
INFER = "/v2/models/frozen/infer"
BODY = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}
PROTECTED = [
    ("GET", "/v2"),
    ("GET", "/v2/models/frozen"),
    ("GET", "/v2/models/frozen/versions/1"),
    ("GET", "/v2/models/frozen/ready"),
    ("POST", INFER),
    ("POST", "/v2/models/frozen/versions/1/infer"),
    ("POST", "/v2/repository/index"),
    ("POST", "/v2/repository/models/frozen/load"),
    ("POST", "/v2/repository/models/frozen/unload"),
]


@pytest.fixture(scope="module")
def secured(repository: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from service.app import create_app
    from tests.service.conftest import InProcess, test_settings

    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# operators' keys\n\n{FILE_KEY}\n")
    server = InProcess(create_app(test_settings(repository.root, api_key=KEY, api_keys_file=keys)))
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_protected_routes_answer_401_with_a_bearer_challenge_without_a_token(
    secured: Any, method: str, path: str
) -> None:
    response = secured.request(method, path, json=BODY if "infer" in path else None)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert set(response.json()) == {"error"}


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_protected_routes_answer_403_to_a_wrong_token(secured: Any, method: str, path: str) -> None:
    for wrong in (KEY + "x", KEY[:-1], "", FILE_KEY.upper()):
        response = secured.request(method, path, headers=bearer(wrong))
        assert response.status_code == (401 if not wrong else 403), wrong
        assert set(response.json()) == {"error"}


@pytest.mark.parametrize("token", [KEY, FILE_KEY])
def test_every_configured_key_opens_inference_and_metadata(secured: Any, token: str) -> None:
    response = secured.post(INFER, json=BODY, headers=bearer(token))
    assert response.status_code == 200, response.text
    assert secured.get("/v2/models/frozen", headers=bearer(token)).status_code == 200
    index = secured.post("/v2/repository/index", headers=bearer(token))
    assert index.status_code == 200
    assert {"name": "frozen", "version": "2", "state": "READY", "reason": ""} in index.json()


def test_health_and_metrics_stay_open_for_probes(secured: Any) -> None:
    assert secured.get("/v2/health/live").status_code == 200
    assert secured.get("/v2/health/ready").status_code == 200
    assert secured.get("/metrics").status_code == 200


def _rejected(server: Any) -> dict[str, float]:
    counts: dict[str, float] = {}
    for line in server.get("/metrics").text.splitlines():
        if line.startswith("bn_serve_auth_rejected_total{"):
            status = line.split('status="', 1)[1].split('"', 1)[0]
            counts[status] = float(line.rsplit(" ", 1)[1])
    return counts


def test_refusals_are_counted_by_status_and_answered_requests_are_not(secured: Any) -> None:
    before = _rejected(secured)
    for _ in range(3):
        assert secured.post(INFER, json=BODY).status_code == 401
    assert secured.get("/v2", headers=bearer("not-a-key")).status_code == 403
    assert secured.post(INFER, json=BODY, headers=bearer(KEY)).status_code == 200
    assert secured.get("/v2/health/ready").status_code == 200
    after = _rejected(secured)
    assert after.get("401", 0) - before.get("401", 0) == 3
    assert after.get("403", 0) - before.get("403", 0) == 1


def test_other_schemes_are_not_tokens(secured: Any) -> None:
    for header in (f"Basic {KEY}", KEY, f"Bearer{KEY}", "Bearer "):
        response = secured.post(INFER, json=BODY, headers={"Authorization": header})
        assert response.status_code == 401, header


def test_model_names_on_protected_routes_are_checked_after_the_token(secured: Any) -> None:
    # Without a token nothing about the repository leaks, not even whether a model exists.
    assert secured.post("/v2/repository/models/%2E%2E/load").status_code == 401
    response = secured.post("/v2/repository/models/%2E%2E/load", headers=bearer(KEY))
    assert response.status_code == 404


def test_the_authenticator_checks_every_key_and_refuses_lookalikes() -> None:
    auth = Authenticator(["a", "bb" * 100, "ccc"])
    for key in ("a", "bb" * 100, "ccc"):
        auth.check("/v2/models/m/infer", f"Bearer {key}")
        auth.check("/v2/models/m/infer", f"bearer   {key}  ")
    for wrong in ("b", "aa", "bb" * 99, "ccc\x00", "é"):
        with pytest.raises(Forbidden):
            auth.check("/v2/models/m/infer", f"Bearer {wrong}")
    with pytest.raises(Unauthorized):
        auth.check("/v2/models/m/infer", None)
    # Only exact open paths: a route that merely starts like /metrics is protected.
    auth.check("/metrics", None)
    auth.check("/v2/health/live", None)
    with pytest.raises(Unauthorized):
        auth.check("/metricsfoo", None)
    Authenticator([]).check("/v2/models/m/infer", None)  # no keys: open


def test_key_files_skip_comments_and_blank_lines_and_refuse_empty_ones(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# comment\n\n  k1  \nk2\n")
    assert load_api_keys(None, path) == ["k1", "k2"]
    assert load_api_keys("k0", path) == ["k0", "k1", "k2"]
    path.write_text("# only a comment\n")
    with pytest.raises(ConfigurationError, match="holds no key"):
        load_api_keys(None, path)
    with pytest.raises(ConfigurationError, match="cannot read"):
        load_api_keys(None, tmp_path / "missing")
    with pytest.raises(ConfigurationError, match="blank"):
        load_api_keys("  ", None)


def test_request_ids_are_echoed_or_generated(secured: Any) -> None:
    given = secured.get("/v2/health/live", headers={"X-Request-ID": "trace-123.a:b"})
    assert given.headers["x-request-id"] == "trace-123.a:b"
    generated = secured.get("/v2/health/live")
    assert len(generated.headers["x-request-id"]) == 32
    unsafe = secured.get("/v2/health/live", headers={"X-Request-ID": "x" * 500})
    assert unsafe.headers["x-request-id"] != "x" * 500
    assert len(unsafe.headers["x-request-id"]) == 32
    refused = secured.post(INFER, json=BODY, headers={"X-Request-ID": "denied-1"})
    assert refused.headers["x-request-id"] == "denied-1"


@pytest.mark.slow
def test_logs_are_json_lines_with_request_ids_and_never_hold_tokens_or_data(repository: Any) -> None:
    marker = 98765.4375  # exact in float32, so any echo of the data would show these digits
    server = start_server(
        "--model-repository", str(repository.root), "--device", "cpu", "--log-level", "debug",
        env={"BN_SERVE_API_KEY": KEY},
    )  # fmt: skip
    try:
        url = server.url + INFER
        good = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [marker] * 4}]}
        response = httpx.post(url, json=good, headers={**bearer(KEY), "X-Request-ID": "req-good"}, timeout=30)
        assert response.status_code == 200
        assert response.headers["x-request-id"] == "req-good"
        nan = json.dumps(good).replace(f"{marker}", "NaN", 1)
        bad = httpx.post(url, content=nan, headers={**bearer(KEY), "Content-Type": "application/json"})
        assert bad.status_code == 400
        mistyped = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "INT8", "data": [marker] * 4}]}
        assert httpx.post(url, json=mistyped, headers=bearer(KEY), timeout=30).status_code == 400
        wrong = httpx.post(url, json=good, headers=bearer(KEY + "-wrong"), timeout=30)
        assert wrong.status_code == 403
        load = httpx.post(f"{server.url}/v2/repository/models/frozen/load", headers=bearer(KEY), timeout=60)
        assert load.status_code == 200
    finally:
        server.process.terminate()
        server.process.wait(30)
        output = server.output()
        assert stop_server(server) == 0
    _assert_clean(output, marker)


def _assert_clean(output: str, marker: float) -> None:
    records = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert records, "the server logged nothing"
    for record in records:
        assert {"ts", "level", "logger", "message"} <= set(record)
    text = output.lower()
    assert KEY.lower() not in text
    assert str(marker) not in text
    assert "98765" not in text
    access = [r for r in records if r["logger"] == "bn_serve.access"]
    assert any(r.get("request_id") == "req-good" and r["status"] == 200 for r in access)
    assert {r["status"] for r in access} >= {200, 400, 403}
    assert any("loaded" in r["message"] and r.get("request_id") for r in records)
