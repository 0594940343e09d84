"""uvicorn's floor: a bare ASGI callable that reads the request and returns a fixed, correct V2 response.

    python benchmarks/serving/asgi_floor.py --canned MANIFEST --port P

No framework, no parsing, no inference: the response is looked up by the request's byte length in the manifest
written by `benchmarks.serving.workloads.write_bodies`, as the FastAPI floor (`floor_app.py`) does. uvicorn
runs it with the settings `bn-serve` passes it (`service/cli.py`): the default loop and HTTP implementation
(uvloop and httptools where installed), log level info with no logging configuration of uvicorn's own, no
access log, a 30 s graceful shutdown. What remains is uvicorn's own cost per request: the difference to the
FastAPI floor is what the framework costs, the difference to bn-serve what bn-serve itself costs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import uvicorn

from service.http_direct import serving_protocol
from service.settings import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

HEADER_LENGTH = b"inference-header-content-length"
READY_BODY = b'{"ready": true}'
NO_CANNED_BODY = b'{"error": "no canned response for this request"}'


def _headers(media: bytes, length: int, header_length: int | None = None) -> Headers:
    headers = [(b"content-type", media), (b"content-length", b"%d" % length)]
    if header_length is not None:
        headers.append((HEADER_LENGTH, b"%d" % header_length))
    return headers


def load_canned(manifest: Path) -> dict[int, tuple[bytes, Headers]]:
    """Request length -> (response body, response headers) for each workload's request."""
    canned: dict[int, tuple[bytes, Headers]] = {}
    for length, entry in json.loads(manifest.read_text()).items():
        body = Path(entry["file"]).read_bytes()
        header_length = entry["header_length"]
        media = b"application/json" if header_length is None else b"application/octet-stream"
        canned[int(length)] = (body, _headers(media, len(body), header_length))
    return canned


class CannedApp:
    """The ASGI application: `GET /v2/health/ready` and any POST, answered from `canned` by body length."""

    def __init__(self, canned: dict[int, tuple[bytes, Headers]]) -> None:
        self.canned = canned

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["method"] == "GET" and scope["path"] == "/v2/health/ready":
            await _respond(send, 200, READY_BODY, _headers(b"application/json", len(READY_BODY)))
            return
        chunks = []
        more_body = True
        while more_body:
            message = await receive()
            chunks.append(message.get("body", b""))
            more_body = message.get("more_body", False)
        answer = self.canned.get(len(b"".join(chunks)))
        if answer is None:
            await _respond(send, 400, NO_CANNED_BODY, _headers(b"application/json", len(NO_CANNED_BODY)))
            return
        await _respond(send, 200, *answer)


async def _respond(send: Send, status: int, body: bytes, headers: Headers) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def uvicorn_options(port: int) -> dict[str, Any]:
    """The keyword arguments `bn-serve` gives `uvicorn.run` with its default settings (service/cli.py)."""
    return {
        "host": "127.0.0.1",
        "port": port,
        "log_level": "info",
        "timeout_graceful_shutdown": 30.0,
        "log_config": None,
        "access_log": False,
        "http": serving_protocol(
            _default("max_header_bytes"),
            _default("max_header_count"),
            head_timeout_s=_default("request_timeout_s"),
            send_timeout_s=_default("send_timeout_s"),
        ),
    }


def _default(setting: str) -> Any:
    return Settings.model_fields[setting].default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--canned", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(CannedApp(load_canned(args.canned)), **uvicorn_options(args.port))


if __name__ == "__main__":
    main()
