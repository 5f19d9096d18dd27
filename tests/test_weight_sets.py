"""The weight-set table against the installed torchvision's own weight enums."""

from __future__ import annotations

import importlib.resources
import math
import re

import jax
import pytest
from flax import nnx
from torchvision.models import get_model_weights
from torchvision.models import list_models as list_torchvision_models

import resnext_flax
from resnext_flax.metadata import Preprocessing, imagenet_categories
from resnext_flax.weights.catalog import DEFAULT_TAGS, WEIGHT_SETS, get_weight_set, list_weight_sets

MODELS = resnext_flax.list_models()
# The models torchvision publishes weights for (its weight enums are the reference here).
TORCHVISION_MODELS = [n for n in MODELS if n in list_torchvision_models()]
HUB_HASH = re.compile(r"-([a-f0-9]*)\.")  # torch.hub.HASH_REGEX


def test_every_model_has_weight_sets():
    assert list(WEIGHT_SETS) == MODELS


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_tags_and_default_match_torchvision(name):
    enum = get_model_weights(name)
    assert list(WEIGHT_SETS[name]) == [w.name for w in enum]  # DEFAULT is an alias, not a member
    assert DEFAULT_TAGS[name] == enum.DEFAULT.name
    assert get_weight_set(name).tag == enum.DEFAULT.name
    assert get_weight_set(name, "DEFAULT") is get_weight_set(name, enum.DEFAULT.name)


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_weight_sets_match_torchvision(name):
    for weights in get_model_weights(name):
        ws = get_weight_set(name, weights.name)
        meta, transform = weights.meta, weights.transforms()
        assert ws.url == weights.url
        assert ws.filename == weights.url.rsplit("/", 1)[-1]
        assert ws.sha256_prefix == HUB_HASH.search(ws.filename).group(1)
        pre = ws.preprocessing
        assert [pre.resize_size] == transform.resize_size
        assert [pre.crop_size] == transform.crop_size
        assert pre.interpolation == transform.interpolation.value
        assert pre.antialias == transform.antialias
        assert list(pre.mean) == transform.mean
        assert list(pre.std) == transform.std
        metrics = meta["_metrics"]["ImageNet-1K"]
        assert (ws.acc1, ws.acc5) == (metrics["acc@1"], metrics["acc@5"])
        assert ws.num_params == meta["num_params"]
        assert ws.gflops == meta["_ops"]
        assert ws.file_size_mb == meta["_file_size"]
        assert ws.recipe == meta["recipe"]
        assert ws.categories == tuple(meta["categories"])
        assert ws.num_classes == len(meta["categories"])
        assert ws.is_default == (weights == get_model_weights(name).DEFAULT)


# One plain, one grouped and one wide model (the core tests count every variant's parameters).
@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d", "wide_resnet50_2"])
def test_parameter_count_matches_our_model(name):
    model = nnx.eval_shape(lambda: resnext_flax.create_model(name))
    count = sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == get_weight_set(name).num_params


def test_categories_are_package_data():
    text = importlib.resources.files("resnext_flax").joinpath(
        "data/imagenet_categories.txt").read_text(encoding="utf-8")
    names = text.splitlines()
    assert len(names) == 1000 == len(set(names))
    assert imagenet_categories() == tuple(names)
    assert names[:2] == ["tench", "goldfish"]


def test_lookup_spellings():
    ws = get_weight_set("resnet50", "IMAGENET1K_V2")
    assert get_weight_set("resnet50", "ResNet50_Weights.IMAGENET1K_V2") is ws
    assert get_weight_set("resnet50", "resnet50.IMAGENET1K_V2") is ws
    assert ws.name == "resnet50.IMAGENET1K_V2"
    assert ws.filename == "resnet50-11ad3fa6.pth"
    assert len(list_weight_sets()) == 17
    assert [w.tag for w in list_weight_sets("resnet50")] == ["IMAGENET1K_V1", "IMAGENET1K_V2"]


def test_lookup_errors():
    with pytest.raises(ValueError, match=r"has no weight set 'IMAGENET1K_V2'.*IMAGENET1K_V1"):
        get_weight_set("resnet18", "IMAGENET1K_V2")
    with pytest.raises(ValueError, match="unknown model 'resnet19'"):
        get_weight_set("resnet19")
    with pytest.raises(TypeError, match="tag string"):
        get_weight_set("resnet18", 1)
    with pytest.raises(ValueError, match="interpolation"):
        Preprocessing(interpolation="cubic")


def test_a_tag_qualified_by_another_model_is_refused():
    """The prefix of a qualified tag names the model: another model's is not dropped
    silently (resnet18 has an IMAGENET1K_V1 too)."""
    assert get_weight_set("resnext50_32x4d", "ResNeXt50_32X4D_Weights.IMAGENET1K_V1").model == (
        "resnext50_32x4d")
    assert get_weight_set("wide_resnet50_2", "Wide_ResNet50_2_Weights.DEFAULT").is_default
    for other in ("resnet50.IMAGENET1K_V1", "ResNet50_Weights.IMAGENET1K_V1"):
        with pytest.raises(ValueError, match=r"is not one of resnet18's"):
            get_weight_set("resnet18", other)


def test_list_weight_sets_is_as_documented():
    sets = list_weight_sets("resnet50")
    assert all(isinstance(ws, resnext_flax.weights.catalog.WeightSet) for ws in sets)
    assert [ws.is_default for ws in sets] == [False, True]  # DEFAULT: no entry of its own
    with pytest.raises(resnext_flax.errors.UnknownModelError, match="unknown model"):
        list_weight_sets("resnet19")
