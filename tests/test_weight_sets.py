"""The weight-set table: torchvision's rows against the installed torchvision's own weight
enums, the rows beyond torchvision's (data/weight_sets.csv) against the architectures."""

from __future__ import annotations

import importlib.resources
import math
import re
import warnings

import jax
import pytest
import torch
import torchvision
from flax import nnx
from torchvision.models import get_model_weights

import resnext_flax
from resnext_flax import cli
from resnext_flax.metadata import Preprocessing, imagenet_categories
from resnext_flax.weights.catalog import (
    DEFAULT_TAGS,
    SOURCES,
    WEIGHT_SETS,
    LicenseWarning,
    get_weight_set,
    list_weight_sets,
    warn_license,
)

# The models torchvision publishes weights for (the wider WSL ResNeXt-101s it does not).
MODELS = [m for m in resnext_flax.list_models() if m in torchvision.models.list_models()]
BEYOND = [ws for ws in list_weight_sets() if ws.source != "torchvision"]
HUB_HASH = re.compile(r"-([a-f0-9]*)\.")  # torch.hub.HASH_REGEX


def test_every_model_has_weight_sets():
    assert list(WEIGHT_SETS) == resnext_flax.list_models()
    assert [m for m in WEIGHT_SETS if list_weight_sets(m, source="torchvision")] == MODELS
    assert list(DEFAULT_TAGS) == list(WEIGHT_SETS)  # every model has a DEFAULT


@pytest.mark.parametrize("name", MODELS)
def test_tags_and_default_match_torchvision(name):
    enum = get_model_weights(name)
    # DEFAULT is an alias, not a member
    assert [ws.tag for ws in list_weight_sets(name, source="torchvision")] == [
        w.name for w in enum]
    assert DEFAULT_TAGS[name] == enum.DEFAULT.name
    assert get_weight_set(name).tag == enum.DEFAULT.name
    assert get_weight_set(name, "DEFAULT") is get_weight_set(name, enum.DEFAULT.name)


@pytest.mark.parametrize("name", MODELS)
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
    assert len(list_weight_sets(source="torchvision")) == 17
    assert [w.tag for w in list_weight_sets("resnet50", source="torchvision")] == [
        "IMAGENET1K_V1", "IMAGENET1K_V2"]


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
    sets = list_weight_sets("resnet50", source="torchvision")
    assert all(isinstance(ws, resnext_flax.weights.catalog.WeightSet) for ws in sets)
    assert [ws.is_default for ws in sets] == [False, True]  # DEFAULT: no entry of its own
    assert [ws.is_default for ws in list_weight_sets("resnet50")].count(True) == 1
    with pytest.raises(resnext_flax.errors.UnknownModelError, match="unknown model"):
        list_weight_sets("resnet19")


def test_the_wsl_models_as_published():
    """The four weakly supervised ResNeXt-101s, with the figures of their paper and
    repository, under their non-commercial license; the wider three default to them."""
    wsl = {ws.model: ws for ws in list_weight_sets(source="WSL-Images")}
    assert {m: ws.acc1 for m, ws in wsl.items()} == {
        "resnext101_32x8d": 82.2, "resnext101_32x16d": 84.2, "resnext101_32x32d": 85.1,
        "resnext101_32x48d": 85.4}
    for model in ("resnext101_32x32d", "resnext101_32x48d"):
        assert get_weight_set(model) is wsl[model]
    assert get_weight_set("resnext101_32x16d").tag == "fb_swsl_ig1b_ft_in1k"  # 84.8 > 84.2
    assert get_weight_set("resnext101_32x8d").tag == "IMAGENET1K_V2"  # torchvision's choice
    for ws in wsl.values():
        assert ws.url == f"https://download.pytorch.org/models/ig_{ws.model[:-1]}-" \
            f"{ws.sha256_prefix}.pth"


