"""Compiled CPU convolutions for XLA:CPU, called through ``jax.ffi``, with a pure-XLA fallback.

XLA:CPU's grouped convolutions are slow, and every formulation of them in XLA primitives that
was tried stays 2-3x behind a direct kernel, so this module registers C++ kernels as XLA
custom calls:

* ``direct`` (``csrc/direct_conv.cc``, no dependencies; the default): a direct 3x3 convolution
  vectorized with AVX2/FMA, for grouped convs with 4 channels per group (an in-lane permute
  lets one 8-wide register serve two groups) or with a multiple of 8 output channels per
  group; the work is spread over XLA's own intra-op thread pool. Used on x86-64 CPUs with
  AVX2 and FMA (checked at run time). Dense 3x3 convs only where it measured faster than
  XLA's lowerings (stride 2, and small maps at stride 1: ``_dense_direct_wins``), with
  16 output channels per block of weights. Dense 1x1 convs (any stride, no padding) as a
  GEMM on the same blocked weights, which are then 16-column panels packed once: faster
  than XLA's YNNPACK matmul on whole models (docs/performance.md).
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
_BOUNDARY_TARGET = "resnext_flax_fusion_boundary"
_POINTWISE_TARGET = "resnext_flax_pointwise_conv"
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
    fusion_boundary: bool = False  # the extension's identity op (any CPU it loads on)

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


def _load_direct() -> tuple[ctypes.CDLL | None, str | None, bool]:
    """(the direct kernel's library or None, why not, whether the fusion boundary loaded)."""
    path = _library_path("_cpu_direct")
    if path is None:
        return None, ("direct: extension not built (no resnext_flax/nn/_cpu_direct.so; reinstall "
                      "with a C++17 compiler available)"), False
    boundary = False
    try:
        lib = ctypes.CDLL(str(path))
        _register(_BOUNDARY_TARGET, lib, "ResnextFusionBoundary")
        boundary = True
        if not lib.resnext_direct_conv_vectorized():
            return None, "direct: this CPU lacks AVX2/FMA", boundary
        _register(_DIRECT_TARGET, lib, "ResnextDirectConv")
        _register(_POINTWISE_TARGET, lib, "ResnextPointwiseConv")
    except (OSError, AttributeError, RuntimeError, ValueError) as err:
        return None, f"direct: cannot load {path.name}: {err}", boundary
    return lib, None, boundary


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
    direct, why_direct, boundary = _load_direct()
    onednn, why_onednn = _load_onednn()
    reasons = tuple(r for r in (why_direct, why_onednn) if r)
    loaded = _Loaded(direct, onednn, reasons, boundary)
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


def _direct_unit(d: int, dout: int, groups: int) -> int | None:
    """Output channels per block of the direct kernel's weight layout; None: no vector form.
    A group; two groups of 4; in a dense conv 16 channels (contiguous weights per tile)."""
    if d == 4 and dout == 4:
        return 8
    if groups == 1 and dout % 16 == 0:
        return 16
    return dout if dout % 8 == 0 else None


def _direct_supports(kernel_shape: tuple[int, ...], groups: int) -> bool:
    """3x3 convs with a vector form; dense 1x1 convs (a GEMM) with a multiple of 16 outputs."""
    kh, kw, d, cout = kernel_shape
    if (kh, kw) == (1, 1):
        return groups == 1 and cout % 16 == 0
    if kh != 3 or kw != 3:
        return False
    unit = _direct_unit(d, cout // groups, groups)
    return unit is not None and cout % unit == 0


def _output_size(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], stride: int,
                 padding: int) -> tuple[int, int, int]:
    """(n, ho, wo) of a conv with torch-style symmetric padding."""
    n, h, w, _ = x_shape
    kh, kw = kernel_shape[:2]
    return n, (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1


def _dense_direct_wins(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], stride: int,
                       padding: int) -> bool:
    """Where the direct kernel beats the pure-XLA choice for a dense conv, measured on
    whole models (docs/performance.md): every 1x1 conv (its GEMM over XLA's matmul: whole
    models 0.98-1.13x, 1.03-1.13x those with bottlenecks), every stride-2 3x3 conv (XLA's
    native conv otherwise; 1.1-1.7x per conv at batch 1 and 8), and stride-1 convs with at
    most 196 output pixels (7x7 and 14x14 maps at batch 1: 1.5-1.7x per conv). Larger maps
    stay with Winograd: its 2.25x fewer multiplies won there (0.54-0.86x per conv at batch 8),
    and at batch 1 the direct kernel on ResNet's 56x56 and 28x28 maps, though faster conv by
    conv, made ResNet-18 slower (1.22x against 1.43x over no dense direct conv)."""
    if kernel_shape[:2] == (1, 1) or stride != 1:
        return True
    return np.prod(_output_size(x_shape, kernel_shape, stride, padding)) <= 196


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
    if n < 1 or d < 1 or min(h + 2 * padding - kh, w + 2 * padding - kw) < 0:
        return None  # (no input channels: the GEMM would leave its output unwritten)
    forced = _backend_override.get()
    candidates = (forced,) if forced else BACKENDS
    for name in candidates:
        if not available(name):
            continue
        if name == "direct" and (not _direct_supports(kernel_shape, groups)
                                 or (kh == 1 and padding)):
            continue
        # Dense convs: the direct kernel where it measured faster than XLA's lowerings;
        # oneDNN only when forced (not measured against them).
        if groups == 1 and not forced and (
            name != "direct" or not _dense_direct_wins(x_shape, kernel_shape, stride, padding)
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


def _out_shape(x: jax.Array, kernel_shape: tuple, stride: int, padding: int):
    n, ho, wo = _output_size(x.shape, kernel_shape, stride, padding)
    return jax.ShapeDtypeStruct((n, ho, wo, kernel_shape[-1]), jnp.float32)


def _blocked_shape(kernel_shape: tuple[int, ...], groups: int) -> tuple[int, ...]:
    """(units, kh, kw, d, unit): the direct kernel's layout of a kernel it supports."""
    kh, kw, d, cout = kernel_shape
    unit = _direct_unit(d, cout // groups, groups)
    return cout // unit, kh, kw, d, unit


def block_kernel(kernel: jax.Array, groups: int) -> jax.Array | None:
    """An HWIO kernel in the direct kernel's layout, (units, kh, kw, d, unit): each block of
    output channels' weights contiguous. None where the direct kernel has no form for it.
    ``conv2d(..., blocked=...)`` takes it precomputed (inference: ``ops.prepare_kernel``)."""
    if kernel.ndim != 4 or not _direct_supports(kernel.shape, groups):
        return None
    units, kh, kw, d, unit = _blocked_shape(kernel.shape, groups)
    return kernel.reshape(kh, kw, d, units, unit).transpose(3, 0, 1, 2, 4)


def _ffi_conv(x, weights, stride: int, padding: int, groups: int, backend: str) -> jax.Array:
    """One custom call on unbatched (rank-4) operands; `weights` blocked for "direct", HWIO
    for "onednn"."""
    attrs = {"stride": np.int64(stride), "padding": np.int64(padding),
             "groups": np.int64(groups)}
    if backend == "direct":
        units, kh, kw, _, unit = weights.shape
        out = _out_shape(x, (kh, kw, None, units * unit), stride, padding)
        return jax.ffi.ffi_call(_DIRECT_TARGET, out, vmap_method="sequential")(
            x, weights, unit=np.int64(unit), **attrs)
    out = _out_shape(x, weights.shape, stride, padding)
    return jax.ffi.ffi_call(_ONEDNN_TARGET, out, vmap_method="sequential")(x, weights, **attrs)


def _vmapped_with_shared(fn: Callable, shared: tuple[int, ...]) -> Callable:
    """``fn(*operands)`` (one custom call) with a vmap rule: while the operands at positions
    `shared` (weights, bias) are unmapped, the mapped axis of the others (input, residual) is
    folded into their batch axis, one call; else one call per slice."""

    @jax.custom_batching.custom_vmap
    def call(*operands):
        return fn(*operands)

    @call.def_vmap
    def call_vmap(axis_size, in_batched, *operands):
        per_slice = any(in_batched[i] for i in shared)

        def mapped(a, batched):
            return a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))

        operands = [mapped(a, batched) if per_slice or i not in shared else a
                    for i, (a, batched) in enumerate(zip(operands, in_batched, strict=True))]
        if per_slice:
            return jax.lax.map(lambda ops: call(*ops), tuple(operands)), True
        # Through `call` again, so that an enclosing vmap is handled by this rule too.
        b, n = operands[0].shape[:2]
        out = call(*(a if i in shared else a.reshape(b * n, *a.shape[2:])
                     for i, a in enumerate(operands)))
        return out.reshape(b, n, *out.shape[1:]), True

    return call


@functools.cache
def _batched_call(config: tuple) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The custom call for one (stride, padding, groups, backend), with a vmap rule."""
    return _vmapped_with_shared(lambda x, weights: _ffi_conv(x, weights, *config), shared=(1,))


def _direct_weights(kernel: jax.Array, groups: int, blocked: jax.Array | None) -> jax.Array:
    """The direct kernel's layout: `blocked` where it is that of `kernel`, else made here."""
    usable = blocked is not None and blocked.dtype == kernel.dtype \
        and blocked.shape == _blocked_shape(kernel.shape, groups)
    return blocked if usable else block_kernel(kernel, groups)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _conv(config, differentiate_with, x, kernel, weights):
    """The custom call on `weights` (derived from `kernel`); derivatives are those of
    ``differentiate_with(x, kernel)``, `weights` gets none."""
    del differentiate_with, kernel
    return _batched_call(config)(x, weights)


@_conv.defjvp
def _conv_jvp(config, differentiate_with, primals, tangents):
    return jax.jvp(differentiate_with, primals[:2], tangents[:2])


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    differentiate_with: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    blocked: jax.Array | None = None,
) -> jax.Array:
    """2-D convolution of an NHWC input with an HWIO kernel, torch-style symmetric padding.

    Runs in a compiled kernel where :func:`supports` says so, else computes XLA's
    ``conv_general_dilated``. Derivatives are those of ``differentiate_with(x, kernel)``
    (default: XLA's conv with the same parameters), which must compute the same conv.
    ``blocked``: ``block_kernel(kernel, groups)`` computed beforehand (for weights that no
    longer change), so that the program does not lay the kernel out again on every call.
    """
    backend = backend_for(x.shape, kernel.shape, stride, padding, groups, x.dtype)
    direct = differentiate_with or functools.partial(
        xla_conv, stride=stride, padding=padding, groups=groups)
    if backend is None or kernel.dtype != x.dtype:
        return direct(x, kernel)
    weights = _direct_weights(kernel, groups, blocked) if backend == "direct" else kernel
    return _conv((stride, padding, groups, backend), direct, x, kernel, weights)


