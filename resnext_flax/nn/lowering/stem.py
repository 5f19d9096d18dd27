"""The ResNet stem in the compiled CPU kernel (``csrc/stem.cc``): a dense conv over a few input
channels (the 7x7 stride-2 conv over RGB) with its bias and ReLU, and the max-pool after it.

XLA:CPU's conv spends most of its time on the stem's three input channels, and its
``reduce_window`` is a scalar loop; the kernel computes the conv as, per kernel row, a GEMM over
contiguous windows of the zero-padded input (padded here, in XLA) and the max-pool with vectors
of channels. Both compute the forward pass only: derivatives are those of XLA's ops (or of the
conv passed as ``differentiate_with``), and under ``jax.vmap`` a mapped input is folded into the
batch. The pool equals ``ops.max_pool`` bit for bit (NaN propagates, +0 beats -0, -inf padding).
Which convs and pools run here is the ``ConvPolicy``'s decision (``nn.policy``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from resnext_flax.nn.lowering import kernel as ffi
from resnext_flax.nn.ops import conv_xla, epilogue
from resnext_flax.nn.ops import max_pool as max_pool_xla


def _usable(dtype) -> bool:
    return jnp.dtype(dtype) == jnp.float32 and jax.default_backend() == "cpu" and ffi.available()


def supports(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], stride: int,
             padding: int, groups: int, dtype) -> bool:
    """Whether :func:`conv` runs this conv in the stem kernel: float32 on the CPU with the
    kernel loaded, a dense conv over at most ``kernel.STEM_MAX_CHANNELS`` input channels, a
    window larger than 1x1 and a multiple of 16 output channels."""
    if len(x_shape) != 4 or not ffi.stem_shaped(tuple(kernel_shape), groups):
        return False
    n, h, w, c = x_shape
    kh, kw, d, _ = kernel_shape
    if c != d or n < 1 or stride < 1 or padding < 0:
        return False
    return min(h + 2 * padding - kh, w + 2 * padding - kw) >= 0 and _usable(dtype)


def conv(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    stride: int = 1,
    padding: int = 0,
    relu: bool = False,
    differentiate_with: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    blocked: jax.Array | None = None,
) -> jax.Array:
    """``relu?(conv2d(x, kernel) + bias?)``, NHWC input, HWIO kernel, torch-style padding, in
    the stem kernel where :func:`supports` says it can and the bias is a float32 (cout,)
    vector; else the same ops in XLA. Derivatives are those of
    ``epilogue(differentiate_with(x, kernel), bias)`` (default: XLA's conv). ``blocked``:
    ``kernel.block_kernel(kernel, 1)`` computed beforehand (inference)."""
    direct = differentiate_with or functools.partial(conv_xla, stride=stride, padding=padding,
                                                     groups=1)
    fits = (supports(x.shape, kernel.shape, stride, padding, 1, x.dtype)
            and kernel.dtype == x.dtype
            and (bias is None or (jnp.result_type(bias) == x.dtype
                                  and jnp.shape(bias) == (kernel.shape[-1],))))
    if not fits:
        return epilogue(direct(x, kernel), bias, None, relu)
    weights = ffi._direct_weights(kernel, 1, blocked)
    operands = (x, kernel) + (() if bias is None else (bias,))
    return _stem((stride, padding, bool(relu)), direct, weights, *operands)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _stem(config, differentiate_with, weights, x, kernel, *bias):
    del differentiate_with, kernel
    return _stem_call(config, bool(bias))(x, weights, *bias)


@_stem.defjvp
def _stem_jvp(config, differentiate_with, primals, tangents):
    relu = config[2]

    def composed(x, kernel, *bias):
        return epilogue(differentiate_with(x, kernel), bias[0] if bias else None, None, relu)

    # `weights` (derived from the kernel) gets no derivative.
    return jax.jvp(composed, primals[1:], tangents[1:])


@functools.cache
def _stem_call(config: tuple, with_bias: bool) -> Callable:
    """The custom call for one (stride, padding, relu); under vmap a mapped input is folded
    into the batch."""
    stride, padding, relu = config

    def call(x, weights, *bias):
        units, kh, kw, _, unit = weights.shape
        out = ffi._out_shape(x, (kh, kw, None, units * unit), stride, padding)
        padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        return jax.ffi.ffi_call(ffi.STEM_TARGET, out, vmap_method="sequential")(
            padded, weights, *bias, stride=np.int64(stride), relu=relu)

    return ffi._vmapped_with_shared(call, shared=(1, 2) if with_bias else (1,))


def pool_supports(x_shape: tuple[int, ...], dtype, *, window: int, stride: int,
                  padding: int) -> bool:
    """Whether :func:`max_pool` runs in the kernel: a float32 NHWC input on the CPU with the
    kernel loaded, overlapping windows (stride < window) and padding in [0, window).
    XLA:CPU computes windows that do not overlap another way, which drops NaN and orders
    +-0 as it meets them: those stay XLA's, so that the kernel gives XLA's bits wherever it
    runs."""
    if len(x_shape) != 4 or min(x_shape) < 1:
        return False
    if not 1 <= stride < window or not 0 <= padding < window:
        return False
    _, h, w, _ = x_shape
    return min(h, w) + 2 * padding >= window and _usable(dtype)


def max_pool(x: jax.Array, *, window: int, stride: int, padding: int) -> jax.Array:
    """``ops.max_pool`` (-inf padding), in the kernel where :func:`pool_supports` says it can:
    the same values bit for bit, NaN included; derivatives are those of ``ops.max_pool``."""
    if not pool_supports(x.shape, x.dtype, window=window, stride=stride, padding=padding):
        return max_pool_xla(x, window=window, stride=stride, padding=padding)
    return _pool((window, stride, padding), x)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _pool(config, x):
    return _pool_call(config)(x)


@_pool.defjvp
def _pool_jvp(config, primals, tangents):
    window, stride, padding = config
    xla = functools.partial(max_pool_xla, window=window, stride=stride, padding=padding)
    return jax.jvp(xla, primals, tangents)


@functools.cache
def _pool_call(config: tuple) -> Callable:
    window, stride, padding = config

    def call(x):
        n, h, w, c = x.shape
        ho, wo = ((size + 2 * padding - window) // stride + 1 for size in (h, w))
        return jax.ffi.ffi_call(ffi.POOL_TARGET, ffi._like(x, (n, ho, wo, c), x.dtype),
                                vmap_method="sequential")(
            x, window=np.int64(window), stride=np.int64(stride), padding=np.int64(padding))

    return ffi._vmapped_with_shared(call, shared=())
