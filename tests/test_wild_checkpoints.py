"""Checkpoints as they come in the wild (docs/checkpoints.md): each layout is built from a
torchvision model with random weights and random BatchNorm statistics, saved the way its
project saves it, and must load in one call to what the torch model computes (pooled features
and, where a linear head exists, logits, relative <= 1e-5), with a report naming the container,
prefix and head; ambiguous or incomplete files raise one error listing the candidates."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import re

import numpy as np
import pytest
import torch
import torchvision
from flax import nnx
from torch_reference import (
    random_images,
    randomize_batchnorm,
    relative_error,
    to_nchw,
    torch_architecture,
)

import resnext_flax
from resnext_flax import cli
from resnext_flax.cli.common import render_error
from resnext_flax.models.variants import VARIANTS, ModelSpec
from resnext_flax.weights.files import UntrustedPickleError, WeightFileError
from resnext_flax.weights.loading import load_model_with_report
from resnext_flax.weights.resolve import CheckpointLayoutError
from resnext_flax.weights.torch_port import StateDictMismatchError, expected_shapes

ROOT = pathlib.Path(__file__).resolve().parents[1]
BOUND = 1e-5  # a whole ResNet in float32 agrees to ~1e-6 (docs/testing.md)


def torch_resnet(name: str, seed: int, num_classes: int = 1000) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    return randomize_batchnorm(model, seed).eval()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return random_images(2, 64, 64, seed=3)


@pytest.fixture(scope="module")
def r18() -> torch.nn.Module:
    """A fine-tuned-like ResNet-18: a 10-class linear head."""
    return torch_resnet("resnet18", seed=21, num_classes=10)


@pytest.fixture(scope="module")
def r18_ema() -> torch.nn.Module:
    """Its "EMA" weights: another draw, so picking the wrong one cannot pass."""
    return torch_resnet("resnet18", seed=22, num_classes=10)


@pytest.fixture(scope="module")
def moco(tmp_path_factory) -> tuple[torch.nn.Module, torch.nn.Module, pathlib.Path]:
    """MoCo v2 as its main_moco.py saves it: ResNet-50 query and key encoders whose fc is an
    MLP (fc.0, fc.2), a queue, DistributedDataParallel's ``module.``."""
    encoders = []
    for seed in (31, 32):
        encoder = torch_resnet("resnet50", seed=seed, num_classes=128)
        encoder.fc = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.ReLU(),
                                         encoder.fc)
        encoders.append(encoder)

    class MoCo(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder_q, self.encoder_k = encoders
            self.register_buffer("queue", torch.randn(128, 64))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    wrapped = {f"module.{k}": v for k, v in MoCo().state_dict().items()}
    path = tmp_path_factory.mktemp("moco") / "checkpoint_0199.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": wrapped,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.03}]}}, path)
    return encoders[0], encoders[1], path


def torch_outputs(model: torch.nn.Module, images: np.ndarray) -> dict[str, np.ndarray]:
    """torchvision's pooled features and (with a linear fc) logits."""
    with torch.no_grad():
        trunk = torch.nn.Sequential(*list(model.children())[:-1])
        pooled = torch.flatten(trunk(to_nchw(images)), 1)
        out = {"pooled": pooled.numpy()}
        if isinstance(model.fc, torch.nn.Linear):
            out["logits"] = model.fc(pooled).numpy()
    return out


@nnx.jit  # compiled once per architecture and head: models of one layout share the program
def features_and_output(model: resnext_flax.ResNet, images):
    pooled = model.forward_features(images)["pre_logits"]
    return pooled, model.forward_head(pooled)


def assert_computes_like(model: resnext_flax.ResNet, reference: torch.nn.Module,
                         images: np.ndarray, *, logits: bool = True) -> None:
    expected = torch_outputs(reference, images)
    features, output = features_and_output(model, images)
    assert relative_error(features, expected["pooled"]) <= BOUND
    if logits:
        assert relative_error(output, expected["logits"]) <= BOUND


def save(obj, path: pathlib.Path) -> pathlib.Path:
    torch.save(obj, path)
    return path


