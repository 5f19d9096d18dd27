"""Build of the optional compiled CPU convolution kernel (the rest is in pyproject.toml).

A plain shared object, loaded with ctypes by ``resnext_flax.nn.lowering.kernel`` (no Python C
API): ``resnext_flax/nn/lowering/_cpu_direct.so`` from ``csrc/`` (the direct convs, the GEMM,
the stem), the kernels the library's CPU convolutions use; it needs only a C++17 compiler and
is built on x86-64 (its AVX2 and AVX-512 code is selected at run time, so it loads on any
x86-64 CPU).

The extension is optional: if it fails to build (no compiler) pip prints a warning and the
install still succeeds; the library then runs XLA's convolutions.
``RESNEXT_FLAX_NO_EXTENSION=1`` skips the build altogether.
"""

from __future__ import annotations

import os
import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

FFI_INCLUDE = "csrc/third_party"  # XLA's typed-FFI headers (see csrc/third_party/xla/README.md)
FLAGS = ["-std=c++17", "-O3", "-g0", "-fno-math-errno", "-Wno-attributes"]


def _x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


class BuildSharedObjects(build_ext):
    """Names the outputs ``<name>.so`` (ctypes loads them; they are not Python modules)."""

    def get_ext_filename(self, fullname: str) -> str:
        return os.path.join(*fullname.split(".")) + ".so"

    def build_extension(self, ext: Extension) -> None:
        print(f"building optional CPU kernel {ext.name}", flush=True)
        super().build_extension(ext)


def extensions() -> list[Extension]:
    if os.environ.get("RESNEXT_FLAX_NO_EXTENSION", "") not in ("", "0"):
        return []
    if not _x86_64() or sys.platform == "win32":
        return []
    return [
        Extension(
            "resnext_flax.nn.lowering._cpu_direct",
            ["csrc/direct_conv.cc", "csrc/gemm.cc", "csrc/stem.cc"],
            extra_compile_args=[*FLAGS, "-isystem", FFI_INCLUDE],
            language="c++",
            optional=True,
        )
    ]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildSharedObjects})
