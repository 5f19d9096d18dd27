"""The record a model carries (``model.pretrained_cfg``): every loader attaches it, it survives
the transformations a model goes through, and what it records (class names, preprocessing)
reaches prediction whatever the source."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
import torch_reference
from flax import nnx
from pretrained_helpers import sample_image_paths, save_torchvision_file, sha256

import resnext_flax
from resnext_flax import cli
from resnext_flax.datasets import DatasetError, ImageDataset
from resnext_flax.metadata import Preprocessing, PretrainedCfg, imagenet_categories
from resnext_flax.models.folding import fold_batchnorm
from resnext_flax.models.variants import VARIANTS
from resnext_flax.weights.catalog import get_weight_set
from resnext_flax.weights.checkpoint import read_safetensors_metadata
from resnext_flax.weights.conversion import convert_checkpoint
from resnext_flax.weights.pretrained import download_pretrained

pytestmark = pytest.mark.usefixtures("isolated_dirs")


@pytest.fixture(scope="module")
def pth(tmp_path_factory):
    model = torch_reference.torch_model("resnet18", seed=21)
    return save_torchvision_file(model, tmp_path_factory.mktemp("w"), "resnet18")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A Hugging Face ResNet-18 folder whose config.json names its 6 classes."""
    transformers = pytest.importorskip("transformers")
    labels = {i: f"kind {i}" for i in range(6)}
    config = transformers.ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2],
                                       hidden_sizes=[64, 128, 256, 512], num_labels=6,
                                       id2label=labels,
                                       label2id={v: k for k, v in labels.items()})
    torch.manual_seed(22)
    model = torch_reference.randomize_batchnorm(
        transformers.ResNetForImageClassification(config), 22).eval()
    folder = tmp_path_factory.mktemp("hf")
    model.save_pretrained(folder)
    return folder


