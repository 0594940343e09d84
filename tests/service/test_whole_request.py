"""`service.http_direct.read_whole_request`, the protocol's own reading of a whole small request, against
httptools (the parser it stands in for): whatever it accepts, httptools parses to the same request; and the
protocol answers what it reads that way exactly as it answers the same request parsed by httptools."""

from __future__ import annotations

from pathlib import Path

import httptools
import numpy as np
import orjson
import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st

from service.http_direct import read_whole_request
from tests.service.conftest import protocol_answers

MAX_HEADER_BYTES = 1024
MAX_HEADER_COUNT = 8


class Parsed:
    """What httptools reads from a request, as uvicorn's callbacks keep it."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.messages = 0
        self.keep_alive: bool | None = None
        self.method: bytes | None = None
        self.version: str | None = None
        self.upgrade = False
        self.parser = httptools.HttpRequestParser(self)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        self.method = self.parser.get_method()
        self.version = self.parser.get_http_version()
        self.upgrade = self.parser.should_upgrade()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.messages += 1
        self.keep_alive = self.parser.should_keep_alive()


def httptools_reading(data: bytes) -> Parsed | None:
    """httptools' reading of `data`, None when it refuses it."""
    parsed = Parsed()
    try:
        parsed.parser.feed_data(data)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None
    return parsed


def request(
    *,
    line: bytes = b"POST /v2/models/m/infer HTTP/1.1",
    headers: tuple[bytes, ...] = (b"Host: h", b"Content-Type: application/json"),
    body: bytes = b'{"inputs": []}',
    length: bytes | None = None,
) -> bytes:
    content_length = b"Content-Length: " + (length if length is not None else b"%d" % len(body))
    return b"\r\n".join((line, *headers, content_length, b"", body))


def test_the_usual_request_is_read_as_httptools_reads_it() -> None:
    data = request(headers=(b"Host: h", b"Content-Type:  application/json \t", b"X-Request-ID: r-1"))
    whole = read_whole_request(data, MAX_HEADER_BYTES, MAX_HEADER_COUNT)
    reference = httptools_reading(data)
    assert whole is not None
    assert reference is not None
    assert whole.path == "/v2/models/m/infer"
    assert whole.headers == reference.headers
    assert (b"content-type", b"application/json") in whole.headers
    assert whole.body == reference.body == b'{"inputs": []}'
    assert whole.keep_alive is True
    closing = request(headers=(b"Connection: Close",))
    assert read_whole_request(closing, MAX_HEADER_BYTES, MAX_HEADER_COUNT).keep_alive is False  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "data",
    [
        request(line=b"POST /v2/models/m/infer HTTP/1.0"),
        request(line=b"post /v2/models/m/infer HTTP/1.1"),
        request(line=b"POST /v2/models/m/infer?x=1 HTTP/1.1"),
        request(line=b"POST /v2/models/m%2F/infer HTTP/1.1"),
        request(line=b"POST http://h/v2/models/m/infer HTTP/1.1"),
        request(line=b"POST /v2/models/m/infer#f HTTP/1.1"),
        request(line=b"POST /v2/models/caf\xc3\xa9/infer HTTP/1.1"),
        request(headers=(b"X-Note: caf\xc3\xa9",)),
        request(
            headers=(
                b"X-Note: a",
                b" folded",
            )
        ),
        request(headers=(b"X-Note : a",)),
        request(headers=(b"X-Note a",)),
        request(headers=(b"X-Note: a\nX-Other: b",)),
        request(headers=(b"Transfer-Encoding: chunked",)),
        request(headers=(b"Connection: Upgrade", b"Upgrade: websocket")),
        request(headers=(b"Connection: keep-alive, close",)),
        request(headers=(b"Content-Length: 14",)),  # a second one
        request(length=b"+14"),
        request(length=b"13"),  # a byte more than it says
        request(length=b"15"),  # a byte short: the rest may come in the next read
        request(headers=tuple(b"X-%d: a" % i for i in range(MAX_HEADER_COUNT))),
        request(headers=(b"X-Long: " + b"a" * MAX_HEADER_BYTES,)),
        request() + request(),  # pipelined: two requests in one read
        request().replace(b"\r\n", b"\n"),
    ],
)
def test_anything_but_one_plain_whole_request_is_left_to_httptools(data: bytes) -> None:
    assert read_whole_request(data, MAX_HEADER_BYTES, MAX_HEADER_COUNT) is None


def mostly(usual: bytes, *others: bytes) -> st.SearchStrategy[bytes]:
    """`usual` three times in four, else one of `others`: most drawn requests are near the accepted form,
    so the property below meets accepted ones as often as refused ones."""
    return st.sampled_from([usual] * 3 * len(others) + list(others))


