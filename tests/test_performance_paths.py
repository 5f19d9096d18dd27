"""The fast inference paths compute the same numbers: every conv lowering against XLA's own
(grouped) convolution, and the BatchNorm-folded model against the eval-mode model and
torchvision."""

from __future__ import annotations

import ast
import collections
import functools
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch_reference import (
    flax_model_from_torch,
    random_images,
    relative_error,
    shrunk,
    to_nchw,
    torch_model,
)

import resnext_flax
from resnext_flax.models.folding import FoldedResNet, fold_batchnorm, optimize_for_inference
from resnext_flax.models.programs import ModuleForward
from resnext_flax.nn.layers import BatchNorm, Conv, with_conv_policy
from resnext_flax.nn.lowering import conv as conv_ops
from resnext_flax.nn.lowering import kernel as cpu_kernel
from resnext_flax.nn.lowering import winograd
from resnext_flax.nn.policy import XLA_POLICY, ConvPolicy

AUTO = ConvPolicy()
NO_FFI = ConvPolicy(exclude={"ffi"})
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RTOL = 1e-5
# One convolution: the lowerings differ from XLA's conv by float32 rounding only (measured
# 1e-7 to 9e-7 relative, Winograd's transforms included). The bound is RTOL, or this multiple
# of XLA float32's own error against a float64 conv where a machine's floor is larger.
FLOOR_MULTIPLE = 10.0


def _reference_conv(x, kernel, stride, padding, groups):
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        precision=jax.lax.Precision.HIGHEST,
    )


def _bound(x, kernel, stride, padding, groups) -> float:
    """RTOL, or FLOOR_MULTIPLE x the float32 reference conv's error against float64."""
    expected = _reference_conv(x, kernel, stride, padding, groups)
    with jax.enable_x64(True):
        exact = _reference_conv(jnp.asarray(x, jnp.float64), jnp.asarray(kernel, jnp.float64),
                                stride, padding, groups)
    return max(RTOL, FLOOR_MULTIPLE * relative_error(expected, exact))


def _case(batch, h, w, cin, cout, k, groups, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, h, w, cin)).astype(np.float32)
    kernel = rng.standard_normal((k, k, cin // groups, cout)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(kernel)


# (batch, H, W, channels, groups, stride): d = channels // groups = 2, 4, 8, 16, 32.
GROUPED = [
    (1, 13, 11, 64, 32, 1),
    (2, 13, 11, 128, 32, 1),
    (1, 15, 9, 128, 32, 2),
    (1, 12, 12, 256, 32, 2),
    (1, 9, 7, 256, 16, 1),
    (1, 7, 9, 512, 32, 2),
    (2, 5, 5, 256, 8, 1),
    (1, 7, 5, 640, 40, 2),  # 40 groups: chunks of 8 groups, the last one short
    (1, 6, 6, 1024, 64, 1),
    (2, 7, 6, 96, 6, 1),  # d = 16, 6 groups
    (1, 4, 5, 2048, 32, 1),  # d = 64
]


@pytest.mark.parametrize("chunk_width", [16, 32, 64])
@pytest.mark.parametrize(("h", "w", "c", "groups", "padding"),
                         [(9, 7, 256, 16, 1), (6, 5, 96, 6, 1), (7, 8, 128, 32, 0)])
def test_winograd_block_diagonal_chunks_match_xla(monkeypatch, chunk_width, h, w, c, groups,
                                                  padding):
    """Chunks that merge several groups (block-diagonal kernels) compute the grouped conv."""
    monkeypatch.setattr(winograd, "CHUNK_WIDTH", chunk_width)
    x, kernel = _case(2, h, w, c, c, 3, groups, seed=3)
    expected = _reference_conv(x, kernel, 1, padding, groups)
    actual = jax.jit(lambda a, b: conv_ops.conv2d(a, b, padding=padding, groups=groups,
                                             policy=ConvPolicy(lowering="winograd")))(x, kernel)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) <= _bound(x, kernel, 1, padding, groups)


@pytest.mark.parametrize("lowering", ["shifted_taps", "group_chunks", "winograd", "auto"])
@pytest.mark.parametrize(("batch", "h", "w", "c", "groups", "stride"), GROUPED)
def test_grouped_lowering_matches_xla(lowering, batch, h, w, c, groups, stride):
    x, kernel = _case(batch, h, w, c, c, 3, groups)
    expected = _reference_conv(x, kernel, stride, 1, groups)
    conv = jax.jit(lambda a, b: conv_ops.conv2d(a, b, stride=stride, padding=1, groups=groups,
                                           policy=ConvPolicy(lowering=lowering)))
    actual = conv(x, kernel)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) <= _bound(x, kernel, stride, 1, groups)


