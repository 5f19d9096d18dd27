"""``evaluate`` against torchvision's own evaluation of the same weights on the same folder
(``torchvision.datasets.ImageFolder`` + ``weights.transforms()`` + the torch model): the same
per-image predictions and the same accuracy; unreadable files skipped and reported; sharded
over 4 simulated devices with a padded last batch; ImageNet WordNet-id folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch_reference
import torchvision
from folder_helpers import mixed_folder, photo_crop, write_image
from limits import CHILD_TIMEOUT
from pretrained_helpers import save_torchvision_file
from torchvision.models import ResNet18_Weights

from resnext_flax import cli, datasets, evaluation
from resnext_flax.metadata import imagenet_wnids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    corrupt = mixed_folder(root / "folder")["corrupt"]
    model = torch_reference.torch_model("resnet18", seed=7, num_classes=6)
    return root / "folder", corrupt, model, save_torchvision_file(model, root / "w", "resnet18")


def _torchvision_eval(model, folder, skip, transform, target_transform=None):
    """torchvision's evaluation: ImageFolder (without the files torchvision cannot read),
    the transform, the model; returns (dataset, logits)."""
    tv = torchvision.datasets.ImageFolder(
        str(folder), transform=transform, target_transform=target_transform,
        is_valid_file=lambda p: p.lower().endswith(datasets.IMG_EXTENSIONS) and p not in skip)
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in torch.utils.data.DataLoader(tv, batch_size=8)])
    return tv, logits.numpy()


def _assert_same_predictions(result, folder, tv, logits, k):
    """Our top-k lists equal torch's for every image. Valid only where torch's consecutive
    logits are further apart than float32 rounding could move them (checked first)."""
    ours_by_path = dict(zip(datasets.image_folder(folder).paths, result.predictions,
                            strict=True))
    expected = np.argsort(-logits, axis=1)[:, :k]
    ranked = np.take_along_axis(logits, expected, axis=1)
    gaps = -np.diff(np.take_along_axis(logits, np.argsort(-logits, axis=1)[:, :k + 1], 1))
    assert gaps.min() > 1e-4 * np.abs(ranked).max(), "seed gives near-ties; pick another"
    ours = np.array([ours_by_path[p] for p, _ in tv.samples])
    np.testing.assert_array_equal(ours, expected)
    targets = np.array([t for _, t in tv.samples])
    top1 = np.mean(expected[:, 0] == targets)
    top5 = np.mean((expected[:, :5] == targets[:, None]).any(axis=1))
    assert (result.top1, result.top5) == (top1, top5)  # identical, not approximately
    return targets


def test_evaluation_equals_torchvision(setup):
    folder, corrupt, model, pth = setup
    result, note = evaluation.evaluate_pretrained(folder, "resnet18", checkpoint=pth,
                                                  batch_size=8, progress=False)
    tv, logits = _torchvision_eval(model, folder, set(corrupt),
                                   ResNet18_Weights.DEFAULT.transforms())
    targets = _assert_same_predictions(result, folder, tv, logits, 5)
    assert note == "classes in sorted folder-name order"
    assert result.num_images == len(tv) == 21 and result.num_skipped == 2
    assert sorted(result.skipped_paths) == sorted(corrupt)
    loss = torch.nn.functional.cross_entropy(torch.from_numpy(logits),
                                             torch.from_numpy(targets)).item()
    assert result.loss == pytest.approx(loss, rel=1e-5)
    assert result.published is None and result.images_per_second > 0


def test_command_on_four_devices_pads_the_last_batch(setup, tmp_path):
    """21 readable images in batches of 8 sharded over 4 devices: the last batch is padded,
    and the predictions equal the single-device ones."""
    folder, _corrupt, _, pth = setup
    single, _ = evaluation.evaluate_pretrained(folder, "resnet18", checkpoint=pth,
                                               batch_size=8, progress=False)
    out = tmp_path / "eval.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run(
        [sys.executable, "-m", "resnext_flax.cli", "evaluate", str(folder), "--model",
         "resnet18", "--checkpoint", str(pth), "--batch-size", "8", "--json", str(out),
         "--no-progress"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=CHILD_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{folder}: 21 images, 6 classes (classes in sorted folder-name order)"
    assert lines[2].split() == ["measured", f"{100 * single.top1:.3f}",
                                f"{100 * single.top5:.3f}", f"{single.loss:.4f}"]
    assert lines[-1].startswith("2 unreadable images skipped (not counted): ")
    report = json.loads(out.read_text())
    assert report["devices"] == 4 and report["images"] == 21 and report["skipped"] == 2
    paths = datasets.image_folder(folder).paths
    expected = {p: top.tolist() for p, top in zip(paths, single.predictions, strict=True)
                if top[0] >= 0}
    assert {e["path"]: e["top5"] for e in report["predictions"]} == expected


def test_imagenet_folders_and_published_accuracy(tmp_path, capsys):
    """WordNet-id folders are labelled with ImageNet's indices (a subset of the classes too),
    and the weight set's published accuracy is printed beside the measured one."""
    wnids = ("n01440764", "n03028079", "n03888257")
    rng = np.random.default_rng(4)
    for wnid in wnids:
        for i in range(2):
            write_image(tmp_path / "val" / wnid / f"{i}.jpg", photo_crop(i, rng))
    model = torch_reference.torch_model("resnet18", seed=5)
    pth = save_torchvision_file(model, tmp_path / "w", "resnet18")
    out = tmp_path / "r.json"
    assert cli.main(["evaluate", str(tmp_path / "val"), "--model", "resnet18", "--checkpoint",
                     str(pth), "--batch-size", "4", "--resize-size", "72", "--crop-size",
                     "64", "--json", str(out), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "ImageNet WordNet-id folders, torchvision's class order; only 3 of the 1000" in (
        lines[0])
    assert lines[3].split() == ["published", "69.758", "89.078"]
    index = {w: imagenet_wnids().index(w) for w in wnids}
    tv, logits = _torchvision_eval(
        model, tmp_path / "val", set(),
        torchvision.transforms.Compose([torchvision.transforms.Resize(72),
                                        torchvision.transforms.CenterCrop(64),
                                        torchvision.transforms.ToTensor(),
                                        torchvision.transforms.Normalize(
                                            [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]),
        target_transform=lambda t: index[wnids[t]])
    report = json.loads(out.read_text())
    result = evaluation.EvaluationResult(
        top1=report["acc1"] / 100, top5=report["acc5"] / 100, loss=0, num_images=6,
        num_skipped=0, skipped_paths=(), seconds=0, images_per_second=0,
        predictions=np.array([e["top5"] for e in report["predictions"]]), classes=())
    _assert_same_predictions(result, tmp_path / "val", tv, logits, 5)


def test_label_errors(setup, tmp_path):
    folder, _, _, pth = setup
    model = torch_reference.torch_model("resnet18", seed=1, num_classes=4)
    four = save_torchvision_file(model, tmp_path, "resnet18")
    with pytest.raises(datasets.DatasetError, match="has 6 class folders but the model has 4"):
        evaluation.evaluate_pretrained(folder, "resnet18", checkpoint=four, progress=False)
    thousand = save_torchvision_file(torch_reference.torch_model("resnet18"), tmp_path / "k",
                                     "resnet18")
    with pytest.raises(datasets.DatasetError, match="must be named by WordNet id"):
        evaluation.evaluate_pretrained(folder, "resnet18", checkpoint=thousand,
                                       progress=False)
    with pytest.raises(datasets.DatasetError, match="no folder or list file"):
        evaluation.evaluate_pretrained(tmp_path / "none", "resnet18", checkpoint=pth)
