"""Using a trained run: the Python API's loader, the embedding index, search, the HTTP service and its page, ONNX."""
