"""frozen-bn's serving side: a KServe V2 / Open Inference Protocol server for frozen-statistics ONNX."""
