"""The Grain input pipeline and the training augmentation: pixels equal torchvision's for the
same crop box, batches do not depend on the worker count, the loader resumes on the exact
batch, padding and unreadable files are flagged, never fatal."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from folder_helpers import corrupt_files, learnable_folder, photo_crop
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from resnext_flax import datasets, pipeline
from resnext_flax.augment import Augmentation, augment_image, random_resized_crop_box
from resnext_flax.metadata import Preprocessing
from resnext_flax.preprocess import preprocess_image

CONFIG = Preprocessing(resize_size=36, crop_size=32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("learnable")
    learnable_folder(root, per_class=6)
    corrupt = corrupt_files(root / "digits")
    return datasets.image_folder(root), [*corrupt, str(root / "flower" / "broken.png")]


def _torchvision_train_pixels(image: Image.Image, box, size, interpolation, flip, cfg):
    out = TF.resized_crop(image, *box, [size, size], InterpolationMode(interpolation),
                          antialias=True)
    if flip:
        out = TF.hflip(out)
    tensor = TF.convert_image_dtype(TF.pil_to_tensor(out), torch.float)
    return TF.normalize(tensor, list(cfg.mean), list(cfg.std)).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_augmentation_equals_torchvision_for_the_same_box(interpolation):
    cfg = Preprocessing(resize_size=64, crop_size=48, interpolation=interpolation)
    rng = np.random.default_rng(0)
    for i in range(6):
        image = Image.fromarray(photo_crop(i % 2, rng, 30, 150))
        # The generator's draws, replayed: the box, then the flip.
        replay = np.random.default_rng(i)
        box = random_resized_crop_box(image.height, image.width, replay)
        flip = replay.random() < 0.5
        ours = augment_image(image, cfg, np.random.default_rng(i))
        expected = _torchvision_train_pixels(image, box, 48, interpolation, flip, cfg)
        np.testing.assert_array_equal(ours, expected)


def test_crop_boxes_follow_torchvision_rules():
    rng = np.random.default_rng(0)
    aug = Augmentation()
    areas, ratios = [], []
    for _ in range(2000):
        height, width = (int(x) for x in rng.integers(8, 300, 2))
        top, left, h, w = random_resized_crop_box(height, width, rng, aug)
        assert top >= 0 and top + h <= height and left >= 0 and left + w <= width and h and w
        areas.append(h * w / (height * width))
        ratios.append(w / h)
    # Rounding to whole pixels widens the ranges a little on small images.
    assert min(areas) > 0.02 and max(areas) <= 1
    assert np.median(ratios) == pytest.approx(1, abs=0.1)
    # The fallback (no random box fits a very elongated image): torchvision's own answer.
    for height, width in [(10, 400), (400, 10), (9, 9)]:
        torch.manual_seed(0)
        expected = RandomResizedCrop.get_params(torch.zeros(3, height, width), [0.99, 1.0],
                                                [3 / 4, 4 / 3])
        ours = random_resized_crop_box(height, width, np.random.default_rng(0),
                                       Augmentation(scale=(0.99, 1.0)))
        assert ours == tuple(expected)
    with pytest.raises(ValueError, match="scale"):
        Augmentation(scale=(0.5, 0.2))


def test_eval_batches_are_the_preprocessed_images_with_padding_and_flags(folder):
    ds, corrupt = folder
    loader = pipeline.eval_loader(ds, CONFIG, 8, process_index=0, process_count=1)
    batches = list(loader)
    assert len(batches) == len(loader) == math.ceil(len(ds) / 8)
    flat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    n = len(ds)
    assert flat["image"].shape == (len(batches) * 8, 32, 32, 3)
    assert flat["index"][:n].tolist() == list(range(n)) and (flat["index"][n:] == -1).all()
    assert not flat["valid"][n:].any() and not flat["bad"][n:].any()
    bad = {ds.paths[i] for i in np.flatnonzero(flat["bad"][:n])}
    assert bad == set(corrupt)
    assert (flat["valid"][:n] == ~flat["bad"][:n]).all()
    for i in (0, 7, n - 1):
        if flat["valid"][i]:
            np.testing.assert_array_equal(flat["image"][i], preprocess_image(ds.paths[i],
                                                                             CONFIG))
    np.testing.assert_array_equal(flat["label"][:n], ds.labels)
    # Two processes each read every other element of the same global batches.
    halves = [list(pipeline.eval_loader(ds, CONFIG, 8, process_index=p, process_count=2))
              for p in (0, 1)]
    for k, batch in enumerate(batches):
        np.testing.assert_array_equal(halves[0][k]["index"], batch["index"][0::2])
        np.testing.assert_array_equal(halves[1][k]["index"], batch["index"][1::2])


def _train(ds, workers=0, **kw):
    return pipeline.train_loader(ds, CONFIG, 4, epochs=3, seed=5,
                                 options=pipeline.LoaderOptions(num_workers=workers),
                                 process_index=0, process_count=1, **kw)


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


def test_train_batches_resume_and_do_not_depend_on_workers(folder):
    ds, corrupt = folder
    with _train(ds) as loader:
        batches = list(loader)
    per_epoch = len(ds) // 4
    assert len(batches) == 3 * per_epoch
    order = [np.concatenate([b["index"] for b in batches[e * per_epoch:(e + 1) * per_epoch]])
             for e in range(3)]
    assert len(set(order[0])) == len(order[0])  # a permutation within an epoch
    assert not np.array_equal(order[0], order[1])  # reshuffled each epoch
    # Unreadable records are replaced by readable images (and flagged), never dropped.
    flat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert flat["valid"].all()
    bad_records = {ds.paths[i] for i in flat["index"][flat["bad"]]}
    assert bad_records and bad_records <= set(corrupt)
    report = pipeline.SkipReport(ds)
    for b in batches:
        report.add(b)
    assert report.count == int(flat["bad"].sum()) and report.message().startswith(
        f"{report.count} unreadable image")
    # Resume at batch 7 in a new loader; two worker processes give the same batches.
    with _train(ds) as resumed:
        resumed.set_state({"position": 7})
        assert all(_same(next(resumed), batches[7 + j]) for j in range(3))
        assert resumed.get_state() == {"position": 10}
    with _train(ds, workers=2) as parallel_loader:
        parallel_loader.set_state({"position": 2 * per_epoch - 1})
        tail = list(parallel_loader)
    assert len(tail) == len(batches) - (2 * per_epoch - 1)
    assert all(_same(a, b) for a, b in zip(tail, batches[2 * per_epoch - 1:], strict=True))
    with pytest.raises(ValueError, match="outside"):
        _train(ds).set_state({"position": 10**6})


def test_train_batches_with_the_recipe_augmentations(folder):
    """TrivialAugmentWide and random erasing run in the loader, per record, reproducibly and
    whatever the worker count."""
    ds, _ = folder
    recipe = Augmentation(auto_augment="ta_wide", random_erase=1.0)
    with _train(ds, augmentation=recipe) as loader:
        batches = [next(loader) for _ in range(3)]
    with _train(ds) as plain_loader:
        plain = [next(plain_loader) for _ in range(3)]
    for ours, without in zip(batches, plain, strict=True):
        np.testing.assert_array_equal(ours["index"], without["index"])
        assert not np.array_equal(ours["image"], without["image"])
        # Every image has its erased box: zeros (the reference's value) in all channels.
        erased = (ours["image"] == 0).all(axis=-1).sum(axis=(1, 2))
        assert (erased >= 15).all(), erased
    with _train(ds, augmentation=recipe) as again:
        again.set_state({"position": 1})
        assert _same(next(again), batches[1])
    with _train(ds, workers=2, augmentation=recipe) as parallel_loader:
        assert all(_same(next(parallel_loader), batch) for batch in batches[:2])
    lanczos = Preprocessing(resize_size=36, crop_size=32, interpolation="lanczos")
    with pytest.raises(ValueError, match="'lanczos'"):
        pipeline.train_loader(ds, lanczos, 4, epochs=1, seed=0, process_index=0,
                              process_count=1, augmentation=Augmentation(auto_augment="ra"))


def test_loader_errors(folder):
    ds, _ = folder
    with pytest.raises(datasets.DatasetError, match="fewer than one batch"):
        pipeline.train_loader(ds, CONFIG, 1000, epochs=1, seed=0, process_index=0,
                              process_count=1)
    with pytest.raises(ValueError, match="multiple of the process count"):
        pipeline.eval_loader(ds, CONFIG, 7, process_index=0, process_count=2)


def test_augmentation_rejects_non_finite_settings():
    for bad in ({"scale": (float("nan"), 1.0)}, {"ratio": (0.75, float("inf"))},
                {"hflip": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Augmentation(**bad)


def test_more_epochs_keep_the_batches_of_the_first(folder):
    """What extending a fine-tuning run relies on: batch k does not depend on the epochs."""
    ds, _ = folder
    with _train(ds) as three:
        short = list(three)
    longer = pipeline.train_loader(ds, CONFIG, 4, epochs=5, seed=5, process_index=0,
                                   process_count=1)
    with longer:
        assert all(_same(a, next(longer)) for a in short)


def test_workers_are_capped_by_cpus_and_memory(folder, monkeypatch):
    ds, _ = folder
    monkeypatch.setattr(pipeline, "_cpu_count", lambda: 2)
    monkeypatch.setattr(pipeline, "_available_memory", lambda: 64 * 2**30)
    asked = pipeline.LoaderOptions(num_workers=8)
    with pytest.warns(pipeline.WorkerCapWarning, match=r"using 2 decoding workers, not the 8 "
                                                       r"asked for: this machine has 2 CPUs"):
        loader = pipeline.train_loader(ds, CONFIG, 4, epochs=1, seed=0, options=asked,
                                       process_index=0, process_count=1)
    assert loader.options.num_workers == 2
    # Each worker holds prefetch + 1 batches and WORKER_BASE_BYTES; half the memory is theirs.
    batch = 4 * 8 * CONFIG.crop_size ** 2 * 3 * 4
    per_worker = pipeline.WORKER_BASE_BYTES + 3 * batch
    monkeypatch.setattr(pipeline, "_available_memory", lambda: 3 * per_worker)
    with pytest.warns(pipeline.WorkerCapWarning, match=r"holds 1 workers"):
        loader = pipeline.eval_loader(ds, CONFIG, 32, options=asked, process_index=0,
                                      process_count=1)
    assert loader.options.num_workers == 1
    monkeypatch.setattr(pipeline, "_cpu_count", lambda: 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader = pipeline.eval_loader(ds, CONFIG, 32, process_index=0, process_count=1,
                                      options=pipeline.LoaderOptions(num_workers=1))
    assert loader.options.num_workers == 1


_TERMINATED_LOADER = """
import sys, time
from resnext_flax import datasets, pipeline
from resnext_flax.metadata import Preprocessing
from resnext_flax.weights.files import sigterm_as_interrupt

