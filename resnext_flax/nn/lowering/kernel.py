"""The compiled CPU convolution kernel (``csrc/direct_conv.cc``), called through ``jax.ffi``.

XLA:CPU's grouped convolutions are slow, and every formulation of them in XLA primitives stays
behind a direct kernel, so this module registers C++ kernels as XLA custom calls: a direct 3x3
convolution vectorized with AVX2/FMA (grouped convs with 4 channels per group, where an in-lane
permute lets one 8-wide register serve two groups, or a multiple of 8 output channels per group;
dense convs with 16 output channels per block of weights), dense 1x1 convs as a GEMM on the same
blocked weights with a bias/residual/ReLU epilogue, and an identity that XLA cannot fuse (the
residual :func:`fusion_boundary`); it also registers the stem's conv and max-pool
(``csrc/stem.cc``), which ``nn.lowering.stem`` calls. The work runs on XLA's own intra-op
thread pool.

The kernels compute the forward pass only: :func:`conv2d` and :func:`pointwise_conv` are
``jax.custom_jvp`` functions whose derivatives are those of XLA's conv (or the function passed
as ``differentiate_with``). Under ``jax.vmap`` a mapped input is folded into the batch (one
call); a mapped kernel runs one call per slice. Which convs use the kernel is the
``ConvPolicy``'s decision (``nn.policy``); this module only says what it can run.

``pip install`` builds the extension (``setup.py``; optional: where it cannot be built or
loaded, or with ``RESNEXT_FLAX_DISABLE_CPU_KERNELS=1``, :func:`available` is False, the reason
is logged once, and :func:`conv2d` computes XLA's conv).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
import platform
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from resnext_flax.nn.ops import conv_xla, epilogue

logger = logging.getLogger(__name__)

#: Set to 1 to never load the extension (tests, debugging): every conv then runs in XLA.
DISABLE_ENV = "RESNEXT_FLAX_DISABLE_CPU_KERNELS"

_DIRECT_TARGET = "resnext_flax_direct_conv"
_BOUNDARY_TARGET = "resnext_flax_fusion_boundary"
_POINTWISE_TARGET = "resnext_flax_pointwise_conv"
_DIRECT_ACT_TARGET = "resnext_flax_direct_conv_bias_act"
STEM_TARGET = "resnext_flax_stem_conv"  # the stem's conv and max-pool (``lowering.stem``)
POOL_TARGET = "resnext_flax_max_pool"
#: The custom-call targets this module registers (a pure-XLA program contains none of them).
TARGETS = (_DIRECT_TARGET, _BOUNDARY_TARGET, _POINTWISE_TARGET, _DIRECT_ACT_TARGET, STEM_TARGET,
           POOL_TARGET)
_LIBRARY = Path(__file__).resolve().parent / "_cpu_direct.so"


@dataclasses.dataclass(frozen=True)
class _Loaded:
    direct: ctypes.CDLL | None  # the convolutions (an x86-64 CPU with AVX2 and FMA)
    reason: str | None  # why they are missing
    fusion_boundary: bool = False  # the extension's identity op (any CPU it loads on)


def _x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def expected_platform() -> bool:
    """True where ``pip install`` must have built the extension (CI checks it): Linux x86-64."""
    return sys.platform.startswith("linux") and _x86_64()


def disabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _register(target: str, lib: ctypes.CDLL, symbol: str) -> None:
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


def _load_direct() -> _Loaded:
    if not _LIBRARY.is_file():
        return _Loaded(None, f"extension not built (no {_LIBRARY.name} in resnext_flax/nn/"
                             "lowering; reinstall with a C++17 compiler available)")
    boundary = False
    try:
        lib = ctypes.CDLL(str(_LIBRARY))
        _register(_BOUNDARY_TARGET, lib, "ResnextFusionBoundary")
        boundary = True
        if not lib.resnext_direct_conv_vectorized():
            return _Loaded(None, "this CPU lacks AVX2/FMA", boundary)
        _register(_DIRECT_TARGET, lib, "ResnextDirectConv")
        _register(_POINTWISE_TARGET, lib, "ResnextPointwiseConv")
        _register(_DIRECT_ACT_TARGET, lib, "ResnextDirectConvBiasAct")
        _register(STEM_TARGET, lib, "ResnextStemConv")
        _register(POOL_TARGET, lib, "ResnextMaxPool")
    except (OSError, AttributeError, RuntimeError, ValueError) as err:
        return _Loaded(None, f"cannot load {_LIBRARY.name}: {err}", boundary)
    return _Loaded(lib, None, boundary)


_load_lock = threading.Lock()


def _load() -> _Loaded:
    """Loads and registers the kernels once per process (thread-safe); logs why not once."""
    with _load_lock:
        return _load_once()


@functools.cache
def _load_once() -> _Loaded:
    if disabled_by_env():
        loaded = _Loaded(None, f"disabled by {DISABLE_ENV}")
        logger.info("resnext_flax CPU kernels off (%s); convolutions run in XLA", loaded.reason)
        return loaded
    if not hasattr(jax, "ffi") or not hasattr(jax.ffi, "ffi_call"):
        loaded = _Loaded(None, f"jax {jax.__version__} has no jax.ffi")
        logger.warning("resnext_flax CPU kernels unavailable (%s)", loaded.reason)
        return loaded
    loaded = _load_direct()
    if loaded.reason:
        # The kernel is expected on x86-64: a missing one there deserves a warning.
        log = logger.warning if _x86_64() and "AVX2" not in loaded.reason else logger.info
        log("resnext_flax CPU kernels unavailable (%s); convolutions run in XLA", loaded.reason)
    return loaded


def available() -> bool:
    """Whether the compiled convolutions are loaded and usable."""
    return _load().direct is not None


def unavailable_reasons() -> tuple[str, ...]:
    """Why the compiled convolutions are missing (empty when loaded)."""
    reason = _load().reason
    return () if reason is None else (reason,)


def _direct_unit(d: int, dout: int, groups: int) -> int | None:
    """Output channels per block of the kernel's weight layout; None: no vector form.
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


