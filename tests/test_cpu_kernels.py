"""The compiled CPU convolutions (resnext_flax.nn.lowering.kernel) against XLA's conv.

Numerics: each kernel's output is compared with a float64 numpy reference, and its relative
error must stay within FACTOR times a float32 floor measured here on the same conv: the larger
of XLA's own error and that of a plain float32 accumulation, one product at a time in tap and
channel order (floored at float32's unit roundoff). XLA alone is no floor: its kernels, and so
its rounding, differ between CPUs (on AVX-512 machines its dense convs accumulate more
accurately than any direct conv's running sum does). Gradients route to XLA's conv, so they must be
bit-identical. Tests needing the extension are skipped only where it is genuinely unavailable
(the skip says why); ``test_extension_loads_where_it_is_built`` fails instead on Linux x86-64,
unless RESNEXT_FLAX_DISABLE_CPU_KERNELS is set.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from limits import CHILD_TIMEOUT

from resnext_flax.builders import list_models
from resnext_flax.models.variants import get_spec
from resnext_flax.nn.layers import block_output
from resnext_flax.nn.lowering import conv as lowering
from resnext_flax.nn.lowering import kernel as cpu_kernels
from resnext_flax.nn.ops import epilogue
from resnext_flax.nn.policy import DEFAULT_POLICY, ConvPolicy

FACTOR = 4.0
EPS32 = 2.0**-24
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _skip_reason() -> str:
    if jax.default_backend() != "cpu":
        return f"the compiled kernels are CPU-only; JAX's backend is {jax.default_backend()}"
    reasons = "; ".join(cpu_kernels.unavailable_reasons()) or "not loaded"
    return f"the compiled CPU kernels unavailable: {reasons}"


def _usable() -> bool:
    return jax.default_backend() == "cpu" and cpu_kernels.available()


needs_kernels = pytest.mark.skipif(not _usable(), reason=_skip_reason())


def _xla(x, k, stride, padding, groups):
    return jax.lax.conv_general_dilated(
        x, k, (stride, stride), ((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def _taps(x, k, stride, padding, groups, dtype):
    """The conv's output shape and, per tap, its input window (n, ho, wo, groups, d) and
    kernel slice (d, groups, out per group), in `dtype`."""
    x = np.asarray(x, dtype)
    k = np.asarray(k, dtype)
    n, h, w, _ = x.shape
    kh, kw, d, cout = k.shape
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    kg = k.reshape(kh, kw, d, groups, cout // groups)
    taps = [(xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
             .reshape(n, ho, wo, groups, d), kg[i, j]) for i in range(kh) for j in range(kw)]
    return (n, ho, wo, groups, cout // groups), taps


def _reference64(x, k, stride, padding, groups) -> np.ndarray:
    """The conv in float64 numpy: a sum over taps of per-group channel contractions."""
    shape, taps = _taps(x, k, stride, padding, groups, np.float64)
    out = np.zeros(shape)
    for tap, kernel in taps:
        out += np.einsum("nhwgc,cgo->nhwgo", tap, kernel)
    return out.reshape(*shape[:3], -1)


def _sequential32(x, k, stride, padding, groups) -> np.ndarray:
    """The conv in float32 numpy, accumulated one product at a time (taps, then channels): the
    rounding of a direct conv's running sum, whatever the machine."""
    shape, taps = _taps(x, k, stride, padding, groups, np.float32)
    out = np.zeros(shape, np.float32)
    for tap, kernel in taps:
        for c in range(tap.shape[-1]):
            out += tap[..., c:c + 1] * kernel[c]
    return out.reshape(*shape[:3], -1)


def _floor(x, k, stride, padding, groups, ref, *xla_outputs) -> float:
    """The float32 error this conv can be expected to have (see the module docstring)."""
    plain = _rel(_sequential32(x, k, stride, padding, groups), ref)
    return max(plain, EPS32, *(_rel(o, ref) for o in xla_outputs))


def _rel(a, ref) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _data(n, h, w, c, kh, d, cout, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((kh, kh, d, cout)) / np.sqrt(kh * kh * d), jnp.float32)
    return x, k


