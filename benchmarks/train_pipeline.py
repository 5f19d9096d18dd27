"""Images/s of the training input pipeline with the ``torchvision-v2`` recipe's augmentations,
vs torchvision's ``DataLoader`` with the same transforms; and whether it keeps up with the
training step.

Both sides read the same JPEG folder and produce float32 batches of the recipe's training crop
(``--model``'s: 176 for resnet50, 224 for the ResNeXt-50; or ``--crop-size``) with
RandomResizedCrop, RandomHorizontalFlip, TrivialAugmentWide, scaling to [0, 1], ImageNet
normalization and RandomErasing (p 0.1):

- **library**: ``resnext_flax.pipeline.train_loader`` with the recipe's ``Augmentation`` and
  ``LoaderOptions(num_workers=W, num_threads=--threads)`` (NHWC batches);
- **torchvision**: ``datasets.ImageFolder`` with the reference's
  ``ClassificationPresetTrain`` transforms (``RandomResizedCrop``, ``RandomHorizontalFlip``,
  ``TrivialAugmentWide``, ``PILToTensor``, ``ConvertImageDtype``, ``Normalize``,
  ``RandomErasing``) in a shuffling ``DataLoader(num_workers=W)`` (NCHW batches).

For each worker count in ``--workers``: images/s after the first batch (the first, which
includes starting the workers, is reported apart). Configurations run interleaved, one pass
each per round, medians over ``--rounds``.

Does the pipeline keep up? The training step's images/s (``--step-images-per-second``, or
measured here: the library's batch-``--step-batch`` step of ``--model`` as ``train_step.py``
builds it, on a batch in memory) against the pipeline's: ``cpu_share`` is the fraction of the
machine the pipeline needs to feed the step (step / pipeline images/s; below 1 it keeps up).
Measured here, the step also runs fed by the library's loader with the most workers
(``end_to_end``, ``--step-steps`` steps after the first): close to the step alone, the
pipeline is not the bottleneck even though both share the CPUs.

With few batches per pass, the loaders' read-ahead during the first batch inflates the rate
of the others: give ``--passes`` enough for many batches per worker.

The folder: ``--folder DIR`` (an ImageFolder), or by default ``--images N`` JPEGs of
ImageNet's typical size written by ``data_pipeline.py``'s ``write_folder``; ``--passes P``
reads it P times.

    python benchmarks/train_pipeline.py --images 256 --passes 4 \\
        --json benchmarks/results/cpu_2core_train_pipeline.json
    python benchmarks/train_pipeline.py --images 256 --passes 4 --step-images-per-second 4.1
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torchvision
from data_pipeline import write_folder  # sibling scripts (same folder)
from torchvision import transforms
from train_step import RECIPE, library_step, recipe_config

import resnext_flax
from resnext_flax import datasets, pipeline
from resnext_flax.finetuning import TrainConfig
from resnext_flax.metadata import Preprocessing


def train_preprocessing(config: TrainConfig) -> Preprocessing:
    """The training crop of the config (the rest is ImageNet's normalization and the bilinear
    interpolation of a model without weights)."""
    crop = config.train_crop_size or config.crop_size or Preprocessing().crop_size
    return Preprocessing(resize_size=max(config.resize_size or crop, crop), crop_size=crop)


def benchmark_config(args: argparse.Namespace, batch: int) -> TrainConfig:
    """The recipe's config for ``--model`` with `batch`, at ``--crop-size`` when given."""
    config = recipe_config(args.model, batch, "fp32")
    if args.crop_size is None:
        return config
    return dataclasses.replace(config, train_crop_size=args.crop_size)


def library_loader(dataset: datasets.ImageDataset, config: TrainConfig, batch: int,
                   workers: int, threads: int) -> Callable[[], Any]:
    def make() -> Any:
        return pipeline.train_loader(
            dataset, train_preprocessing(config), batch, epochs=1, seed=config.seed,
            augmentation=config.augmentation,
            options=pipeline.LoaderOptions(num_workers=workers, num_threads=threads))
    return make


