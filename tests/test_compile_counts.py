"""Preparing a model costs its arithmetic, not a compiled program per operation and shape:
optimizing compiles a program per distinct kernel shape (none for a second model of the
architecture), loading a checkpoint compiles nothing that grows with depth, and the cheap
abstract build describes the same module as ``nnx.eval_shape``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import resnext_flax
from resnext_flax.models.folding import fold_conv_bn, optimize_for_inference
from resnext_flax.models.resnet import ResNet
from resnext_flax.models.variants import get_spec
from resnext_flax.nn.init import abstract_model
from resnext_flax.nn.layers import BatchNorm, Conv
from resnext_flax.weights.torch_port import to_torch_state_dict

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def counted_compiles() -> Iterator[list[str]]:
    """The XLA compilations inside the block (one entry each)."""
    seen: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == _COMPILE_EVENT:
            seen.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _kernel_shapes(model: nnx.Module) -> set[tuple[int, ...]]:
    return {tuple(m.kernel.get_value().shape) for _, m in nnx.iter_graph(model)
            if isinstance(m, Conv)}


def test_a_second_model_of_an_architecture_optimizes_without_compiling():
    first = resnext_flax.create_model("resnet18", rngs=nnx.Rngs(0))
    second = resnext_flax.create_model("resnet18", rngs=nnx.Rngs(1))
    second.eval()  # the mode is no part of what folding compiles
    optimize_for_inference(first)
    with counted_compiles() as compiles:
        folded = optimize_for_inference(second)
        jax.block_until_ready(folded.state)
    assert compiles == []


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_optimizing_compiles_a_program_per_kernel_shape_not_per_layer(name):
    model = resnext_flax.create_model(name, rngs=nnx.Rngs(0))
    shapes = _kernel_shapes(model)
    winograd_shapes = {s for s in shapes if s[:2] == (3, 3)}
    jax.clear_caches()
    with counted_compiles() as compiles:
        jax.block_until_ready(optimize_for_inference(model).state)
    # A scaling per kernel shape, Winograd's transform per 3x3 shape, and two programs over
    # every BatchNorm's vectors: resnet34 (36 convs) the same as resnet18 (20 convs).
    assert len(compiles) <= len(shapes) + len(winograd_shapes) + 2


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for name in ("resnet18", "resnet50"):
        model = resnext_flax.create_model(name, rngs=nnx.Rngs(0))
        paths[name] = str(folder / f"{name}.safetensors")
        resnext_flax.save_checkpoint(model, paths[name])
        paths[f"{name}.pth"] = str(folder / f"{name}.pth")
        torch.save({k: torch.from_numpy(v) for k, v in to_torch_state_dict(model).items()},
                   paths[f"{name}.pth"])
    return paths


@pytest.mark.parametrize("suffix", ["", ".pth"])
def test_loading_compiles_nothing(checkpoints, suffix):
    """Reading, relayout and casts run on the host, and the empty model is built without
    random keys or tracing: a program per tensor shape (or per layer) would show here."""
    counts = {}
    for name in ("resnet18", "resnet50"):
        with counted_compiles() as compiles:
            model = resnext_flax.load_model(checkpoints[name + suffix])
            jax.block_until_ready(nnx.state(model))
        counts[name] = len(compiles)
    assert counts == {"resnet18": 0, "resnet50": 0}


def test_loaded_values_are_the_files_values(checkpoints):
    model = resnext_flax.load_model(checkpoints["resnet18.pth"], dtype=None)
    source = torch.load(checkpoints["resnet18.pth"])
    np.testing.assert_array_equal(np.asarray(model.conv1.kernel.get_value()),
                                  source["conv1.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(model.fc.kernel.get_value()),
                                  source["fc.weight"].numpy().T)


@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d"])
def test_abstract_model_describes_what_eval_shape_does(name):
    def build(rngs: nnx.Rngs) -> ResNet:
        return ResNet(get_spec(name), num_classes=7, param_dtype=jnp.bfloat16, rngs=rngs)

    cheap, traced = abstract_model(build), nnx.eval_shape(lambda: build(nnx.Rngs(0)))
    assert nnx.graphdef(cheap) == nnx.graphdef(traced)
    leaves = [jax.tree.leaves(nnx.state(m)) for m in (cheap, traced)]
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in leaves[0])
    assert [(a.shape, a.dtype) for a in leaves[0]] == [(b.shape, b.dtype) for b in leaves[1]]


def test_a_biased_conv_keeps_its_bias_when_folded():
    conv = Conv(8, 16, 3, padding=1, use_bias=True, rngs=nnx.Rngs(0))
    conv.bias.set_value(jnp.linspace(-1.0, 1.0, 16))
    bn = BatchNorm(16, use_running_average=True)
    rng = np.random.default_rng(0)
    for variable, low in ((bn.scale, 0.5), (bn.var, 0.5)):
        variable.set_value(jnp.asarray(rng.uniform(low, 2.0, 16), jnp.float32))
    for variable in (bn.bias, bn.mean):
        variable.set_value(jnp.asarray(rng.normal(size=16), jnp.float32))
    x = jnp.asarray(rng.normal(size=(2, 9, 9, 8)), jnp.float32)
    np.testing.assert_allclose(fold_conv_bn(conv, bn)(x), bn(conv(x)), rtol=1e-5, atol=1e-5)