# (batch, H, W, cin, cout, kernel, stride, padding): the dense convs of the model.
DENSE = [
    (1, 13, 11, 32, 48, 1, 1, 0),
    (2, 13, 11, 32, 48, 1, 2, 0),
    (1, 15, 9, 16, 24, 3, 1, 1),
    (1, 15, 9, 16, 24, 3, 2, 1),
    (2, 23, 19, 3, 16, 7, 2, 3),
    (2, 14, 14, 64, 64, 3, 1, 1),
    (1, 1, 1, 8, 4, 3, 1, 1),  # a single pixel: one Winograd tile, mostly padding
    (1, 2, 9, 8, 4, 3, 1, 2),
    (1, 10, 7, 8, 4, 3, 1, 0),
]


@pytest.mark.parametrize("lowering", ["matmul", "winograd", "auto"])
@pytest.mark.parametrize(("batch", "h", "w", "cin", "cout", "k", "stride", "padding"), DENSE)
def test_dense_lowering_matches_xla(lowering, batch, h, w, cin, cout, k, stride, padding):
    x, kernel = _case(batch, h, w, cin, cout, k, 1)
    expected = _reference_conv(x, kernel, stride, padding, 1)
    conv = jax.jit(lambda a, b: conv_ops.conv2d(a, b, stride=stride, padding=padding,
                                           policy=ConvPolicy(lowering=lowering)))
    actual = conv(x, kernel)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) <= _bound(x, kernel, stride, padding, 1)


def _primitives(fn, *args) -> set[str]:
    return {eqn.primitive.name for eqn in jax.make_jaxpr(fn)(*args).eqns}


def test_auto_lowering_is_chosen_by_backend_and_shape():
    # The compiled CPU kernel comes first for grouped 3x3 convs where it loaded
    # (tests/test_cpu_kernels.py); the pure-XLA choices behind it:
    ffi = "ffi" if cpu_kernel.available() else None
    assert AUTO.select((3, 3, 4, 128), groups=32, backend="cpu") == (ffi or "shifted_taps")
    assert AUTO.select((3, 3, 16, 512), groups=32, backend="cpu") == (ffi or "winograd")
    assert NO_FFI.select((3, 3, 4, 128), groups=32, backend="cpu") == "shifted_taps"
    assert NO_FFI.select((3, 3, 8, 256), groups=32, backend="cpu") == "shifted_taps"
    assert NO_FFI.select((3, 3, 16, 512), groups=32, backend="cpu") == "winograd"
    assert NO_FFI.select((3, 3, 16, 512), groups=32, stride=2, backend="cpu") == "group_chunks"
    assert NO_FFI.select((3, 3, 16, 128), groups=8, stride=2, backend="cpu") == "xla"
    # Dense 3x3 convs: the compiled kernel first (it takes stride 2 and small maps), then
    # Winograd at stride 1, XLA's native conv at stride 2. 1x1 convs: the kernel's GEMM,
    # then XLA's matmul.
    dense_ffi = "ffi" if cpu_kernel.available() else None
    assert AUTO.select((1, 1, 256, 64), backend="cpu") == (dense_ffi or "matmul")
    assert AUTO.select((3, 3, 64, 64), backend="cpu") == (dense_ffi or "winograd")
    assert AUTO.select((3, 3, 64, 64), stride=2, backend="cpu") == (dense_ffi or "xla")
    assert NO_FFI.select((3, 3, 64, 64), backend="cpu") == "winograd"
    assert NO_FFI.select((3, 3, 64, 64), stride=2, backend="cpu") == "xla"
    assert NO_FFI.select((1, 1, 256, 64), backend="cpu") == "matmul"
    # The 7x7 stem over RGB: the kernel's stem form, else XLA's conv.
    assert AUTO.select((7, 7, 3, 64), stride=2, backend="cpu") == (dense_ffi or "xla")
    assert NO_FFI.select((7, 7, 3, 64), stride=2, backend="cpu") == "xla"
    assert ConvPolicy(stem=False).select((7, 7, 3, 64), stride=2, backend="cpu") == "xla"
    for backend in ("gpu", "tpu"):
        assert AUTO.select((3, 3, 4, 128), groups=32, backend=backend) == "xla"
        assert AUTO.select((1, 1, 256, 64), backend=backend) == "xla"
        assert AUTO.select((3, 3, 64, 64), backend=backend) == "xla"
    if jax.default_backend() == "cpu":  # the choice really reaches the traced program
        x, kernel = _case(1, 8, 8, 128, 128, 3, 32)
        prims = _primitives(lambda a, b: conv_ops.conv2d(a, b, padding=1, groups=32), x, kernel)
        assert "conv_general_dilated" not in prims
        prims = _primitives(lambda a, b: conv_ops.conv2d(a, b, padding=1, groups=32,
                                                         policy=ConvPolicy(lowering="xla")),
                            x, kernel)
        assert "conv_general_dilated" in prims


