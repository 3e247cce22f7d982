"""Deployment: a fitted model as one self-contained ONNX or TorchScript file, with its parity proven."""
