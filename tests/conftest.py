import atexit
import os
import shutil
import sys
import tempfile

import jax
import pytest

# The command line keeps compiled programs on disk: in the tests' own folder, never the user's.
if "RESNEXT_FLAX_COMPILATION_CACHE" not in os.environ:
    _compilation_cache = tempfile.mkdtemp(prefix="resnext-flax-compilation-")
    os.environ["RESNEXT_FLAX_COMPILATION_CACHE"] = _compilation_cache
    atexit.register(shutil.rmtree, _compilation_cache, ignore_errors=True)

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


@pytest.fixture
def isolated_dirs(tmp_path, monkeypatch):
    """Never touch the real caches: an empty torch hub folder and the library's cache under
    tmp_path, no mirror, online (modules opt in with ``pytestmark``)."""
    from resnext_flax.weights.cache import BASE_URL_ENV, CACHE_ENV, OFFLINE_ENV

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(BASE_URL_ENV, raising=False)
    monkeypatch.delenv(OFFLINE_ENV, raising=False)


@pytest.fixture(params=["default", "avx2"])
def gemm_form(request):
    """The compiled kernel's default forms (AVX-512 where the CPU has it: the 1x1 GEMM's and the
    stem's), and their AVX2 forms, which CPUs without AVX-512 run (on such a CPU both runs take
    them)."""
    if request.param == "default":
        yield request.param
        return
    from resnext_flax.nn.lowering import kernel as cpu_kernels

    lib = cpu_kernels._load().direct
    previous = lib.resnext_gemm_set_avx512(0)
    try:
        assert lib.resnext_gemm_set_avx512(0) == 0  # the AVX-512 forms are off now
        yield request.param
    finally:
        lib.resnext_gemm_set_avx512(previous)
