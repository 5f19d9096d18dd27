"""An eager ``model(x)`` runs one compiled program, shared by every wrapper of an equal model;
inside a trace the model runs as plain code; batches are padded to a few buckets."""

from __future__ import annotations

import copy

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
    to_nchw,
    torch_model,
)

import resnext_flax
from resnext_flax.compilation import report_compilation
from resnext_flax.inference import FeatureExtractor, Predictor, batch_bucket
from resnext_flax.models.programs import forward_program
from resnext_flax.models.resnet import FEATURE_NAMES, ResNet
from resnext_flax.nn.layers import Linear

NAME = "resnet18"
SIZE = 32
RTOL = 1e-5
FLOOR_MULTIPLE = 10.0


def programs() -> int:
    """How many (structure, method, shape) programs the shared forward has compiled."""
    return forward_program._cache_size()


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    return torch_model(NAME, seed=3, num_classes=10)


@pytest.fixture
def model(reference) -> resnext_flax.ResNet:
    return flax_model_from_torch(NAME, reference)


def _bound(torch_module: torch.nn.Module, x: np.ndarray, train: bool) -> float:
    """RTOL, or FLOOR_MULTIPLE x torch float32's own error against float64 on `x`."""
    single, double = copy.deepcopy(torch_module), copy.deepcopy(torch_module).double()
    single.train(train)
    double.train(train)
    with torch.no_grad():
        expected = double(to_nchw(x).double()).numpy()
        floor = relative_error(single(to_nchw(x)).numpy(), expected)
    return max(RTOL, FLOOR_MULTIPLE * floor)


def test_eager_call_is_one_program_matching_torch(model, reference):
    x = random_images(2, SIZE, SIZE, seed=1)
    before = programs()
    logits = model(x)
    assert programs() == before + 1  # the whole forward, not one program per op
    assert isinstance(logits, jax.Array)
    with torch.no_grad():
        expected = reference(to_nchw(x)).numpy()
    assert relative_error(logits, expected) <= _bound(reference, x, train=False)
    again = model(jnp.asarray(x))  # numpy and device inputs share the program
    assert programs() == before + 1
    np.testing.assert_array_equal(np.asarray(again), np.asarray(logits))
    features = model.forward_features(x)
    assert programs() == before + 2
    assert tuple(features) == FEATURE_NAMES
    head = np.asarray(features["pre_logits"]) @ np.asarray(model.fc.kernel[...]) + np.asarray(
        model.fc.bias[...])
    np.testing.assert_allclose(head, np.asarray(logits), rtol=1e-5, atol=1e-5)
    with jax.disable_jit():  # op by op, as plain code
        plain = model(x)
    assert programs() == before + 2
    assert relative_error(plain, expected) <= _bound(reference, x, train=False)