# (n, h, w, channels, groups, stride, padding): d = channels // groups.
CASES = [
    (2, 13, 17, 128, 32, 1, 1),    # d = 4
    (2, 13, 17, 128, 32, 2, 1),
    (3, 13, 17, 128, 32, 1, 0),
    (2, 13, 17, 256, 32, 1, 1),    # d = 8
    (2, 13, 17, 256, 32, 2, 0),
    (2, 13, 17, 512, 32, 1, 1),    # d = 16
    (2, 9, 9, 96, 4, 1, 1),        # d = 24: an odd number of output vectors per group
    (1, 13, 17, 512, 32, 2, 1),
    (2, 9, 11, 1024, 32, 1, 1),    # d = 32
    (1, 7, 7, 2048, 32, 1, 1),     # d = 64
    (1, 7, 7, 2048, 32, 2, 1),
    (2, 13, 17, 64, 1, 1, 1),      # dense
    (2, 13, 17, 64, 1, 2, 1),
    (1, 7, 7, 512, 1, 1, 1),       # dense, one pair of output vectors per chunk
    (2, 5, 6, 72, 1, 1, 1),        # dense, an odd number of output vectors
    (64, 6, 5, 128, 32, 1, 1),     # batch 64
    (64, 4, 4, 256, 32, 2, 1),
    (1, 1, 1, 128, 32, 1, 1),      # a single pixel
    (1, 1, 1, 512, 32, 2, 1),
    (4, 8, 8, 256, 64, 1, 1),      # 64 groups of 4 (ResNeXt-101 64x4d)
    # the WSL ResNeXt-101s' wider groups (fewer groups than theirs: the per-group loop is what
    # differs, and a float64 reference of a 12288-channel conv is slow)
    (1, 9, 11, 1536, 32, 1, 1),    # d = 48 (32x48d layer1): six output vectors per group
    (1, 7, 9, 384, 4, 2, 1),       # d = 96, stride 2 (32x48d layer2.0)
    (1, 5, 6, 512, 4, 1, 1),       # d = 128 (32x16d layer4)
    (1, 5, 5, 768, 4, 2, 1),       # d = 192, stride 2 (32x48d layer3.0)
    (1, 4, 4, 512, 2, 2, 1),       # d = 256, stride 2 (32x32d layer4.0)
    (1, 4, 5, 768, 2, 1, 1),       # d = 384 (32x48d layer4)
]


def _id(case) -> str:
    n, h, w, c, g, s, p = case
    return f"{n}x{h}x{w}x{c}-d{c // g}-s{s}-p{p}"


