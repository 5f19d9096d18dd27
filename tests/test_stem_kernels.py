"""The compiled kernel's stem (resnext_flax.nn.lowering.stem): the dense conv over few input
channels against a float64 reference (within the float32 floor of test_cpu_kernels), the
max-pool bit for bit against XLA's reduce_window, the policy's routing, derivatives (XLA's,
bit for bit) and vmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cpu_kernels import FACTOR, _floor, _reference64, _rel, needs_kernels

from resnext_flax.nn import ops
from resnext_flax.nn.lowering import conv as lowering
from resnext_flax.nn.lowering import kernel as cpu_kernels
from resnext_flax.nn.lowering import stem
from resnext_flax.nn.policy import DEFAULT_POLICY, XLA_POLICY, ConvPolicy

STEM_CALL = "resnext_flax_stem_conv"
POOL_CALL = "resnext_flax_max_pool"

# (n, h, w, channels in, kh, kw, channels out, stride, padding)
CONVS = [
    (1, 224, 224, 3, 7, 7, 64, 2, 3),   # ResNet's stem at batch 1
    (3, 13, 17, 3, 7, 7, 64, 2, 3),     # batch 3, odd sizes: 7x9 outputs, partial pixel blocks
    (1, 9, 13, 3, 7, 7, 32, 2, 3),      # 5x7 outputs: one block of 6 and one of 1 per row
    (2, 10, 9, 1, 3, 3, 16, 1, 1),      # one channel, 3x3, stride 1
    (1, 11, 10, 4, 5, 5, 48, 3, 2),     # four channels, stride 3
    (2, 9, 12, 2, 3, 5, 16, 2, 0),      # a non-square window, no padding
    (1, 7, 7, 3, 7, 7, 16, 1, 0),       # a single output pixel
    (2, 30, 27, 3, 3, 3, 32, 1, 1),     # a 3x3 conv over RGB, stride 1 (windows 3 floats apart)
    (1, 33, 57, 3, 7, 7, 96, 2, 3),     # 29 outputs per row (tiles of 9-10), three panel pairs
]


def _id(case) -> str:
    n, h, w, c, kh, kw, cout, s, p = case
    return f"{n}x{h}x{w}x{c}-{kh}x{kw}-{cout}-s{s}-p{p}"


def _data(n, h, w, c, kh, kw, cout, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((kh, kw, c, cout)) / np.sqrt(kh * kw * c), jnp.float32)
    b = jnp.asarray(rng.standard_normal(cout), jnp.float32)
    return x, k, b


def _xla(x, k, stride, padding):
    return ops.conv_xla(x, k, stride, padding, 1)


@needs_kernels
@pytest.mark.parametrize("case", CONVS, ids=_id)
def test_conv_matches_xla(case, gemm_form):
    """Each case in the stem's AVX-512 form (where the CPU has it: windows 3 or 6 floats apart,
    outputs in pairs of panels) and its AVX2 form (``gemm_form``)."""
    n, h, w, c, kh, kw, cout, s, p = case
    x, k, b = _data(n, h, w, c, kh, kw, cout)
    assert stem.supports(x.shape, k.shape, s, p, 1, x.dtype)
    conv = jax.jit(lambda x, k: stem.conv(x, k, stride=s, padding=p))
    assert STEM_CALL in conv.lower(x, k).as_text()
    out = conv(x, k)
    expected = _xla(x, k, s, p)
    assert out.shape == expected.shape and out.dtype == jnp.float32
    ref = _reference64(x, k, s, p, 1)
    floor = _floor(x, k, s, p, 1, ref, expected)
    assert _rel(out, ref) <= FACTOR * floor, (_rel(out, ref), floor)
    # With the folded BatchNorm's bias and the ReLU applied as the output is written.
    fused = jax.jit(lambda x, k, b: stem.conv(x, k, b, stride=s, padding=p, relu=True))
    ref = np.maximum(ref + np.asarray(b, np.float64), 0.0)
    assert _rel(fused(x, k, b), ref) <= FACTOR * max(floor, _rel(jax.nn.relu(expected + b), ref))


@needs_kernels
def test_conv_keeps_nan(gemm_form):
    x, k, b = _data(1, 9, 9, 3, 7, 7, 32, seed=1)
    x = x.at[0, 4, 4, 1].set(jnp.nan)
    got = np.asarray(stem.conv(x, k, b, stride=2, padding=3, relu=True))
    want = np.asarray(jax.nn.relu(_xla(x, k, 2, 3) + b))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got).any()


@needs_kernels
def test_conv_falls_back_on_what_it_cannot_run():
    """A bias of another shape or dtype, another dtype, or a window larger than the padded
    input: the same ops in XLA (broadcasting as XLA does), never a wrong read."""
    x, k, b = _data(1, 12, 12, 3, 7, 7, 16, seed=7)
    for bias in (jnp.ones((1, 1, 1, 16), jnp.float32), b.astype(jnp.bfloat16), 0.5):
        conv = jax.jit(lambda x, bias=bias: stem.conv(x, k, bias, stride=2, padding=3, relu=True))
        assert STEM_CALL not in conv.lower(x).as_text()
        want = jax.nn.relu(_xla(x, k, 2, 3) + bias)
        np.testing.assert_allclose(conv(x), want, rtol=1e-5, atol=1e-5)
    half = jax.jit(lambda x, k: stem.conv(x, k, stride=2, padding=3))
    assert STEM_CALL not in half.lower(x.astype(jnp.float16), k.astype(jnp.float16)).as_text()
    assert not stem.supports((1, 3, 3, 3), k.shape, 1, 1, 1, jnp.float32)  # 5x5 < 7x7
    assert not stem.supports(x.shape, (7, 7, 3, 16), 2, 3, 3, jnp.float32)  # grouped


@needs_kernels
def test_routing():
    """The stem's shapes take the kernel under the automatic policy (fused with bias and ReLU
    in ``conv_bias_act``); others keep their lowering; the pure-XLA policy has no custom call."""
    x, k, b = _data(1, 32, 32, 3, 7, 7, 64)
    auto = DEFAULT_POLICY
    assert auto.choose(x.shape, k.shape, stride=2, padding=3) == "ffi"
    assert lowering.kernel_forms(k.shape, k.dtype, stride=2) == ("ffi",)
    assert cpu_kernels.stem_shaped((5, 5, 3, 64), 1) and cpu_kernels.stem_shaped((3, 3, 1, 16), 1)
    for shape, groups in (((7, 7, 8, 64), 1), ((7, 7, 3, 40), 1), ((1, 1, 3, 64), 1),
                          ((7, 7, 1, 64), 3)):
        assert not cpu_kernels.stem_shaped(shape, groups), shape
    assert auto.choose((1, 32, 32, 8), (7, 7, 8, 64), stride=2, padding=3) == "xla"
    assert auto.choose((1, 32, 32, 3), (7, 7, 3, 40), stride=2, padding=3) == "xla"
    for policy in (ConvPolicy(stem=False), ConvPolicy(exclude={"ffi"}), XLA_POLICY):
        assert policy.choose(x.shape, k.shape, stride=2, padding=3) == "xla"
    assert auto.choose((1, 32, 32, 4), (3, 3, 4, 64), stride=1, padding=1) == "ffi"

    def fused(policy, prepared=None):
        return jax.jit(lambda x, k, b: lowering.conv_bias_act(
            x, k, b, relu=True, stride=2, padding=3, policy=policy, prepared=prepared))

    prepared = lowering.prepare_kernel(k, stride=2)
    text = fused(auto, prepared).lower(x, k, b).as_text()
    assert STEM_CALL in text and "relu=true" in text.replace(" ", "").lower()
    want = jax.nn.relu(_xla(x, k, 2, 3) + b)
    np.testing.assert_allclose(fused(auto, prepared)(x, k, b), want, rtol=1e-5, atol=1e-5)
    for policy in (XLA_POLICY, ConvPolicy(stem=False), ConvPolicy(fuse=False)):
        text = fused(policy).lower(x, k, b).as_text()
        assert (STEM_CALL in text) == (policy == ConvPolicy(fuse=False)), policy
        if policy == XLA_POLICY:
            assert not [t for t in cpu_kernels.TARGETS if t in text]
        np.testing.assert_allclose(fused(policy)(x, k, b), want, rtol=1e-5, atol=1e-5)
    # The pool follows conv1's policy.
    y = jnp.ones((1, 16, 16, 64), jnp.float32)
    assert auto.pool_kernel(y.shape, y.dtype, window=3, stride=2, padding=1) is stem.max_pool
    for policy in (XLA_POLICY, ConvPolicy(stem=False), ConvPolicy(exclude={"ffi"})):
        assert policy.pool_kernel(y.shape, y.dtype, window=3, stride=2, padding=1) is None
        pool = jax.jit(lambda y, p=policy: ops.max_pool_under(p, y, window=3, stride=2,
                                                              padding=1))
        assert POOL_CALL not in pool.lower(y).as_text()
    assert auto.pool_kernel(y.shape, jnp.bfloat16, window=3, stride=2, padding=1) is None


def _pool_inputs() -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 11, 10, 13)).astype(np.float32)
    negative = -np.abs(x) - 1.0  # every value below the padding's 0 would be, above -inf
    special = x.copy()
    special[0, 0, 0, :] = np.nan
    special[1, 3, 4, 2] = np.nan
    special[1, 5:8, 2:5, 5] = -np.inf
    special[2, :, :, 7] = -np.inf
    special[2, 2, 2, 9] = np.inf
    zeros = np.zeros_like(x)
    zeros[..., ::2] = -0.0  # +0 beats -0 in XLA's max, whatever the order
    zeros[0, ::3, ::2, 1::2] = -0.0
    return [x, negative, special, zeros, rng.standard_normal((1, 56, 56, 64)).astype(np.float32)]


def _nan_windows(x: np.ndarray, window: int, stride: int, padding: int) -> np.ndarray:
    """Which output pixels' windows hold a NaN: where HLO's maximum gives NaN."""
    nan = np.pad(np.isnan(x), ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    _, h, w, _ = nan.shape
    ho, wo = (h - window) // stride + 1, (w - window) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, x.shape[3]), bool)
    for i in range(window):
        for j in range(window):
            out |= nan[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
    return out


@needs_kernels
@pytest.mark.parametrize("window, stride, padding", [(3, 2, 1), (3, 1, 1), (3, 2, 0),
                                                     (2, 1, 0), (5, 2, 2), (4, 3, 1)])
def test_pool_is_reduce_window_bit_for_bit(window, stride, padding):
    """The same bits as XLA's reduce_window: -inf padding, +0 over -0, and NaN wherever a
    window holds one (HLO's maximum)."""
    pool = jax.jit(lambda x: stem.max_pool(x, window=window, stride=stride, padding=padding))
    xla = jax.jit(lambda x: ops.max_pool(x, window=window, stride=stride, padding=padding))
    for x in _pool_inputs():
        assert POOL_CALL in pool.lower(x).as_text()
        got, want = np.asarray(pool(x)), np.asarray(xla(x))
        assert got.shape == want.shape
        nan = _nan_windows(x, window, stride, padding)
        np.testing.assert_array_equal(np.isnan(got), nan)
        np.testing.assert_array_equal(np.isnan(want), nan)
        np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    assert _nan_windows(_pool_inputs()[2], window, stride, padding).any()


@needs_kernels
def test_pool_refuses_what_it_cannot_run():
    """Padding as large as the window, no output, or windows that do not overlap: XLA's
    reduce_window. (XLA:CPU computes non-overlapping windows another way, which drops NaN and
    orders +-0 as it meets them (jax 0.10), so no kernel could give its bits for all inputs.)"""
    x = jnp.ones((1, 4, 4, 8), jnp.float32)
    for window, stride, padding in ((2, 2, 0), (3, 3, 1), (1, 1, 0)):
        assert not stem.pool_supports(x.shape, x.dtype, window=window, stride=stride,
                                      padding=padding)
    assert not stem.pool_supports(x.shape, x.dtype, window=2, stride=1, padding=2)
    assert not stem.pool_supports(x.shape, x.dtype, window=9, stride=1, padding=1)
    assert not stem.pool_supports(x.shape, jnp.float16, window=3, stride=2, padding=1)
    np.testing.assert_array_equal(stem.max_pool(x, window=2, stride=1, padding=2),
                                  ops.max_pool(x, window=2, stride=1, padding=2))


@needs_kernels
def test_gradients_are_xla():
    x, k, b = _data(2, 15, 13, 3, 7, 7, 32, seed=3)
    cot = jnp.asarray(np.random.default_rng(4).standard_normal((2, 4, 4, 32)), jnp.float32)

    def loss(conv, pool):
        return lambda x, k, b: jnp.sum(pool(conv(x, k, b), window=3, stride=2, padding=1) * cot)

    def xla_conv(x, k, b):
        return jax.nn.relu(_xla(x, k, 2, 3) + b)

    def fast_conv(x, k, b):
        return stem.conv(x, k, b, stride=2, padding=3, relu=True)

    args = (0, 1, 2)
    fast = jax.jit(jax.grad(loss(fast_conv, stem.max_pool), argnums=args))(x, k, b)
    slow = jax.jit(jax.grad(loss(xla_conv, ops.max_pool), argnums=args))(x, k, b)
    for a, e in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(a, e)
    # Through the policy's routing: the derivatives of the lowering chosen without "ffi".
    def routed(policy):
        return lambda x, k, b: lowering.conv_bias_act(x, k, b, relu=True, stride=2, padding=3,
                                                      policy=policy)

    fast = jax.jit(jax.grad(loss(routed(DEFAULT_POLICY), stem.max_pool), argnums=args))(x, k, b)
    slow = jax.jit(jax.grad(loss(routed(XLA_POLICY), ops.max_pool), argnums=args))(x, k, b)
    for a, e in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(a, e)


@needs_kernels
def test_vmap():
    x, k, b = _data(2, 12, 11, 3, 7, 7, 16, seed=5)
    xs = jnp.stack([x, -2 * x, 0.5 * x])

    def conv(x, k, b):
        return stem.conv(x, k, b, stride=2, padding=3, relu=True)

    def ref(x, k, b):
        return jax.nn.relu(_xla(x, k, 2, 3) + b)

    batched = jax.jit(jax.vmap(conv, in_axes=(0, None, None)))
    assert batched.lower(xs, k, b).as_text().count(STEM_CALL) == 1  # folded into the batch
    np.testing.assert_allclose(batched(xs, k, b), jax.vmap(ref, in_axes=(0, None, None))(xs, k, b),
                               rtol=2e-5, atol=2e-5)
    ks = jnp.stack([k, -k, 2 * k])  # a mapped kernel: one call per slice
    np.testing.assert_allclose(jax.jit(jax.vmap(conv, in_axes=(0, 0, None)))(xs, ks, b),
                               jax.vmap(ref, in_axes=(0, 0, None))(xs, ks, b),
                               rtol=2e-5, atol=2e-5)
    ys = jnp.stack([xs, -xs])

    def pool(y):
        return stem.max_pool(y, window=3, stride=2, padding=1)

    nested = jax.jit(jax.vmap(jax.vmap(pool)))
    assert POOL_CALL in nested.lower(ys).as_text()
    def xla(y):
        return ops.max_pool(y, window=3, stride=2, padding=1)

    np.testing.assert_array_equal(nested(ys), jax.vmap(jax.vmap(xla))(ys))


@needs_kernels
def test_model_stem_runs_in_the_kernel():
    """``optimize_for_inference`` runs the stem (conv with bias and ReLU, then the pool) in the
    kernel; the model under the pure-XLA policy has none of its calls; same logits."""
    import resnext_flax
    from resnext_flax.models.folding import optimize_for_inference

    model = resnext_flax.create_model("resnet18", num_classes=10)
    model.eval()
    x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 40, 40, 3)), jnp.float32)
    fast = optimize_for_inference(model)
    plain = optimize_for_inference(model, policy=XLA_POLICY)
    texts = [jax.jit(lambda f, a: f(a)).lower(m, x).as_text() for m in (fast, plain)]
    assert texts[0].count(STEM_CALL) == 1 and texts[0].count(POOL_CALL) == 1
    assert STEM_CALL not in texts[1] and POOL_CALL not in texts[1]
    np.testing.assert_allclose(fast(x), plain(x), rtol=1e-4, atol=1e-5)
    stem_out = jax.jit(lambda f, a: f.module().stem(a))
    np.testing.assert_allclose(stem_out(fast, x), model.stem(x), rtol=1e-5, atol=1e-5)
