"""Build of the optional compiled CPU convolution kernels (the rest is in pyproject.toml).

Plain shared objects, loaded with ctypes by ``resnext_flax.nn.cpu_kernels`` (no Python C API):

* ``resnext_flax/nn/_cpu_direct.so`` from ``csrc/direct_conv.cc``: the kernel the library uses
  (grouped 3x3 convs); needs only a C++17 compiler; built on x86-64 (its AVX2 code is selected
  at run time, so it loads on any x86-64 CPU).
* ``resnext_flax/nn/_cpu_onednn.so`` from ``csrc/onednn_conv.cc``: an opt-in oneDNN backend,
  measured but not used by default (docs/performance.md). Built only where oneDNN's headers
  are installed in the build environment, i.e. on Linux x86-64 with
  ``pip install onednn-devel-cpu-gomp==2023.2.0`` and then
  ``pip install --no-build-isolation -e ".[onednn]"``. It is not linked against libdnnl: the
  library loads ``libdnnl.so.3`` from the ``onednn-cpu-gomp`` package first, with RTLD_GLOBAL.

Both extensions are optional: if one fails to build (no compiler, no headers) pip prints a
warning and the install still succeeds; the library then runs XLA's convolutions.
``RESNEXT_FLAX_NO_EXTENSION=1`` skips the build altogether.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

FFI_INCLUDE = "csrc/third_party"  # XLA's typed-FFI headers (see csrc/third_party/xla/README.md)
FLAGS = ["-std=c++17", "-O3", "-g0", "-fno-math-errno", "-Wno-attributes"]


def _x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _onednn_include() -> str | None:
    """<prefix>/include of the installed onednn-devel-cpu-gomp wheel, if any."""
    try:
        files = importlib.metadata.distribution("onednn-devel-cpu-gomp").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == "dnnl.hpp" and file.parent.name == "dnnl":
            return str(Path(file.locate()).resolve().parents[2])
    return None


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
    exts = [
        Extension(
            "resnext_flax.nn._cpu_direct",
            ["csrc/direct_conv.cc"],
            extra_compile_args=[*FLAGS, "-isystem", FFI_INCLUDE],
            language="c++",
            optional=True,
        )
    ]
    include = _onednn_include()
    if sys.platform.startswith("linux") and include is not None:
        exts.append(
            Extension(
                "resnext_flax.nn._cpu_onednn",
                ["csrc/onednn_conv.cc"],
                extra_compile_args=[*FLAGS, "-fopenmp", "-isystem", FFI_INCLUDE,
                                    "-isystem", include],
                extra_link_args=["-fopenmp"],
                language="c++",
                optional=True,
            )
        )
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildSharedObjects})
