"""The loopback floor: a bare HTTP/1.1 keep-alive server on asyncio streams, no framework, no parsing.

    python benchmarks/serving/wire_server.py --canned MANIFEST --port P

It reads each request's head and `Content-Length` bytes of body and writes back the canned V2 response for a
request of that length (the manifest of `benchmarks.serving.workloads.write_bodies`). Under the same wrk
load, its latency is the time to move a workload's bytes both ways over loopback: W3-binary's physical floor.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from pathlib import Path

HEADER_LENGTH = b"Inference-Header-Content-Length"


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


async def serve(canned: dict[int, bytes], port: int) -> None:
    not_found = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    ready = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{"ready": true}'

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                if head.startswith(b"GET /v2/health/ready "):
                    writer.write(ready)
                else:
                    writer.write(canned.get(length, not_found))
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, limit=1 << 20)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--canned", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop  # the fastest loop available is the fairest floor

        uvloop.run(serve(load_canned(args.canned), args.port))
    except ImportError:
        asyncio.run(serve(load_canned(args.canned), args.port))


if __name__ == "__main__":
    main()