@needs_kernels
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_xla(case):
    n, h, w, c, g, s, p = case
    x, k = _data(n, h, w, c, 3, c // g, c)
    assert cpu_kernels.supports(x.shape, k.shape, s, p, g, x.dtype)
    out = jax.jit(lambda x, k: cpu_kernels.conv2d(x, k, stride=s, padding=p, groups=g))(x, k)
    expected = _xla(x, k, s, p, g)
    assert out.shape == expected.shape and out.dtype == jnp.float32
    ref = _reference64(x, k, s, p, g)
    floor = _floor(x, k, s, p, g, ref, expected)
    assert _rel(out, ref) <= FACTOR * floor, (_rel(out, ref), floor)


@needs_kernels
@pytest.mark.parametrize("name", list_models("resnext*"))
def test_every_resnext_grouped_conv_runs_in_the_kernel(name):
    """The automatic choice gives every grouped 3x3 conv of every ResNeXt in the table (all
    their channels per group, strides and 224x224 map sizes, batch 1 and 8) to the kernel."""
    spec = get_spec(name)
    for stage, size in enumerate((56, 56, 28, 14)):
        width = spec.block_width(64 * 2**stage)
        kernel_shape = (3, 3, width // spec.groups, width)
        for stride, h in ((1, size // (2 if stage else 1)), (2 if stage else 1, size)):
            for n in (1, 8):
                x_shape = (n, h, h, width)
                assert cpu_kernels.supports(x_shape, kernel_shape, stride, 1, spec.groups,
                                            jnp.float32), (name, stage, stride)
                assert DEFAULT_POLICY.choose(x_shape, kernel_shape, stride=stride, padding=1,
                                             groups=spec.groups, backend="cpu") == "ffi"


# 1x1 convs in the direct kernel's GEMM: (n, h, w, channels in, channels out, stride).
POINTWISE = [
    (2, 14, 14, 1024, 256, 1),   # several 256-channel slices summed in the output
    (1, 7, 7, 2048, 512, 1),     # batch 1: one block of rows, columns spread over threads
    (2, 9, 9, 300, 32, 1),       # a partial channel slice; 162 rows: partial row tiles
    (3, 5, 7, 64, 256, 1),
    (2, 15, 15, 256, 512, 2),    # downsample: every other pixel of every other row
    (1, 9, 9, 512, 64, 2),       # rows 4 KiB apart at stride 2: each tile's rows copied
    (1, 13, 11, 40, 48, 2),      # odd map, stride 2
    (64, 3, 3, 64, 128, 1),      # batch 64
    (1, 1, 1, 16, 16, 1),        # a single pixel and panel
    (1, 1, 13, 32, 80, 1),       # 13 rows (a full tile and one row), an odd number of panels
    (2, 5, 5, 24, 48, 1),        # 50 rows, three panels
]


@needs_kernels
@pytest.mark.parametrize("case", POINTWISE, ids=lambda c: "x".join(map(str, c[:5])) + f"-s{c[5]}")
def test_pointwise_gemm_matches_xla(case, gemm_form):
    n, h, w, c, cout, s = case
    x, k = _data(n, h, w, c, 1, c, cout, seed=3)
    assert cpu_kernels.supports(x.shape, k.shape, s, 0, 1, x.dtype)
    conv = jax.jit(lambda x, k: cpu_kernels.conv2d(x, k, stride=s))
    assert "resnext_flax_direct_conv" in conv.lower(x, k).as_text()
    out = conv(x, k)
    expected = _xla(x, k, s, 0, 1)
    assert out.shape == expected.shape and out.dtype == jnp.float32
    ref = _reference64(x, k, s, 0, 1)
    floor = _floor(x, k, s, 0, 1, ref, expected)
    assert _rel(out, ref) <= FACTOR * floor, (_rel(out, ref), floor)


@needs_kernels
def test_pointwise_through_ops_differentiates_as_the_matmul():
    """A 1x1 conv through ``lowering.conv2d`` runs the GEMM when evaluated; its derivatives (and
    a vmapped call) are those of the matmul lowering it replaces."""
    x, k = _data(2, 6, 5, 96, 1, 96, 64, seed=4)
    conv = functools.partial(lowering.conv2d, stride=2)
    assert ConvPolicy().select(k.shape, stride=2) == "ffi"
    assert "resnext_flax_direct_conv" in jax.jit(conv).lower(x, k).as_text()

    def loss(policy):
        return lambda x, k: jnp.sum(jnp.sin(conv(x, k, policy=policy)))

    fast = jax.jit(jax.grad(loss(ConvPolicy()), argnums=(0, 1)))(x, k)
    slow = jax.jit(jax.grad(loss(ConvPolicy(lowering="matmul")), argnums=(0, 1)))(x, k)
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(a, b)
    xs = jnp.stack([x, -2 * x])
    np.testing.assert_allclose(jax.jit(jax.vmap(conv, in_axes=(0, None)))(xs, k),
                               jax.vmap(lambda a: _xla(a, k, 2, 0, 1))(xs), rtol=2e-5, atol=2e-5)


@needs_kernels
@pytest.mark.parametrize("residual, relu", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("case", [(2, 9, 9, 300, 32, 1), (1, 7, 7, 1024, 256, 1),
                                  (2, 15, 15, 256, 512, 2), (1, 5, 5, 40, 48, 1)],
                         ids=lambda c: f"{c[3]}-{c[4]}-s{c[5]}")
def test_pointwise_epilogue_is_the_unfused_ops(case, residual, relu, gemm_form):
    """``lowering.conv_bias_act`` on a 1x1 conv: bias, residual and ReLU applied by the GEMM as it
    writes the output, within the conv's float32 bound of the float64 reference; derivatives
    and a vmapped call are those of the same ops in XLA."""
    n, h, w, c, cout, s = case
    x, k = _data(n, h, w, c, 1, c, cout, seed=5)
    rng = np.random.default_rng(6)
    bias = jnp.asarray(rng.standard_normal(cout), jnp.float32)
    ho = (h - 1) // s + 1
    res = jnp.asarray(rng.standard_normal((n, ho, ho, cout)), jnp.float32) if residual else None

    def fused(x, k, b, r):
        return lowering.conv_bias_act(x, k, b, residual=r, relu=relu, stride=s)

    def unfused(x, k, b, r):  # what the model computed before: XLA's matmul, then the ops
        return epilogue(lowering.conv2d(x, k, stride=s, policy=ConvPolicy(lowering="matmul")),
                        b, r, relu)

    assert "resnext_flax_pointwise_conv" in jax.jit(fused).lower(x, k, bias, res).as_text()
    ref = _reference64(x, k, s, 0, 1) + np.asarray(bias, np.float64)
    ref = ref + (np.asarray(res, np.float64) if residual else 0.0)
    ref = np.maximum(ref, 0.0) if relu else ref
    conv_ref = _reference64(x, k, s, 0, 1)
    floor = max(_floor(x, k, s, 0, 1, conv_ref), _rel(jax.jit(unfused)(x, k, bias, res), ref))
    assert _rel(jax.jit(fused)(x, k, bias, res), ref) <= FACTOR * floor

    args = (0, 1, 2, 3) if residual else (0, 1, 2)

    def grads(conv):
        return jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(conv(*a))), argnums=args))(
            x, k, bias, res)

    def ops_unfused(x, k, b, r):  # the unfused ops through the library's own 1x1 conv
        return epilogue(lowering.conv2d(x, k, stride=s), b, r, relu)

    for a, b in zip(grads(fused), grads(ops_unfused), strict=True):
        np.testing.assert_array_equal(a, b)
    xs = jnp.stack([x, -x])
    rs = None if res is None else jnp.stack([res, 2 * res])
    axes = (0, None, None, None if res is None else 0)
    np.testing.assert_allclose(jax.jit(jax.vmap(fused, in_axes=axes))(xs, k, bias, rs),
                               jax.vmap(unfused, in_axes=axes)(xs, k, bias, rs),
                               rtol=2e-5, atol=2e-5)


@needs_kernels
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("case", [(2, 9, 7, 128, 32, 128, 1), (1, 7, 7, 256, 32, 256, 2),
                                  (2, 6, 5, 64, 1, 64, 1), (1, 9, 9, 64, 1, 128, 2)],
                         ids=lambda c: f"{c[3]}g{c[4]}-{c[5]}-s{c[6]}")
def test_direct_epilogue_is_the_unfused_ops(case, relu):
    """``lowering.conv_bias_act`` on a 3x3 conv the direct kernel runs: bias and ReLU applied as
    it writes the output, within the conv's float32 bound of the float64 reference;
    derivatives and a vmapped call are those of the same ops in XLA."""
    n, h, w, c, g, cout, s = case
    x, k = _data(n, h, w, c, 3, c // g, cout, seed=9)
    bias = jnp.asarray(np.random.default_rng(10).standard_normal(cout), jnp.float32)

    def fused(x, k, b):
        return lowering.conv_bias_act(x, k, b, relu=relu, stride=s, padding=1, groups=g)

    def unfused(x, k, b):
        return epilogue(lowering.conv2d(x, k, stride=s, padding=1, groups=g,
                                        policy=ConvPolicy(exclude={"ffi"})), b, None, relu)

    text = jax.jit(fused).lower(x, k, bias).as_text()
    assert "resnext_flax_direct_conv_bias_act" in text and "maximum" not in text
    conv_ref = _reference64(x, k, s, 1, g)
    ref = conv_ref + np.asarray(bias, np.float64)
    ref = np.maximum(ref, 0.0) if relu else ref
    floor = max(_floor(x, k, s, 1, g, conv_ref), _rel(jax.jit(unfused)(x, k, bias), ref))
    assert _rel(jax.jit(fused)(x, k, bias), ref) <= FACTOR * floor

    def grads(conv):
        return jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(conv(*a))), argnums=(0, 1, 2)))(
            x, k, bias)

    def ops_unfused(x, k, b):  # the unfused ops through the library's own conv
        return epilogue(lowering.conv2d(x, k, stride=s, padding=1, groups=g), b, None, relu)

    for a, b in zip(grads(fused), grads(ops_unfused), strict=True):
        np.testing.assert_array_equal(a, b)
    xs = jnp.stack([x, -x])
    np.testing.assert_allclose(jax.jit(jax.vmap(fused, in_axes=(0, None, None)))(xs, k, bias),
                               jax.vmap(unfused, in_axes=(0, None, None))(xs, k, bias),
                               rtol=2e-5, atol=2e-5)