def pointwise_supports(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], stride: int,
                       dtype) -> bool:
    """Whether :func:`pointwise_conv` runs this 1x1 conv and its epilogue in the kernel's GEMM."""
    return tuple(kernel_shape[:2]) == (1, 1) and backend_for(
        x_shape, kernel_shape, stride, 0, 1, dtype) == "direct"


def epilogue(y: jax.Array, bias: jax.Array | None, residual: jax.Array | None,
             relu: bool) -> jax.Array:
    """``relu?(y + bias + residual)`` in XLA, in that order: what the GEMM's epilogue computes."""
    if bias is not None:
        y = y + bias
    if residual is not None:
        y = y + residual
    return jax.nn.relu(y) if relu else y


def pointwise_conv(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    *,
    residual: jax.Array | None = None,
    relu: bool = False,
    stride: int = 1,
    differentiate_with: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    blocked: jax.Array | None = None,
) -> jax.Array:
    """``relu?(conv1x1(x, kernel) + bias + residual)``: with BatchNorm folded into the conv, the
    ops around a ResNet's 1x1 convs, applied by the kernel's GEMM as it writes its output
    (saves XLA a pass over it). Where the GEMM does not run the conv (see
    :func:`pointwise_supports`), or operands differ in dtype or shape, the same ops in XLA.
    Derivatives are those of ``epilogue(differentiate_with(x, kernel), ...)`` (default: XLA's
    conv); ``blocked`` as in :func:`conv2d`.
    """
    direct = differentiate_with or functools.partial(xla_conv, stride=stride, padding=0, groups=1)
    out = _out_shape(x, kernel.shape, stride, 0) if x.ndim == 4 else None
    fits = (out is not None and pointwise_supports(x.shape, kernel.shape, stride, x.dtype)
            and kernel.dtype == jnp.result_type(bias) == x.dtype
            and jnp.shape(bias) == (kernel.shape[-1],)
            and (residual is None or (jnp.shape(residual) == out.shape
                                      and jnp.result_type(residual) == x.dtype)))
    if not fits:
        return epilogue(direct(x, kernel), bias, residual, relu)
    operands = (x, kernel, bias) + (() if residual is None else (residual,))
    return _pointwise((stride, bool(relu)), direct, _direct_weights(kernel, 1, blocked),
                      *operands)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _pointwise(config, differentiate_with, weights, x, kernel, bias, *residual):
    del differentiate_with, kernel
    return _pointwise_call(config)(x, weights, bias, *residual)


