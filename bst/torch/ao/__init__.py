"""bst.torch.ao: a compact quantization-aware-training library on core torch ops (no torch.ao)."""

# The quantizers (quantization) load before the modules built on them (nn), whichever of the two a program imports
# first: the modules' files import quantizer files, and the quantization package's swap tables import module files.
from bst.torch.ao import quantization  # noqa: F401
