"""The baseline: what a FastAPI + onnxruntime V2 endpoint looks like when written the obvious way.

    python benchmarks/serving/baseline_app.py --model-repository DIR --port P

Loads `DIR/<name>/1/model.onnx`, parses the JSON body into lists, runs onnxruntime (one intra-op thread, the
same as the peers get), answers `outputs[].data` as a list. No binary extension. Self-contained on purpose.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Request


def create_app(repository: Path) -> FastAPI:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = {p.parts[-3]: ort.InferenceSession(str(p), options) for p in repository.glob("*/1/model.onnx")}
    app = FastAPI()

    @app.get("/v2/health/ready")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> dict[str, Any]:
        body = await request.json()
        session = sessions[name]
        feeds = {
            i["name"]: np.asarray(i["data"], dtype=np.float32).reshape(i["shape"]) for i in body["inputs"]
        }
        names = [o.name for o in session.get_outputs()]
        outputs = session.run(names, feeds)
        return {
            "model_name": name,
            "outputs": [
                {"name": n, "shape": list(y.shape), "datatype": "FP32", "data": y.ravel().tolist()}
                for n, y in zip(names, outputs, strict=True)
            ],
        }

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model_repository), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