def ema_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What torch's AveragedModel (torchvision's ExponentialMovingAverage) saves:
    ``n_averaged`` and the model's keys under ``module.``."""
    return torch.optim.swa_utils.AveragedModel(model).state_dict()


def namespace() -> argparse.Namespace:
    return argparse.Namespace(model="resnet18", lr=0.5, epochs=600, output_dir=pathlib.Path("o"),
                              weight_decay=2e-5, model_ema=True, mixup_alpha=np.float64(0.2))


# ---- containers ----------------------------------------------------------------------------------


def test_torchvision_reference_script_checkpoint(tmp_path, r18, r18_ema, images):
    optimizer = torch.optim.SGD(r18.parameters(), lr=0.5, momentum=0.9)
    path = save({"model": r18.state_dict(), "model_ema": ema_state_dict(r18_ema),
                 "optimizer": optimizer.state_dict(),
                 "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 30).state_dict(),
                 "epoch": 599, "args": namespace()}, tmp_path / "checkpoint.pth")
    with pytest.raises(Exception, match=r"argparse\.Namespace"):  # why the allow-list exists
        torch.load(path, weights_only=True)

    model, report = load_model_with_report(path)
    assert_computes_like(model, r18, images)
    assert report.layout == "torchvision reference-script checkpoint"
    assert (report.container, report.prefix, model.num_classes) == (("model",), "", 10)
    assert report.ema_present and any("ema=True (--ema)" in render_error(note)
                                      for note in report.notes)

    for options in ({"ema": True}, {"key": "model_ema"}):
        model, report = load_model_with_report(path, "resnet18", **options)
        assert_computes_like(model, r18_ema, images)
        assert (report.container, report.prefix) == (("model_ema",), "module.")
        assert report.dropped == ("n_averaged",)


def test_timm_train_checkpoint(tmp_path, r18, r18_ema, images):
    path = save({"epoch": 99, "arch": "resnet18", "state_dict": r18.state_dict(),
                 "state_dict_ema": r18_ema.state_dict(), "optimizer": {}, "args": namespace(),
                 "metric": 71.2, "version": 2}, tmp_path / "last.pth.tar")
    model, report = load_model_with_report(path)
    assert_computes_like(model, r18, images)
    assert (report.layout, report.container) == ("timm train.py checkpoint", ("state_dict",))
    model = resnext_flax.from_pretrained("resnet18", checkpoint=path, ema=True)
    assert_computes_like(model, r18_ema, images)


def test_lightning_checkpoint(tmp_path, r18, images):
    class Classifier(torch.nn.Module):  # a LightningModule's parameters: its attributes
        def __init__(self):
            super().__init__()
            self.model = r18
            self.criterion = torch.nn.CrossEntropyLoss(weight=torch.ones(10))

    path = save({"epoch": 4, "global_step": 1000, "pytorch-lightning_version": "2.4.0",
                 "state_dict": Classifier().state_dict(), "loops": {}, "callbacks": {},
                 "optimizer_states": [{}], "lr_schedulers": [],
                 "hyper_parameters": {"lr": 0.1, "num_classes": 10}}, tmp_path / "e4.ckpt")
    model, report = load_model_with_report(path)
    assert_computes_like(model, r18, images)
    assert report.layout == "PyTorch Lightning checkpoint"
    assert (report.container, report.prefix, report.dropped) == (
        ("state_dict",), "model.", ("criterion.weight",))


def test_moco_query_encoder_by_default_mlp_head_dropped(moco, images):
    query, key, path = moco
    model, report = load_model_with_report(path)
    assert_computes_like(model, query, images, logits=False)
    assert report.layout == "MoCo v1/v2 checkpoint"
    assert (report.container, report.prefix) == (("state_dict",), "module.encoder_q.")
    assert report.head.kind == "mlp" and model.num_classes == 0
    assert any("MLP head (fc.0.weight (2048, 2048), fc.2.weight (128, 2048)) dropped" in n
               for n in report.notes)
    assert "module.queue" in report.dropped and "module.encoder_k.fc.2.bias" in report.dropped
    assert not any(k.startswith("fc.") for k in report.state_dict)

    model = resnext_flax.load_model(path, prefix="module.encoder_k.")
    assert_computes_like(model, key, images, logits=False)


