#!/usr/bin/env bash
# Parity tests on a GPU/TPU machine: the same tests as on the CPU, placed on the accelerator
# (matmul precision 'highest', torch TF32 off; see tests/conftest.py). Fails if JAX sees none.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import jax; d = jax.devices(); print(d); assert d[0].platform != 'cpu', 'no accelerator'"
pytest tests/test_parity.py -m accelerator -rA -q "$@"
