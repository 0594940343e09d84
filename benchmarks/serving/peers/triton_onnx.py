"""Triton Inference Server's peer: a python-backend model running its ONNX file with onnxruntime.

Copied as `model.py` beside `model.onnx` in each model's version folder of the repository that
`benchmarks.serving.servers.triton_repository` writes. Triton's dynamic batcher hands `execute` the requests
that queued together; their inputs go through one onnxruntime run and the output is split back per request,
as a batching server does. numpy and onnxruntime come from the peer's virtual environment (see
`benchmarks/serving/triton_peer.py` for how the stub finds them).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils  # provided by the backend's stub


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        model = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name

    def execute(self, requests: list[Any]) -> list[Any]:
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input).as_numpy() for r in requests]
        merged = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        (y,) = self.session.run([self.output], {self.input: merged})
        bounds = np.cumsum([a.shape[0] for a in arrays])[:-1]
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output, part)])
            for part in np.split(y, bounds)
        ]
