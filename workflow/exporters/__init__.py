"""One exporter per format, each in its own module (torchscript, onnx, openvino, integer; what they share: common),
and the one verification step every exported file passes before it is kept (verify: its outputs against PyTorch's,
every format; qdq_checks: the QDQ graph itself)."""