@needs_kernels
def test_direct_epilogue_keeps_nan_and_falls_back_on_mismatched_operands():
    """The fused ReLU keeps NaN as ``jax.nn.relu`` does; a bias of another shape or dtype
    gives the same ops in XLA."""
    x, k = _data(1, 5, 5, 64, 3, 64, 64, seed=11)
    x = x.at[0, 2, 2, :].set(jnp.nan)
    bias = jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32)
    out = lowering.conv_bias_act(x, k, bias, relu=True, padding=1)
    want = jax.nn.relu(lowering.conv2d(x, k, padding=1) + bias)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    assert np.isnan(np.asarray(out)).any()
    for other in (jnp.ones((1, 64), jnp.float32), bias.astype(jnp.float16)):
        conv = jax.jit(lambda x, b: lowering.conv_bias_act(x, k, b, relu=True, padding=1))
        assert "resnext_flax_direct_conv_bias_act" not in conv.lower(x, other).as_text()
        np.testing.assert_allclose(conv(x, other), jax.nn.relu(
            lowering.conv2d(x, k, padding=1) + other), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_pointwise_epilogue_falls_back_on_mismatched_operands():
    """A residual of another shape or dtype, or no bias, is not passed to the kernel: the
    ops then run in XLA (broadcasting as XLA does), never a wrong read."""
    x, k = _data(1, 6, 6, 64, 1, 64, 32, seed=7)
    bias = jnp.ones((32,), jnp.float32)
    for res in (jnp.ones((1, 6, 6, 32), jnp.bfloat16), jnp.ones((1, 1, 1, 32), jnp.float32)):
        def conv(x, r):
            return lowering.conv_bias_act(x, k, bias, residual=r, relu=True)

        assert "resnext_flax_pointwise_conv" not in jax.jit(conv).lower(x, res).as_text()
        want = jax.nn.relu(lowering.conv2d(x, k) + bias + res)
        np.testing.assert_allclose(conv(x, res), want, rtol=1e-5, atol=1e-5)
    no_bias = jax.jit(lambda x: lowering.conv_bias_act(x, k, None, relu=True))
    assert "resnext_flax_pointwise_conv" not in no_bias.lower(x).as_text()
    np.testing.assert_allclose(no_bias(x), jax.nn.relu(lowering.conv2d(x, k)), rtol=1e-5, atol=1e-5)
    # A scalar residual broadcasts, as in XLA.
    np.testing.assert_allclose(lowering.conv_bias_act(x, k, bias, residual=1.5),
                               lowering.conv2d(x, k) + bias + 1.5, rtol=1e-5, atol=1e-5)
    # No input channels: XLA's (the GEMM would have nothing to write its output with).
    empty_x, empty_k = jnp.ones((1, 4, 4, 0), jnp.float32), jnp.ones((1, 1, 0, 16), jnp.float32)
    assert not cpu_kernels.supports(empty_x.shape, empty_k.shape, 1, 0, 1, jnp.float32)
    np.testing.assert_array_equal(
        lowering.conv_bias_act(empty_x, empty_k, jnp.arange(16.0), relu=True),
        jnp.broadcast_to(jnp.arange(16.0), (1, 4, 4, 16)))


@needs_kernels
def test_pointwise_epilogue_keeps_nan():
    """The fused ReLU propagates NaN and infinities as ``jax.nn.relu`` does (a max with the
    operands the other way round would turn NaN into 0 and hide a broken input)."""
    x, k = _data(1, 3, 4, 32, 1, 32, 16, seed=8)
    x = x.at[0, 1, 2, 5].set(jnp.nan).at[0, 2, 3, :].set(jnp.inf)
    bias = jnp.zeros((16,), jnp.float32)
    res = jnp.zeros((1, 3, 4, 16), jnp.float32).at[0, 0, 0, 3].set(jnp.nan)

    def fused(x, r):
        return lowering.conv_bias_act(x, k, bias, residual=r, relu=True)

    assert "resnext_flax_pointwise_conv" in jax.jit(fused).lower(x, res).as_text()
    got = np.asarray(jax.jit(fused)(x, res))
    want = np.asarray(epilogue(_xla(x, k, 1, 0, 1), bias, res, True))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got).sum() >= 1 + 16  # the NaN pixel, the residual's NaN
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-5)