def predicted_labels(capsys, *argv: str) -> set[str]:
    assert cli.main(["predict", *sample_image_paths(), "--model", "resnet18", "--no-progress",
                     "--top-k", "6", *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    return {line.split(". ", 1)[1].rsplit(" ", 1)[0].strip() for line in lines
            if line.startswith("  ")}


def test_random_init_carries_none():
    assert resnext_flax.resnet18(num_classes=3).pretrained_cfg is None


def test_a_loaded_file_records_what_it_was(pth):
    model = resnext_flax.load_model(pth)
    cfg = model.pretrained_cfg
    assert isinstance(cfg, PretrainedCfg)
    assert (cfg.architecture, cfg.spec, cfg.num_classes) == (
        "resnet18", VARIANTS["resnet18"], 1000)
    assert cfg.source == str(pth) and cfg.dropped == () and cfg.class_names is None
    headless = resnext_flax.load_model(pth, num_classes=0).pretrained_cfg
    assert headless.num_classes == 0 and headless.dropped == ("fc.weight", "fc.bias")


def test_the_record_survives_split_clone_and_folding(pth):
    model = resnext_flax.load_model(pth)
    cfg = model.pretrained_cfg
    graphdef, state = nnx.split(model)
    assert nnx.merge(graphdef, state).pretrained_cfg == cfg
    assert nnx.clone(model).pretrained_cfg == cfg
    assert fold_batchnorm(model).pretrained_cfg == cfg
    # It travels in the graph definition, yet never tells two apart: models that differ only
    # in their records share one compiled program.
    assert hash(cfg) == hash(dataclasses.replace(cfg)) and cfg == dataclasses.replace(cfg)
    other = nnx.clone(model)
    other.pretrained_cfg = dataclasses.replace(cfg, source="elsewhere", class_names=None)
    assert nnx.split(other)[0] == graphdef and hash(nnx.split(other)[0]) == hash(graphdef)
    traces = []

    def forward(state, images, graphdef):
        traces.append(1)
        return nnx.merge(graphdef, state)(images)

    forward = jax.jit(forward, static_argnums=2)
    images = np.zeros((1, 32, 32, 3), np.float32)
    for m in (model, other):
        g, st = nnx.split(m)
        assert forward(st, images, g).shape == (1, 1000)
    assert len(traces) == 1
    assert other.pretrained_cfg.source == "elsewhere" and model.pretrained_cfg == cfg


def test_the_record_follows_the_weights(pth):
    """A fresh head drops what described the old one, even at the same class count; a file
    loaded with a weight set's labels is not recorded as that weight set; a state dict poured
    into a model replaces its record."""
    model = resnext_flax.from_pretrained("resnet18", checkpoint=pth)
    assert model.pretrained_cfg.class_names == imagenet_categories()
    assert model.pretrained_cfg.weights is None and model.pretrained_cfg.source == str(pth)
    model.reset_classifier(1000)
    assert model.pretrained_cfg.class_names is None and model.pretrained_cfg.source == str(pth)
    fresh = resnext_flax.resnet18()
    fresh.pretrained_cfg = dataclasses.replace(model.pretrained_cfg, class_names=("a",) * 1000)
    resnext_flax.load_torch_state_dict(fresh, torch.load(pth))
    cfg = fresh.pretrained_cfg
    assert (cfg.architecture, cfg.num_classes, cfg.class_names, cfg.source) == (
        "resnet18", 1000, None, None)
    with pytest.raises(TypeError, match="PretrainedCfg or None"):
        fresh.pretrained_cfg = {"class_names": ["a"]}


def test_repeated_class_names_are_labels_not_keys(pth, tmp_path):
    """Published label lists repeat names (ImageNet's synset names hold "crane" twice): such
    a checkpoint saves, loads and predicts; only matching folders by name refuses them."""
    model = resnext_flax.load_model(pth, num_classes=3)
    names = ("crane", "tench", "crane")
    model.pretrained_cfg = dataclasses.replace(model.pretrained_cfg, class_names=names)
    resnext_flax.save_checkpoint(model, tmp_path / "m.safetensors")
    loaded = resnext_flax.load_checkpoint(tmp_path / "m.safetensors")
    assert loaded.pretrained_cfg.class_names == names
    assert resnext_flax.Predictor.from_model(loaded).categories == names
    folder = ImageDataset(("a.png", "b.png"), np.array([0, 1]), ("crane", "tench"), "root")
    with pytest.raises(DatasetError, match="ambiguous"):
        folder.relabel(names)


def test_from_pretrained_records_the_weight_set(pth):
    ws = dataclasses.replace(get_weight_set("resnet18"), url=pth.as_uri())
    model = resnext_flax.from_pretrained("resnet18", ws, progress=False)
    cfg = model.pretrained_cfg
    assert cfg.weights == "resnet18.IMAGENET1K_V1" and cfg.sha256 == sha256(pth)
    assert cfg.source == pth.as_uri()
    assert cfg.class_names == imagenet_categories() and cfg.preprocessing == ws.preprocessing
    # The cached file records them too: loading it alone gives the same record.
    cached = download_pretrained("resnet18", ws, progress=False)
    assert resnext_flax.load_checkpoint(cached).pretrained_cfg == cfg
    fresh = resnext_flax.from_pretrained("resnet18", ws, num_classes=4, progress=False)
    assert fresh.pretrained_cfg.class_names is None and fresh.pretrained_cfg.num_classes == 4


def test_hugging_face_class_names_reach_predict(hf_folder, capsys):
    model = resnext_flax.load_model(hf_folder)
    assert model.pretrained_cfg.class_names == tuple(f"kind {i}" for i in range(6))
    assert predicted_labels(capsys, "--checkpoint", str(hf_folder)) == {
        f"kind {i}" for i in range(6)}


def test_class_names_of_a_converted_hugging_face_file_reach_predict(hf_folder, tmp_path,
                                                                      capsys):
    """The converter wrote them as ``class_names`` and the reader looked for ``classes``:
    predict printed "class 2"."""
    output = tmp_path / "r18.safetensors"
    convert_checkpoint(hf_folder, output, verify=False)
    header = read_safetensors_metadata(output)
    assert json.loads(header["classes"]) == [f"kind {i}" for i in range(6)]
    assert resnext_flax.load_checkpoint(output).pretrained_cfg.class_names == tuple(
        f"kind {i}" for i in range(6))
    assert predicted_labels(capsys, "--checkpoint", str(output)) == {
        f"kind {i}" for i in range(6)}


def test_files_of_the_earlier_converter_still_name_their_classes(pth, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    model = resnext_flax.load_model(pth, num_classes=0)
    model.reset_classifier(3)
    written = tmp_path / "new.safetensors"
    resnext_flax.save_checkpoint(model, written)
    legacy = tmp_path / "legacy.safetensors"
    header = {**read_safetensors_metadata(written), "class_names": json.dumps(["a", "b", "c"])}
    save_file(load_file(str(written)), str(legacy), metadata=header)
    assert resnext_flax.load_checkpoint(legacy).pretrained_cfg.class_names == ("a", "b", "c")
    assert predicted_labels(capsys, "--checkpoint", str(legacy)) == {"a", "b", "c"}


def test_torchvision_categories_reach_predict_for_a_pth(pth, capsys):
    labels = predicted_labels(capsys, "--checkpoint", str(pth))
    assert labels <= set(imagenet_categories()) and len(labels) >= 6


def test_predictor_reads_the_record(pth):
    model = resnext_flax.load_model(pth, num_classes=0)
    model.reset_classifier(2)
    model.pretrained_cfg = dataclasses.replace(
        model.pretrained_cfg, num_classes=2, class_names=("cat", "dog"),
        preprocessing=Preprocessing(resize_size=40, crop_size=32))
    predictor = resnext_flax.Predictor.from_model(model)
    assert predictor.categories == ("cat", "dog")
    assert predictor.preprocessing.crop_size == 32
    result = predictor.classify(sample_image_paths()[:1])
    assert {label for label, _ in result.top(0)} == {"cat", "dog"}
    # A record whose class count no longer fits the head names no classes.
    model.reset_classifier(3)
    assert resnext_flax.Predictor.from_model(model).categories is None


def test_saving_a_model_writes_what_it_carries(pth, tmp_path):
    model = resnext_flax.load_model(pth, num_classes=0)
    model.reset_classifier(2)
    model.pretrained_cfg = dataclasses.replace(
        model.pretrained_cfg, num_classes=2, class_names=("cat", "dog"),
        preprocessing=Preprocessing(resize_size=40, crop_size=32))
    path = tmp_path / "m.safetensors"
    resnext_flax.save_checkpoint(model, path)
    cfg = resnext_flax.load_checkpoint(path).pretrained_cfg
    assert cfg.class_names == ("cat", "dog") and cfg.preprocessing.crop_size == 32
    assert cfg.source == str(path)


def test_weights_are_resolved_and_read_once_per_call(pth, monkeypatch, capsys):
    from resnext_flax.weights import catalog, files, loading, pretrained

    calls = {"resolve": 0, "read": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    # The builders resolve through pretrained.split_weights, as from_pretrained does.
    monkeypatch.setattr(pretrained, "resolve_weights", counting("resolve", catalog.resolve_weights))
    for module in (loading, pretrained):
        monkeypatch.setattr(module, "read_weight_file", counting("read", files.read_weight_file))
    ws = dataclasses.replace(get_weight_set("resnet18"), url=pth.as_uri())
    download_pretrained("resnet18", ws, progress=False)  # fill the cache
    for build in (lambda: resnext_flax.create_model("resnet18", weights=ws),
                  lambda: resnext_flax.from_pretrained("resnet18", ws),
                  lambda: resnext_flax.Predictor.from_pretrained("resnet18", ws),
                  lambda: resnext_flax.from_pretrained("resnet18", checkpoint=pth)):
        calls.update(resolve=0, read=0)
        build()
        assert calls == {"resolve": 1, "read": 1}
