"""Winograd F(2x2, 3x3) convolution (Lavin & Gray, 2016) for 3x3 stride-1 convs on the CPU.

Each 2x2 output tile is computed from a 4x4 input tile as A^T [(G g G^T) * (B^T d B)] A, so a
3x3 conv becomes 16 channel matmuls on 4x4 tiles (2.25x fewer multiplies), and the matmuls run
at XLA:CPU's dot speed instead of its conv speed. The transforms only add, subtract and halve,
so float32 results stay within ~1e-6 of the direct conv; F(4x4, 3x3) would save more but errs
~1e-5. The kernel transform runs inside the traced function, so parameters are unchanged;
an inference model may compute it once instead (:func:`winograd_kernel`, passed back as
``transformed``), since at small batches the per-call transform dominates.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_WINOGRAD_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])
_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
_WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]])
# A grouped conv runs Winograd on chunks of groups this many input channels wide (one group
# when groups are wider), as block-diagonal matmuls batched over the chunks: wider chunks
# merge groups and multiply more zeros (docs/performance.md compares the widths).
CHUNK_WIDTH = 16


def _combine(terms: list[jax.Array], coefficients: np.ndarray) -> jax.Array:
    """sum(c * t) over the nonzero coefficients, without multiplying by +-1."""
    out = None
    for c, t in zip(coefficients.tolist(), terms, strict=True):
        if c == 0:
            continue
        t = t if c == 1 else -t if c == -1 else t * c
        out = t if out is None else out + t
    return out


def _winograd_input_tiles(x: jax.Array, padding: int, th: int, tw: int) -> list[jax.Array]:
    """The 16 transformed inputs B^T d B, each (N, th, tw, C) for th x tw tiles, one per entry.

    The 4x4 tiles (stride 2) are read through a reshape into blocks of 2 rather than strided
    slices, which XLA:CPU vectorizes better.
    """
    n, h, w, c = x.shape
    # Pad to (tiles + 1) blocks of 2 so every tile is in range; the outputs this adds past the
    # true output size are computed from zeros and cropped.
    xp = jnp.pad(x, ((0, 0), (padding, 2 * th + 2 - h - padding),
                     (padding, 2 * tw + 2 - w - padding), (0, 0)))
    blocks = xp.reshape(n, th + 1, 2, tw + 1, 2, c)
    rows = [blocks[:, i // 2:i // 2 + th, i % 2] for i in range(4)]  # (n, th, tw+1, 2, c)
    tiles = []
    for row in (_combine(rows, b) for b in _WINOGRAD_BT):
        cols = [row[:, :, j // 2:j // 2 + tw, j % 2] for j in range(4)]  # (n, th, tw, c)
        tiles += [_combine(cols, b) for b in _WINOGRAD_BT]
    return tiles


def _winograd_kernel_tiles(kernel: jax.Array) -> list[jax.Array]:
    """The 16 entries of G g G^T for a (3, 3, ...) kernel, each of shape kernel.shape[2:]."""
    rows = [_combine([kernel[r] for r in range(3)], g) for g in _WINOGRAD_G]
    return [_combine([row[s] for s in range(3)], g) for row in rows for g in _WINOGRAD_G]


def _winograd_output(products: list[jax.Array], out_h: int, out_w: int) -> jax.Array:
    """A^T M A from the 16 products (N, tiles_h, tiles_w, O): the (N, out_h, out_w, O) output."""
    grid = [products[4 * i:4 * i + 4] for i in range(4)]
    rows = [[_combine([grid[i][j] for i in range(4)], a) for j in range(4)] for a in _WINOGRAD_AT]
    out = [[_combine(row, a) for a in _WINOGRAD_AT] for row in rows]  # out[dy][dx]
    out = jnp.stack([jnp.stack(row, axis=3) for row in out], axis=2)  # (n, th, 2, tw, 2, o)
    n, th, _, tw, _, o = out.shape
    return out.reshape(n, 2 * th, 2 * tw, o)[:, :out_h, :out_w]


def _groups_per_chunk(groups: int, per_group: int) -> int:
    """Largest divisor of ``groups`` whose chunk is at most ``CHUNK_WIDTH`` wide."""
    most = max(1, CHUNK_WIDTH // per_group)
    return max(k for k in range(1, min(most, groups) + 1) if groups % k == 0)


def winograd_kernel(kernel: jax.Array, groups: int) -> tuple[jax.Array, ...]:
    """G g G^T for every chunk of groups: 16 arrays (chunks, width, out_width), the right-hand
    sides of :func:`conv_winograd`'s 16 matmuls, in the accumulation dtype (float32 at least).
    Separate arrays, not one stack: XLA:CPU copies each slice of a stacked parameter before
    its matmul, which cost as much as the transform itself."""
    acc = jnp.promote_types(kernel.dtype, jnp.float32)
    d, cout = kernel.shape[2], kernel.shape[3]
    per_chunk = _groups_per_chunk(groups, d) if groups > 1 else 1
    chunks = groups // per_chunk
    width, out_width = per_chunk * d, cout // chunks
    k = kernel.astype(acc).reshape(3, 3, d, chunks, per_chunk, cout // groups)
    k = jnp.einsum("hwdkgo,gf->hwkgdfo", k, jnp.eye(per_chunk, dtype=acc))
    return tuple(_winograd_kernel_tiles(k.reshape(3, 3, chunks, width, out_width)))


def conv_winograd(x: jax.Array, kernel: jax.Array, padding: int, groups: int,
                  transformed: Sequence[jax.Array] | None = None) -> jax.Array:
    """3x3 stride-1 conv as Winograd F(2x2, 3x3): 16 matmuls of (tiles, C) x (C, O).

    A grouped conv is split into ``k`` chunks of whole groups, each a dense conv with a
    block-diagonal kernel; the chunks move to the batch axis (the transposes fuse into the
    transforms) so each of the 16 products is one matmul batched over chunks. The zeros cost
    FLOPs, but the matmuls outrun XLA:CPU's grouped conv for wide groups and compile in one
    pass, where a separate dense conv per chunk would compile for each chunk. The 16 products
    stay separate arrays: XLA:CPU runs one matmul batched over them slower.
    """
    dtype, acc = x.dtype, jnp.promote_types(x.dtype, jnp.float32)
    n, h, w, _ = x.shape
    d, cout = kernel.shape[2], kernel.shape[3]
    out_h, out_w = h + 2 * padding - 2, w + 2 * padding - 2
    per_chunk = _groups_per_chunk(groups, d) if groups > 1 else 1
    chunks = groups // per_chunk
    width, out_width = per_chunk * d, cout // chunks
    # (n, h, w, chunks * width) -> (chunks * n, h, w, width): chunk-major batch.
    x = x.astype(acc).reshape(n, h, w, chunks, width).transpose(3, 0, 1, 2, 4)
    tiles = _winograd_input_tiles(x.reshape(chunks * n, h, w, width), padding,
                                  -(-out_h // 2), -(-out_w // 2))
    if transformed is None:
        transformed = winograd_kernel(kernel.astype(acc), groups)
    expected = [((chunks, width, out_width), acc)] * 16
    if [(u.shape, u.dtype) for u in transformed] != expected:
        raise ValueError(f"transformed Winograd kernel {[u.shape for u in transformed]}; "
                         f"expected 16 arrays of shape {expected[0][0]} ({acc})")
    products = [
        jnp.einsum("kpc,kco->kpo", v.reshape(chunks, -1, width), u).reshape(*v.shape[:3], -1)
        for v, u in zip(tiles, transformed, strict=True)
    ]
    out = _winograd_output(products, out_h, out_w).reshape(chunks, n, out_h, out_w, out_width)
    return out.transpose(1, 2, 3, 0, 4).reshape(n, out_h, out_w, cout).astype(dtype)
