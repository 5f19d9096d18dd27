"""``resnext-flax evaluate``: accuracy on an image folder or list file, around
:func:`resnext_flax.evaluation.evaluate_pretrained`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from resnext_flax.cli.common import (
    add_checkpoint_options,
    add_compilation_options,
    add_loader_arguments,
    checkpoint_options,
)
from resnext_flax.models.variants import VARIANTS


def add_parser(commands: Any) -> None:
    """``resnext-flax evaluate DIR --model NAME [--weights TAG | --checkpoint PATH] ...``"""
    p = commands.add_parser(
        "evaluate", help="top-1/top-5 accuracy on an image folder or list file",
        description="Accuracy, mean loss and images/s of a model on an ImageFolder layout "
                    "(one sub-folder per class) or a list file (path<TAB>label). ImageNet "
                    "folders named by WordNet id are labelled in torchvision's class order and "
                    "compared with the weight set's published accuracy.")
    p.add_argument("folder", metavar="DIR", help="image folder or list file")
    p.add_argument("--model", required=True, choices=list(VARIANTS), metavar="NAME")
    p.add_argument("--weights", default="DEFAULT", metavar="TAG|PATH",
                   help="weight set (DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2) or a local file "
                        "(the same as --checkpoint PATH); with --checkpoint "
                        "it still sets the preprocessing and the published accuracy")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="local .pth / .safetensors / converted (e.g. fine-tuned) checkpoint")
    p.add_argument("--batch-size", type=int, default=64, metavar="N",
                   help="global batch, a multiple of the device count (default 64)")
    p.add_argument("--json", metavar="OUT", help="also write the results (and per-image "
                                                 "top-5 predictions) as JSON")
    add_loader_arguments(p)
    add_checkpoint_options(p, head=False)
    add_compilation_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> str:
    """Run ``evaluate`` and return what it prints."""
    from resnext_flax.compilation import report_compilation
    from resnext_flax.evaluation import evaluate_pretrained
    from resnext_flax.pipeline import LoaderOptions

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    with report_compilation(f"{args.model}'s evaluation step for batches of {args.batch_size}",
                            enabled=not args.no_progress):
        result, note = evaluate_pretrained(
            args.folder, args.model, args.weights, checkpoint=args.checkpoint,
            batch_size=args.batch_size, loader=LoaderOptions(args.workers, args.threads),
            resize_size=args.resize_size, crop_size=args.crop_size, cache_dir=args.cache_dir,
            progress=not args.no_progress, **checkpoint_options(args))
    lines = [f"{args.folder}: {result.num_images} images, {len(result.classes)} classes "
             f"({note})", result.table(),
             f"{result.num_images} images in {result.seconds:.1f} s, "
             f"{result.images_per_second:.1f} images/s after the first batch"]
    if result.num_skipped:
        more = ", ..." if result.num_skipped > len(result.skipped_paths) else ""
        lines.append(f"{result.num_skipped} unreadable images skipped (not counted): "
                     f"{', '.join(result.skipped_paths)}{more}")
    if args.json:
        _write_evaluation_json(args, result, note)
    return "\n".join(lines)


def _write_evaluation_json(args: argparse.Namespace, result: Any, note: str) -> None:
    import jax

    from resnext_flax.datasets import load_dataset
    from resnext_flax.weights.files import atomic_write

    dataset = load_dataset(args.folder)
    ok = (result.predictions >= 0).all(axis=1)
    report = {"folder": args.folder, "model": args.model, "weights": args.weights,
              "checkpoint": args.checkpoint, "batch_size": args.batch_size,
              "devices": jax.device_count(), "labels": note, **result.summary(),
              "predictions": [{"path": path, "top5": [int(c) for c in top]}
                              for path, top, good in zip(dataset.paths, result.predictions,
                                                         ok, strict=True) if good]}

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)

    atomic_write(args.json, write)
