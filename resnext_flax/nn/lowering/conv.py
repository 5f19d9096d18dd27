"""The CPU lowerings of a convolution, run as a :class:`~resnext_flax.nn.policy.ConvPolicy`
chooses them.

``conv2d`` computes the same conv behind the same HWIO kernel in whichever form the policy
picks for the shape: XLA's own conv, a matmul (1x1), shifted taps or chunks of groups
(grouped convs, ``nn.lowering.xla``), Winograd (3x3 stride 1, ``nn.lowering.winograd``) or the
compiled kernel (``nn.lowering.kernel``). Winograd and the compiled kernel are used only where
the conv is evaluated; derivatives take the direct form the policy would choose without them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from resnext_flax.nn.lowering import kernel as ffi
from resnext_flax.nn.lowering import stem, winograd, xla
from resnext_flax.nn.ops import conv_xla, epilogue
from resnext_flax.nn.policy import DEFAULT_POLICY, FAST_LOWERINGS, ConvPolicy


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    policy: ConvPolicy = DEFAULT_POLICY,
    prepared: Mapping[str, Any] | None = None,
) -> jax.Array:
    """2-D convolution of an NHWC input with an HWIO kernel, torch-style symmetric padding, in
    the lowering `policy` chooses for it; the result is the same conv for every lowering.
    ``prepared``: from :func:`prepare_kernel`, the kernel already in the forms lowerings consume
    (lowering -> array); a form is used where its lowering is the one that runs."""
    prepared = prepared or {}
    name = _lowering(policy, x, kernel, stride, padding, groups, prepared)
    return _run(name, policy, x, kernel, stride, padding, groups, prepared)


def _lowering(policy: ConvPolicy, x: jax.Array, kernel: jax.Array, stride: int, padding: int,
              groups: int, prepared: Mapping[str, Any]) -> str:
    """The policy's choice, except that the automatic choice takes Winograd only for a kernel
    prepared for it (``optimize_for_inference``): transforming the kernel inside the program
    makes it several times slower to compile and redoes the transform on every call."""
    name = policy.choose(x.shape, kernel.shape, stride=stride, padding=padding, groups=groups,
                         dtype=x.dtype)
    if name == "winograd" and policy.lowering == "auto" and "winograd" not in prepared:
        name = policy.without("winograd").choose(x.shape, kernel.shape, stride=stride,
                                                 padding=padding, groups=groups, dtype=x.dtype)
    return name


def _run(name: str, policy: ConvPolicy, x: jax.Array, kernel: jax.Array, stride: int,
         padding: int, groups: int, prepared: Mapping[str, Any]) -> jax.Array:
    """The conv in lowering `name`; a form that cannot express the conv gives XLA's own."""
    kh, kw = kernel.shape[:2]
    if name == "ffi" and stem.supports(x.shape, kernel.shape, stride, padding, groups, x.dtype):
        return stem.conv(x, kernel, stride=stride, padding=padding,
                         differentiate_with=_direct(policy, x, kernel, stride, padding, groups,
                                                    prepared),
                         blocked=prepared.get("ffi"))
    if name == "ffi":
        return ffi.conv2d(x, kernel, stride=stride, padding=padding, groups=groups,
                          differentiate_with=_direct(policy, x, kernel, stride, padding, groups,
                                                     prepared),
                          blocked=prepared.get("ffi"))
    if name == "shifted_taps" and groups > 1:
        return xla.conv_shifted_taps(x, kernel, stride, padding, groups)
    if name == "group_chunks" and groups > 1:
        return xla.conv_group_chunks(x, kernel, stride, padding, groups)
    if name == "matmul" and groups == 1 and kh == kw == 1:
        return xla.conv1x1_matmul(x, kernel, stride, padding)
    if name == "winograd" and kh == kw == 3 and stride == 1:
        tiles = prepared.get("winograd")
        # Prepared tiles only where the kernel outweighs the input: on large feature maps the
        # per-call transform is cheap, and XLA then schedules the input transforms better.
        usable = tiles is not None and kernel.size >= x.size \
            and all(x.dtype == kernel.dtype == u.dtype for u in tiles)
        return _evaluated_fast(policy, x, kernel, tiles if usable else None, padding, groups)
    return conv_xla(x, kernel, stride, padding, groups)