if __name__ == "__main__":
    ds = datasets.image_folder(sys.argv[1])
    loader = pipeline.train_loader(ds, Preprocessing(resize_size=36, crop_size=32), 4,
                                   epochs=100, seed=0,
                                   options=pipeline.LoaderOptions(num_workers=2))
    try:
        with sigterm_as_interrupt(), loader:
            for i, batch in enumerate(loader):
                if i == 2:
                    print("ready", flush=True)
                time.sleep(0.2)
    except KeyboardInterrupt:
        sys.exit(130)
"""


def test_sigterm_with_workers_shuts_down_quietly(folder, tmp_path):
    """Grain's workers stop, and no batch in shared memory outlives them: no "Exception
    ignored" at exit, no leaked shared memory."""
    import signal
    import subprocess
    import sys

    from limits import CHILD_TIMEOUT

    ds, _ = folder
    script = tmp_path / "loop.py"
    script.write_text(_TERMINATED_LOADER)
    child = subprocess.Popen([sys.executable, str(script), ds.root], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=CHILD_TIMEOUT)
    finally:
        child.kill()
    assert child.returncode == 130, err
    assert "Exception ignored" not in err and "leaked" not in err, err


def test_repeated_augmentation_gives_each_device_its_replicas_images():
    """Device ``r``'s part of every global batch is the reference sampler's rank ``r`` list
    in order, so copies of one image land on different devices (as on the reference's GPUs)
    and MixUp/CutMix, which pair within a device's part, pair distinct images."""
    from resnext_flax.datasets import DatasetError
    from resnext_flax.pipeline import RepeatedOrder
    from resnext_flax.sampling import RASampler

    order = RepeatedOrder(600, 3, 4, 32, 4, 2, "data")
    assert order.steps == 512 // 4 // 8 and len(order) == 2 * order.steps * 32
    for epoch in range(2):
        lists = [RASampler(600, num_replicas=4, rank=r, seed=3, repetitions=4).indices(epoch)
                 for r in range(4)]
        for step in range(order.steps):
            start = (epoch * order.steps + step) * 32
            batch = [order[start + i] for i in range(32)]
            for r in range(4):
                part = batch[8 * r:8 * r + 8]
                assert part == list(lists[r][8 * step:8 * step + 8])
                assert len(set(part)) == 8
    with pytest.raises(ValueError, match="split evenly over the 3 replicas"):
        RepeatedOrder(600, 3, 4, 32, 3, 1, "data")
    with pytest.raises(DatasetError, match="255 images give none"):
        RepeatedOrder(255, 3, 4, 32, 1, 1, "data")
