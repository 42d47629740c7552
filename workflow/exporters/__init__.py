"""One exporter per format (torchscript, onnx, openvino, integer), the checks every exported file passes before it is
kept (verify: its outputs against PyTorch's; qdq_checks: the QDQ graph itself)."""
