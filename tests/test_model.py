"""Model construction: the variant table, the public API, initialization, input checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import nnx
from torch_reference import WSL_WIDTHS, torch_architecture

import resnext_flax
from resnext_flax.models.resnet import FEATURE_NAMES
from resnext_flax.models.variants import VARIANTS

# torchvision's published parameter counts (weights enums' `num_params`), not computed here.
PUBLISHED_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
}
# The WSL ResNeXt-101s' counts as torchvision's ResNet class builds them (the paper rounds them
# to 193 M / 466 M / 829 M).
WSL_PARAMS = {
    "resnext101_32x16d": 194_026_792,
    "resnext101_32x32d": 468_530_472,
    "resnext101_32x48d": 828_411_176,
}


def count_params(model) -> int:
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_the_ten_torchvision_models_and_the_wsl_resnexts_are_listed():
    assert sorted(resnext_flax.list_models()) == sorted({**PUBLISHED_PARAMS, **WSL_PARAMS})
    assert set(PUBLISHED_PARAMS) <= set(torchvision.models.list_models())
    assert set(WSL_PARAMS) == set(WSL_WIDTHS)
    assert not set(WSL_PARAMS) & set(torchvision.models.list_models())


@pytest.mark.parametrize("name", resnext_flax.list_models())
def test_parameter_count_equals_torchvision(name: str):
    model = nnx.eval_shape(lambda: resnext_flax.create_model(name))
    with torch.device("meta"):  # shapes only: no random init of up to 828 M parameters
        reference = torch_architecture(name)
    assert count_params(model) == sum(p.numel() for p in reference.parameters())
    assert count_params(model) == {**PUBLISHED_PARAMS, **WSL_PARAMS}[name]


def test_every_variant_has_an_explicit_constructor():
    for name in resnext_flax.list_models():
        build = getattr(resnext_flax, name)
        assert build.__name__ == name and name in build.__doc__
        assert build.__module__ == "resnext_flax.builders"  # a def, visible to IDEs
        model = nnx.eval_shape(lambda b=build: b(num_classes=3))
        assert model.spec == VARIANTS[name]
        assert model.fc.kernel.get_value().shape == (model.num_features, 3)


def test_list_models_filters_with_wildcards():
    assert resnext_flax.list_models("resnext*") == [
        "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "resnext101_32x16d",
        "resnext101_32x32d", "resnext101_32x48d"]
    assert resnext_flax.list_models(["resnet1*", "wide*"], exclude="*101*") == [
        "resnet18", "resnet152", "wide_resnet50_2"]
    assert resnext_flax.list_models(exclude=["resnet*", "wide*"]) == resnext_flax.list_models(
        "resnext*")
    assert resnext_flax.list_models("vit*") == []


def test_weights_and_a_different_num_classes_conflict():
    """As torchvision's builders: the weights fix the class count (checked before loading)."""
    with pytest.raises(ValueError, match=r"num_classes=10 conflicts with resnet18.IMAGENET1K_V1"):
        resnext_flax.resnet18(weights="DEFAULT", num_classes=10)
    with pytest.raises(ValueError, match="no weight set 'IMAGENET1K_V9'"):
        resnext_flax.resnet18(weights="IMAGENET1K_V9")


def test_random_weights_are_drawn_as_the_eager_initializers_draw_them(monkeypatch):
    """The batched draw (nn.init) equals drawing each parameter eagerly, bit for bit."""
    import contextlib

    from resnext_flax.models import resnet

    for name in ("resnet18", "resnext50_32x4d"):
        batched = resnext_flax.create_model(name, num_classes=7, rngs=nnx.Rngs(5))
        with monkeypatch.context() as patch:
            patch.setattr(resnet, "batched_init", contextlib.nullcontext)
            eager = resnext_flax.create_model(name, num_classes=7, rngs=nnx.Rngs(5))
        for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(batched)),
                                     nnx.to_flat_state(nnx.state(eager)), strict=True):
            assert a.get_value().dtype == b.get_value().dtype, path
            np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(path))


def test_headless_model_returns_pooled_features():
    model = resnext_flax.resnet18(num_classes=0)
    model.eval()
    x = jnp.ones((2, 40, 40, 3))
    out = model(x)
    assert out.shape == (2, 512)
    np.testing.assert_array_equal(out, model.forward_features(x)["pre_logits"])
    assert not any("fc" in str(path) for path, _ in nnx.to_flat_state(nnx.state(model)))


def test_a_python_list_is_named_as_such(resnet18):
    with pytest.raises(ValueError, match=r"got a list, not an array; convert it with np\.asarray"):
        resnet18([[[[0.0, 0.0, 0.0]]]])


@pytest.mark.parametrize("bad", [-5, 2.5, True, 10**11])
def test_bad_num_classes_is_rejected(bad):
    with pytest.raises(ValueError, match="num_classes must be an int from 0"):
        resnext_flax.resnet18(num_classes=bad)


