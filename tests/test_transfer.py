"""Transfer-learning helpers: embeddings and stage features equal torchvision's, and a new head
keeps the backbone and is initialized like torch's nn.Linear."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch_reference
from flax import nnx
from pretrained_helpers import sample_image_paths, save_torchvision_file

import resnext_flax
from resnext_flax import FeatureExtractor
from resnext_flax.models.resnet import replace_head
from resnext_flax.preprocess import preprocess
from resnext_flax.weights.catalog import get_weight_set


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    """(torch model, .pth path) with random weights and BN statistics."""
    model = torch_reference.torch_model("resnet18", seed=7)
    return model, save_torchvision_file(model, tmp_path_factory.mktemp("w"), "resnet18")


def test_embeddings_and_stages_match_torchvision(resnet18):
    torch_model, pth = resnet18
    model = resnext_flax.from_pretrained("resnet18", checkpoint=pth)
    images = preprocess(sample_image_paths(), get_weight_set("resnet18"))
    extractor = FeatureExtractor(model, names=("layer3", "pre_logits"))
    features = extractor(images)
    assert set(features) == {"layer3", "pre_logits"}
    assert features["layer3"].shape == (2, 14, 14, 256)
    np.testing.assert_array_equal(extractor.embed(images), features["pre_logits"])

    expected = torch_reference.torch_stages(torch_model, torch_reference.to_nchw(images))
    error3 = torch_reference.relative_error(features["layer3"], expected["layer3"])
    error = torch_reference.relative_error(features["pre_logits"], expected["pre_logits"])
    print(f"layer3 relative error {error3:.2e}, pre_logits {error:.2e}")
    assert error3 <= 1e-5 and error <= 1e-5


def test_feature_extractor_errors():
    model = nnx.eval_shape(lambda: resnext_flax.create_model("resnet18"))
    with pytest.raises(ValueError, match="unknown feature names"):
        FeatureExtractor(model, names=("layer5",))
    with pytest.raises(ValueError, match="without 'pre_logits'"):
        FeatureExtractor(model, names=("stem",)).embed(np.zeros((1, 32, 32, 3), np.float32))


def test_replace_head_keeps_backbone(resnet18, tmp_path):
    _, pth = resnet18
    model = resnext_flax.from_pretrained("resnet18", checkpoint=pth)
    before = resnext_flax.to_torch_state_dict(model)
    assert replace_head(model, 10, rngs=nnx.Rngs(1)) is model
    after = resnext_flax.to_torch_state_dict(model)
    assert model.num_classes == 10
    assert after["fc.weight"].shape == (10, 512) and after["fc.bias"].shape == (10,)
    assert after.keys() == before.keys()
    for key in before:
        if not key.startswith("fc."):
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    # The fine-tuned model saves and loads with its new class count.
    resnext_flax.save_checkpoint(model, tmp_path / "finetuned.safetensors")
    reloaded = resnext_flax.from_pretrained("resnet18",
                                            checkpoint=tmp_path / "finetuned.safetensors")
    assert reloaded.num_classes == 10
    np.testing.assert_array_equal(resnext_flax.to_torch_state_dict(reloaded)["fc.weight"],
                                  after["fc.weight"])


def test_new_head_init_is_torch_linear():
    """torch.nn.Linear: weight and bias uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    model = nnx.eval_shape(lambda: resnext_flax.create_model("resnet50"))
    replace_head(model, 1000, rngs=nnx.Rngs(0))
    kernel = np.asarray(model.fc.kernel.get_value())
    bias = np.asarray(model.fc.bias.get_value())
    assert kernel.shape == (2048, 1000) and kernel.dtype == np.float32
    bound = 1 / math.sqrt(2048)
    for values in (kernel.ravel(), bias):
        n = values.size
        assert np.abs(values).max() <= bound
        assert np.abs(values).max() > (1 - 10 / n) * bound  # fills the interval
        # uniform(-b, b) has std b / sqrt(3); the sample std's relative s.d. is sqrt(0.2 / n),
        # so 5 of those separate it from e.g. a normal(0, b) init (std b) at any n used here.
        assert abs(values.std() / (bound / math.sqrt(3)) - 1) < 5 * math.sqrt(0.2 / n)
        assert abs(values.mean()) < 5 * bound / math.sqrt(3 * n)
    assert not np.allclose(bias, 0)


def test_replace_head_errors():
    model = nnx.eval_shape(lambda: resnext_flax.create_model("resnet18"))
    with pytest.raises(ValueError, match="positive int"):
        replace_head(model, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="positive int"):
        replace_head(model, 2.5, rngs=nnx.Rngs(0))
