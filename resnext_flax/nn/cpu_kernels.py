"""Compiled CPU convolutions for XLA:CPU, called through ``jax.ffi``, with a pure-XLA fallback.

XLA:CPU's grouped convolutions are slow, and every formulation of them in XLA primitives that
was tried stays 2-3x behind a direct kernel, so this module registers C++ kernels as XLA
custom calls:

* ``direct`` (``csrc/direct_conv.cc``, no dependencies; the default): a direct 3x3 convolution
  vectorized with AVX2/FMA, for grouped convs with 4 channels per group (an in-lane permute
  lets one 8-wide register serve two groups) or with a multiple of 8 output channels per
  group; the work is spread over XLA's own intra-op thread pool. Used on x86-64 CPUs with
  AVX2 and FMA (checked at run time). Dense convs are left to XLA (its Winograd lowering wins).
* ``onednn`` (``csrc/onednn_conv.cc``; opt-in, see ``setup.py``): oneDNN's
  ``convolution_forward`` from the ``onednn-cpu-gomp`` wheel (CPU-only, GNU OpenMP), any kernel
  size and group count. Measured against ``direct`` and not used by default: no whole-model
  gain here, and its OpenMP threads spin after each call and compete with XLA's thread pool
  (docs/performance.md). Where loaded it takes grouped convs ``direct`` cannot run.

Both compute the forward pass only. :func:`conv2d` is a ``jax.custom_jvp``: differentiating
it differentiates XLA's conv instead (or the function passed as ``differentiate_with``), so
gradients are those of the pure-XLA path. Under ``jax.vmap`` the mapped axis is folded into the
batch (one call) when only the input is mapped, else the kernel runs once per mapped slice.

``pip install`` builds the extension (``setup.py``; optional: where it cannot be built or
loaded, or with ``RESNEXT_FLAX_DISABLE_CPU_KERNELS=1``, :func:`available` is False, the reason
is logged once, and :func:`conv2d` computes XLA's conv).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import dataclasses
import functools
import importlib.metadata
import logging
import os
import platform
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

#: Set to 1 to never load the extension (tests, debugging): every conv then runs in XLA.
DISABLE_ENV = "RESNEXT_FLAX_DISABLE_CPU_KERNELS"
BACKENDS = ("direct", "onednn")

_DIRECT_TARGET = "resnext_flax_direct_conv"
_ONEDNN_TARGET = "resnext_flax_onednn_conv"
_PACKAGE_DIR = Path(__file__).resolve().parent
_NHWC = ("NHWC", "HWIO", "NHWC")

_backend_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "resnext_flax_cpu_kernel_backend", default=None
)


@dataclasses.dataclass(frozen=True)
class _Loaded:
    direct: ctypes.CDLL | None
    onednn: ctypes.CDLL | None
    reasons: tuple[str, ...]  # why a backend is missing

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(name for name in BACKENDS if getattr(self, name) is not None)


def _x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def expected_platform() -> bool:
    """True where ``pip install`` must have built the extension (CI checks it): Linux x86-64."""
    return sys.platform.startswith("linux") and _x86_64()


def disabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _library_path(name: str) -> Path | None:
    path = _PACKAGE_DIR / f"{name}.so"
    return path if path.is_file() else None


def _libdnnl() -> Path | None:
    """libdnnl.so.3 of the installed ``onednn-cpu-gomp`` wheel (it installs into <prefix>/lib)."""
    try:
        files = importlib.metadata.distribution("onednn-cpu-gomp").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == "libdnnl.so.3":
            return Path(file.locate()).resolve()
    return None


def _register(target: str, lib: ctypes.CDLL, symbol: str) -> None:
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


def _load_direct() -> tuple[ctypes.CDLL | None, str | None]:
    path = _library_path("_cpu_direct")
    if path is None:
        return None, ("direct: extension not built (no resnext_flax/nn/_cpu_direct.so; reinstall "
                      "with a C++17 compiler available)")
    try:
        lib = ctypes.CDLL(str(path))
        if not lib.resnext_direct_conv_vectorized():
            return None, "direct: this CPU lacks AVX2/FMA"
        _register(_DIRECT_TARGET, lib, "ResnextDirectConv")
    except (OSError, AttributeError, RuntimeError, ValueError) as err:
        return None, f"direct: cannot load {path.name}: {err}"
    return lib, None


def _load_onednn() -> tuple[ctypes.CDLL | None, str | None]:
    path = _library_path("_cpu_onednn")
    if path is None:
        return None, "onednn: extension not built (no resnext_flax/nn/_cpu_onednn.so)"
    dnnl = _libdnnl()
    if dnnl is None:
        return None, "onednn: the onednn-cpu-gomp package (libdnnl.so.3) is not installed"
    try:
        # Global, so that the extension's dnnl_* symbols resolve against it.
        ctypes.CDLL(str(dnnl), mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(str(path))
        _register(_ONEDNN_TARGET, lib, "ResnextOnednnConv")
    except (OSError, AttributeError, RuntimeError, ValueError) as err:
        return None, f"onednn: cannot load {path.name}: {err}"
    return lib, None


_load_lock = threading.Lock()


def _load() -> _Loaded:
    """Loads and registers the kernels once per process (thread-safe); logs why not once."""
    with _load_lock:
        return _load_once()


@functools.cache
def _load_once() -> _Loaded:
    if disabled_by_env():
        reasons = (f"disabled by {DISABLE_ENV}",)
        logger.info("resnext_flax CPU kernels off (%s); convolutions run in XLA", reasons[0])
        return _Loaded(None, None, reasons)
    if not hasattr(jax, "ffi") or not hasattr(jax.ffi, "ffi_call"):
        reasons = (f"jax {jax.__version__} has no jax.ffi",)
        logger.warning("resnext_flax CPU kernels unavailable (%s)", reasons[0])
        return _Loaded(None, None, reasons)
    direct, why_direct = _load_direct()
    onednn, why_onednn = _load_onednn()
    reasons = tuple(r for r in (why_direct, why_onednn) if r)
    loaded = _Loaded(direct, onednn, reasons)
    # oneDNN is opt-in: its absence is only worth a line where it was built.
    told = [r for r in reasons if not r.startswith("onednn: extension not built")]
    if told:
        # The direct kernel is expected on x86-64: a missing one there deserves a warning.
        log = (logger.warning if why_direct and _x86_64() and "AVX2" not in why_direct
               else logger.info)
        log("resnext_flax CPU kernels: %s; loaded: %s", "; ".join(told),
            ", ".join(loaded.backends) or "none (convolutions run in XLA)")
    return loaded


def available(backend: str | None = None) -> bool:
    """Whether the compiled kernels (any, or the named backend) are loaded and usable."""
    loaded = _load()
    return bool(loaded.backends) if backend is None else backend in loaded.backends


def unavailable_reasons() -> tuple[str, ...]:
    """Why backends are missing (empty when all loaded)."""
    return _load().reasons


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force one backend for every :func:`conv2d` *traced* in the block (benchmarks, tests).

    A conv the forced backend cannot run falls back to XLA. ``None``: the per-shape choice.
    """
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown CPU kernel backend {name!r}; expected one of {BACKENDS}")
    token = _backend_override.set(name)
    try:
        yield
    finally:
        _backend_override.reset(token)


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` here, or None."""
    return _backend_override.get()


def _direct_unit(d: int, dout: int) -> int | None:
    """Output channels per block of the direct kernel's weight layout; None: no vector form."""
    if d == 4 and dout == 4:
        return 8
    return dout if dout % 8 == 0 else None


def _direct_supports(kernel_shape: tuple[int, ...], groups: int) -> bool:
    kh, kw, d, cout = kernel_shape
    if kh != 3 or kw != 3:
        return False
    unit = _direct_unit(d, cout // groups)
    return unit is not None and cout % unit == 0


def backend_for(
    x_shape: tuple[int, ...],
    kernel_shape: tuple[int, ...],
    stride: int,
    padding: int,
    groups: int,
    dtype,
) -> str | None:
    """The backend :func:`conv2d` uses for a conv, or None where it falls back to XLA."""
    if len(x_shape) != 4 or len(kernel_shape) != 4:
        return None
    if jnp.dtype(dtype) != jnp.float32 or jax.default_backend() != "cpu" or not available():
        return None
    n, h, w, c = x_shape
    kh, kw, d, cout = kernel_shape
    if groups < 1 or d * groups != c or cout % groups or stride < 1 or padding < 0:
        return None
    if n < 1 or min(h + 2 * padding - kh, w + 2 * padding - kw) < 0:
        return None
    forced = _backend_override.get()
    candidates = (forced,) if forced else BACKENDS
    for name in candidates:
        if not available(name):
            continue
        # Dense convs: the direct kernel has no cache blocking over input channels and loses to
        # XLA/oneDNN there; it runs them only when forced.
        if name == "direct" and (
            not _direct_supports(kernel_shape, groups) or (groups == 1 and not forced)
        ):
            continue
        return name
    return None


def supports(
    x_shape: tuple[int, ...],
    kernel_shape: tuple[int, ...],
    stride: int,
    padding: int,
    groups: int,
    dtype,
) -> bool:
    """Whether :func:`conv2d` runs this conv in a compiled kernel (else it computes XLA's)."""
    return backend_for(x_shape, kernel_shape, stride, padding, groups, dtype) is not None


def xla_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int):
    """XLA's own convolution (NHWC, HWIO, symmetric padding): what the kernels compute and fall
    back to, and the ``"xla"`` lowering of ``nn.ops.conv2d``."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=_NHWC,
        feature_group_count=groups,
    )


def _out_shape(x: jax.Array, kernel: jax.Array, stride: int, padding: int):
    n, h, w, _ = x.shape
    kh, kw, _, cout = kernel.shape
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    return jax.ShapeDtypeStruct((n, ho, wo, cout), jnp.float32)


def _ffi_conv(x, kernel, stride: int, padding: int, groups: int, backend: str) -> jax.Array:
    """One custom call on unbatched (rank-4) operands."""
    attrs = {"stride": np.int64(stride), "padding": np.int64(padding),
             "groups": np.int64(groups)}
    out = _out_shape(x, kernel, stride, padding)
    if backend == "direct":
        kh, kw, d, cout = kernel.shape
        unit = _direct_unit(d, cout // groups)
        # HWIO -> (units, kh, kw, d, unit): each block of output channels' weights contiguous.
        blocked = kernel.reshape(kh, kw, d, cout // unit, unit).transpose(3, 0, 1, 2, 4)
        return jax.ffi.ffi_call(_DIRECT_TARGET, out, vmap_method="sequential")(
            x, blocked, unit=np.int64(unit), **attrs)
    return jax.ffi.ffi_call(_ONEDNN_TARGET, out, vmap_method="sequential")(x, kernel, **attrs)


@functools.cache
def _batched_call(config: tuple) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The custom call for one (stride, padding, groups, backend), with a vmap rule."""

    @jax.custom_batching.custom_vmap
    def call(x, kernel):
        return _ffi_conv(x, kernel, *config)

    @call.def_vmap
    def call_vmap(axis_size, in_batched, x, kernel):
        x_batched, kernel_batched = in_batched
        if not kernel_batched:
            # Fold the mapped axis into the batch: one call.
            # (Through `call` again, so that an enclosing vmap is handled by this rule too.)
            b, n = x.shape[:2]
            out = call(x.reshape(b * n, *x.shape[2:]), kernel)
            return out.reshape(b, n, *out.shape[1:]), True
        if not x_batched:
            x = jnp.broadcast_to(x, (axis_size, *x.shape))
        return jax.lax.map(lambda xk: call(*xk), (x, kernel)), True

    return call


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _conv(x, kernel, config, differentiate_with):
    del differentiate_with
    return _batched_call(config)(x, kernel)


@_conv.defjvp
def _conv_jvp(config, differentiate_with, primals, tangents):
    return jax.jvp(differentiate_with, primals, tangents)


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    differentiate_with: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """2-D convolution of an NHWC input with an HWIO kernel, torch-style symmetric padding.

    Runs in a compiled kernel where :func:`supports` says so, else computes XLA's
    ``conv_general_dilated``. Derivatives are those of ``differentiate_with(x, kernel)``
    (default: XLA's conv with the same parameters), which must compute the same conv.
    """
    backend = backend_for(x.shape, kernel.shape, stride, padding, groups, x.dtype)
    direct = differentiate_with or functools.partial(
        xla_conv, stride=stride, padding=padding, groups=groups)
    if backend is None or kernel.dtype != x.dtype:
        return direct(x, kernel)
    return _conv(x, kernel, (stride, padding, groups, backend), direct)


# ---- Benchmark controls (ctypes; no effect on results).

def _configure_onednn(threads: int = 0, weight_cache: bool = False, timing: bool = False):
    """oneDNN: OpenMP threads per call (0: OpenMP's default), weight cache, timing counters."""
    lib = _load().onednn
    if lib is not None:
        lib.resnext_onednn_configure(int(threads), int(weight_cache), int(timing))


def _onednn_stats() -> dict[str, float]:
    """Seconds creating primitives, reordering weights, executing, and counts; then resets."""
    lib = _load().onednn
    if lib is None:
        return {}
    out = (ctypes.c_double * 6)()
    lib.resnext_onednn_stats(out)
    return dict(zip(("create_s", "reorder_s", "exec_s", "calls", "creates", "reorders"), out,
                    strict=True))


def _onednn_impl(x_shape, kernel_shape, stride: int, padding: int, groups: int) -> str:
    """The oneDNN implementation name for a conv (e.g. ``brgconv:avx2``)."""
    lib = _load().onednn
    if lib is None:
        return ""
    n, h, w, c = x_shape
    kh, kw, _, cout = kernel_shape
    buf = ctypes.create_string_buffer(256)
    args = [ctypes.c_int64(v) for v in (n, h, w, c, kh, kw, cout, stride, padding, groups)]
    lib.resnext_onednn_impl(*args, buf, ctypes.c_int64(256))
    return buf.value.decode()


def _set_direct_helpers(helpers: int) -> None:
    """Direct kernel: cap the helper threads taken from XLA's pool (-1: all, 0: none)."""
    lib = _load().direct
    if lib is not None:
        lib.resnext_direct_conv_set_helpers(int(helpers))
