"""JSON log lines: the access line written directly equals the one `logging` writes; request ids; times."""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.log import (
    JsonFormatter,
    JsonLinesHandler,
    RequestIds,
    access_log,
    request_id,
    utc_timestamp,
    write_access_record,
    write_access_records,
)
from tests.service.conftest import start_server, stop_server


@contextlib.contextmanager
def server_logging(level: int = logging.INFO) -> Iterator[io.StringIO]:
    """The server's logging configuration, as `configure_logging` leaves it, writing into a buffer.

    Entered inside the test itself: pytest adds its capture handlers to the root logger for each phase,
    and with them there the access record (rightly) takes the `logging` path.
    """
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    handler = JsonLinesHandler()
    handler.setStream(stream)
    root.handlers[:] = [handler]
    root.setLevel(level)
    try:
        yield stream
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@contextlib.contextmanager
def counting_records() -> Iterator[list[logging.LogRecord]]:
    """The `LogRecord`s created meanwhile, through logging's record-factory hook."""
    created: list[logging.LogRecord] = []
    factory = logging.getLogRecordFactory()

    def counting(*args: Any, **kwargs: Any) -> logging.LogRecord:
        created.append(factory(*args, **kwargs))
        return created[-1]

    logging.setLogRecordFactory(counting)
    try:
        yield created
    finally:
        logging.setLogRecordFactory(factory)


def test_the_direct_access_line_is_the_line_logging_writes() -> None:
    path = '/v2/models/"m"/infer'
    token = request_id.set("rid-1")
    with server_logging() as json_lines:
        with counting_records() as direct_records:
            write_access_record("POST", path, 400, 0.0012345, "rid-1")
        # Any filter on the way sends the record through logging and the formatter: the reference line.
        pass_all = logging.Filter()
        access_log.addFilter(pass_all)
        try:
            with counting_records() as logged_records:
                write_access_record("POST", path, 400, 0.0012345, "rid-1")
        finally:
            access_log.removeFilter(pass_all)
    request_id.reset(token)
    assert (len(direct_records), len(logged_records)) == (0, 1)
    direct, reference = _lines(json_lines)
    assert list(direct) == list(reference)  # the same fields in the same order
    for key in reference:
        if key != "ts":
            assert direct[key] == reference[key], key
    assert reference["duration_ms"] == 1.234
    assert reference["message"] == f"POST {path} 400"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", direct["ts"])


def test_records_written_together_are_the_lines_written_one_by_one() -> None:
    records = [('/v2/models/"m"/infer', 200, 0.0012345, "a"), ("/v2/models/n/infer", 499, 2.5, "b")]
    with server_logging() as together:
        write_access_records("POST", records)
    with server_logging() as one_by_one:
        for path, status, seconds, rid in records:
            write_access_record("POST", path, status, seconds, rid)
    assert len(_lines(together)) == 2
    for got, want in zip(_lines(together), _lines(one_by_one), strict=True):
        assert list(got) == list(want)
        assert {k: v for k, v in got.items() if k != "ts"} == {k: v for k, v in want.items() if k != "ts"}
    pass_all = logging.Filter()  # another configuration: through logging, one record each
    access_log.addFilter(pass_all)
    try:
        with server_logging() as logged, counting_records() as created:
            write_access_records("POST", records)
    finally:
        access_log.removeFilter(pass_all)
    assert len(created) == 2
    assert [line["request_id"] for line in _lines(logged)] == ["a", "b"]


def test_access_records_follow_the_level() -> None:
    with server_logging(logging.WARNING) as json_lines:
        write_access_record("GET", "/v2", 200, 0.001, "quiet")
    assert json_lines.getvalue() == ""


