"""One connection, one request at a time, every request timed: the latency of the one-connection workloads.

    python -m benchmarks.serving.sequential URL BODY_FILE CONTENT_TYPE [--header-length N] [--duration S]

Sends a workload's request over one keep-alive connection, waits for the whole answer, sends the next, for
`--duration` seconds, and prints one `SEQUENTIAL_JSON {...}` line: the requests answered, the run's length
and latency percentiles over every request (nearest rank, from `time.perf_counter_ns` read just before the
request is written and just after the answer's last byte is read). The run stops with an error at an
answer other than 200.

Why not wrk's percentiles at one connection: against the same server process, back to back, wrk's p99.9
was 1.7-2.5 ms on every server, the bare ASGI floor (no framework, no thread of its own) included, where
this client's was 0.3-1.1 ms; that tail is a share of wrk's requests, and where requests take a quarter
of a millisecond it reaches p99 (benchmarks/README.md, "The one-connection tail";
`python benchmarks/one_connection_tail.py`). wrk still gives these workloads' req/s: this loop, in
Python, answers fewer requests per second than wrk sends to the fastest servers.
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

MARKER = "SEQUENTIAL_JSON "
_HEADER_END = b"\r\n\r\n"


class SequentialClientError(Exception):
    """The server's answer could not be read as one HTTP/1.1 response with a Content-Length."""


@dataclass(frozen=True)
class Answer:
    """The framing of one response: its status code, the bytes of its head (blank line included) and its
    Content-Length, or None for a chunked body."""

    status: int
    head: int
    body: int | None


def request_bytes(path: str, body: bytes, content_type: str, header_length: int | None) -> bytes:
    """The whole HTTP/1.1 request, head and body, sent with one `sendall` per request."""
    head = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
    ]
    if header_length is not None:
        head.append(f"Inference-Header-Content-Length: {header_length}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


def parse_head(received: bytes | bytearray) -> Answer | None:
    """The framing of the response `received` starts with, or None while its head is incomplete."""
    end = received.find(_HEADER_END)
    if end < 0:
        return None
    lines = bytes(received[:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise SequentialClientError(f"not an HTTP/1.x status line: {lines[0]!r}")
    length, chunked = None, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "transfer-encoding":
            chunked = value.strip().lower().endswith("chunked")
    if chunked:
        length = None
    elif length is None:
        raise SequentialClientError("the answer has neither a Content-Length nor a chunked body")
    return Answer(int(parts[1]), end + len(_HEADER_END), length)


def chunked_end(received: bytes | bytearray, start: int) -> int | None:
    """Where the chunked body starting at `received[start]` ends (after its last chunk and the blank line;
    no trailers), or None while it is incomplete."""
    position = start
    while True:
        line_end = received.find(b"\r\n", position)
        if line_end < 0:
            return None
        size = int(bytes(received[position:line_end]).split(b";")[0], 16)
        if size == 0:
            end = line_end + 4  # "0\r\n" then the blank line
            if len(received) < end:
                return None
            if received[line_end + 2 : end] != b"\r\n":
                raise SequentialClientError("trailers after a chunked body are not read")
            return end
        position = line_end + 2 + size + 2
        if len(received) < position:
            return None


def read_answer(sock: socket.socket) -> tuple[Answer, int]:
    """Read one whole answer, whatever its framing; its framing and its length in bytes."""
    received = bytearray()
    answer, end = None, None
    while end is None:
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise SequentialClientError("the server closed the connection")
        received += chunk
        if answer is None:
            answer = parse_head(received)
        if answer is not None:
            if answer.body is not None:
                end = answer.head + answer.body if len(received) >= answer.head + answer.body else None
            else:
                end = chunked_end(received, answer.head)
    if len(received) > end:
        raise SequentialClientError("more bytes than one answer: pipelining is not expected")
    if answer is None or answer.status != 200:
        raise SequentialClientError(f"a non-200 answer: {bytes(received)[:200]!r}")
    return answer, end


def percentile(ordered: list[int], p: float) -> int:
    """Nearest-rank percentile `p` (0-100] of the ascending `ordered` (not empty)."""
    rank = max(1, -(-len(ordered) * p // 100))  # ceil(n * p / 100)
    return ordered[int(rank) - 1]


def run(port: int, request: bytes, duration_s: float) -> dict[str, float | int]:
    """Drive 127.0.0.1:`port` with `request`, one at a time, for `duration_s`; the summary of the run."""
    buffer = bytearray(1 << 16)
    view = memoryview(buffer)
    latencies: list[int] = []
    clock = time.perf_counter_ns
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The first answer's framing: one with a Content-Length is read straight into a buffer by its
        # length from then on (a different status would have another length: checked on every answer);
        # a chunked one is parsed each time.
        length: int | None = None
        started = clock()
        end = started + int(duration_s * 1e9)
        while True:
            sent = clock()
            if sent >= end:
                break
            sock.sendall(request)
            if length is None:
                answer, total = read_answer(sock)
                if answer.body is not None:
                    length = total
            else:
                got = 0
                while got < length:
                    n = sock.recv_into(view[: length - got])
                    if n == 0:
                        raise SequentialClientError("the server closed the connection")
                    if got == 0 and buffer[9:12] != b"200":
                        raise SequentialClientError(f"a non-200 answer: {bytes(buffer[:n])[:200]!r}")
                    got += n
            latencies.append(clock() - sent)
        finished = clock()
    ordered = sorted(latencies)
    if not ordered:
        raise SequentialClientError("no request was answered")
    return {
        "requests": len(ordered),
        "duration_us": (finished - started) // 1000,
        "latency_p50_us": percentile(ordered, 50) / 1000,
        "latency_p90_us": percentile(ordered, 90) / 1000,
        "latency_p99_us": percentile(ordered, 99) / 1000,
        "latency_p999_us": percentile(ordered, 99.9) / 1000,
        "latency_mean_us": sum(ordered) / len(ordered) / 1000,
        "latency_max_us": ordered[-1] / 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url", help="http://127.0.0.1:PORT/PATH")
    parser.add_argument("body", type=Path)
    parser.add_argument("content_type")
    parser.add_argument("--header-length", type=int, default=None)
    parser.add_argument("--duration", type=float, default=8.0)
    args = parser.parse_args()
    url = urlsplit(args.url)
    if url.hostname != "127.0.0.1" or url.port is None:
        raise SystemExit(f"load goes to loopback only, got {args.url}")
    request = request_bytes(url.path, args.body.read_bytes(), args.content_type, args.header_length)
    print(MARKER + json.dumps(run(url.port, request, args.duration)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