def torch_transform(config: TrainConfig) -> transforms.Compose:
    """torchvision reference's ``ClassificationPresetTrain`` for the config's settings."""
    pre, aug = train_preprocessing(config), config.augmentation
    if aug.auto_augment not in (None, "ta_wide") or aug.erase_value != 0:
        raise ValueError("the torch side builds TrivialAugmentWide (or none) and erasing "
                         f"with 0, got {aug.auto_augment!r} and {aug.erase_value!r}")
    mode = transforms.InterpolationMode(pre.interpolation)
    steps: list[Any] = [transforms.RandomResizedCrop(pre.crop_size, scale=aug.scale,
                                                     ratio=aug.ratio, interpolation=mode,
                                                     antialias=True)]
    if aug.hflip > 0:
        steps.append(transforms.RandomHorizontalFlip(aug.hflip))
    if aug.auto_augment == "ta_wide":
        steps.append(transforms.TrivialAugmentWide(interpolation=mode))
    steps += [transforms.PILToTensor(), transforms.ConvertImageDtype(torch.float),
              transforms.Normalize(mean=pre.mean, std=pre.std)]
    if aug.random_erase > 0:
        steps.append(transforms.RandomErasing(p=aug.random_erase))
    return transforms.Compose(steps)


def torch_loader(folder: str, passes: int, config: TrainConfig, batch: int,
                 workers: int) -> Callable[[], Any]:
    images = torchvision.datasets.ImageFolder(folder, transform=torch_transform(config))
    data = torch.utils.data.Subset(images, np.tile(np.arange(len(images)), passes).tolist())

    def make() -> Any:
        generator = torch.Generator().manual_seed(config.seed)
        # Workers are spawned, not forked: this process runs JAX's threads, which a fork
        # would copy in whatever state they are (a deadlock risk).
        return torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True,
                                           num_workers=workers, drop_last=True,
                                           generator=generator,
                                           multiprocessing_context="spawn" if workers else None)
    return make


def time_batches(batches: Iterable[Any], size: Callable[[Any], int],
                 consume: Callable[[Any], None] = lambda batch: None) -> tuple[float, float]:
    """(seconds to the first batch, images/s over the others); `consume` runs on each."""
    start = time.perf_counter()
    iterator: Iterator[Any] = iter(batches)
    consume(next(iterator))
    ready = time.perf_counter()
    images = 0
    for batch in iterator:
        consume(batch)
        images += size(batch)
    if images == 0:
        raise ValueError("one batch only: give more --images or --passes to time the others")
    return ready - start, images / (time.perf_counter() - ready)


def _timed_library(make: Callable[[], Any], consume: Callable[[Any], None] = lambda batch: None,
                   limit: int | None = None) -> tuple[float, float]:
    """`time_batches` over a library loader, its first `limit` batches (None: all)."""
    with make() as loader:
        return time_batches(itertools.islice(loader, limit), lambda b: len(b["image"]),
                            consume)