def test_request_ids_echo_safe_tokens_and_replace_anything_else() -> None:
    ids = RequestIds()
    for safe in ("trace-123.a:b", "A" * 128, "0"):
        assert ids.incoming(safe) == safe
    generated = [ids.incoming(unsafe) for unsafe in (None, "", "x" * 129, "a b", "a\nb", 'a"b', "é")]
    generated += [ids.incoming(None) for _ in range(1000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in generated)
    assert len(set(generated)) == len(generated)
    assert RequestIds().incoming(None)[:16] != ids.incoming(None)[:16]  # a fresh prefix per server start


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=0, max_value=2**33, allow_nan=False, allow_infinity=False))
def test_timestamps_read_as_datetime_writes_them(seconds: float) -> None:
    reference = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    assert utc_timestamp(seconds) == reference.isoformat(timespec="milliseconds")


def test_json_lines_carry_extra_fields_but_not_uvicorns_colour_codes() -> None:
    record = logging.makeLogRecord(
        {
            "name": "uvicorn.error",
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": "Started server process [%d]",
            "args": (42,),
            "color_message": "Started server process [\x1b[36m%d\x1b[0m]",
            "model": "digits",
        }
    )
    document = json.loads(JsonFormatter().format(record))
    assert document["message"] == "Started server process [42]"
    assert document["model"] == "digits"
    assert "color_message" not in document


def test_kept_access_records_are_written_in_order_before_any_other_record_and_on_flush() -> None:
    stream = io.StringIO()
    handler = JsonLinesHandler(flush_interval_s=60.0)
    handler.setStream(stream)
    handler.write_document({"message": "first"})
    handler.write_document({"message": "second"})
    assert stream.getvalue() == "", "a line was written before its interval ended"
    handler.handle(logging.makeLogRecord({"msg": "a warning", "levelno": logging.WARNING}))
    handler.write_document({"message": "third"})
    assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == [
        "first",
        "second",
        "a warning",
    ]
    handler.flush()  # what logging.shutdown does at exit: nothing kept is lost
    assert json.loads(stream.getvalue().splitlines()[-1])["message"] == "third"


def test_kept_access_records_are_written_within_their_interval_or_once_the_buffer_fills() -> None:
    stream = io.StringIO()
    handler = JsonLinesHandler(flush_interval_s=0.05, buffer_bytes=1 << 20)
    handler.setStream(stream)
    handler.write_document({"message": "timed"})
    deadline = time.monotonic() + 5
    while not stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert json.loads(stream.getvalue())["message"] == "timed"
    full = JsonLinesHandler(flush_interval_s=60.0, buffer_bytes=100)
    full.setStream(stream := io.StringIO())
    for index in range(5):
        full.write_document({"message": f"line {index}", "padding": "x" * 20})
    assert len(stream.getvalue().splitlines()) >= 2, "a full buffer was not written out"


def test_each_access_record_is_written_at_once_with_no_interval() -> None:
    stream = io.StringIO()
    handler = JsonLinesHandler(flush_interval_s=0)
    handler.setStream(stream)
    handler.write_document({"message": "now"})
    assert json.loads(stream.getvalue())["message"] == "now"


@pytest.mark.slow
def test_no_kept_access_record_is_lost_when_the_server_stops(repository: Any) -> None:
    # An interval no request outlives: every record reaches stderr through the shutdown's write alone.
    server = start_server(
        "--model-repository", str(repository.root), "--device", "cpu", "--log-flush-interval-s", "600"
    )
    ids = [f"kept-{i}" for i in range(25)]
    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0.5] * 4}]}
    try:
        for rid in ids:
            answer = httpx.post(
                f"{server.url}/v2/models/frozen/infer", json=body, headers={"X-Request-ID": rid}, timeout=30
            )
            assert answer.status_code == 200
    finally:
        server.process.terminate()
        server.process.wait(30)
        output = server.output()
        assert stop_server(server) == 0
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    logged = [r["request_id"] for r in records if r["logger"] == "bn_serve.access"]
    assert [rid for rid in logged if rid.startswith("kept-")] == ids