@pytest.mark.parametrize("groups", [1, 32])
def test_winograd_is_differentiated_as_the_direct_conv(groups):
    """Evaluation runs Winograd; gradients (training) go through the direct conv."""
    x, kernel = _case(2, 9, 7, 512, 512, 3, groups, seed=5)
    conv = functools.partial(conv_ops.conv2d, padding=1, groups=groups,
                             policy=ConvPolicy(lowering="winograd"))
    program = jax.jit(conv).lower(x, kernel).as_text()
    grads = jax.grad(lambda a, b: jnp.sum(jnp.sin(conv(a, b))), argnums=(0, 1))(x, kernel)
    assert "convolution" not in program and "dot_general" in program
    direct = functools.partial(conv_ops.conv2d, padding=1, groups=groups, policy=ConvPolicy(
        lowering="group_chunks" if groups > 1 else "xla"))
    expected = jax.grad(lambda a, b: jnp.sum(jnp.sin(direct(a, b))), argnums=(0, 1))(x, kernel)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_excluded_lowerings_fall_back_to_the_next_preference():
    direct = ConvPolicy(exclude={"winograd", "ffi"})
    assert direct.select((3, 3, 64, 64), backend="cpu") == "xla"
    assert direct.select((3, 3, 16, 512), groups=32, backend="cpu") == "group_chunks"
    assert direct.select((1, 1, 64, 64), backend="cpu") == "matmul"
    assert NO_FFI.select((3, 3, 64, 64), backend="cpu") == "winograd"
    with pytest.raises(ValueError, match="unknown conv lowering 'wino'"):
        ConvPolicy(exclude=["wino"])


def test_unknown_lowering_is_rejected():
    x, kernel = _case(1, 4, 4, 8, 8, 3, 1)
    with pytest.raises(ValueError, match="unknown conv lowering"):
        conv_ops.conv2d(x, kernel, policy=ConvPolicy(lowering="fft"))
    with pytest.raises(ValueError, match="unknown conv lowering"):
        ConvPolicy(lowering="fft")


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d",
                                  shrunk("resnext101_32x16d"), shrunk("resnext101_32x48d")])