# ---- prefixes, numbering, heads ----------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["backbone.", "encoder.", "model.", "net.",
                                    "module.encoder_q."])
def test_trunk_under_any_prefix(tmp_path, r18, images, prefix):
    sd = {f"{prefix}{k}": v for k, v in r18.state_dict().items()}
    sd["head.weight"] = torch.zeros(3, 512)  # a sibling module: dropped, and reported
    path = save(sd, tmp_path / "fine-tuned.pth")
    model = resnext_flax.from_pretrained("resnet18", checkpoint=path)  # the example
    assert_computes_like(model, r18, images)
    report = resnext_flax.inspect_checkpoint(path)
    assert (report.prefix, report.dropped) == (prefix, ("head.weight",))


@pytest.mark.parametrize("wrap", ["", "encoder."])
def test_sequential_children_numbering(tmp_path, r18, images, wrap):
    trunk = torch.nn.Sequential(*list(r18.children())[:-1])  # SimCLR, BYOL, SwAV... backbones
    path = save({f"{wrap}{k}": v for k, v in trunk.state_dict().items()}, tmp_path / "ssl.pth")
    model, report = load_model_with_report(path)
    assert_computes_like(model, r18, images, logits=False)
    assert (report.prefix, report.chosen.key_style, model.num_classes) == (wrap, "sequential", 0)


def test_headless_file_loads_headless_or_with_a_fresh_head(tmp_path, r18, images):
    path = save({k: v for k, v in r18.state_dict().items() if not k.startswith("fc.")},
                tmp_path / "dino_resnet18_backbone.pth")
    model = resnext_flax.load_model(path)
    assert model.num_classes == 0
    output = features_and_output(model, images)[1]  # a headless model outputs the features
    assert relative_error(output, torch_outputs(r18, images)["pooled"]) <= BOUND
    model, report = load_model_with_report(path, num_classes=7)
    assert report.fresh_head and features_and_output(model, images)[1].shape == (2, 7)
    assert_computes_like(model, r18, images, logits=False)
    # A linear head is kept; num_classes=0 drops it.
    full = save(r18.state_dict(), tmp_path / "full.pth")
    assert resnext_flax.load_model(full).num_classes == 10
    assert resnext_flax.load_model(full, num_classes=0).num_classes == 0
    # A converted checkpoint takes num_classes too (from_pretrained's cache holds those).
    converted = tmp_path / "converted.safetensors"
    resnext_flax.save_checkpoint(resnext_flax.load_model(full), converted)
    model = resnext_flax.from_pretrained("resnet18", checkpoint=converted, num_classes=7)
    assert model.num_classes == 7
    assert_computes_like(model, r18, images, logits=False)


# ---- Hugging Face transformers ----------------------------------------------------------------


def transformers_resnet(layer_type: str, depths, hidden_sizes, *, headless: bool, seed: int):
    transformers = pytest.importorskip("transformers")
    labels = {i: f"kind {i}" for i in range(6)}
    config = transformers.ResNetConfig(layer_type=layer_type, depths=depths,
                                       hidden_sizes=hidden_sizes, num_labels=6,
                                       id2label=labels, label2id={v: k for k, v in labels.items()})
    torch.manual_seed(seed)
    cls = transformers.ResNetModel if headless else transformers.ResNetForImageClassification
    return randomize_batchnorm(cls(config), seed).eval()


