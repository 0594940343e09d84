"""The framework's floor: a FastAPI route that reads the request and returns a fixed, correct V2 response.

    python benchmarks/serving/floor_app.py --canned MANIFEST --port P

No parsing and no inference: the response is looked up by the request's byte length in the manifest written
by `benchmarks.serving.workloads.write_bodies`. What remains is FastAPI + uvicorn's own cost per request,
which no server built on them can beat.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request, Response

HEADER_LENGTH = "Inference-Header-Content-Length"


def create_app(manifest: Path) -> FastAPI:
    canned: dict[int, tuple[bytes, dict[str, str], str]] = {}
    for length, entry in json.loads(manifest.read_text()).items():
        header_length = entry["header_length"]
        headers = {} if header_length is None else {HEADER_LENGTH: str(header_length)}
        media = "application/json" if header_length is None else "application/octet-stream"
        canned[int(length)] = (Path(entry["file"]).read_bytes(), headers, media)
    app = FastAPI()

    @app.get("/v2/health/ready")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        body = await request.body()
        if len(body) not in canned:
            return Response(
                b'{"error": "no canned response for this request"}', 400, media_type="application/json"
            )
        content, headers, media = canned[len(body)]
        return Response(content, headers=headers, media_type=media)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--canned", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(args.canned), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
