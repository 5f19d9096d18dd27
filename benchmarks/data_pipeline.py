"""Throughput of the image-folder input pipeline, and of ``evaluate`` end to end.

Three numbers, so it is visible whether the input pipeline or the model is the bottleneck:

1. **pipeline alone**: images/s of the Grain evaluation loader (decode + resize + center crop
   + normalize, ``resnext_flax.pipeline.eval_loader``) for each worker count, and of the
   training loader (random resized crop + flip); as the alternative measured against it, the
   library's thread-pool ``preprocess(paths, num_workers=T)`` (no Grain, no processes);
2. **model alone**: images/s of the sharded evaluation program on batches already in memory;
3. **evaluate end to end**: ``evaluate`` on the folder (images/s after the first
   batch, which includes compilation).

If (3) is close to (2), the model is the bottleneck; if it is close to (1), the pipeline is.
Configurations are measured interleaved (one pass each per round, medians over rounds) so that
load from other processes hits all of them alike; the 1-minute load average is recorded.

The folder: ``--folder DIR`` (an ImageFolder; e.g. ImageNet's validation set), or by default
``--images N`` JPEGs of ImageNet's typical size (500x375, quality 90) cut from scikit-learn's
sample photographs, written to a temporary folder; ``--passes P`` reads it P times (enough
batches for every worker to reach a steady state).

    python benchmarks/data_pipeline.py                                  # this CPU
    python benchmarks/data_pipeline.py --workers 8,16 --threads 1 --batch-size 256 \\
        --model resnet50 --images 1024 --passes 16 --json gpu_pipeline.json   # a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np
from PIL import Image

import resnext_flax
from resnext_flax import datasets, parallel, pipeline
from resnext_flax.evaluation import _sharded_outputs, evaluate
from resnext_flax.metadata import Preprocessing
from resnext_flax.models.functional import CompiledModel


def write_folder(root: str, count: int, classes: int = 8) -> None:
    """`count` 500x375 JPEGs (quality 90), crops of the sample photographs, in `classes`
    class folders."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    for i in range(count):
        photo = photos[i % 2]
        h, w = int(rng.integers(200, 427)), int(rng.integers(260, 640))
        top, left = int(rng.integers(0, 427 - h + 1)), int(rng.integers(0, 640 - w + 1))
        image = Image.fromarray(photo[top:top + h, left:left + w]).resize((500, 375))
        path = os.path.join(root, f"class{i % classes}", f"{i:06d}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        image.save(path, quality=90)


def _time_loader(make: Any) -> tuple[float, float]:
    """(seconds to the first batch: start-up, images/s over the remaining batches)."""
    start = time.perf_counter()
    with make() as loader:
        first = next(loader)
        ready = time.perf_counter()
        images = 0
        for batch in loader:
            images += len(batch["image"])
    end = time.perf_counter()
    del first
    return ready - start, images / (end - ready)


def _time_threads(paths: list[str], config: Preprocessing, batch: int, threads: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        resnext_flax.preprocess.preprocess(paths[i:i + batch], config, num_workers=threads)
    return len(paths) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--folder", help="an existing ImageFolder (default: generated JPEGs)")
    p.add_argument("--images", type=int, default=256, help="generated images (default 256)")
    p.add_argument("--passes", type=int, default=1,
                   help="read the folder this many times (more batches per worker without "
                        "more files; the files are then in the page cache)")
    p.add_argument("--workers", default="0,1,2", help="Grain worker counts to compare")
    p.add_argument("--threads", type=int, default=2, help="threads per process")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", default="resnet50", help="for the model and evaluate numbers")
    p.add_argument("--size", type=int, default=224,
                   help="crop size (resize: 8/7 of it, as 256/224); 224 by default")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    # 256 / 224, bilinear (the V1 weight sets') by default.
    config = Preprocessing(resize_size=args.size * 8 // 7, crop_size=args.size)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            folder = os.path.join(tmp, "images")
            write_folder(folder, args.images)
        dataset = datasets.image_folder(folder)
        dataset = dataset.subset(np.tile(np.arange(len(dataset)), args.passes))
        results: dict[str, Any] = {
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "jax_backend": jax.default_backend(), "devices": jax.device_count(),
                        "loadavg_1min_start": os.getloadavg()[0]},
            "args": vars(args), "images": len(dataset)}
        results.update(_measure(args, workers, config, dataset))
        results["machine"]["loadavg_1min_end"] = os.getloadavg()[0]
    _print(results, workers, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


def _measure(args: argparse.Namespace, workers: list[int], config: Preprocessing,
             dataset: datasets.ImageDataset) -> dict[str, Any]:
    mesh = parallel.data_mesh()
    batch = args.batch_size
    model = resnext_flax.create_model(args.model, num_classes=dataset.num_classes)
    compiled = parallel.replicate(mesh, CompiledModel.from_module(model))
    step = _sharded_outputs(mesh, min(5, dataset.num_classes))
    images = np.random.default_rng(0).standard_normal(
        (batch, config.crop_size, config.crop_size, 3)).astype(np.float32)
    labels = np.zeros(batch, np.int32)
    x, y = parallel.shard_batch(mesh, images, labels)
    jax.block_until_ready(step(compiled, x, y))  # compile

    def model_alone() -> float:
        calls = max(2, len(dataset) // batch)
        start = time.perf_counter()
        for _ in range(calls):
            out = step(compiled, x, y)
        jax.block_until_ready(out)
        return calls * batch / (time.perf_counter() - start)

    def eval_loader(w: int):
        return lambda: pipeline.eval_loader(dataset, config, batch, pipeline.LoaderOptions(
            num_workers=w, num_threads=args.threads))

    def train_loader(w: int):
        return lambda: pipeline.train_loader(dataset, config, batch, epochs=1, seed=0,
                                             options=pipeline.LoaderOptions(
                                                 num_workers=w, num_threads=args.threads))

    samples: dict[str, list[float]] = {}

    def record(key: str, value: float) -> None:
        samples.setdefault(key, []).append(value)

    for _ in range(args.rounds):
        for w in workers:
            startup, rate = _time_loader(eval_loader(w))
            record(f"eval_pipeline_w{w}", rate)
            record(f"eval_pipeline_w{w}_startup_s", startup)
            record(f"train_pipeline_w{w}", _time_loader(train_loader(w))[1])
        record("threadpool_preprocess", _time_threads(list(dataset.paths), config, batch,
                                                      args.threads))
        record("model_alone", model_alone())
        result = evaluate(model, dataset, preprocessing=config, batch_size=batch,
                                       loader=pipeline.LoaderOptions(
                                           num_workers=max(workers), num_threads=args.threads),
                                       mesh=mesh, progress=False)
        record(f"evaluate_end_to_end_w{max(workers)}", result.images_per_second)
    return {"median": {k: statistics.median(v) for k, v in samples.items()},
            "samples": samples}


def _print(results: dict[str, Any], workers: list[int], args: argparse.Namespace) -> None:
    m = results["median"]
    print(f"{results['images']} images, batch {args.batch_size}, {args.threads} threads per "
          f"process, {results['machine']['cpu_count']} CPUs, backend "
          f"{results['machine']['jax_backend']} x{results['machine']['devices']}, load "
          f"{results['machine']['loadavg_1min_start']:.1f} -> "
          f"{results['machine']['loadavg_1min_end']:.1f}; medians of {args.rounds} rounds")
    print(f"{'what':<44}{'images/s':>10}")
    for w in workers:
        print(f"{f'pipeline, evaluation, {w} workers':<44}{m[f'eval_pipeline_w{w}']:>10.1f}"
              f"   (first batch after {m[f'eval_pipeline_w{w}_startup_s']:.1f} s)")
        print(f"{f'pipeline, training, {w} workers':<44}{m[f'train_pipeline_w{w}']:>10.1f}")
    print(f"{'thread pool preprocess() (no Grain)':<44}{m['threadpool_preprocess']:>10.1f}")
    print(f"{f'model alone ({args.model}, {args.size} px)':<44}{m['model_alone']:>10.1f}")
    key = f"evaluate_end_to_end_w{max(workers)}"
    print(f"{f'evaluate end to end ({max(workers)} workers)':<44}{m[key]:>10.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