@pytest.mark.parametrize("ws", BEYOND, ids=lambda ws: ws.name)
def test_rows_beyond_torchvision(ws):
    assert ws.source in SOURCES and ws.recipe.startswith("https://")
    assert ws.license in ("CC-BY-NC-4.0", "Apache-2.0")
    assert ws.non_commercial == (ws.source != "timm")
    assert ws.hub_id == f"timm/{ws.name}"  # timm's name is model.tag
    if ws.url:  # the publisher's own file, its sha256 prefix in its name
        assert len(ws.sha256_prefix) == 8
    assert ws.acc5 is None or ws.acc1 is not None
    assert ws.categories == imagenet_categories() and ws.num_classes == 1000
    pre = ws.preprocessing
    assert (pre.mean, pre.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    same = [other for other in list_weight_sets(ws.model) if other.source == "torchvision"]
    if same:
        assert (ws.num_params, ws.gflops) == (same[0].num_params, same[0].gflops)


@pytest.mark.parametrize("name", [m for m in resnext_flax.list_models() if m not in MODELS])
def test_costs_of_the_models_torchvision_does_not_publish(name):
    """Parameters as our model counts them; GFLOPS (multiply-adds at 224) as torch counts
    torchvision's: on the meta device, so nothing is allocated."""
    from torch.utils.flop_counter import FlopCounterMode

    ws = get_weight_set(name)
    model = nnx.eval_shape(lambda: resnext_flax.create_model(name))
    count = sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == ws.num_params
    spec = resnext_flax.models.variants.get_spec(name)
    with torch.device("meta"):
        reference = torchvision.models.ResNet(
            torchvision.models.resnet.Bottleneck, list(spec.layers), groups=spec.groups,
            width_per_group=spec.width_per_group)
        with FlopCounterMode(display=False) as flops:
            reference(torch.empty(1, 3, 224, 224))
    assert sum(p.numel() for p in reference.parameters()) == ws.num_params
    assert round(flops.get_total_flops() / 2e9, 3) == ws.gflops


def test_published_accuracy_only_where_both_figures_are():
    """What an evaluation compares with: the paper gives no top-5 for timm's A1/A2 sets."""
    assert get_weight_set("resnet50", "a1_in1k").published is None
    assert get_weight_set("resnet50", "IMAGENET1K_V2").published == (80.858, 95.434)
    assert get_weight_set("resnet50", "fb_swsl_ig1b_ft_in1k").published == (81.2, 96.0)


def test_only_architectures_the_library_builds():
    """Facebook also published ResNeXt-101 32x4d SSL/SWSL weights: not in the table, since
    the library does not build that model."""
    assert "resnext101_32x4d" not in WEIGHT_SETS
    assert {ws.model for ws in BEYOND} <= set(resnext_flax.list_models())


def test_non_commercial_sets_say_so_once(monkeypatch):
    monkeypatch.setattr(resnext_flax.weights.catalog, "_WARNED", set())
    swsl = get_weight_set("resnet50", "fb_swsl_ig1b_ft_in1k")
    with pytest.warns(LicenseWarning, match=r"CC-BY-NC-4.0: non-commercial use only"):
        warn_license(swsl)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_license(swsl)  # once per process
        warn_license(get_weight_set("resnet50", "a1_in1k"))  # Apache-2.0
        warn_license(get_weight_set("resnet50"))  # torchvision's


def test_list_sorts_by_accuracy_and_shows_licenses(capsys):
    assert cli.main(["list", "--sort", "acc1"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == len(list_weight_sets())
    assert rows[0].split()[:2] == ["resnext101_32x48d", "fb_wsl_ig1b_ft_in1k"]
    assert "85.4" in rows[0] and "CC-BY-NC-4.0" in rows[0]
    accs = [row.split()[3 if "(DEFAULT)" in row else 2] for row in rows]
    known = [float(a) for a in accs if a != "-"]
    assert known == sorted(known, reverse=True) and accs[len(known):] == ["-"] * (
        len(accs) - len(known))  # unpublished last
    assert cli.main(["list", "--commercial", "--model", "resnet50"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [row.split()[1] for row in rows] == ["IMAGENET1K_V1", "IMAGENET1K_V2", "a1_in1k",
                                                "a2_in1k"]
