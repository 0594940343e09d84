"""The loopback floor: a bare HTTP/1.1 keep-alive server on blocking sockets, no framework, no parsing.

    python benchmarks/serving/wire_server.py --canned MANIFEST --port P

One thread per connection reads each request's head and `Content-Length` bytes of body straight into a
reused buffer (`recv_into`, no copies in Python) and sends back the canned V2 response for a request of that
length (the manifest of `benchmarks.serving.workloads.write_bodies`). Under the same wrk load, its latency is
the time to move a workload's bytes both ways over loopback: W3-binary's physical floor.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import threading
from pathlib import Path

HEADER_LENGTH = b"Inference-Header-Content-Length"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
READY = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{"ready": true}'


def load_canned(manifest: Path) -> dict[int, bytes]:
    """Request length -> the complete HTTP response (status line, headers, body) to send back."""
    responses: dict[int, bytes] = {}
    for length, entry in json.loads(manifest.read_text()).items():
        body = Path(entry["file"]).read_bytes()
        header_length = entry["header_length"]
        media = b"application/json" if header_length is None else b"application/octet-stream"
        head = b"HTTP/1.1 200 OK\r\nContent-Type: " + media + b"\r\nContent-Length: %d\r\n" % len(body)
        if header_length is not None:
            head += HEADER_LENGTH + b": %d\r\n" % header_length
        responses[int(length)] = head + b"\r\n" + body
    return responses


def _serve_connection(connection: socket.socket, canned: dict[int, bytes]) -> None:
    largest = max(canned, default=0)
    buffer = bytearray(1 << 16)
    pending = b""
    with connection, contextlib.suppress(ConnectionError):
        while True:
            while b"\r\n\r\n" not in pending:
                chunk = connection.recv(1 << 16)
                if not chunk:
                    return
                pending += chunk
            head, _, pending = pending.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length > largest:
                return  # not one of the workloads' requests
            if length > len(buffer):
                buffer = bytearray(length)  # grown once per connection to the largest request it carries
            view = memoryview(buffer)
            received = min(len(pending), length)
            view[:received] = pending[:received]
            pending = pending[received:]
            while received < length:
                count = connection.recv_into(view[received:length])
                if count == 0:
                    return
                received += count
            if head.startswith(b"GET /v2/health/ready "):
                connection.sendall(READY)
            else:
                connection.sendall(canned.get(length, NOT_FOUND))


def serve(canned: dict[int, bytes], port: int) -> None:
    with socket.create_server(("127.0.0.1", port), backlog=128) as listener:
        while True:
            connection, _ = listener.accept()
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=_serve_connection, args=(connection, canned), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--canned", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    serve(load_canned(args.canned), args.port)


if __name__ == "__main__":
    main()
