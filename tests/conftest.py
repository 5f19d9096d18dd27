import os
import sys

import jax

# Make tests/torch_reference.py importable as a plain module from every test file.
sys.path.insert(0, os.path.dirname(__file__))

# float32 parity needs full-precision matmuls and convs on GPU/TPU (no TF32 on either side);
# both settings are no-ops on the CPU.
jax.config.update("jax_default_matmul_precision", "highest")
try:
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
except ImportError:  # the torch-free tests still run
    pass