TOKEN = st.text("abcXYZ-_.!#09", min_size=1, max_size=6).map(str.encode)
NAMES = st.one_of(
    TOKEN,
    st.sampled_from(
        [b"Content-Length", b"Connection", b"Transfer-Encoding", b"Upgrade", b"Expect", b"", b"a b"]
    ),
)
VALUE = st.one_of(
    st.text(" \tab:;,=0", max_size=8).map(str.encode),
    st.text(" \tab\r\n\x00\x7f\x80é", max_size=8).map(lambda text: text.encode("utf-8")),
    st.sampled_from([b"close", b"Keep-Alive", b"upgrade", b"chunked", b"100-continue", b"keep-alive, close"]),
)
SEPARATORS = mostly(b": ", b":", b":\t", b" :", b"", b": \r\n ")


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(mostly(b"POST", b"post", b"GET", b"PUT", b"POS"))
    target = draw(
        st.one_of(
            mostly(b"/v2/models/m/infer", b"/", b"*", b"http://h/x", b"/a?b", b"/%41", b"//x", b"/a#b"),
            st.text("/ab%?#é \t\x00", max_size=8).map(lambda text: b"/" + text.encode("utf-8")),
        )
    )
    version = draw(mostly(b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 "))
    body = draw(st.binary(max_size=12))
    headers = draw(
        st.lists(st.tuples(NAMES, SEPARATORS, VALUE).map(lambda h: h[0] + h[1] + h[2]), max_size=5)
    )
    stated = draw(
        st.one_of(
            st.just(b"%d" % len(body)),
            st.just(b"%d" % len(body)),
            st.integers(0, 20).map(lambda n: b"%d" % n),
            st.sampled_from([b"", b"-1", b" 3", b"0x3", b"1,1", b"\xd9\xa3", b"007"]),
        )
    )
    if draw(mostly(b"one", b"none", b"two")) != b"none":
        headers.insert(draw(st.integers(0, len(headers))), b"Content-Length: " + stated)
    ending = draw(mostly(b"\r\n", b"\n"))
    head = method + b" " + target + b" " + version + b"\r\n" + b"".join(h + ending for h in headers)
    return head + b"\r\n" + body + draw(mostly(b"", b"x", b"GET / HTTP/1.1\r\n\r\n"))


@settings(max_examples=2000, deadline=None)
@given(requests())
def test_what_it_reads_httptools_reads_the_same(data: bytes) -> None:
    whole = read_whole_request(data, MAX_HEADER_BYTES, MAX_HEADER_COUNT)
    if whole is None:
        return
    reference = httptools_reading(data)
    assert reference is not None, "httptools refuses what was read"
    assert reference.messages == 1
    assert (reference.method, reference.version, reference.upgrade) == (b"POST", "1.1", False)
    url = httptools.parse_url(reference.url)
    assert url.query is None
    assert url.fragment is None
    assert url.host is None
    assert whole.path == reference.url.decode("ascii") == url.path.decode("ascii")
    assert whole.headers == reference.headers
    assert whole.body == reference.body
    assert whole.keep_alive == reference.keep_alive


def test_the_property_meets_accepted_requests() -> None:
    # A property that never meets an accepted request proves nothing.
    found = find(
        requests(),
        lambda data: read_whole_request(data, MAX_HEADER_BYTES, MAX_HEADER_COUNT) is not None,
        settings=settings(database=None, max_examples=500),
    )
    assert found.startswith(b"POST /v2/models/m/infer HTTP/1.1\r\n")


def test_the_reading_accepts_the_requests_clients_send() -> None:
    for headers in [
        (b"Host: 127.0.0.1:8000", b"Content-Type: application/json"),  # wrk, curl
        (
            b"Host: h",
            b"Accept-Encoding: identity",
            b"Content-Type: application/json",
            b"Connection: keep-alive",
        ),
        (b"host: h", b"user-agent: python-httpx/0.28", b"authorization: Bearer k", b"x-request-id: a.b:c"),
    ]:
        assert read_whole_request(request(headers=headers), MAX_HEADER_BYTES, MAX_HEADER_COUNT) is not None


def answers(model_root: Path, reads: list[list[bytes]]) -> list[tuple[bytes, bool]]:
    """Each list of reads delivered on a connection of its own to the served app, in-process; per
    connection, what it was answered (its status line, its headers but `date` in sorted order, its body)
    and whether httptools parsed a head."""
    found = []
    for written, _, protocol in protocol_answers(model_root, reads):
        head, _, body = written.partition(b"\r\n\r\n")
        status, *lines = head.split(b"\r\n")
        kept = sorted(line for line in lines if not line.startswith(b"date:"))
        found.append((b"\r\n".join([status, *kept, b"", body]), protocol.scope is not None))
    return found


def infer_request(body: bytes, *extra: bytes) -> bytes:
    return request(
        line=b"POST /v2/models/m/infer HTTP/1.1",
        headers=(b"Host: h", b"Content-Type: application/json", b"X-Request-ID: same", *extra),
        body=body,
    )


def test_a_request_read_whole_is_answered_as_the_one_httptools_parses(model_root: Path) -> None:
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    body = orjson.dumps(
        {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()}]}
    )
    whole = infer_request(body)
    cut = whole.index(b"\r\n\r\n") + 4
    found = answers(
        model_root,
        [
            [whole],  # read whole: no httptools
            [whole[:cut], whole[cut:]],  # the body in a second read: httptools, then the ASGI way
            [infer_request(body, b"X-Note: caf\xc3\xa9")],  # outside the narrow form: httptools, direct
        ],
    )
    (fast, fast_parsed), (split, split_parsed), (other, other_parsed) = found
    assert fast.startswith(b"HTTP/1.1 200"), fast
    assert (fast_parsed, split_parsed, other_parsed) == (False, True, True)
    assert fast == split == other


def test_a_request_read_whole_that_the_direct_path_declines_is_answered_by_the_asgi_path(
    model_root: Path,
) -> None:
    bad = [
        infer_request(b"{not json"),
        infer_request(
            orjson.dumps(
                {"inputs": [{"name": "input", "shape": [1, 5], "datatype": "FP32", "data": [0.0] * 5}]}
            )
        ),
        # Taken, then handed to the ASGI way at its run (past FP32: infinite): its cycle is made then.
        infer_request(
            orjson.dumps(
                {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1e39, 0, 0, 0]}]}
            )
        ),
    ]
    found = answers(model_root, [[data] for data in bad] + [[data[:-1], data[-1:]] for data in bad])
    for (answer, _), (reference, parsed) in zip(found[: len(bad)], found[len(bad) :], strict=True):
        assert parsed
        assert answer.startswith(b"HTTP/1.1 400"), answer
        assert answer == reference
    assert b"inf" in found[2][0]