def test_reset_classifier_replaces_only_the_head():
    model = resnext_flax.resnet18(num_classes=10)
    before = np.asarray(model.layer4[1].conv2.kernel.get_value())
    model.reset_classifier(3, rngs=nnx.Rngs(1))
    assert model.num_classes == 3 and model.fc.kernel.get_value().shape == (512, 3)
    np.testing.assert_array_equal(model.layer4[1].conv2.kernel.get_value(), before)
    model.reset_classifier(0)
    model.eval()
    assert model(jnp.ones((1, 32, 32, 3))).shape == (1, 512)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model 'resnext50'.*resnext50_32x4d"):
        resnext_flax.create_model("resnext50")


def test_variant_table_is_frozen():
    with pytest.raises(TypeError):
        VARIANTS["resnet9"] = VARIANTS["resnet18"]
    with pytest.raises(AttributeError):
        VARIANTS["resnet18"].groups = 2


def test_grouped_conv_width_and_groups():
    model = nnx.eval_shape(lambda: resnext_flax.resnext101_64x4d())
    conv2 = model.layer3[0].conv2
    # width = int(256 * 4 / 64) * 64 = 1024, kernel I axis = 1024 / 64 groups.
    assert conv2.groups == 64
    assert conv2.kernel.get_value().shape == (3, 3, 16, 1024)


@pytest.fixture(scope="module")
def resnet18():
    model = resnext_flax.resnet18(rngs=nnx.Rngs(0))
    model.eval()
    return model


def test_initialization_follows_torchvision(resnet18):
    kernel = np.asarray(resnet18.layer4[0].conv1.kernel.get_value())  # 3x3, 256 -> 512
    fan_out = 3 * 3 * 512
    assert abs(kernel.std() - np.sqrt(2.0 / fan_out)) < 0.02 * np.sqrt(2.0 / fan_out)
    assert abs(kernel.mean()) < 1e-3
    bn = resnet18.layer2[1].bn2
    np.testing.assert_array_equal(np.asarray(bn.scale.get_value()), 1.0)
    np.testing.assert_array_equal(np.asarray(bn.bias.get_value()), 0.0)
    bound = 1 / np.sqrt(512)
    fc_kernel = np.asarray(resnet18.fc.kernel.get_value())
    assert np.abs(fc_kernel).max() <= bound and np.abs(fc_kernel).max() > 0.95 * bound
    assert np.abs(np.asarray(resnet18.fc.bias.get_value())).max() <= bound


def test_zero_init_residual_zeroes_each_blocks_last_bn():
    model = resnext_flax.resnet50(zero_init_residual=True)
    for stage in (model.layer1, model.layer4):
        for block in stage:
            np.testing.assert_array_equal(np.asarray(block.bn3.scale.get_value()), 0.0)
            np.testing.assert_array_equal(np.asarray(block.bn2.scale.get_value()), 1.0)


def test_features_have_the_documented_shapes(resnet18):
    features = resnet18.forward_features(jnp.ones((1, 97, 131, 3)))
    assert tuple(features) == FEATURE_NAMES
    assert features["stem"].shape == (1, 25, 33, 64)
    assert features["layer1"].shape == (1, 25, 33, 64)
    assert features["layer2"].shape == (1, 13, 17, 128)
    assert features["layer3"].shape == (1, 7, 9, 256)
    assert features["layer4"].shape == (1, 4, 5, 512)
    assert features["pre_logits"].shape == (1, 512)
    logits = resnet18.forward_head(features["pre_logits"])
    np.testing.assert_allclose(logits, resnet18(jnp.ones((1, 97, 131, 3))), rtol=1e-6)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((224, 224, 3), np.float32), r"shape \(N, H, W, 3\).*rank 3"),
        (np.zeros((2, 3, 64, 64), np.float32), "looks like NCHW"),
        (np.zeros((2, 64, 64, 4), np.float32), "4 channels"),
        (np.zeros((2, 64, 64, 3), np.uint8), "got dtype uint8"),
        (np.zeros((0, 64, 64, 3), np.float32), "must be at least 1"),
        (np.zeros((1, 0, 0, 3), np.float32), "must be at least 1"),
    ],
)
def test_bad_input_is_rejected_before_tracing(resnet18, images, message):
    with pytest.raises(ValueError, match=message):
        resnet18(images)
    with pytest.raises(ValueError, match=message):
        jax.jit(lambda x: resnet18(x))(images)


def test_train_mode_uses_batch_statistics_and_updates_running_ones():
    model = resnext_flax.resnet18(rngs=nnx.Rngs(1))
    images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3)) * 2 + 1
    model.eval()
    eval_logits = model(images)
    np.testing.assert_array_equal(np.asarray(model.bn1.mean.get_value()), 0.0)
    model.train()
    train_logits = model(images)
    assert not np.allclose(eval_logits, train_logits)
    assert np.abs(np.asarray(model.bn1.mean.get_value())).max() > 0


def test_bfloat16_compute_keeps_float32_params():
    model = resnext_flax.resnet18(dtype=jnp.bfloat16, num_classes=10)
    model.eval()
    assert model.layer1[0].conv2.kernel.get_value().dtype == jnp.float32
    logits = jax.jit(lambda x: model(x))(jnp.ones((1, 64, 64, 3)))
    assert logits.dtype == jnp.bfloat16 and logits.shape == (1, 10)
