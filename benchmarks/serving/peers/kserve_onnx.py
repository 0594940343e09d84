"""The KServe Python model server's peer: a `kserve.Model` running each ONNX file with onnxruntime, V2 REST.

    python kserve_onnx.py --model-repository DIR --http_port P --enable_grpc false --workers 1

KServe parses its own flags (`--http_port`, ...) from the command line; ours is `--model-repository`, laid
out as Triton's (`DIR/<name>/1/model.onnx`). Inputs come decoded by KServe (`InferInput.as_numpy`, which
handles the binary tensor extension); outputs go back as binary when the request asks for it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import kserve
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse
from kserve.utils.utils import generate_uuid


class OnnxModel(kserve.Model):
    def __init__(self, name: str, path: Path) -> None:
        super().__init__(name)
        self.path = path
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]
        self.ready = True
        return self.ready

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        feeds = {i.name: i.as_numpy() for i in payload.inputs}
        results = self._session.run(self._outputs, feeds)
        outputs = []
        for name, y in zip(self._outputs, results, strict=True):
            output = InferOutput(name=name, shape=list(y.shape), datatype="FP32")
            # Raw bytes here; KServe's encoder turns them into JSON or binary as the request asks.
            output.set_data_from_numpy(y, binary_data=True)
            outputs.append(output)
        return InferResponse(
            response_id=payload.id or generate_uuid(),
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=payload.use_binary_outputs,
            requested_outputs=payload.request_outputs,
        )


def main() -> None:
    # KServe reads its own flags from sys.argv when imported; take ours and leave it the rest.
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model-repository", type=Path, required=True)
    args, _ = parser.parse_known_args()
    models = [OnnxModel(p.parts[-3], p) for p in sorted(args.model_repository.glob("*/1/model.onnx"))]
    kserve.ModelServer().start(models)


if __name__ == "__main__":
    main()