@needs_kernels
def test_default_choice_and_unusual_shapes():
    """Grouped 3x3 convs go to the direct kernel when loaded; shapes it cannot run fall back
    to XLA (same numbers as XLA's conv), never fail."""
    x, k = _data(1, 9, 9, 64, 3, 2, 64)  # 32 groups of 2: no vector form in the direct kernel
    assert not cpu_kernels.supports(x.shape, k.shape, 1, 1, 32, x.dtype)
    out = jax.jit(lambda x, k: cpu_kernels.conv2d(x, k, stride=1, padding=1, groups=32))(x, k)
    ref = _reference64(x, k, 1, 1, 32)
    assert _rel(out, ref) <= FACTOR * _floor(x, k, 1, 1, 32, ref, _xla(x, k, 1, 1, 32))
    np.testing.assert_array_equal(out, _xla(x, k, 1, 1, 32))
    # Output smaller than the kernel window: XLA's business.
    tiny = jnp.ones((1, 1, 1, 128), jnp.float32)
    assert not cpu_kernels.supports(tiny.shape, k.shape, 1, 0, 64, jnp.float32)


def _choice(policy: ConvPolicy, x_shape, kernel_shape, stride, padding, groups=1) -> str:
    return policy.choose(x_shape, kernel_shape, stride=stride, padding=padding, groups=groups,
                         dtype=jnp.float32, backend="cpu")


