"""Seldon MLServer's peer: a custom `MLModel` that runs the ONNX file with onnxruntime.

MLServer ships no onnxruntime runtime, so this is the smallest one its documentation's custom-runtime recipe
gives: decode the V2 input with MLServer's own `NumpyCodec`, run the session (one intra-op thread, as the
baseline), encode the output with the same codec. The model file comes from `parameters.uri` in
`model-settings.json`. Runs in MLServer's own virtual environment, found through PYTHONPATH.
"""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        uri = self.settings.parameters.uri if self.settings.parameters else None
        if not uri:
            raise ValueError(f"model {self.name}: model-settings.json needs parameters.uri, the ONNX file")
        self._session = ort.InferenceSession(uri, options, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        results = self._session.run(self._outputs, feeds)
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(n, y) for n, y in zip(self._outputs, results, strict=True)],
        )