@pytest.mark.parametrize("arch, layer_type, depths, widths, headless, file", [
    ("resnet18", "basic", [2, 2, 2, 2], [64, 128, 256, 512], False, "model.safetensors"),
    ("resnet50", "bottleneck", [3, 4, 6, 3], [256, 512, 1024, 2048], False,
     "pytorch_model.bin"),
    ("resnet18", "basic", [2, 2, 2, 2], [64, 128, 256, 512], True, "model.safetensors"),
])
def test_transformers_resnet(tmp_path, images, arch, layer_type, depths, widths, headless,
                             file):
    hf = transformers_resnet(layer_type, depths, widths, headless=headless, seed=41)
    if file == "model.safetensors":
        hf.save_pretrained(tmp_path)
    else:
        hf.config.save_pretrained(tmp_path)
        torch.save(hf.state_dict(), tmp_path / file)
    assert (tmp_path / file).is_file()
    with torch.no_grad():
        out = hf(pixel_values=to_nchw(images))
    model, report = load_model_with_report(tmp_path)  # the folder, as downloaded
    assert VARIANTS[arch] == model.spec
    assert report.chosen.key_style == "transformers"
    pooled = out.pooler_output.flatten(1) if headless else None
    if headless:
        assert model.num_classes == 0 and report.prefix == ""
        assert relative_error(features_and_output(model, images)[1], pooled.numpy()) <= BOUND
    else:
        assert report.prefix == "resnet." and model.num_classes == 6
        assert relative_error(features_and_output(model, images)[1], out.logits.numpy()) <= BOUND
        assert report.class_names == tuple(f"kind {i}" for i in range(6))


def test_transformers_config_that_is_not_torchvision_is_refused(tmp_path):
    hf = transformers_resnet("bottleneck", [1, 1, 1, 1], [256, 512, 1024, 2048],
                             headless=False, seed=42)
    hf.config.downsample_in_bottleneck = True  # ResNet V1: the stride in the first 1x1 conv
    hf.save_pretrained(tmp_path)
    with pytest.raises(CheckpointLayoutError, match=r"downsample_in_bottleneck=True"):
        resnext_flax.load_model(tmp_path / "model.safetensors")
    # microsoft/resnet-26's architecture: torchvision has no bottleneck ResNet of 2-2-2-2.
    resnet26 = transformers_resnet("bottleneck", [2, 2, 2, 2], [256, 512, 1024, 2048],
                                   headless=False, seed=42)
    resnet26.save_pretrained(tmp_path / "r26")
    refusal = "is not one of the architectures this library builds"
    with pytest.raises(CheckpointLayoutError, match=refusal):
        resnext_flax.load_model(tmp_path / "r26")
    spec = ModelSpec("bottleneck", (2, 2, 2, 2))
    assert resnext_flax.inspect_checkpoint(tmp_path / "r26").problems == (f"{spec} {refusal}",)


@pytest.mark.parametrize(("config", "phrase"), [
    ({"depths": 5}, "field 'depths' must be a list of block counts, got 5"),
    ({"depths": ["2", 2, 2, 2]}, "field 'depths'"),
])
def test_transformers_config_fields_of_the_wrong_type_are_one_error(tmp_path, config, phrase):
    hf = transformers_resnet("basic", [2, 2, 2, 2], [64, 128, 256, 512], headless=False,
                             seed=42)
    hf.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**stored, **config}))
    with pytest.raises(CheckpointLayoutError, match=phrase):
        resnext_flax.load_model(tmp_path)
    assert phrase.split(" must")[0] in str(resnext_flax.inspect_checkpoint(tmp_path).error)


def test_transformers_config_nested_too_deeply_is_one_error(tmp_path):
    hf = transformers_resnet("basic", [2, 2, 2, 2], [64, 128, 256, 512], headless=False,
                             seed=42)
    hf.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(WeightFileError, match="nested too deeply"):
        resnext_flax.load_model(tmp_path)


# ---- pickles -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Payload:
    """Stands for any object a pickle can rebuild by calling something."""

    target: str

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_a_malicious_pickle_never_runs_by_default(tmp_path, r18, capsys):
    target = tmp_path / "pwned"
    path = save({"state_dict": r18.state_dict(), "args": namespace(),
                 "x": Payload(str(target))}, tmp_path / "e.pth")
    for load in (resnext_flax.load_model, resnext_flax.inspect_checkpoint,
                 lambda p: resnext_flax.from_pretrained("resnet18", checkpoint=p)):
        with pytest.raises(UntrustedPickleError) as info:
            load(path)
        message = render_error(info.value)
        assert "pickles posix.mkdir, outside the allow-list" in message or "nt.mkdir" in message
        assert "argparse" not in message  # allowed, so not named
        assert "trust_pickle=True (--trust-pickle)" in message
        assert not target.exists()
    assert cli.main(["inspect", str(path)]) == 1
    assert "runs any code" in capsys.readouterr().err and not target.exists()