def output_size(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], stride: int,
                padding: int) -> tuple[int, int, int]:
    """(n, ho, wo) of a conv with torch-style symmetric padding."""
    n, h, w, _ = x_shape
    kh, kw = kernel_shape[:2]
    return n, (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1


def supports(
    x_shape: tuple[int, ...],
    kernel_shape: tuple[int, ...],
    stride: int,
    padding: int,
    groups: int,
    dtype,
) -> bool:
    """Whether :func:`conv2d` can run this conv in the compiled kernel (else it computes
    XLA's): float32 on the CPU with the kernel loaded, a shape it has a vector form for."""
    if len(x_shape) != 4 or len(kernel_shape) != 4:
        return False
    if jnp.dtype(dtype) != jnp.float32 or jax.default_backend() != "cpu" or not available():
        return False
    n, h, w, c = x_shape
    kh, kw, d, cout = kernel_shape
    if groups < 1 or d * groups != c or cout % groups or stride < 1 or padding < 0:
        return False
    if n < 1 or d < 1 or min(h + 2 * padding - kh, w + 2 * padding - kw) < 0:
        return False  # (no input channels: the GEMM would leave its output unwritten)
    return _direct_supports(kernel_shape, groups) and not (kh == 1 and padding)


def _out_shape(x: jax.Array, kernel_shape: tuple, stride: int, padding: int):
    n, ho, wo = output_size(x.shape, kernel_shape, stride, padding)
    return _like(x, (n, ho, wo, kernel_shape[-1]), jnp.float32)


def _like(x: jax.Array, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
    """A custom call's result type: `shape` and `dtype`, varying over the same manual mesh
    axes as `x` (inside ``shard_map`` a custom call's result is otherwise typed as the same
    on every device, which a per-device batch is not: a scan carry or a custom JVP rule that
    compares types then rejects it)."""
    aval = jax.typeof(x)
    if aval.manual_axis_type.empty:
        return jax.ShapeDtypeStruct(shape, dtype)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=aval.sharding,
                                manual_axis_type=aval.manual_axis_type)


def _blocked_shape(kernel_shape: tuple[int, ...], groups: int) -> tuple[int, ...]:
    """(units, kh, kw, d, unit): the direct kernel's layout of a kernel it supports."""
    kh, kw, d, cout = kernel_shape
    unit = _direct_unit(d, cout // groups, groups)
    return cout // unit, kh, kw, d, unit


#: The most input channels of a dense conv that the stem kernel runs (``lowering.stem``).
STEM_MAX_CHANNELS = 4


def stem_shaped(kernel_shape: tuple[int, ...], groups: int) -> bool:
    """A dense kernel over few input channels, larger than 1x1, with whole 16-channel blocks
    of outputs (the 7x7 stem conv over RGB): the stem kernel's, in the dense layout."""
    if len(kernel_shape) != 4:
        return False
    kh, kw, d, cout = kernel_shape
    return (groups == 1 and 1 <= d <= STEM_MAX_CHANNELS and cout % 16 == 0 and cout > 0
            and (kh, kw) != (1, 1) and kh >= 1 and kw >= 1)


def blockable(kernel_shape: tuple[int, ...], groups: int) -> bool:
    """Whether :func:`block_kernel` has a layout for an HWIO kernel of this shape."""
    return len(kernel_shape) == 4 and (_direct_supports(tuple(kernel_shape), groups)
                                       or stem_shaped(tuple(kernel_shape), groups))


def block_kernel(kernel: jax.Array, groups: int) -> jax.Array | None:
    """An HWIO kernel in the direct kernel's layout, (units, kh, kw, d, unit): each block of
    output channels' weights contiguous. None where the direct kernel has no form for it.
    ``conv2d(..., blocked=...)`` takes it precomputed (inference:
    ``lowering.conv.prepare_kernel``). A pure relayout: a numpy kernel gives a numpy view."""
    if not blockable(kernel.shape, groups):
        return None
    units, kh, kw, d, unit = _blocked_shape(kernel.shape, groups)
    return kernel.reshape(kh, kw, d, units, unit).transpose(3, 0, 1, 2, 4)


def _ffi_conv(x, weights, stride: int, padding: int, groups: int) -> jax.Array:
    """One custom call on unbatched (rank-4) operands and blocked weights."""
    units, kh, kw, _, unit = weights.shape
    out = _out_shape(x, (kh, kw, None, units * unit), stride, padding)
    return jax.ffi.ffi_call(_DIRECT_TARGET, out, vmap_method="sequential")(
        x, weights, unit=np.int64(unit), stride=np.int64(stride), padding=np.int64(padding),
        groups=np.int64(groups))


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
    """The custom call for one (stride, padding, groups), with a vmap rule."""
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

    Runs in the compiled kernel where :func:`supports` says it can, else computes XLA's
    ``conv_general_dilated``. Derivatives are those of ``differentiate_with(x, kernel)``
    (default: XLA's conv with the same parameters), which must compute the same conv.
    ``blocked``: ``block_kernel(kernel, groups)`` computed beforehand (for weights that no
    longer change), so that the program does not lay the kernel out again on every call.
    """
    direct = differentiate_with or functools.partial(
        conv_xla, stride=stride, padding=padding, groups=groups)
    if (not supports(x.shape, kernel.shape, stride, padding, groups, x.dtype)
            or kernel.dtype != x.dtype):
        return direct(x, kernel)
    weights = _direct_weights(kernel, groups, blocked)
    return _conv((stride, padding, groups), direct, x, kernel, weights)


def pointwise_supports(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], stride: int,
                       dtype) -> bool:
    """Whether :func:`pointwise_conv` runs this 1x1 conv and its epilogue in the kernel's GEMM."""
    return tuple(kernel_shape[:2]) == (1, 1) and supports(x_shape, kernel_shape, stride, 0, 1,
                                                          dtype)


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
    direct = differentiate_with or functools.partial(conv_xla, stride=stride, padding=0, groups=1)
    out = _out_shape(x, kernel.shape, stride, 0) if x.ndim == 4 else None
    fits = (out is not None and pointwise_supports(x.shape, kernel.shape, stride, x.dtype)
            and kernel.dtype == jnp.result_type(bias) == x.dtype
            and jnp.shape(bias) == (kernel.shape[-1],)
            and (residual is None or (jnp.shape(residual) == out.shape
                                      and jnp.result_type(residual) == x.dtype)))
    if not fits:
        return epilogue(direct(x, kernel), bias, residual, relu)
    operands = (x, kernel, bias) + (() if residual is None else (residual,))
    return _fused(("pointwise", stride, bool(relu)), direct, _direct_weights(kernel, 1, blocked),
                  *operands)


def conv2d_bias_act(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    *,
    relu: bool = False,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    differentiate_with: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    blocked: jax.Array | None = None,
) -> jax.Array:
    """``relu?(conv2d(x, kernel) + bias)``: a conv with its BatchNorm folded in and the ReLU
    that follows it, applied by the direct kernel as it writes its output (saves XLA a pass
    over it). Where the kernel does not run the conv (:func:`supports`), or operands differ in
    dtype or the bias in shape, the same ops in XLA. Derivatives are those of
    ``epilogue(differentiate_with(x, kernel), bias)`` (default: XLA's conv); ``blocked`` as in
    :func:`conv2d`."""
    direct = differentiate_with or functools.partial(
        conv_xla, stride=stride, padding=padding, groups=groups)
    fits = (x.ndim == 4 and supports(x.shape, kernel.shape, stride, padding, groups, x.dtype)
            and kernel.dtype == jnp.result_type(bias) == x.dtype
            and jnp.shape(bias) == (kernel.shape[-1],))
    if not fits:
        return epilogue(direct(x, kernel), bias, None, relu)
    return _fused(("direct", stride, padding, groups, bool(relu)), direct,
                  _direct_weights(kernel, groups, blocked), x, kernel, bias)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _fused(config, differentiate_with, weights, x, kernel, bias, *residual):
    """The custom call of `config` (its last entry: relu) on `weights` (derived from `kernel`);
    derivatives are those of the conv by `differentiate_with` and the epilogue in XLA."""
    del differentiate_with, kernel
    return _fused_call(config)(x, weights, bias, *residual)


@_fused.defjvp
def _fused_jvp(config, differentiate_with, primals, tangents):
    relu = config[-1]

    def composed(x, kernel, bias, *residual):
        return epilogue(differentiate_with(x, kernel), bias, residual[0] if residual else None,
                        relu)

    # `weights` (derived from the kernel) gets no derivative.
    return jax.jvp(composed, primals[1:], tangents[1:])


@functools.cache
def _fused_call(config: tuple) -> Callable:
    """The custom call for one configuration: ("pointwise", stride, relu), the GEMM with or
    without a residual, or ("direct", stride, padding, groups, relu), the direct conv with its
    bias. Under vmap a mapped input (and residual) is folded into the batch."""
    kind, *attrs = config

    def call(x, weights, bias, *residual):
        units, kh, kw, _, unit = weights.shape
        if kind == "pointwise":
            stride, relu = attrs
            out = _out_shape(x, (1, 1, None, units * unit), stride, 0)
            return jax.ffi.ffi_call(_POINTWISE_TARGET, out, vmap_method="sequential")(
                x, weights, bias, *residual, stride=np.int64(stride), relu=relu)
        stride, padding, groups, relu = attrs
        out = _out_shape(x, (kh, kw, None, units * unit), stride, padding)
        return jax.ffi.ffi_call(_DIRECT_ACT_TARGET, out, vmap_method="sequential")(
            x, weights, bias, unit=np.int64(unit), stride=np.int64(stride),
            padding=np.int64(padding), groups=np.int64(groups), relu=relu)

    return _vmapped_with_shared(call, shared=(1, 2))


def fusion_boundary(x: jax.Array) -> jax.Array:
    """``x`` itself, computed once into memory: an op XLA cannot fuse into its consumers.

    XLA:CPU duplicates cheap elementwise producers into every consumer fusion. A residual
    block's output ``relu(out + identity)`` feeds the next block's 1x1 conv (a library matmul,
    which reads it from memory) and the next residual add (a loop fusion, which recomputes
    it): so each add recomputed every earlier block's add of its stage, a cost quadratic in
    the depth. Behind this custom call the add is computed once. Its output aliases its input, so
    it copies nothing. Only on the CPU where the extension loaded (with or without AVX2), and
    only where it is evaluated, not differentiated (where it is the plain identity).
    """
    if not _load().fusion_boundary or jax.default_backend() != "cpu":
        return x
    return _boundary(x)


@jax.custom_jvp
def _boundary(x: jax.Array) -> jax.Array:
    return jax.ffi.ffi_call(_BOUNDARY_TARGET, _like(x, x.shape, x.dtype),
                            input_output_aliases={0: 0}, vmap_method="expand_dims")(x)


@_boundary.defjvp
def _boundary_jvp(primals, tangents):
    # Differentiated (training): the plain identity, no boundary, so XLA fuses freely.
    return primals[0], tangents[0]
