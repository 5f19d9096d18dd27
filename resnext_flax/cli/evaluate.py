"""``resnext-flax evaluate``: accuracy on an image folder or list file, around
:func:`resnext_flax.evaluation.evaluate_pretrained`."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from resnext_flax.cli.common import (
    add_checkpoint_options,
    add_compilation_options,
    add_loader_arguments,
    add_model_argument,
    checkpoint_options,
    local_weight_file,
    model_name,
)


def add_parser(commands: Any) -> None:
    """``resnext-flax evaluate DIR --model NAME [--weights TAG | --checkpoint PATH] ...``"""
    p = commands.add_parser(
        "evaluate", help="top-1/top-5 accuracy on an image folder or list file",
        description="Accuracy, mean loss and images/s of a model on an ImageFolder layout "
                    "(one sub-folder per class) or a list file (path<TAB>label). ImageNet "
                    "folders named by WordNet id are labelled in torchvision's class order and "
                    "compared with the weight set's published accuracy.")
    p.add_argument("folder", metavar="DIR", help="image folder or list file")
    add_model_argument(p)
    p.add_argument("--weights", default="DEFAULT", metavar="TAG|PATH",
                   help="weight set (DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2) or a local file "
                        "(the same as --checkpoint PATH); with --checkpoint it still sets the "
                        "preprocessing and the published accuracy (default: DEFAULT)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="local .pth / .safetensors / converted (e.g. fine-tuned) checkpoint")
    p.add_argument("--batch-size", type=int, default=64, metavar="N",
                   help="global batch, a multiple of the device count (default: 64)")
    p.add_argument("--json", metavar="OUT", help="also write the results (and per-image "
                                                 "top-5 predictions) as JSON; checked before "
                                                 "the evaluation starts")
    add_loader_arguments(p)
    add_checkpoint_options(p, head=False)
    add_compilation_options(p)
    p.set_defaults(run=run, check=check)


def check(args: argparse.Namespace) -> None:
    """What fails at once, before anything is imported or read: the batch size, and a
    ``--json`` that cannot be written or is a file the evaluation reads (the images are
    checked once the folder is scanned)."""
    from resnext_flax.outputs import check_output_path, weight_source_files

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.json:
        weight_file = local_weight_file(args)
        read = weight_source_files(weight_file) if weight_file else []
        list_file = [args.folder] if os.path.isfile(args.folder) else []
        check_output_path(args.json, [*read, *list_file], what="--json")


def run(args: argparse.Namespace) -> str:
    """Run ``evaluate`` and return what it prints."""
    from resnext_flax.compilation import report_compilation
    from resnext_flax.datasets import load_dataset
    from resnext_flax.evaluation import evaluate_pretrained
    from resnext_flax.outputs import check_output_path
    from resnext_flax.pipeline import LoaderOptions

    check(args)
    name = model_name(args)
    dataset = load_dataset(args.folder)
    if args.json:
        check_output_path(args.json, dataset.paths, what="--json")
    with report_compilation(f"{name}'s evaluation step for batches of {args.batch_size}",
                            enabled=not args.no_progress):
        result, note = evaluate_pretrained(
            dataset, name, args.weights, checkpoint=args.checkpoint,
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
        _write_evaluation_json(args, name, dataset, result, note)
    return "\n".join(lines)


def _write_evaluation_json(args: argparse.Namespace, name: str, dataset: Any, result: Any,
                           note: str) -> None:
    """The report names the weights measured: the weight set resolved from ``--weights``
    (never ``DEFAULT``) and the file or URL the weights were read from (with ``--checkpoint``
    the file found, e.g. a Hugging Face folder's ``model.safetensors``, as an absolute path)."""
    import jax

    from resnext_flax.weights.catalog import resolve_weights
    from resnext_flax.weights.files import atomic_write

    source = result.source
    if source is not None and os.path.exists(source):
        source = os.path.abspath(source)
    ok = (result.predictions >= 0).all(axis=1)
    report = {"folder": args.folder, "model": name,
              "weights": result.weights or resolve_weights(name, args.weights).name,
              "checkpoint": source, "batch_size": args.batch_size,
              "devices": jax.device_count(), "labels": note, **result.summary(),
              "predictions": [{"path": path, "top5": [int(c) for c in top]}
                              for path, top, good in zip(dataset.paths, result.predictions,
                                                         ok, strict=True) if good]}

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)

    atomic_write(args.json, write)
