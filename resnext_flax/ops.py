"""Low-level array ops shared by the layers: convolution and pooling with torch's padding.

Padding is always explicit and symmetric, exactly as torchvision pads; XLA's 'SAME' pads
stride-2 layers unevenly and silently changes the numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
) -> jax.Array:
    """2-D convolution of an NHWC input with an HWIO kernel, torch-style symmetric padding."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=_NHWC,
        feature_group_count=groups,
    )


def max_pool(x: jax.Array, *, window: int, stride: int, padding: int) -> jax.Array:
    """Max-pool over H and W, padding with -inf as torch does."""
    return jax.lax.reduce_window(
        x,
        jnp.array(-jnp.inf, dtype=x.dtype),
        jax.lax.max,
        window_dimensions=(1, window, window, 1),
        window_strides=(1, stride, stride, 1),
        padding=((0, 0), (padding, padding), (padding, padding), (0, 0)),
    )
