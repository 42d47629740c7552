"""bst.torch.ao: a compact quantization-aware-training library on core torch ops (no torch.ao)."""