def test_eager_train_call_updates_batchnorm_statistics_as_torch(model, reference):
    torch_train = copy.deepcopy(reference).train()
    x = random_images(4, SIZE, SIZE, seed=2)
    model.train()
    logits = model(x)
    with torch.no_grad():
        expected = torch_train(to_nchw(x)).numpy()
    assert relative_error(logits, expected) <= _bound(reference, x, train=True)
    for ours, theirs in ((model.bn1, torch_train.bn1), (model.layer4[1].bn2,
                                                         torch_train.layer4[1].bn2)):
        for stat, torch_stat in (("mean", "running_mean"), ("var", "running_var")):
            updated = getattr(ours, stat).get_value()
            assert relative_error(updated, getattr(theirs, torch_stat).numpy()) <= 1e-5
    # The same call traced by nnx.jit gives the same output and the same statistics.
    twin = flax_model_from_torch(NAME, reference)
    twin.train()
    traced = nnx.jit(lambda m, images: m(images))(twin, x)
    np.testing.assert_allclose(np.asarray(traced), np.asarray(logits), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(twin.bn1.var.get_value(), model.bn1.var.get_value(),
                               rtol=1e-6)


def test_inside_a_trace_the_model_runs_as_plain_code(model):
    x = random_images(2, SIZE, SIZE, seed=4)
    eager = np.asarray(model(x))
    before = programs()
    jitted = jax.jit(lambda images: model(images))(x)
    via_nnx = nnx.jit(lambda m, images: m(images))(model, x)
    assert programs() == before  # traced inline, not through the shared program

    def loss(m):  # parameters traced, the input a concrete array
        return jnp.sum(m(x) ** 2)

    grads = nnx.grad(loss)(model)
    assert programs() == before
    assert np.isfinite(np.asarray(grads["conv1"]["kernel"][...])).all()
    np.testing.assert_allclose(np.asarray(jitted), eager, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(via_nnx), eager, rtol=1e-5, atol=1e-5)


def test_wrappers_of_an_equal_model_compile_nothing_new(model, reference):
    x = random_images(2, SIZE, SIZE, seed=5)
    expected = np.asarray(model(x))
    before = programs()
    assert np.array_equal(Predictor.from_model(model)(x).logits, expected)
    reloaded = flax_model_from_torch(NAME, torch_model(NAME, seed=9, num_classes=10))
    reloaded.train()  # an eval-mode wrapper keys the eval-mode program whatever the mode
    Predictor.from_model(reloaded)(x)
    assert not reloaded.bn1.use_running_average
    assert programs() == before  # same structure, mode, policy and shape: no compile

    first = FeatureExtractor(model, ("pre_logits", "layer2"))(x)
    assert programs() == before + 1
    second = FeatureExtractor(reloaded, ("pre_logits", "layer2"))(x)
    assert programs() == before + 1
    assert first["layer2"].shape == second["layer2"].shape

    folded = resnext_flax.optimize_for_inference(model)
    folded_logits = folded(x)
    assert programs() == before + 2
    np.testing.assert_allclose(Predictor.from_model(folded)(x).logits,
                               np.asarray(folded_logits), rtol=0, atol=0)
    Predictor.from_model(resnext_flax.optimize_for_inference(reloaded))(x)
    assert programs() == before + 2


@pytest.mark.parametrize(("n", "bucket"), [(1, 1), (2, 2), (3, 4), (5, 8), (33, 64),
                                           (64, 64), (65, 128), (200, 256)])
def test_batch_bucket(n, bucket):
    assert batch_bucket(n) == bucket


def test_new_batch_sizes_compile_once_per_bucket(model):
    images = random_images(8, SIZE, SIZE, seed=6)
    predictor = Predictor.from_model(model, top_k=3)
    exact = np.asarray(model(images))
    before = programs()
    with report_compilation("buckets", enabled=False) as report:
        for n in (5, 6, 7, 8):
            result = predictor(images[:n])
            assert result.logits.shape == (n, 10) and len(result.labels) == n
            np.testing.assert_allclose(result.logits, exact[:n], rtol=1e-5, atol=1e-5)
    assert programs() == before  # 5..8 all run as 8, compiled by model(images) already
    # Nothing else either (the padding is done on the host): only the top-k of the first call.
    assert report.compiled <= 1
    unpadded = Predictor.from_model(model, top_k=3, pad_batches=False)
    unpadded(images[:5])
    unpadded(images[:6])
    assert programs() == before + 2
    features = FeatureExtractor(model)(images[:3])
    assert features["pre_logits"].shape == (3, model.num_features)


def test_a_subclass_override_runs_once(model):
    """An override that calls super() runs outside the program, once, as under jit."""

    class Doubled(ResNet):
        def __call__(self, x):
            return super().__call__(x) * 2.0

    doubled = Doubled(model.spec, num_classes=10, rngs=nnx.Rngs(1))
    nnx.update(doubled, nnx.state(model))
    doubled.eval()
    x = random_images(1, SIZE, SIZE, seed=8)
    base = np.asarray(model(x))
    np.testing.assert_allclose(np.asarray(doubled(x)), 2 * base, rtol=1e-6, atol=1e-6)
    traced = nnx.jit(lambda m, images: m(images))(doubled, x)
    np.testing.assert_allclose(np.asarray(traced), 2 * base, rtol=1e-5, atol=1e-5)


def test_eager_train_call_writes_back_every_variable_it_changes(model):
    """A dropout head's RNG counter advances on every eager call, as under nnx.jit."""
    model.fc = nnx.Sequential(nnx.Dropout(0.5, rngs=nnx.Rngs(7)),
                              Linear(model.num_features, 10, rngs=nnx.Rngs(0)))
    model.train()
    x = random_images(2, SIZE, SIZE, seed=9)
    first, second = np.asarray(model(x)), np.asarray(model(x))
    assert not np.array_equal(first, second)  # a fresh dropout mask per call
    twin = nnx.clone(model)
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x)))
    twin.train()
    jitted = nnx.jit(lambda m, images: m(images))
    assert not np.array_equal(np.asarray(jitted(twin, x)), np.asarray(jitted(twin, x)))