def measure(args: argparse.Namespace, folder: str) -> dict[str, Any]:
    config = benchmark_config(args, args.batch_size)
    dataset = datasets.image_folder(folder)
    dataset = dataset.subset(np.tile(np.arange(len(dataset)), args.passes))
    sides: dict[str, Callable[[], tuple[float, float]]] = {}
    for w in args.workers:
        ours = library_loader(dataset, config, args.batch_size, w, args.threads)
        theirs = torch_loader(folder, args.passes, config, args.batch_size, w)
        sides[f"library_w{w}"] = lambda m=ours: _timed_library(m)
        sides[f"torch_w{w}"] = lambda m=theirs: time_batches(m(), lambda b: len(b[0]))
    step = None
    if args.step_images_per_second is None:
        step_config = benchmark_config(args, args.step_batch)
        step = library_step(step_config, args.num_classes)
        batch = np.random.default_rng(0).standard_normal(
            (args.step_batch, *(train_preprocessing(step_config).crop_size,) * 2, 3),
            dtype=np.float32)
        labels = np.zeros(args.step_batch, np.int32)
        step(batch, labels)  # compiles
        feed = library_loader(dataset, step_config, args.step_batch, max(args.workers),
                              args.threads)

        def step_alone() -> tuple[float, float]:
            return time_batches(range(args.step_steps + 1), lambda _: args.step_batch,
                                lambda _: step(batch, labels))

        sides["step_alone"] = step_alone
        sides[f"end_to_end_w{max(args.workers)}"] = lambda: _timed_library(
            feed, lambda b: step(b["image"], b["label"]), limit=args.step_steps + 1)
    samples: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        keys = list(sides)
        for key in keys[round_ % len(keys):] + keys[:round_ % len(keys)]:
            startup, rate = sides[key]()
            samples.setdefault(key, []).append(rate)
            samples.setdefault(f"{key}_startup_s", []).append(startup)
    median = {k: statistics.median(v) for k, v in samples.items()}
    step_rate = args.step_images_per_second or median["step_alone"]
    keep_up = {}
    for w in args.workers:
        share = step_rate / median[f"library_w{w}"]
        keep_up[f"library_w{w}"] = {"cpu_share": share, "keeps_up": share < 1}
    if step is not None:
        key = f"end_to_end_w{max(args.workers)}"
        keep_up[key] = {"of_step_alone": median[key] / median["step_alone"]}
    return {"crop_size": train_preprocessing(config).crop_size,
            "augmentation": dataclasses.asdict(config.augmentation), "images": len(dataset),
            "step_images_per_second": step_rate,
            "step_measured": step is not None, "median": median, "samples": samples,
            "keep_up": keep_up}


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    m, lines = results["median"], []
    lines.append(f"{results['images']} images, crop {results['crop_size']}, batch "
                 f"{args.batch_size}, {args.threads} threads per library process, load "
                 f"{results['machine']['loadavg_1min_start']:.1f} -> "
                 f"{results['machine']['loadavg_1min_end']:.1f}; medians of {args.rounds}")
    lines += ["| workers | library img/s | torchvision DataLoader img/s | library/torchvision |",
              "|---|---|---|---|"]
    for w in args.workers:
        lib, tv = m[f"library_w{w}"], m[f"torch_w{w}"]
        lines.append(f"| {w} | {lib:.1f} | {tv:.1f} | {lib / tv:.2f} |")
    source = "measured" if results["step_measured"] else "given"
    lines.append(f"training step ({args.model}, batch {args.step_batch}, {source}): "
                 f"{results['step_images_per_second']:.2f} img/s")
    for key, verdict in results["keep_up"].items():
        if "cpu_share" in verdict:
            verdict_word = "keeps up" if verdict["keeps_up"] else "BOTTLENECK"
            lines.append(f"  {key}: the pipeline needs {verdict['cpu_share']:.1%} of the "
                         f"machine to feed it ({verdict_word})")
        else:
            lines.append(f"  {key}: the step fed by the loader runs at "
                         f"{verdict['of_step_alone']:.2f}x of the step alone")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", help="an existing ImageFolder (default: generated JPEGs)")
    p.add_argument("--images", type=int, default=256, help="generated images (default 256)")
    p.add_argument("--passes", type=int, default=1, help="read the folder this many times")
    p.add_argument("--workers", default="0,1,2", help="worker counts to compare")
    p.add_argument("--threads", type=int, default=2, help="threads per library process")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--model", default="resnet50",
                   help="whose recipe crop and step (default resnet50)")
    p.add_argument("--crop-size", type=int,
                   help="the training crop (default: the recipe's for --model)")
    p.add_argument("--num-classes", type=int, default=1000, help="the step's head")
    p.add_argument("--step-batch", type=int, default=64, help="the step's batch (default 64)")
    p.add_argument("--step-steps", type=int, default=3,
                   help="steps timed per round, alone and fed by the loader")
    p.add_argument("--step-images-per-second", type=float,
                   help="the step's images/s (e.g. from train_step.py); not measured then")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", metavar="FILE", help="write the results here")
    args = p.parse_args(argv)
    try:
        args.workers = [int(w) for w in args.workers.split(",") if w]
    except ValueError:
        p.error(f"--workers: comma-separated integers, got {args.workers!r}")
    if not args.workers or min(args.workers) < 0:
        p.error("--workers: at least one count, none negative")
    if args.model not in resnext_flax.list_models():
        p.error(f"--model: unknown {args.model!r}")
    if min(args.rounds, args.passes, args.images, args.batch_size, args.step_batch,
           args.step_steps, args.crop_size or 1) < 1:
        p.error("--rounds, --passes, --images, --batch-size, --step-batch, --step-steps and "
                "--crop-size must be at least 1")
    if args.step_images_per_second is not None and args.step_images_per_second <= 0:
        p.error("--step-images-per-second must be positive")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results: dict[str, Any] = {
        "machine": {"platform": sys.platform, "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "torchvision": torchvision.__version__,
                    "loadavg_1min_start": os.getloadavg()[0]},
        "args": vars(args), "recipe": RECIPE, "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/train_pipeline.py " + " ".join(
            sys.argv[1:] if argv is None else argv)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            folder = os.path.join(tmp, "images")
            write_folder(folder, args.images)
        results.update(measure(args, folder))
    results["machine"]["loadavg_1min_end"] = os.getloadavg()[0]
    print(report(results, args))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
