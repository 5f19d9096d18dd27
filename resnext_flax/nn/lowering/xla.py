"""The pure-XLA rewrites of a convolution for XLA:CPU: a 1x1 conv as a matmul, a grouped conv
as shifted taps (few channels per group) or as chunks of groups. Each computes exactly the
conv of ``nn.ops.conv_xla`` up to float rounding order."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from resnext_flax.nn.ops import conv_xla
from resnext_flax.nn.policy import GROUPS_PER_CHUNK


def _acc(x: jax.Array) -> jnp.dtype:
    """Accumulate in float32 at least, as XLA's convs do for bf16/f16 inputs."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _taps(x: jax.Array, kh: int, kw: int, stride: int, padding: int) -> list[jax.Array]:
    """The kh*kw strided windows of the padded input, each (N, Ho, Wo, C), row-major taps."""
    n, h, w, c = x.shape
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    return [
        jax.lax.slice(
            x,
            (0, i, j, 0),
            (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
            (1, stride, stride, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]


def conv1x1_matmul(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """A 1x1 conv as a matmul over channels (XLA:CPU's dot outruns its conv)."""
    (tap,) = _taps(x, 1, 1, stride, padding)
    out = jnp.einsum("nhwc,co->nhwo", tap, kernel[0, 0], preferred_element_type=_acc(x))
    return out.astype(x.dtype)


def conv_shifted_taps(
    x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int
) -> jax.Array:
    """Grouped conv as kh*kw*d broadcast multiply-adds, which XLA fuses into one loop.

    For each tap and each of the d input channels of a group, the channel (N, Ho, Wo, G, 1) is
    multiplied by that kernel row (G, d_out) and accumulated: no im2col buffer, no tiny
    matmuls. It suits small d only: the fused loop's arithmetic grows as d^2 per output.
    """
    kh, kw, d, cout = kernel.shape
    out_per_group = cout // groups
    k = kernel.reshape(kh, kw, d, groups, out_per_group).astype(_acc(x))
    if padding:
        # Materialize the padded input: fused into the 9*d-term loop, the pad (and whatever
        # elementwise producer XLA fuses with it, e.g. the previous bias + ReLU) would be
        # recomputed for every term.
        x = jax.lax.optimization_barrier(
            jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        )
        padding = 0
    acc = None
    for t, tap in enumerate(_taps(x, kh, kw, stride, padding)):
        n, ho, wo, _ = tap.shape
        tap = tap.reshape(n, ho, wo, groups, d).astype(_acc(x))
        i, j = divmod(t, kw)
        for c in range(d):
            term = tap[..., c : c + 1] * k[i, j, c]
            acc = term if acc is None else acc + term
    return acc.reshape(n, ho, wo, cout).astype(x.dtype)


def conv_group_chunks(
    x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int
) -> jax.Array:
    """A grouped conv as XLA grouped convs of ``GROUPS_PER_CHUNK`` groups each, concatenated
    on channels (group g reads input channels [g*d, (g+1)*d) and writes its own outputs)."""
    d, cout = kernel.shape[2], kernel.shape[3]
    out_per_group = cout // groups
    chunks = []
    for first in range(0, groups, GROUPS_PER_CHUNK):
        n = min(GROUPS_PER_CHUNK, groups - first)
        chunks.append(conv_xla(
            x[..., first * d:(first + n) * d],
            kernel[..., first * out_per_group:(first + n) * out_per_group],
            stride, padding, n,
        ))
    return jnp.concatenate(chunks, axis=-1)