@needs_kernels
def test_per_shape_default():
    auto = ConvPolicy()
    assert _choice(auto, (8, 56, 56, 128), (3, 3, 4, 128), 1, 1, 32) == "ffi"
    # Dense 3x3 convs: the direct kernel at stride 2 and on small maps (<= 196 output
    # pixels), Winograd (no compiled kernel) on larger ones.
    kernel = (3, 3, 256, 256)
    assert _choice(auto, (1, 14, 14, 256), kernel, 1, 1) == "ffi"
    assert _choice(auto, (8, 14, 14, 256), kernel, 1, 1) == "winograd"
    assert _choice(auto, (8, 28, 28, 256), kernel, 2, 1) == "ffi"
    # 1x1 convs: the kernel's GEMM (16-column panels), unpadded, any stride, every map size.
    for x_shape, stride in (((1, 7, 7, 256), 1), ((8, 56, 56, 256), 1), ((8, 56, 56, 256), 2)):
        assert _choice(auto, x_shape, (1, 1, 256, 512), stride, 0) == "ffi"
    assert _choice(auto, (1, 7, 7, 256), (1, 1, 256, 256), 1, 1) == "matmul"  # padded
    assert _choice(auto, (1, 7, 7, 256), (1, 1, 256, 40), 1, 0) == "matmul"  # not whole panels
    assert _choice(auto, (1, 7, 7, 256), (1, 1, 8, 256), 1, 0, 32) == "shifted_taps"  # grouped
    # The rule's knobs (A/B runs): no GEMM, every dense 3x3 conv, no strided one.
    assert _choice(ConvPolicy(gemm_1x1=False), (1, 7, 7, 256), (1, 1, 256, 512), 1, 0) \
        == "matmul"
    assert _choice(ConvPolicy(direct_max_pixels=None), (8, 14, 14, 256), kernel, 1, 1) == "ffi"
    assert _choice(ConvPolicy(direct_max_pixels=0), (1, 14, 14, 256), kernel, 1, 1) \
        == "winograd"
    assert _choice(ConvPolicy(direct_strided=False), (8, 28, 28, 256), kernel, 2, 1) == "xla"
    # Forced "ffi" where the kernel cannot run the conv: the automatic choice without it.
    assert _choice(ConvPolicy(lowering="ffi"), (1, 9, 9, 64), (3, 3, 2, 64), 1, 1, 32) \
        == "shifted_taps"
    assert _choice(ConvPolicy(exclude={"ffi"}), (1, 14, 14, 256), kernel, 1, 1) == "winograd"


@needs_kernels
@pytest.mark.parametrize("stride", [1, 2])
def test_grad_is_xla_grad(stride):
    x, k = _data(2, 9, 11, 128, 3, 4, 128)
    cot = jnp.asarray(np.random.default_rng(1).standard_normal(
        _xla(x, k, stride, 1, 32).shape), jnp.float32)

    def loss(conv):
        return lambda x, k: jnp.sum(conv(x, k) * cot)

    fast = jax.jit(jax.grad(loss(lambda x, k: cpu_kernels.conv2d(
        x, k, stride=stride, padding=1, groups=32)), argnums=(0, 1)))(x, k)
    slow = jax.jit(jax.grad(loss(lambda x, k: _xla(x, k, stride, 1, 32)), argnums=(0, 1)))(x, k)
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(a, b)


@needs_kernels
def test_ops_ffi_lowering_grad_is_fallback_grad():
    """Through lowering.conv2d, derivatives are those of the lowering chosen without "ffi"."""
    x, k = _data(2, 9, 11, 128, 3, 4, 128)

    def conv(x, k, name):
        return lowering.conv2d(x, k, padding=1, groups=32, policy=ConvPolicy(lowering=name))

    def loss(name):
        def f(x, k):
            return jnp.sum(conv(x, k, name) ** 2)
        return f

    fallback = ConvPolicy(exclude={"ffi"}).select(k.shape, groups=32, stride=1)
    fast = jax.jit(jax.grad(loss("ffi"), argnums=(0, 1)))(x, k)
    slow = jax.jit(jax.grad(loss(fallback), argnums=(0, 1)))(x, k)
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(a, b)
    # and the forward pass is the compiled kernel's, close to the fallback's
    np.testing.assert_allclose(conv(x, k, "ffi"), conv(x, k, fallback),
                               rtol=1e-5, atol=1e-5)


