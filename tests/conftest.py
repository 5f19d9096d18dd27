import os
import sys

import jax
import pytest

# Make tests/torch_reference.py importable as a plain module from every test file.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session", autouse=True)
def highest_precision():
    """f32 parity needs full-precision matmuls/convs on GPU/TPU (no TF32); a no-op on CPU."""
    try:
        import torch

        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    except ImportError:
        pass
    with jax.default_matmul_precision("highest"):
        yield