class TrainingConfig:
    """A project's own class in a checkpoint: harmless, but not on the allow-list."""

    def __init__(self):
        self.lr = 0.1


def test_trust_pickle_is_an_explicit_opt_in(tmp_path, r18, images):
    path = save({"state_dict": r18.state_dict(), "config": TrainingConfig()},
                tmp_path / "custom.pth")
    with pytest.raises(UntrustedPickleError, match=r"\.TrainingConfig"):
        resnext_flax.load_model(path)
    model = resnext_flax.load_model(path, trust_pickle=True)
    assert_computes_like(model, r18, images)

    whole = save(r18, tmp_path / "whole_model.pth")  # torch.save(model): a pickled module
    with pytest.raises(UntrustedPickleError,
                       match=r"torchvision\.models\.resnet\.ResNet"):
        resnext_flax.load_model(whole)
    assert_computes_like(resnext_flax.load_model(whole, trust_pickle=True), r18, images)


# ---- errors ------------------------------------------------------------------------------------


def test_several_trunks_raise_one_error_listing_them(tmp_path, r18, r18_ema):
    student = {f"student.backbone.{k}": v for k, v in r18.state_dict().items()}
    teacher = {f"teacher.backbone.{k}": v for k, v in r18_ema.state_dict().items()}
    path = save({**student, **teacher}, tmp_path / "dino_full.pth")
    with pytest.raises(CheckpointLayoutError) as info:
        resnext_flax.load_model(path)
    message = render_error(info.value)
    # The library speaks of keyword arguments; the command line adds its flags.
    assert "prefix='student.backbone.'" in str(info.value) and "--" not in str(info.value)
    assert "several complete ResNet trunks" in message
    for p in ("student.backbone.", "teacher.backbone."):
        assert f"prefix={p!r} (--prefix {p})" in message
    model = resnext_flax.load_model(path, prefix="teacher.backbone")
    np.testing.assert_array_equal(np.asarray(model.fc.kernel.get_value()).T,
                                  r18_ema.fc.weight.detach().numpy())

    nested = save({"student": r18.state_dict(), "teacher": r18_ema.state_dict()},
                  tmp_path / "nested.pth")
    with pytest.raises(CheckpointLayoutError) as info:
        resnext_flax.load_model(nested)
    assert re.search(r"key='teacher' \(--key teacher\)", render_error(info.value))
    with pytest.raises(CheckpointLayoutError, match=r"no ResNet trunk in container 'ema'"):
        resnext_flax.load_model(nested, key="ema")


def test_incomplete_file_lists_the_candidates(tmp_path, r18):
    sd = {k: v for k, v in r18.state_dict().items() if k != "layer3.1.bn2.running_var"}
    partial = {f"backbone.{k}": v for k, v in sd.items() if not k.startswith("layer4")}
    path = save({"model": {**sd, **partial}}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointLayoutError) as info:
        resnext_flax.load_model(path)
    message = str(info.value)
    assert "no complete ResNet trunk; candidates:" in message
    assert "prefix '': resnet18, incomplete: 1 trunk key(s) missing" in message
    assert "layer3.1.bn2.running_var" in message
    assert "prefix 'backbone.': an unknown architecture, incomplete" in message
    assert "layer4.*" in message


def test_strict_mismatch_ends_with_the_option_that_fixes_it(tmp_path, r18):
    path = save(r18.state_dict(), tmp_path / "r18.pth")
    with pytest.raises(StateDictMismatchError) as info:
        resnext_flax.from_pretrained("resnet34", checkpoint=path)
    assert render_error(info.value).splitlines()[-1] == (
        "fix: the file holds resnet18: ask for that model (name='resnet18', --model resnet18)")

    def abstract(**kwargs):
        return nnx.eval_shape(lambda: resnext_flax.resnet18(**kwargs))

    with pytest.raises(StateDictMismatchError) as info:
        resnext_flax.load_torch_state_dict(abstract(), r18.state_dict())
    assert render_error(info.value).splitlines()[-1] == (
        "fix: num_classes=10 (--num-classes 10) keeps the file's head")
    prefixed = {f"backbone.{k}": v for k, v in r18.state_dict().items()}
    with pytest.raises(StateDictMismatchError) as info:
        resnext_flax.load_torch_state_dict(abstract(num_classes=10), prefixed)
    assert render_error(info.value).splitlines()[-1].endswith(
        "prefix='backbone.' (--prefix backbone.)")