def test_folded_model_matches_model_and_torchvision(name):
    reference = torch_model(name, seed=3)
    model = flax_model_from_torch(name, reference)
    x = random_images(2, 97, 131, seed=1)
    with torch.no_grad():
        expected = reference(to_nchw(x)).numpy()

    graphdef, state = nnx.split(model)
    features = jax.jit(lambda s, a: nnx.merge(graphdef, s).forward_features(a))(state, x)
    logits = model.forward_head(features["pre_logits"])

    folded = optimize_for_inference(model)
    folded_logits = np.asarray(folded(x))
    assert relative_error(folded_logits, expected) <= RTOL
    assert relative_error(folded_logits, logits) <= RTOL
    np.testing.assert_array_equal(folded_logits.argmax(-1), expected.argmax(-1))

    folded_features = folded.forward_features(x)
    assert set(folded_features) == set(features)
    for key, value in features.items():
        assert folded_features[key].shape == value.shape, key
        assert relative_error(folded_features[key], value) <= RTOL, key

    # The model is untouched (still eval mode, same logits) and the folded one is a pytree.
    assert relative_error(model(x[:1]), logits[:1]) <= RTOL
    through_jit = jax.jit(lambda f, a: f(a))(folded, x)
    assert relative_error(through_jit, folded_logits) <= 1e-6
    leaves = jax.tree_util.tree_leaves(folded)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    assert isinstance(jax.tree_util.tree_map(lambda a: a, folded), FoldedResNet)
    # One forward: the folded model is the same ResNet module tree, without BatchNorms.
    module = folded.module()
    assert type(module) is type(model)
    assert not any(isinstance(m, BatchNorm) for _, m in nnx.iter_graph(module))
    assert module.layer1[0].conv1.bias is not None


def test_folded_model_checks_its_input():
    model = flax_model_from_torch("resnet18", torch_model("resnet18"))
    folded = optimize_for_inference(model)
    with pytest.raises(ValueError, match="NCHW"):
        folded(jnp.zeros((1, 3, 32, 32)))


def test_folded_model_is_traced_again_under_another_lowering():
    """The folded model's cached jit follows its convs' policy: a program traced under one
    policy is not reused under another (A/B benchmarks in one process depend on it)."""
    model = flax_model_from_torch("resnet18", torch_model("resnet18"))
    folded = optimize_for_inference(model)
    native_folded = optimize_for_inference(model, policy=ConvPolicy(lowering="xla"))
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)

    def convolutions(f) -> int:
        return jax.make_jaxpr(lambda f, a: f(a))(f, x).pretty_print().count(
            "conv_general_dilated")

    automatic = convolutions(folded)
    native = convolutions(native_folded)
    assert native == 20  # every conv of resnet18 as XLA's own
    if jax.default_backend() == "cpu":
        assert automatic < native  # 1x1 convs as matmuls, 3x3 stride-1 convs as Winograd
    assert convolutions(folded) == automatic
    # The same jitted apply, called on both: each gets its own program.
    np.testing.assert_allclose(folded(x), native_folded(x), rtol=RTOL, atol=1e-6)
    assert convolutions(native_folded) == native


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="Winograd is a CPU lowering")
def test_prepared_winograd_kernels_compute_the_same_conv():
    """A kernel transformed once (inference) gives the conv of the in-program transform; it is
    ignored where another lowering runs, and derivatives stay those of the direct conv."""
    x, kernel = _case(2, 9, 7, 64, 64, 3, 1, seed=7)
    winograd_policy = ConvPolicy(lowering="winograd")
    prepared = conv_ops.prepare_kernel(kernel, groups=1, policy=winograd_policy)
    assert set(prepared) == {"winograd"} and len(prepared["winograd"]) == 16
    transformed = prepared["winograd"]
    conv = functools.partial(conv_ops.conv2d, padding=1, policy=winograd_policy)
    expected = conv(x, kernel)
    got = conv(x, kernel, prepared=prepared)
    # The prepared tiles are the matmul operands: the kernel itself is not read.
    nan_kernel = jnp.full_like(kernel, jnp.nan)
    without_kernel = jax.jit(lambda a, k, t: conv(a, k, prepared={"winograd": t}))(
        x, nan_kernel, transformed)
    assert relative_error(got, expected) <= RTOL
    np.testing.assert_array_equal(without_kernel, got)
    # Under another lowering the prepared kernel is not used (here: a garbage one).
    garbage = {"winograd": tuple(jnp.full_like(t, jnp.nan) for t in transformed)}
    assert np.isfinite(np.asarray(conv(x, kernel, prepared=garbage,
                                       policy=ConvPolicy(lowering="xla")))).all()
    # Gradients: the direct conv's, whatever was prepared.
    def loss(k, prepared):
        return jnp.sum(jnp.sin(conv(x, k, prepared=prepared)))

    grad_prepared = jax.grad(loss)(kernel, prepared)
    grad_plain = jax.grad(loss)(kernel, None)
    np.testing.assert_array_equal(grad_prepared, grad_plain)
    with pytest.raises(ValueError, match="expected 16 arrays"):
        winograd.conv_winograd(x, kernel, 1, 1, transformed[:15])
    # Float32 kernels only; XLA's matmuls (1x1) and convs (stride 2) have nothing to prepare.
    assert conv_ops.prepare_kernel(kernel.astype(jnp.bfloat16)) is None
    assert conv_ops.prepare_kernel(jnp.zeros((1, 1, 64, 64)), policy=NO_FFI) is None
    assert conv_ops.prepare_kernel(kernel, stride=2, policy=NO_FFI) is None


