"""Low-level array ops shared by the layers: convolution and pooling with torch's padding.

Padding is always explicit and symmetric, exactly as torchvision pads; XLA's 'SAME' pads
stride-2 layers unevenly and silently changes the numbers.

``conv2d`` picks a *lowering* per backend and shape, behind the same HWIO kernel: on XLA's CPU
backend a grouped conv is slow (PITFALLS 15), a 1x1 conv runs faster as a plain matmul and a
3x3 stride-1 conv faster as Winograd F(2x2, 3x3) matmuls, so those shapes are rewritten; the
rest, and every shape on GPU/TPU, stays XLA's native convolution. Every lowering computes the
same sum (only the float rounding order differs); ``docs/performance.md`` has the measurements
behind the choices.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

_NHWC = ("NHWC", "HWIO", "NHWC")

#: The lowerings ``conv2d`` can use; "auto" picks one by backend and shape.
LOWERINGS = ("auto", "xla", "matmul", "im2col", "shifted_taps", "group_chunks", "winograd")

# Largest channels-per-group for which the elementwise "shifted taps" form beats XLA's grouped
# conv on CPU (measured: d=4 and 8 win 3-8x, d=16 loses 10x).
_MAX_TAPS_GROUP_WIDTH = 8

# XLA's CPU grouped conv slows down far more than linearly with the group count (14x14x1024,
# 64 groups of 16: 68 ms, but the same conv as 8 convs of 8 groups: 22 ms), so wider grouped
# convs run as several XLA grouped convs of this many groups each, concatenated.
_GROUPS_PER_CHUNK = 8

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "resnext_flax_conv_lowering", default=None
)
_excluded: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "resnext_flax_excluded_lowerings", default=frozenset()
)


@contextlib.contextmanager
def conv_lowering(name: str, *, exclude: Iterable[str] = ()) -> Iterator[None]:
    """Force one lowering for every ``conv2d`` *traced* inside the block (benchmarks, tests).

    It acts at trace time: a function jitted before the block keeps its compiled lowering.
    A lowering that cannot express a conv (``shifted_taps`` for a dense conv) falls back to
    "xla" for it. With ``name="auto"``, ``exclude`` removes lowerings from the automatic
    choice, which then takes its next preference (A/B runs: "auto without winograd").
    """
    exclude = frozenset(exclude)
    for lowering in (name, *exclude):
        if lowering not in LOWERINGS:
            raise ValueError(f"unknown conv lowering {lowering!r}; expected one of {LOWERINGS}")
    token, excluded_token = _override.set(name), _excluded.set(exclude)
    try:
        yield
    finally:
        _override.reset(token)
        _excluded.reset(excluded_token)


def select_lowering(
    kernel_shape: tuple[int, ...],
    *,
    groups: int = 1,
    stride: int = 1,
    backend: str | None = None,
) -> str:
    """The lowering ``conv2d`` uses for a kernel (HWIO) on a backend, by default the current one.

    On GPU/TPU: always XLA's native conv (cuDNN / TPU convs are fast; nothing measured says
    otherwise). On CPU: grouped convs with <= 8 channels per group as shifted taps, wider ones
    as Winograd (stride 1) or chunks of 8 groups (stride 2), 1x1 convs as one matmul, dense
    3x3 stride-1 convs as Winograd, the rest (stride-2 3x3, the 7x7 stem) native. ``im2col``
    is never chosen (it won alone at 14x14 and 7x7 but lost at model level,
    docs/performance.md); force it with ``conv_lowering``. Lowerings excluded with
    ``conv_lowering("auto", exclude=...)`` are skipped for the next preference.
    """
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return "xla"
    return _first_cpu_lowering(kernel_shape, groups, stride, excluded=_excluded.get())


def _first_cpu_lowering(
    kernel_shape: tuple[int, ...], groups: int, stride: int, *, excluded: Iterable[str]
) -> str:
    preferences = _cpu_preferences(kernel_shape, groups=groups, stride=stride)
    return next((name for name in preferences if name not in excluded), "xla")


def _cpu_preferences(kernel_shape: tuple[int, ...], *, groups: int, stride: int) -> list[str]:
    """The CPU lowerings for a conv, best first (measured: docs/performance.md)."""
    kh, kw, per_group, _ = kernel_shape
    if groups > 1:
        if per_group <= _MAX_TAPS_GROUP_WIDTH:
            return ["shifted_taps"]
        preferences = ["winograd"] if kh == kw == 3 and stride == 1 else []
        return preferences + (["group_chunks"] if groups > _GROUPS_PER_CHUNK else [])
    if kh == kw == 1:
        return ["matmul"]
    return ["winograd"] if kh == kw == 3 and stride == 1 else []


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    lowering: str | None = None,
) -> jax.Array:
    """2-D convolution of an NHWC input with an HWIO kernel, torch-style symmetric padding.

    ``lowering`` (default: the ``conv_lowering`` override, else :func:`select_lowering`)
    chooses how XLA computes it; the parameters and the result are the same for all.
    """
    lowering = lowering or _override.get() or "auto"
    kh, kw = kernel.shape[:2]
    if lowering == "auto":
        lowering = select_lowering(kernel.shape, groups=groups, stride=stride)
    if lowering == "shifted_taps" and groups > 1:
        return _conv_shifted_taps(x, kernel, stride, padding, groups)
    if lowering == "group_chunks" and groups > 1:
        return _conv_group_chunks(x, kernel, stride, padding, groups)
    if lowering == "matmul" and groups == 1 and kh == kw == 1:
        return _conv1x1_matmul(x, kernel, stride, padding)
    if lowering == "winograd" and kh == kw == 3 and stride == 1:
        return _winograd_for_inference(x, kernel, padding, groups)
    if lowering in ("matmul", "im2col") and groups == 1:
        return _conv_im2col(x, kernel, stride, padding)
    if lowering not in LOWERINGS:
        raise ValueError(f"unknown conv lowering {lowering!r}; expected one of {LOWERINGS}")
    return _conv_xla(x, kernel, stride, padding, groups)


def _conv_xla(x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int):
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=_NHWC,
        feature_group_count=groups,
    )


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


def _conv1x1_matmul(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """A 1x1 conv is a matmul over channels (XLA's CPU dot runs ~1.5-2.5x its conv here)."""
    (tap,) = _taps(x, 1, 1, stride, padding)
    out = jnp.einsum("nhwc,co->nhwo", tap, kernel[0, 0], preferred_element_type=_acc(x))
    return out.astype(x.dtype)


def _conv_im2col(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Dense conv as im2col (taps concatenated on channels, tap-major) and one matmul."""
    kh, kw, cin, cout = kernel.shape
    patches = jnp.concatenate(_taps(x, kh, kw, stride, padding), axis=-1)
    kernel = kernel.reshape(kh * kw * cin, cout)
    out = jnp.einsum("nhwk,ko->nhwo", patches, kernel, preferred_element_type=_acc(x))
    return out.astype(x.dtype)


def _conv_shifted_taps(
    x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int
) -> jax.Array:
    """Grouped conv as kh*kw*d broadcast multiply-adds, which XLA fuses into one loop.

    For each tap and each of the d input channels of a group, the channel (N, Ho, Wo, G, 1) is
    multiplied by that kernel row (G, d_out) and accumulated: no im2col buffer, no tiny
    matmuls. It wins for small d (4, 8) and loses badly from d=16 on (the fused loop's
    arithmetic grows as d^2 per output).
    """
    kh, kw, d, cout = kernel.shape
    out_per_group = cout // groups
    k = kernel.reshape(kh, kw, d, groups, out_per_group).astype(_acc(x))
    if padding:
        # Materialize the padded input: fused into the 9*d-term loop, the pad (and whatever
        # elementwise producer XLA fuses with it, e.g. the previous bias + ReLU) is recomputed
        # for every term, which made the conv ~4x slower inside a model than alone.
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


def _conv_group_chunks(
    x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int
) -> jax.Array:
    """A grouped conv as XLA grouped convs of ``_GROUPS_PER_CHUNK`` groups each, concatenated
    on channels (group g reads input channels [g*d, (g+1)*d) and writes its own outputs)."""
    d, cout = kernel.shape[2], kernel.shape[3]
    out_per_group = cout // groups
    chunks = []
    for first in range(0, groups, _GROUPS_PER_CHUNK):
        n = min(_GROUPS_PER_CHUNK, groups - first)
        chunks.append(_conv_xla(
            x[..., first * d:(first + n) * d],
            kernel[..., first * out_per_group:(first + n) * out_per_group],
            stride, padding, n,
        ))
    return jnp.concatenate(chunks, axis=-1)


# Winograd F(2x2, 3x3) (Lavin & Gray, 2016): each 2x2 output tile is computed from a 4x4 input
# tile as A^T [(G g G^T) * (B^T d B)] A, so a 3x3 conv becomes 16 channel matmuls on 4x4 tiles
# (2.25x fewer multiplies). The transforms only add, subtract and halve, so float32 results
# stay within ~1e-6 of the direct conv; F(4x4, 3x3) would save more but errs ~1e-5.
_WINOGRAD_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])
_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
_WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]])
# A grouped conv runs Winograd on chunks of groups this many input channels wide (one group
# when groups are wider), as block-diagonal matmuls batched over the chunks. Whole ResNeXt
# models ran fastest with 16, i.e. one group per chunk from 16 channels per group on
# (32 and 64 merge groups into block-diagonal chunks; docs/performance.md).
_WINOGRAD_CHUNK_WIDTH = 16


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
    slices, which XLA:CPU vectorizes better (measured 1.5x on the 56x56 stage).
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
    """Largest divisor of ``groups`` whose chunk is at most ``_WINOGRAD_CHUNK_WIDTH`` wide."""
    most = max(1, _WINOGRAD_CHUNK_WIDTH // per_group)
    return max(k for k in range(1, min(most, groups) + 1) if groups % k == 0)


def _conv_winograd(x: jax.Array, kernel: jax.Array, padding: int, groups: int) -> jax.Array:
    """3x3 stride-1 conv as Winograd F(2x2, 3x3): 16 matmuls of (tiles, C) x (C, O).

    A grouped conv is split into ``k`` chunks of whole groups, each a dense conv with a
    block-diagonal kernel; the chunks move to the batch axis (the transposes fuse into the
    transforms) so each of the 16 products is one matmul batched over chunks. The zeros cost
    FLOPs, but from 16 channels per group this beats XLA:CPU's grouped conv ~1.5-2x and
    compiles in one pass (a separate dense conv per chunk compiled for minutes at ResNeXt-101).
    The 16 products stay separate arrays: one matmul batched over them measured 1.2-4x slower.
    """
    dtype, acc = x.dtype, _acc(x)
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
    k = kernel.astype(acc).reshape(3, 3, d, chunks, per_chunk, cout // groups)
    k = jnp.einsum("hwdkgo,gf->hwkgdfo", k, jnp.eye(per_chunk, dtype=acc))
    k_tiles = _winograd_kernel_tiles(k.reshape(3, 3, chunks, width, out_width))
    products = [
        jnp.einsum("kpc,kco->kpo", v.reshape(chunks, -1, width), u).reshape(*v.shape[:3], -1)
        for v, u in zip(tiles, k_tiles, strict=True)
    ]
    out = _winograd_output(products, out_h, out_w).reshape(chunks, n, out_h, out_w, out_width)
    return out.transpose(1, 2, 3, 0, 4).reshape(n, out_h, out_w, cout).astype(dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _winograd_for_inference(
    x: jax.Array, kernel: jax.Array, padding: int, groups: int
) -> jax.Array:
    """Winograd when the conv is only evaluated; the direct conv when it is differentiated.

    Training keeps the direct conv's forward and gradients (those the parity tests compare
    with torch step by step): measured on ResNeXt-50's 3-step SGD test, Winograd in the training
    path left the parameters as close to torch's float64 trajectory as before (6.5e-3 vs
    6.6e-3) but moved the chaotic step-3 loss from 1.8x to 2.2x of torch float32's own drift.
    """
    return _conv_winograd(x, kernel, padding, groups)


@_winograd_for_inference.defjvp
def _winograd_jvp(padding: int, groups: int, primals, tangents):
    # The direct conv is the CPU choice without Winograd (XLA native or group chunks).
    direct = _first_cpu_lowering(primals[1].shape, groups, 1, excluded=("winograd",))
    return jax.jvp(
        lambda x, kernel: conv2d(x, kernel, padding=padding, groups=groups, lowering=direct),
        primals, tangents)


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
