"""End to end on real photographs: this library's preprocessing + jitted predict equals
torchvision's own pipeline (``weights.transforms()`` + the model, same random weights and
random BatchNorm statistics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_reference
from pretrained_helpers import (
    sample_image_paths,
    save_torchvision_file,
    torch_top_k,
    torchvision_pipeline,
)
from torchvision.models import get_model_weights

import resnext_flax
from resnext_flax import Predictor
from resnext_flax.metadata import Preprocessing
from resnext_flax.models.folding import fold_batchnorm, is_folded
from resnext_flax.models.programs import forward_program
from resnext_flax.preprocess import preprocess

# A plain ResNet (weights V1: resize 256) and a grouped ResNeXt (DEFAULT = V2: resize 232).
MODELS = ["resnet18", "resnext50_32x4d"]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """name -> (torch model, .pth path, Predictor, torchvision inputs NCHW, torchvision logits)."""
    directory = tmp_path_factory.mktemp("weights")
    paths = sample_image_paths()
    out = {}
    for seed, name in enumerate(MODELS):
        model = torch_reference.torch_model(name, seed=seed)
        pth = save_torchvision_file(model, directory, name)
        predictor = Predictor.from_pretrained(name, checkpoint=pth)
        inputs, logits = torchvision_pipeline(model, name, paths)
        out[name] = (model, pth, predictor, inputs, logits)
    return out


@pytest.mark.parametrize("name", MODELS)
def test_preprocessed_batch_equals_torchvision(pipelines, name):
    *_, predictor, inputs, _ = pipelines[name]
    ours = preprocess(sample_image_paths(), predictor.preprocessing)
    np.testing.assert_array_equal(ours, inputs.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("name", MODELS)
def test_classify_photos_matches_torchvision(pipelines, name):
    _, _, predictor, _, expected_logits = pipelines[name]
    result = predictor.classify(sample_image_paths())
    error = torch_reference.relative_error(result.logits, expected_logits)
    print(f"{name}: logits relative error {error:.2e}")
    assert error <= 1e-5
    expected_p, expected_i = torch_top_k(expected_logits, 5)
    np.testing.assert_array_equal(result.indices, expected_i)
    assert torch_reference.relative_error(result.probabilities, expected_p) <= 1e-5
    categories = get_model_weights(name).DEFAULT.meta["categories"]
    assert result.labels == tuple(tuple(categories[i] for i in row) for row in expected_i)
    assert [label for label, _ in result.top(0)] == list(result.labels[0])


def test_compiled_once_per_shape(pipelines):
    predictor = pipelines["resnet18"][2]
    batch = preprocess(sample_image_paths(), predictor.preprocessing)
    first = predictor(batch)
    size = forward_program._cache_size()
    second = predictor(jnp.asarray(batch))
    assert forward_program._cache_size() == size  # no retrace for the same shape
    np.testing.assert_array_equal(first.logits, second.logits)


def mean_color_forward(weights, images):
    """A tiny stand-in forward (pooled colour times a matrix): compiles in milliseconds."""
    return jnp.mean(images, axis=(1, 2)) @ weights


def test_padded_batches_equal_one_batch():
    weights = jnp.asarray(np.random.default_rng(0).standard_normal((3, 7)), jnp.float32)
    small = Preprocessing(resize_size=40, crop_size=32)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (50 + i, 45, 3), dtype=np.uint8) for i in range(5)]
    chunked = Predictor(mean_color_forward, weights, preprocessing=small, top_k=10,
                        batch_size=2).classify(images)  # 2 + 2 + 1 padded to 2
    single = Predictor(mean_color_forward, weights, preprocessing=small, top_k=10,
                       batch_size=5).classify(images)
    expected = np.asarray(mean_color_forward(weights, preprocess(images, small)))
    assert chunked.logits.shape == (5, 7) and chunked.indices.shape == (5, 7)  # k clamped
    np.testing.assert_allclose(chunked.logits, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(single.logits, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(chunked.indices, single.indices)
    assert chunked.labels[0][0].startswith("class ")  # no category names given
    assert len(chunked) == 5


def test_predictor_runs_eval_mode_and_leaves_the_model_alone(pipelines):
    torch_model, pth = pipelines["resnet18"][:2]
    model = resnext_flax.from_pretrained("resnet18", checkpoint=pth)
    model.train()  # batch statistics would give different logits
    x = torch_reference.random_images(2, 32, 32)
    out = Predictor.from_model(model)(x)
    assert not model.bn1.use_running_average  # still in training mode
    with torch.no_grad():
        expected = torch_model(torch_reference.to_nchw(x)).numpy()
    assert torch_reference.relative_error(out.logits, expected) <= 1e-5


def test_custom_forward_function():
    """The seam for other forward functions (e.g. BatchNorm folded into the convs)."""
    weights = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)), jnp.float32)
    apply_fn = mean_color_forward
    x = torch_reference.random_images(2, 5, 5)
    predictor = Predictor(apply_fn, weights, categories=["a", "b", "c", "d"], top_k=2)
    result = predictor(x)
    expected = np.asarray(apply_fn(weights, x))
    np.testing.assert_allclose(result.logits, expected, rtol=1e-6)
    np.testing.assert_array_equal(result.indices, np.argsort(-expected, axis=1)[:, :2])
    assert all(label in "abcd" for row in result.labels for label in row)
    np.testing.assert_allclose(
        result.probabilities, np.asarray(jax.nn.softmax(expected))[
            np.arange(2)[:, None], result.indices], rtol=1e-6)


def test_predictor_errors():
    predictor = Predictor(lambda w, x: x.mean((1, 2)) * w, 1.0)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        predictor(np.zeros((3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="top_k"):
        Predictor(lambda w, x: x, 1.0, top_k=0)


def test_predictor_takes_an_optimized_model_and_refuses_a_headless_one():
    model = resnext_flax.resnet18(num_classes=4)
    model.eval()
    images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    folded = resnext_flax.optimize_for_inference(model)
    got = resnext_flax.Predictor.from_model(folded)(images).logits
    np.testing.assert_allclose(got, np.asarray(model(images)), rtol=1e-5, atol=1e-5)
    assert resnext_flax.FeatureExtractor(folded).embed(images).shape == (2, 512)
    for call in (lambda: resnext_flax.optimize_for_inference(folded),
                 lambda: resnext_flax.Predictor.from_model(folded,
                                                           policy=resnext_flax.ConvPolicy())):
        with pytest.raises(TypeError, match="already optimized"):
            call()
    with pytest.raises(ValueError, match="headless"):
        resnext_flax.Predictor.from_model(resnext_flax.resnet18(num_classes=0))


def test_a_folded_model_is_refused_where_it_cannot_serve(tmp_path):
    """A folded model has no BatchNorm statistics left: saving it would write a file that no
    loader reads, and folding it again has nothing to fold; both say so instead."""
    model = resnext_flax.resnet18(num_classes=4)
    optimized = resnext_flax.optimize_for_inference(model)
    with pytest.raises(TypeError, match="already optimized"):
        fold_batchnorm(optimized)
    for folded in (optimized, optimized.module(), fold_batchnorm(model)):
        assert is_folded(folded)
        with pytest.raises(TypeError, match="save the model it was made from"):
            resnext_flax.save_checkpoint(folded, tmp_path / "folded.safetensors")
    assert not (tmp_path / "folded.safetensors").exists()
    assert not is_folded(model)
    resnext_flax.save_checkpoint(model, tmp_path / "model.safetensors")