@pytest.mark.skipif(not cpu_kernel.available(), reason="the compiled CPU kernel "
                    f"is not loaded: {cpu_kernel.unavailable_reasons()}")
@pytest.mark.parametrize("size, stride, groups",
                         [(3, 1, 1), (3, 2, 1), (3, 1, 32), (1, 1, 1), (1, 2, 1)])
def test_prepared_blocked_kernels_compute_the_same_conv(size, stride, groups):
    """The compiled kernel's weight layout made once (inference) gives the conv computed with
    the layout made in the program; the kernel itself is then not read; gradients are the
    direct conv's. A dense 3x3 stride-1 kernel also gets Winograd's tiles, for the larger maps
    the compiled kernel leaves to Winograd; a 1x1 kernel only the GEMM's panels."""
    x, kernel = _case(1, 7, 7, 128, 128, size, groups, seed=8)
    prepared = conv_ops.prepare_kernel(kernel, stride=stride, groups=groups)
    expected_forms = {"ffi", "winograd"} if (size, stride, groups) == (3, 1, 1) else {"ffi"}
    assert set(prepared) == expected_forms
    conv = functools.partial(conv_ops.conv2d, stride=stride, padding=size // 2, groups=groups)
    plain = jax.jit(conv)(x, kernel)
    assert "resnext_flax_direct_conv" in jax.jit(conv).lower(x, kernel).as_text()
    nan_kernel = jnp.full_like(kernel, jnp.nan)
    got = jax.jit(lambda a, k, p: conv(a, k, prepared=p))(x, nan_kernel, prepared)
    np.testing.assert_array_equal(got, plain)

    def loss(k, prepared):
        return jnp.sum(jnp.sin(conv(x, k, prepared=prepared)))

    np.testing.assert_array_equal(jax.grad(loss)(kernel, prepared), jax.grad(loss)(kernel, None))


def test_optimized_model_prepares_kernels_once():
    model = flax_model_from_torch("resnet18", torch_model("resnet18", seed=4))
    folded = optimize_for_inference(model)
    convs = [m for _, m in nnx.iter_graph(folded.module()) if hasattr(m, "prepared_for")]
    prepared = collections.Counter(c.prepared_for for c in convs if c.prepared is not None)
    # The 13 3x3 stride-1 convs get Winograd's tiles; with the compiled kernel, those, the
    # 3 stride-2 3x3 convs, the 3 1x1 (downsample) convs and the 7x7 stem conv also get its
    # weight layout.
    if jax.default_backend() != "cpu":
        assert not prepared
    elif cpu_kernel.available():
        assert prepared == {("ffi", "winograd"): 13, ("ffi",): 7}
    else:
        assert prepared == {("winograd",): 13}
    x = random_images(1, 64, 64, seed=2)
    plain = FoldedResNet.from_module(fold_batchnorm(model))
    assert relative_error(folded(x), plain(x)) <= RTOL
    # The 3 downsample 1x1 convs (+ folded bias) run in the kernel's GEMM with its epilogue.
    program = jax.jit(lambda f, a: f(a)).lower(folded, x).as_text()
    fused = 3 if jax.default_backend() == "cpu" and cpu_kernel.available() else 0
    assert program.count("resnext_flax_pointwise_conv") == fused


def test_benchmark_script_runs_and_agrees(tmp_path):
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "benchmark.py"
    spec = importlib.util.spec_from_file_location("resnext_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    out = tmp_path / "bench.json"
    benchmark.main(["--models", "resnet18", "--batch-sizes", "1", "--size", "40",
                    "--repeats", "1", "--warmup", "1", "--json", str(out)])
    (case,) = json.loads(out.read_text())["cases"]
    assert set(case["results"]) == {"jax_folded", "torch_nchw", "torch_channels_last"}
    jax_result = case["results"]["jax_folded"]
    assert jax_result["rel_err_vs_torch"] <= RTOL
    assert jax_result["images_per_s"] > 0 and jax_result["compile_s"] > 0


def test_conv_policy_is_validated_and_hashable():
    assert ConvPolicy() == AUTO and hash(ConvPolicy()) == hash(AUTO)
    assert ConvPolicy(exclude=["ffi"]) == NO_FFI and NO_FFI.exclude == frozenset({"ffi"})
    assert {AUTO: 1, NO_FFI: 2}[ConvPolicy(exclude=("ffi",))] == 2
    assert AUTO.without("winograd") == ConvPolicy(exclude={"winograd"})
    with pytest.raises(TypeError, match="collection of lowering names"):
        ConvPolicy(exclude="ffi")
    with pytest.raises(ValueError, match="both chosen and excluded"):
        ConvPolicy(lowering="winograd", exclude={"winograd"})
    for fallback in ("xla", "auto"):
        with pytest.raises(ValueError, match="cannot be excluded"):
            ConvPolicy(exclude={fallback})
    with pytest.raises(ValueError, match="direct_max_pixels"):
        ConvPolicy(direct_max_pixels=-1)
    with pytest.raises(TypeError, match="fuse must be a bool"):
        ConvPolicy(fuse=1)
    with pytest.raises(TypeError, match="policy must be a ConvPolicy"):
        Conv(8, 8, 3, policy="xla", rngs=nnx.Rngs(0))


def test_conv_policy_lives_in_the_graph_definition():
    """The policy is a static attribute of each conv: models with different policies have
    different graph definitions (so the jitted apply traces each), equal ones share one."""
    model = flax_model_from_torch("resnet18", torch_model("resnet18"))
    native = with_conv_policy(model, XLA_POLICY)
    assert all(c.policy == XLA_POLICY for _, c in nnx.iter_graph(native) if isinstance(c, Conv))
    assert all(c.policy == AUTO for _, c in nnx.iter_graph(model) if isinstance(c, Conv))
    assert nnx.graphdef(native) != nnx.graphdef(model)
    assert nnx.graphdef(with_conv_policy(model, XLA_POLICY)) == nnx.graphdef(native)
    x = random_images(1, 40, 40, seed=5)
    graphdef, state = nnx.split(native)
    forward = jax.jit(ModuleForward(graphdef))
    program = forward.lower(state, x).as_text()
    assert program.count("convolution(") == 20
    assert relative_error(forward(state, x), model(x)) <= RTOL


def test_xla_policy_runs_without_the_lowering_package():
    """Under ConvPolicy(lowering="xla") neither the folded nor the plain model imports
    ``nn.lowering`` (the compiled kernel's loader included), and their programs hold none of
    its custom calls."""
    script = textwrap.dedent("""
        import sys
        import jax, jax.numpy as jnp, numpy as np
        import resnext_flax
        from resnext_flax.models.folding import optimize_for_inference
        from resnext_flax.models.functional import pure_forward
        from resnext_flax.nn.layers import with_conv_policy
        from resnext_flax.nn.policy import XLA_POLICY
        model = resnext_flax.create_model("resnet50", num_classes=10)
        model.eval()
        x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 32, 32, 3)), jnp.float32)
        folded = optimize_for_inference(model, policy=XLA_POLICY)
        fn, state = pure_forward(with_conv_policy(model, XLA_POLICY))
        texts = [jax.jit(lambda f, a: f(a)).lower(folded, x).as_text(),
                 jax.jit(fn).lower(state, x).as_text()]
        np.testing.assert_allclose(folded(x), jax.jit(fn)(state, x), rtol=1e-4, atol=1e-5)
        loaded = sorted(m for m in sys.modules if m.startswith("resnext_flax.nn.lowering"))
        assert not loaded, loaded
        print("PROGRAM", repr(texts))
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    texts = ast.literal_eval(proc.stdout.split("PROGRAM ", 1)[1].strip())
    for text in texts:
        assert "convolution" in text
        assert not [t for t in cpu_kernel.TARGETS if t in text]
    # The automatic policy does use them (where the kernel loaded).
    if jax.default_backend() == "cpu" and cpu_kernel.available():
        model = flax_model_from_torch("resnet18", torch_model("resnet18"))
        text = jax.jit(lambda f, a: f(a)).lower(optimize_for_inference(model),
                                                random_images(1, 32, 32)).as_text()
        assert all(t in text for t in cpu_kernel.TARGETS)


def test_only_the_conv_layer_imports_the_lowering_package():
    """``nn.lowering`` stays optional: outside it only ``nn.layers`` (lazily, on the CPU path)
    and ``nn.policy`` (lazily, for the compiled kernel's capabilities) import it."""
    package = pathlib.Path(resnext_flax.__file__).parent
    importers = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.startswith("resnext_flax.nn.lowering") for n in names):
                importers.add(path.relative_to(package).as_posix())
    outside = {p for p in importers if not p.startswith("nn/lowering/")}
    assert outside == {"nn/layers.py", "nn/policy.py"}, outside


def test_predictor_and_feature_extractor_take_a_policy():
    """With a policy, Predictor and FeatureExtractor run the optimized model under it: the same
    outputs as the model's, and under the pure-XLA policy none of the library's custom calls."""
    from resnext_flax.inference import FeatureExtractor, Predictor

    model = flax_model_from_torch("resnet18", torch_model("resnet18", seed=6))
    x = random_images(2, 48, 48, seed=3)
    plain = Predictor.from_model(model)(x)
    for policy in (AUTO, XLA_POLICY):
        predictor = Predictor.from_model(model, policy=policy)
        got = predictor(x)
        assert relative_error(got.logits, plain.logits) <= RTOL
        np.testing.assert_array_equal(got.indices, plain.indices)
        program = jax.jit(predictor.apply_fn).lower(predictor.variables, x).as_text()
        used = [t for t in cpu_kernel.TARGETS if t in program]
        if policy == XLA_POLICY:
            assert not used
        elif jax.default_backend() == "cpu" and cpu_kernel.available():
            assert used
    expected = model.forward_features(x)
    features = FeatureExtractor(model, ("layer4", "pre_logits"), policy=XLA_POLICY)(x)
    for name, value in features.items():
        assert relative_error(value, expected[name]) <= RTOL, name


def test_fusion_is_a_policy_choice():
    """``optimize_for_inference`` fuses (inference blocks, the GEMM's epilogue, the residual
    boundary) only under ``fuse=True``; without it the folded model keeps the plain blocks.
    Both compute the model's logits."""
    from resnext_flax.models.fused import FusedBlock

    model = flax_model_from_torch("resnet50", torch_model("resnet50", seed=2))
    x = random_images(1, 40, 40, seed=4)
    expected = model(x)
    fused = optimize_for_inference(model)
    unfused = optimize_for_inference(model, policy=ConvPolicy(fuse=False))
    assert isinstance(fused.module().layer2[1], FusedBlock)
    assert fused.module().layer2[1].conv_names == ("conv1", "conv2", "conv3")
    assert type(unfused.module().layer2[1]) is type(model.layer2[1])
    for folded in (fused, unfused):
        assert relative_error(folded(x), expected) <= RTOL
    text = jax.jit(lambda f, a: f(a)).lower(unfused, x).as_text()
    assert "resnext_flax_pointwise_conv" not in text
    assert "resnext_flax_fusion_boundary" not in text
    if jax.default_backend() == "cpu" and cpu_kernel.available():
        text = jax.jit(lambda f, a: f(a)).lower(fused, x).as_text()
        assert text.count("resnext_flax_fusion_boundary") == 16  # one per block
        assert "resnext_flax_pointwise_conv" in text
