"""Convolution and pooling with torch's padding, in plain XLA.

Padding is always explicit and symmetric, exactly as torchvision pads; XLA's 'SAME' pads
stride-2 layers unevenly and silently changes the numbers. The faster CPU forms of the
convolution live in ``nn.lowering`` (chosen by ``nn.policy.ConvPolicy``); this module is what
every backend can run without them.
"""

from __future__ import annotations

import jax
import numpy as np

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_xla(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: int = 0,
             groups: int = 1) -> jax.Array:
    """XLA's own convolution of an NHWC input with an HWIO kernel, torch-style padding: the
    "xla" lowering, and what every other lowering must equal."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=_NHWC,
        feature_group_count=groups,
    )


def epilogue(y: jax.Array, bias: jax.Array | None, residual: jax.Array | None,
             relu: bool) -> jax.Array:
    """``relu?(y + bias + residual)``, in that order: what follows a conv with a folded
    BatchNorm in a residual block (and what the compiled GEMM's epilogue computes)."""
    if bias is not None:
        y = y + bias
    if residual is not None:
        y = y + residual
    return jax.nn.relu(y) if relu else y


def max_pool(x: jax.Array, *, window: int, stride: int, padding: int) -> jax.Array:
    """Max-pool over H and W, padding with -inf as torch does."""
    return jax.lax.reduce_window(
        x,
        # A concrete (numpy) init value: a traced one hides the max monoid from JAX, which then
        # cannot differentiate reduce_window under jit.
        np.array(-np.inf, dtype=x.dtype),
        jax.lax.max,
        window_dimensions=(1, window, window, 1),
        window_strides=(1, stride, stride, 1),
        padding=((0, 0), (padding, padding), (padding, padding), (0, 0)),
    )


def max_pool_under(policy, x: jax.Array, *, window: int, stride: int,
                   padding: int) -> jax.Array:
    """:func:`max_pool`, run by the compiled CPU kernel where `policy` (the
    ``nn.policy.ConvPolicy`` of the convs around it) lets it (``policy.pool_kernel``): the
    same values bit for bit, derivatives those of :func:`max_pool`."""
    pool = policy.pool_kernel(x.shape, x.dtype, window=window, stride=stride, padding=padding)
    return (pool or max_pool)(x, window=window, stride=stride, padding=padding)