@needs_kernels
def test_vmap():
    x, k = _data(2, 7, 9, 256, 3, 8, 256)
    xs = jnp.stack([x, 2 * x, -x])
    ks = jnp.stack([k, 0.5 * k, -k])

    def conv(x, k):
        return cpu_kernels.conv2d(x, k, stride=2, padding=1, groups=32)

    def ref(x, k):
        return _xla(x, k, 2, 1, 32)

    got = [
        jax.jit(jax.vmap(conv, in_axes=(0, None)))(xs, k),  # folded into the batch
        jax.jit(jax.vmap(conv))(xs, ks),                    # one call per slice
        jax.jit(jax.vmap(conv, in_axes=(None, 0)))(x, ks),
        jax.jit(jax.vmap(jax.vmap(conv, in_axes=(0, None)), in_axes=(0, None)))(
            jnp.stack([xs, xs]), k),
    ]
    want = [
        jax.vmap(ref, in_axes=(0, None))(xs, k),
        jax.vmap(ref)(xs, ks),
        jax.vmap(ref, in_axes=(None, 0))(x, ks),
        jnp.stack([jax.vmap(ref, in_axes=(0, None))(xs, k)] * 2),
    ]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_unsupported_dtype_falls_back(dtype):
    x, k = _data(2, 9, 9, 128, 3, 4, 128)
    x, k = x.astype(dtype), k.astype(dtype)
    assert not cpu_kernels.supports(x.shape, k.shape, 1, 1, 32, dtype)
    out = jax.jit(lambda x, k: cpu_kernels.conv2d(x, k, padding=1, groups=32))(x, k)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, jax.jit(lambda x, k: _xla(x, k, 1, 1, 32))(x, k))
    # also through the "ffi" lowering of lowering.conv2d
    lowering.conv2d(x, k, padding=1, groups=32,
                    policy=ConvPolicy(lowering="ffi")).block_until_ready()


