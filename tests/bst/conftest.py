import warnings

import pytest


@pytest.fixture(scope="module")
def tq():
    """torch.ao.quantization, the reference bst's quantization modules are compared with (skips without it)."""
    ao = pytest.importorskip("torch.ao.quantization")
    warnings.filterwarnings("ignore", module="torch.ao")
    return ao
