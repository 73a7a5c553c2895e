"""Export to TorchScript and ONNX, and running the exported files through the same post-processing."""