def test_disable_env_var_falls_back():
    """With RESNEXT_FLAX_DISABLE_CPU_KERNELS=1 nothing is loaded, the reason is logged once,
    and conv2d (and a model's forward) still give XLA's results."""
    script = textwrap.dedent("""
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(message)s")
        import jax, jax.numpy as jnp, numpy as np
        from resnext_flax.nn.lowering import conv as lowering
        from resnext_flax.nn.lowering import kernel as cpu_kernels
        from resnext_flax.nn.policy import ConvPolicy
        assert not cpu_kernels.available(), cpu_kernels._load()
        assert not cpu_kernels.supports((2, 9, 9, 128), (3, 3, 4, 128), 1, 1, 32, jnp.float32)
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((2, 9, 9, 128)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((3, 3, 4, 128)), jnp.float32)
        out = cpu_kernels.conv2d(x, k, padding=1, groups=32)
        ref = jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=32)
        np.testing.assert_array_equal(out, ref)
        fallback = ConvPolicy(exclude={"ffi"}).select(k.shape, groups=32, stride=1)
        np.testing.assert_array_equal(
            lowering.conv2d(x, k, padding=1, groups=32),
            lowering.conv2d(x, k, padding=1, groups=32, policy=ConvPolicy(lowering=fallback)))
        cpu_kernels.available(); cpu_kernels.available()
        print("OK")
    """)
    env = {**os.environ, cpu_kernels.DISABLE_ENV: "1", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("OK")
    logs = [line for line in proc.stdout.splitlines() if line.startswith("LOG resnext_flax")]
    assert len(logs) == 1 and cpu_kernels.DISABLE_ENV in logs[0], proc.stdout


def test_extension_loads_where_it_is_built():
    """CI must notice a broken build: on Linux x86-64 the direct kernel has to load (unless
    disabled on purpose with RESNEXT_FLAX_DISABLE_CPU_KERNELS or the CPU lacks AVX2/FMA)."""
    # Skips only where no kernel is expected to load: the user turned it off on purpose (the
    # fallback is then tested by test_disable_env_var_falls_back), or setup.py does not build
    # it for this platform. On Linux x86-64 without the variable, CI always runs the checks.
    if cpu_kernels.disabled_by_env():
        pytest.skip(f"{cpu_kernels.DISABLE_ENV} is set")
    if not cpu_kernels.expected_platform():
        pytest.skip("the extension is only built on Linux x86-64")
    reasons = cpu_kernels.unavailable_reasons()
    if not cpu_kernels.available() and not any("AVX2" in r for r in reasons):
        pytest.fail(f"the direct CPU kernel did not load on Linux x86-64: {reasons} "
                    "(rebuild with `pip install -e .`; a C++17 compiler is needed)")


@pytest.mark.skipif(not (jax.default_backend() == "cpu" and cpu_kernels._load().fusion_boundary),
                    reason=_skip_reason())
def test_fusion_boundary_is_the_identity():
    """Under jit, grad, vmap and any dtype: the same array, the identity's derivative."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 5)), jnp.float32)
    boundary = cpu_kernels.fusion_boundary
    assert "resnext_flax_fusion_boundary" in jax.jit(boundary).lower(x).as_text()
    np.testing.assert_array_equal(jax.jit(boundary)(x), x)
    np.testing.assert_array_equal(jax.jit(jax.vmap(jax.vmap(boundary)))(x), x)
    np.testing.assert_array_equal(jax.jit(boundary)(x.astype(jnp.bfloat16)),
                                  x.astype(jnp.bfloat16))
    np.testing.assert_array_equal(jax.jit(jax.grad(lambda v: (boundary(v) ** 3).sum()))(x),
                                  3 * x**2)


def _residual_chain(x: jax.Array, weights: list[jax.Array],
                    policy: ConvPolicy = DEFAULT_POLICY) -> jax.Array:
    """Bottleneck-like blocks: 1x1 convs (matmuls) and a residual add through block_output."""
    for w in weights:
        out = jnp.einsum("nhwc,co->nhwo", jax.nn.relu(jnp.einsum("nhwc,co->nhwo", x, w)), w)
        x = block_output(jax.nn.relu(out + x), policy)
    return x


def _loop_fusion_operands(hlo: str) -> list[int]:
    import re

    return [len(m.group(1).split(","))
            for m in re.finditer(r"fusion\(([^)]*)\), kind=kLoop", hlo)]


@pytest.mark.skipif(not (jax.default_backend() == "cpu" and cpu_kernels._load().fusion_boundary),
                    reason=_skip_reason())
def test_block_outputs_are_computed_once():
    """Each residual add is one loop fusion reading its own block's arrays: XLA:CPU does not
    recompute the earlier blocks inside it (without the boundary, the last add of this
    12-block chain reads 13 arrays: jax 0.10). Same values as without the boundary."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 6, 6, 32)), jnp.float32)
    weights = [jnp.asarray(rng.standard_normal((32, 32)) * 0.1, jnp.float32) for _ in range(12)]
    compiled = jax.jit(_residual_chain).lower(x, weights).compile()
    hlo = compiled.as_text()
    assert hlo.count('custom_call_target="resnext_flax_fusion_boundary"') == 12
    assert max(_loop_fusion_operands(hlo)) <= 4, sorted(_loop_fusion_operands(hlo))
    for policy in (ConvPolicy(exclude={"ffi"}), ConvPolicy(fuse=False)):
        chain = functools.partial(_residual_chain, policy=policy)
        plain = jax.jit(chain).lower(x, weights).compile()
        assert "resnext_flax_fusion_boundary" not in plain.as_text()
    np.testing.assert_array_equal(compiled(x, weights), plain(x, weights))


@needs_kernels
def test_custom_call_results_vary_over_the_manual_mesh_axes():
    """Inside shard_map each custom call's result is typed per device, as its input is (a
    result typed as replicated breaks a scan carry, a custom JVP's type check and out_specs)."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 16)), jnp.float32)
    dense = jnp.asarray(rng.standard_normal((3, 3, 16, 16)) * 0.1, jnp.float32)
    pointwise = jnp.asarray(rng.standard_normal((1, 1, 16, 32)) * 0.1, jnp.float32)
    types = {}

    def per_device(x, dense, pointwise):
        outs = {"conv2d": cpu_kernels.conv2d(x, dense, padding=1),
                "pointwise": cpu_kernels.pointwise_conv(x, pointwise, jnp.zeros(32))}
        if cpu_kernels._load().fusion_boundary:
            outs["boundary"] = cpu_kernels.fusion_boundary(x)
        types.update({k: jax.typeof(v).manual_axis_type.varying for k, v in outs.items()})
        return outs

    run = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P(), P()),
                                out_specs=P("data")))
    sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    outs = run(sharded, dense, pointwise)
    assert types and all(v == {"data"} for v in types.values()), types
    np.testing.assert_allclose(outs["conv2d"], cpu_kernels.conv2d(x, dense, padding=1),
                               rtol=1e-6)
