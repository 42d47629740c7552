"""Module namespaces mirroring torch.ao.nn: intrinsic (fused), intrinsic.qat, qat, quantized."""