# ---- inspection, conversion, shapes ------------------------------------------------------------


def test_inspect_command(tmp_path, r18, r18_ema, capsys):
    path = save({"model": r18.state_dict(), "model_ema": ema_state_dict(r18_ema),
                 "epoch": 1, "optimizer": {}, "args": namespace()}, tmp_path / "ck.pth")
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    params = sum(p.numel() for p in r18.parameters())
    for line in ("layout: torchvision reference-script checkpoint", "EMA weights: present",
                 "container: 'model'", "prefix: ''", "architecture: resnet18",
                 "head in the file: linear, 10 classes", "dtypes: float32",
                 f"parameters: {params:,} loaded",
                 "would load: 102 tensors into resnet18, strictly: every key and shape fits",
                 "dropped: nothing"):
        assert line in out.splitlines(), line
    assert "container 'model_ema', prefix 'module.': resnet18" in out
    assert cli.main(["inspect", str(path), "--ema", "--num-classes", "0"]) == 0
    out = capsys.readouterr().out
    assert "container: 'model_ema'" in out and "dropped: n_averaged, module.fc.* (2 keys)" in out
    assert cli.main(["inspect", str(path), "--key", "nothing"]) == 1
    assert "no ResNet trunk in container 'nothing'" in capsys.readouterr().err
    assert cli.main(["inspect", str(path), "--model", "resnet34"]) == 1
    captured = capsys.readouterr()
    # resnet34 has 8 blocks more (1+2+4+1), 10 tensors each (2 convs, 2 BatchNorms x 4).
    assert "would load: 102 tensors into resnet34; the strict load would fail: 80 missing " \
           "(layer1.2.conv1.weight, layer1.2.bn1.weight, layer1.2.bn1.bias, ...)" in captured.out
    assert "the strict load would fail: 80 missing" in captured.err


def test_converter_takes_the_same_options(tmp_path, moco, images):
    _, key, path = moco
    spec = importlib.util.spec_from_file_location("convert_torchvision",
                                                  ROOT / "convert" / "convert_torchvision.py")
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    output = tmp_path / "moco_k.safetensors"
    assert converter.main([str(path), "-o", str(output), "--prefix", "module.encoder_k.",
                           "--probe-size", "64", "--probe-batch", "1"]) == 0
    model = resnext_flax.load_checkpoint(output)
    assert model.num_classes == 0
    output = features_and_output(model, images)[1]
    assert relative_error(output, torch_outputs(key, images)["pooled"]) <= BOUND


def test_transformers_class_names_survive_conversion(tmp_path, images):
    hf = transformers_resnet("basic", [2, 2, 2, 2], [64, 128, 256, 512], headless=False,
                             seed=43)
    hf.save_pretrained(tmp_path / "hf")
    from resnext_flax.weights.conversion import convert_checkpoint

    report = convert_checkpoint(tmp_path / "hf", tmp_path / "r18.safetensors",
                                probe_shape=(1, 64, 64))
    assert report.relative_error <= BOUND
    inspected = resnext_flax.inspect_checkpoint(tmp_path / "r18.safetensors")
    assert inspected.class_names == tuple(f"kind {i}" for i in range(6))
    assert json.loads(json.dumps(inspected.class_names)) == [f"kind {i}" for i in range(6)]


@pytest.mark.parametrize("name", resnext_flax.list_models())
def test_expected_keys_and_shapes_are_torchvisions(name):
    with torch.device("meta"):
        model = torch_architecture(name, num_classes=7)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not k.endswith("num_batches_tracked")}
    assert dict(expected_shapes(VARIANTS[name], 7)) == expected
    assert list(expected_shapes(VARIANTS[name], 7)) == list(expected)  # order