@_pointwise.defjvp
def _pointwise_jvp(config, differentiate_with, primals, tangents):
    relu = config[1]

    def composed(x, kernel, bias, *residual):
        return epilogue(differentiate_with(x, kernel), bias, residual[0] if residual else None,
                        relu)

    # `weights` (derived from the kernel) gets no derivative.
    return jax.jvp(composed, primals[1:], tangents[1:])


@functools.cache
def _pointwise_call(config: tuple) -> Callable:
    """The custom call for one (stride, relu), with or without a residual; under vmap a mapped
    input (and residual) is folded into the batch."""
    stride, relu = config

    def call(x, weights, bias, *residual):
        units, _, _, _, unit = weights.shape
        out = _out_shape(x, (1, 1, None, units * unit), stride, 0)
        return jax.ffi.ffi_call(_POINTWISE_TARGET, out, vmap_method="sequential")(
            x, weights, bias, *residual, stride=np.int64(stride), relu=relu)

    return _vmapped_with_shared(call, shared=(1, 2))


def fusion_boundary(x: jax.Array) -> jax.Array:
    """``x`` itself, computed once into memory: an op XLA cannot fuse into its consumers.

    XLA:CPU duplicates cheap elementwise producers into every consumer fusion. A residual
    block's output ``relu(out + identity)`` feeds the next block's 1x1 conv (a library matmul,
    which reads it from memory) and the next residual add (a loop fusion, which recomputes
    it): so each add recomputed every earlier block's add of its stage, a cost quadratic in
    the depth (ResNet-152's last layer3 add read 74 arrays; the adds were 16% of a batch-8
    call). Behind this custom call the add is computed once. Its output aliases its input, so
    it copies nothing. Only on the CPU where the extension loaded (with or without AVX2), and
    only where it is evaluated, not differentiated (where it is the plain identity).
    """
    if not _load().fusion_boundary or jax.default_backend() != "cpu":
        return x
    return _boundary(x)


@jax.custom_jvp
def _boundary(x: jax.Array) -> jax.Array:
    return jax.ffi.ffi_call(_BOUNDARY_TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype),
                            input_output_aliases={0: 0}, vmap_method="expand_dims")(x)


@_boundary.defjvp
def _boundary_jvp(primals, tangents):
    # Differentiated (training): the plain identity, no boundary; XLA fuses as before.
    return primals[0], tangents[0]


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
