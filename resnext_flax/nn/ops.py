"""Convolution and pooling with torch's padding, and the per-shape choice of conv lowering.

Padding is always explicit and symmetric, exactly as torchvision pads; XLA's 'SAME' pads
stride-2 layers unevenly and silently changes the numbers.

``conv2d`` picks a *lowering* per backend and shape, behind the same HWIO kernel. On XLA's CPU
backend a grouped conv is slow (one ResNeXt-50 stage-1 grouped conv, batch 8: 153 ms in XLA,
9 ms in PyTorch), a 1x1 conv runs faster as a plain matmul and a 3x3 stride-1 conv faster as
Winograd F(2x2, 3x3) matmuls, so those shapes are rewritten; the rest, and every shape on
GPU/TPU, stays XLA's native convolution. Every lowering computes the same sum (only the float
rounding order differs); ``docs/performance.md`` has the measurements behind the choices.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnext_flax.nn import cpu_kernels, winograd

#: The lowerings ``conv2d`` can use; "auto" picks one by backend and shape.
LOWERINGS = ("auto", "xla", "matmul", "im2col", "shifted_taps", "group_chunks", "winograd", "ffi")

# Largest channels-per-group for which the elementwise "shifted taps" form beats XLA's grouped
# conv on CPU (measured: d=4 and 8 win 3-8x, d=16 loses 10x).
_MAX_TAPS_GROUP_WIDTH = 8

# XLA's CPU grouped conv slows down far more than linearly with the group count (14x14x1024,
# 64 groups of 16: 68 ms, but the same conv as 8 convs of 8 groups: 22 ms), so wider grouped
# convs run as several XLA grouped convs of this many groups each, concatenated.
_GROUPS_PER_CHUNK = 8

# Lowerings that run only when a conv is evaluated; differentiation takes the direct conv.
_FAST_LOWERINGS = ("winograd", "ffi")

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


def lowering_context() -> tuple:
    """The trace-time lowering settings in force (``conv_lowering``, ``cpu_kernels.use_backend``)
    as a hashable key. A cached jit must take it as a static argument: JAX reuses a function's
    trace for the same argument shapes, so without it a program traced under one setting would
    silently be reused under another."""
    return _override.get(), tuple(sorted(_excluded.get())), cpu_kernels.forced_backend()


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
    "ffi" (the compiled CPU kernel, ``nn.cpu_kernels``) comes first for grouped 3x3 convs,
    dense 3x3 convs and 1x1 convs (its GEMM) where it loaded; at trace time the next choice
    takes the convs it does not support or does not win.
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
        ffi = ["ffi"] if kh == kw == 3 and cpu_kernels.available() else []
        if per_group <= _MAX_TAPS_GROUP_WIDTH:
            return [*ffi, "shifted_taps"]
        preferences = ["winograd"] if kh == kw == 3 and stride == 1 else []
        return ffi + preferences + (["group_chunks"] if groups > _GROUPS_PER_CHUNK else [])
    if kh == kw == 1:
        return (["ffi"] if cpu_kernels.available("direct") else []) + ["matmul"]
    if kh == kw == 3:
        # The kernel takes the shapes it wins (stride 2, small maps); the rest go on.
        ffi = ["ffi"] if cpu_kernels.available("direct") else []
        return ffi + (["winograd"] if stride == 1 else [])
    return []


def _resolve_lowering(kernel_shape: tuple[int, ...], groups: int, stride: int,
                      lowering: str | None = None, backend: str | None = None) -> str:
    """The lowering a conv runs with: the one asked for, else the ``conv_lowering`` override,
    else the automatic choice."""
    lowering = lowering or _override.get() or "auto"
    if lowering == "auto":
        lowering = select_lowering(kernel_shape, groups=groups, stride=stride, backend=backend)
    return lowering


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    lowering: str | None = None,
    prepared: Mapping[str, Any] | None = None,
) -> jax.Array:
    """2-D convolution of an NHWC input with an HWIO kernel, torch-style symmetric padding.

    ``lowering`` (default: the ``conv_lowering`` override, else :func:`select_lowering`)
    chooses how XLA computes it; the parameters and the result are the same for all.
    ``prepared``: from :func:`prepare_kernel`, the kernel already in the forms lowerings
    consume (lowering -> array); a form is used where its lowering is the one that runs.
    """
    lowering = _resolve_lowering(kernel.shape, groups, stride, lowering)
    kh, kw = kernel.shape[:2]
    prepared = prepared or {}
    if lowering == "ffi":
        return _conv_ffi(x, kernel, stride, padding, groups, prepared)
    if lowering == "shifted_taps" and groups > 1:
        return _conv_shifted_taps(x, kernel, stride, padding, groups)
    if lowering == "group_chunks" and groups > 1:
        return _conv_group_chunks(x, kernel, stride, padding, groups)
    if lowering == "matmul" and groups == 1 and kh == kw == 1:
        return _conv1x1_matmul(x, kernel, stride, padding)
    if lowering == "winograd" and kh == kw == 3 and stride == 1:
        transformed = None
        # Only where the kernel outweighs the input: on large feature maps the per-call
        # transform is cheap, and reading prepared tiles measured slower (56x56 and 28x28 at
        # batch 8: 1.5x; XLA then schedules all input transforms before the matmuls).
        tiles = prepared.get("winograd")
        if tiles is not None and kernel.size >= x.size \
                and all(x.dtype == kernel.dtype == u.dtype for u in tiles):
            transformed = tiles
        return _conv_winograd(x, kernel, padding, groups, transformed)
    if lowering in ("matmul", "im2col") and groups == 1:
        return _conv_im2col(x, kernel, stride, padding)
    if lowering not in LOWERINGS:
        raise ValueError(f"unknown conv lowering {lowering!r}; expected one of {LOWERINGS}")
    return _conv_xla(x, kernel, stride, padding, groups)


def conv_bias_act(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    *,
    residual: jax.Array | None = None,
    relu: bool = False,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    prepared: Mapping[str, Any] | None = None,
) -> jax.Array:
    """``relu?(conv2d(x, kernel) + bias + residual)`` (bias, residual optional): a conv with its
    BatchNorm folded in and what follows it in a residual block. Where the compiled kernel's
    GEMM runs the conv (1x1 convs, "ffi" lowering) it applies bias, residual and ReLU as it
    writes the output, saving XLA a pass over it; elsewhere the same ops follow the conv in
    XLA. Derivatives are those of the unfused ops."""
    lowering = _resolve_lowering(kernel.shape, groups, stride, None)
    prepared = prepared or {}
    if (lowering == "ffi" and bias is not None and groups == 1 and padding == 0
            and cpu_kernels.pointwise_supports(x.shape, kernel.shape, stride, x.dtype)):
        direct = _without_ffi(kernel.shape, stride, padding, groups, prepared, *_FAST_LOWERINGS)
        return cpu_kernels.pointwise_conv(x, kernel, bias, residual=residual, relu=relu,
                                          stride=stride, differentiate_with=direct,
                                          blocked=prepared.get("ffi"))
    y = conv2d(x, kernel, stride=stride, padding=padding, groups=groups, lowering=lowering,
               prepared=prepared)
    return cpu_kernels.epilogue(y, bias, residual, relu)


def _conv_ffi(x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int,
              prepared: Mapping[str, Any]):
    """The compiled kernel where it supports the conv, else the next choice; differentiated
    as the direct conv (as Winograd is), so training computes what it did without it."""
    if not cpu_kernels.supports(x.shape, kernel.shape, stride, padding, groups, x.dtype):
        return _without_ffi(kernel.shape, stride, padding, groups, prepared)(x, kernel)
    return cpu_kernels.conv2d(
        x, kernel, stride=stride, padding=padding, groups=groups,
        differentiate_with=_without_ffi(kernel.shape, stride, padding, groups, prepared,
                                        *_FAST_LOWERINGS),
        blocked=prepared.get("ffi"))


def _without_ffi(kernel_shape: tuple[int, ...], stride: int, padding: int, groups: int,
                 prepared: Mapping[str, Any], *excluded: str) -> functools.partial:
    """``conv2d`` with the lowering chosen without the compiled kernel (and `excluded`): what
    runs the convs the kernel leaves, and (excluding the fast lowerings) its derivatives."""
    lowering = "xla"
    if jax.default_backend() == "cpu":
        lowering = _lowering_without_ffi(kernel_shape, groups, stride, *excluded)
    return functools.partial(conv2d, stride=stride, padding=padding, groups=groups,
                             lowering=lowering, prepared=prepared)


def _lowering_without_ffi(kernel_shape: tuple[int, ...], groups: int, stride: int,
                          *excluded: str) -> str:
    """The CPU choice for the convs the compiled kernel leaves (and its derivatives)."""
    excluded = {"ffi", *excluded, *_excluded.get()}
    return _first_cpu_lowering(kernel_shape, groups, stride, excluded=excluded)


_conv_xla = cpu_kernels.xla_conv


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


def prepare_kernel(kernel: jax.Array, *, stride: int = 1, groups: int = 1,
                   backend: str | None = None) -> dict[str, Any] | None:
    """The kernel transformed once for the lowerings :func:`conv2d` may run it with now
    (lowering -> array; which one runs can depend on the input's shape), or None where those
    have nothing to precompute: Winograd's transformed tiles, the compiled kernel's blocked
    layout.

    For an inference model whose weights no longer change: the kernel transform then leaves
    the compiled program (at batch 1 Winograd's was most of ResNet-18's time on the CPU).
    """
    if kernel.ndim != 4 or kernel.dtype != jnp.float32:
        return None
    lowering = _resolve_lowering(kernel.shape, groups, stride, backend=backend)
    candidates = [lowering]
    if lowering == "ffi" and groups == 1:  # the next choice runs the maps the kernel leaves
        candidates.append(_lowering_without_ffi(kernel.shape, groups, stride))
    prepared = {}
    if "ffi" in candidates and cpu_kernels.available("direct"):
        blocked = _blocked_kernel(kernel, groups)
        if blocked is not None:
            prepared["ffi"] = blocked
    if "winograd" in candidates and kernel.shape[:2] == (3, 3) and stride == 1:
        prepared["winograd"] = _winograd_kernel(kernel, groups)
    return prepared or None


_winograd_kernel = jax.jit(winograd.winograd_kernel, static_argnums=1)
_blocked_kernel = jax.jit(cpu_kernels.block_kernel, static_argnums=1)


def _conv_winograd(x: jax.Array, kernel: jax.Array, padding: int, groups: int,
                   transformed: tuple[jax.Array, ...] | None = None) -> jax.Array:
    return _evaluated_fast(_winograd_with, x, kernel, transformed, 1, padding, groups)


def _winograd_with(x: jax.Array, kernel: jax.Array, transformed: tuple[jax.Array, ...] | None,
                   padding: int, groups: int) -> jax.Array:
    return winograd.conv_winograd(x, kernel, padding, groups, transformed)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 4, 5, 6))
def _evaluated_fast(fast, x: jax.Array, kernel: jax.Array, prepared: Any,
                    stride: int, padding: int, groups: int) -> jax.Array:
    """``fast(x, kernel, prepared, padding, groups)`` when the conv is only evaluated; the
    direct conv when it is differentiated (`prepared`, derived from `kernel`, gets no
    derivative).

    Training keeps the direct conv's forward and gradients (those the parity tests compare
    with torch step by step): measured on ResNeXt-50's 3-step SGD test, Winograd in the
    training path left the parameters as close to torch's float64 trajectory as before
    (6.5e-3 vs 6.6e-3) but moved the chaotic step-3 loss from 1.8x to 2.2x of torch float32's
    own drift.
    """
    return fast(x, kernel, prepared, padding, groups)


@_evaluated_fast.defjvp
def _evaluated_fast_jvp(fast, stride: int, padding: int, groups: int, primals, tangents):
    del fast
    primals, tangents = primals[:2], tangents[:2]
    # The direct conv is the CPU choice without the fast lowerings (XLA native or chunks).
    direct = _first_cpu_lowering(primals[1].shape, groups, stride, excluded=_FAST_LOWERINGS)
    return jax.jvp(
        lambda x, kernel: conv2d(x, kernel, stride=stride, padding=padding, groups=groups,
                                 lowering=direct),
        primals, tangents)


def block_output(x: jax.Array) -> jax.Array:
    """A residual block's output, kept in memory once on the CPU (``cpu_kernels.fusion_boundary``:
    XLA:CPU otherwise recomputes every earlier block's residual add inside each later one).

    Active where the compiled ``ffi`` lowering may run (the CPU, the extension loaded, "ffi"
    neither excluded nor overridden by another lowering); ``x`` unchanged elsewhere.
    """
    forced = _override.get()
    if forced not in (None, "auto", "ffi") or "ffi" in _excluded.get():
        return x
    return cpu_kernels.fusion_boundary(x)


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