def _direct(policy: ConvPolicy, x: jax.Array, kernel: jax.Array, stride: int, padding: int,
            groups: int, prepared: Mapping[str, Any]) -> functools.partial:
    """The conv as the policy computes it without the evaluation-only lowerings: what the
    derivatives of Winograd and the compiled kernel are taken from."""
    direct = policy.without(*FAST_LOWERINGS)
    name = direct.choose(x.shape, kernel.shape, stride=stride, padding=padding, groups=groups,
                         dtype=x.dtype)
    return functools.partial(_run, name, direct, stride=stride, padding=padding, groups=groups,
                             prepared=prepared)


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
    policy: ConvPolicy = DEFAULT_POLICY,
    prepared: Mapping[str, Any] | None = None,
) -> jax.Array:
    """``relu?(conv2d(x, kernel) + bias + residual)`` (bias, residual optional): a conv with its
    BatchNorm folded in and what follows it in a residual block. Where the compiled kernel
    runs the conv and ``policy.fuse``, it applies what follows as it writes the output, saving
    XLA a pass over it: bias, residual and ReLU in the GEMM (1x1 convs), bias and ReLU in the
    direct 3x3 convs and the stem form; elsewhere the same ops follow the conv in XLA.
    Derivatives are those of the unfused ops."""
    prepared = prepared or {}
    name = _lowering(policy, x, kernel, stride, padding, groups, prepared)
    if name == "ffi" and policy.fuse and bias is not None:
        direct = _direct(policy, x, kernel, stride, padding, groups, prepared)
        if residual is None and stem.supports(x.shape, kernel.shape, stride, padding, groups,
                                              x.dtype):
            return stem.conv(x, kernel, bias, stride=stride, padding=padding, relu=relu,
                             differentiate_with=direct, blocked=prepared.get("ffi"))
        if (groups == 1 and padding == 0
                and ffi.pointwise_supports(x.shape, kernel.shape, stride, x.dtype)):
            return ffi.pointwise_conv(x, kernel, bias, residual=residual, relu=relu,
                                      stride=stride, differentiate_with=direct,
                                      blocked=prepared.get("ffi"))
        if residual is None:
            return ffi.conv2d_bias_act(x, kernel, bias, relu=relu, stride=stride,
                                       padding=padding, groups=groups, differentiate_with=direct,
                                       blocked=prepared.get("ffi"))
    y = _run(name, policy, x, kernel, stride, padding, groups, prepared)
    return epilogue(y, bias, residual, relu)


def kernel_forms(kernel_shape: tuple[int, ...], dtype: Any, *, stride: int = 1, groups: int = 1,
                 policy: ConvPolicy = DEFAULT_POLICY,
                 backend: str | None = None) -> tuple[str, ...]:
    """The forms :func:`prepare_kernel` computes for a kernel of this shape and dtype (static:
    no array is read): "ffi" (the compiled kernel's blocked layout, a pure relayout; its stem
    form's too),
    "winograd" (the transformed tiles)."""
    if len(kernel_shape) != 4 or jnp.dtype(dtype) != jnp.float32:
        return ()
    first = policy.select(kernel_shape, groups=groups, stride=stride, backend=backend)
    candidates = [first]
    if first == "ffi" and groups == 1:  # the next choice runs the maps the kernel leaves
        candidates.append(policy.without("ffi").select(kernel_shape, groups=groups,
                                                       stride=stride, backend=backend))
    forms = []
    if "ffi" in candidates and ffi.available() and ffi.blockable(kernel_shape, groups):
        forms.append("ffi")
    if "winograd" in candidates and kernel_shape[:2] == (3, 3) and stride == 1:
        forms.append("winograd")
    return tuple(forms)


def prepare_kernel(kernel: jax.Array, *, stride: int = 1, groups: int = 1,
                   policy: ConvPolicy = DEFAULT_POLICY,
                   backend: str | None = None) -> dict[str, Any] | None:
    """The kernel transformed once for the lowerings :func:`conv2d` may run it with under
    `policy` (lowering -> array; which one runs can depend on the input's shape), or None where
    those have nothing to precompute: Winograd's transformed tiles, the compiled kernel's
    blocked layout (:func:`kernel_forms`). For an inference model whose weights no longer
    change: the transform then leaves the compiled program."""
    forms = kernel_forms(kernel.shape, kernel.dtype, stride=stride, groups=groups,
                         policy=policy, backend=backend)
    prepared = {}
    if "ffi" in forms:
        prepared["ffi"] = _blocked_kernel(kernel, groups)
    if "winograd" in forms:
        prepared["winograd"] = winograd_kernel_jit(kernel, groups)
    return prepared or None


#: ``winograd.winograd_kernel``, a compiled program per kernel shape and group count.
winograd_kernel_jit = jax.jit(winograd.winograd_kernel, static_argnums=1)
_blocked_kernel = jax.jit(ffi.block_kernel, static_argnums=1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 4, 5))
def _evaluated_fast(policy: ConvPolicy, x: jax.Array, kernel: jax.Array, tiles: Any,
                    padding: int, groups: int) -> jax.Array:
    """Winograd when the conv is only evaluated; the policy's direct conv when it is
    differentiated (`tiles`, derived from `kernel`, get no derivative), so training keeps the
    forward pass and gradients the parity tests compare with torch."""
    del policy
    return winograd.conv_winograd(x, kernel, padding, groups, tiles)


@_evaluated_fast.defjvp
def _evaluated_fast_jvp(policy: ConvPolicy, padding: int, groups: int, primals, tangents):
    x, kernel = primals[:2]
    direct = _direct(policy, x, kernel, 1, padding, groups, {})
    return jax.jvp(direct, primals[:2], tangents[:2])


def fusion_boundary(x: jax.Array) -> jax.Array:
    """A residual block's output kept in memory once (see ``kernel.fusion_boundary``)."""
    return ffi.fusion_boundary(x)
