"""The ``evaluate`` and ``finetune`` subcommands of ``resnext-flax`` (registered by
``cli.py``): argument parsing and printing around :mod:`resnext_flax.evaluation` and
:mod:`resnext_flax.finetuning`."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from resnext_flax.models.variants import VARIANTS


def _add_loader_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="Grain worker processes decoding images (default 0: in-process "
                             "threads only); see docs/data.md")
    parser.add_argument("--threads", type=int, default=2, metavar="N",
                        help="decoding threads per process (default 2)")
    parser.add_argument("--resize-size", type=int, metavar="PX",
                        help="override the weights' resize size")
    parser.add_argument("--crop-size", type=int, metavar="PX",
                        help="override the weights' crop size")
    parser.add_argument("--cache-dir", metavar="DIR", help="converted-checkpoint cache")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_evaluate_parser(commands: Any) -> None:
    """``resnext-flax evaluate DIR --model NAME [--weights TAG | --checkpoint PATH] ...``"""
    p = commands.add_parser(
        "evaluate", help="top-1/top-5 accuracy on an image folder or list file",
        description="Accuracy, mean loss and images/s of a model on an ImageFolder layout "
                    "(one sub-folder per class) or a list file (path<TAB>label). ImageNet "
                    "folders named by WordNet id are labelled in torchvision's class order and "
                    "compared with the weight set's published accuracy.")
    p.add_argument("folder", metavar="DIR", help="image folder or list file")
    p.add_argument("--model", required=True, choices=list(VARIANTS), metavar="NAME")
    p.add_argument("--weights", default="DEFAULT", metavar="TAG",
                   help="weight set (DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2); with --checkpoint "
                        "it still sets the preprocessing and the published accuracy")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="local .pth / .safetensors / converted (e.g. fine-tuned) checkpoint")
    p.add_argument("--batch-size", type=int, default=64, metavar="N",
                   help="global batch, a multiple of the device count (default 64)")
    p.add_argument("--json", metavar="OUT", help="also write the results (and per-image "
                                                 "top-5 predictions) as JSON")
    _add_loader_arguments(p)


def run_evaluate(args: argparse.Namespace) -> str:
    """Run ``evaluate`` and return what it prints."""
    from resnext_flax.evaluation import evaluate_pretrained
    from resnext_flax.pipeline import LoaderOptions

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    result, note = evaluate_pretrained(
        args.folder, args.model, args.weights, checkpoint=args.checkpoint,
        batch_size=args.batch_size, loader=LoaderOptions(args.workers, args.threads),
        resize_size=args.resize_size, crop_size=args.crop_size, cache_dir=args.cache_dir,
        progress=not args.no_progress)
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


_FINETUNE_DESCRIPTION = (
    "Fine-tune a model on an ImageFolder layout or a list file: a new head for its classes, "
    "validation each epoch, resumable checkpoints in --output-dir, and the best model written "
    "to OUTPUT_DIR/best.safetensors with the class names in its header.")


def add_finetune_parser(commands: Any) -> None:
    """``resnext-flax finetune TRAIN_DIR [--val-dir DIR | --val-split F] --model NAME ...``"""
    _add_finetune_arguments(commands.add_parser(
        "finetune", help="fine-tune on an image folder (new head for its classes)",
        description=_FINETUNE_DESCRIPTION))


def finetune_parser() -> argparse.ArgumentParser:
    """A stand-alone parser of the ``finetune`` arguments (for scripts that wrap it)."""
    parser = argparse.ArgumentParser(prog="resnext-flax finetune",
                                     description=_FINETUNE_DESCRIPTION)
    _add_finetune_arguments(parser)
    return parser


def _add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    from resnext_flax.finetuning import FinetuneConfig

    d = FinetuneConfig(model="resnet18")
    p.add_argument("train", metavar="TRAIN_DIR", help="training folder or list file")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-dir", metavar="DIR", help="validation folder or list file")
    val.add_argument("--val-split", type=float, metavar="F",
                     help="hold out this fraction of each class for validation")
    p.add_argument("--model", required=True, choices=list(VARIANTS), metavar="NAME")
    p.add_argument("--weights", default="DEFAULT", metavar="TAG|PATH",
                   help="weight set tag, a local .pth/.safetensors file, or 'none' for random "
                        "initialization (default DEFAULT)")
    p.add_argument("--checkpoint", metavar="PATH", help="start from this local file (same as "
                                                        "--weights PATH)")
    p.add_argument("--output-dir", default="finetune-run", metavar="DIR",
                   help="checkpoints, history.json and best.safetensors (default "
                        "./finetune-run); rerun with the same directory to resume")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, metavar="N",
                   help="global batch, a multiple of the device count")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=d.optimizer)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="on conv and linear kernels only")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--freeze-backbone", action="store_true", help="train the head only")
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--min-scale", type=float, default=d.augmentation.scale[0],
                   help="RandomResizedCrop's smallest area fraction (default 0.08)")
    p.add_argument("--hflip", type=float, default=d.augmentation.hflip,
                   help="horizontal flip probability (default 0.5)")
    p.add_argument("--save-every", type=int, default=0, metavar="STEPS",
                   help="also checkpoint every N steps (default: each epoch)")
    _add_loader_arguments(p)


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`FinetuneConfig` the ``finetune`` arguments describe."""
    from resnext_flax.augment import Augmentation
    from resnext_flax.finetuning import FinetuneConfig

    weights = args.checkpoint or args.weights
    return FinetuneConfig(
        model=args.model, weights=None if weights.lower() in ("none", "random") else weights,
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
        freeze_backbone=args.freeze_backbone, bf16=args.bf16, seed=args.seed,
        resize_size=args.resize_size, crop_size=args.crop_size,
        augmentation=Augmentation(scale=(args.min_scale, 1.0), hflip=args.hflip),
        val_split=args.val_split, save_every=args.save_every)


def run_finetune(args: argparse.Namespace) -> str:
    """Run ``finetune`` (epoch lines are printed as they come) and return the summary."""
    from resnext_flax.finetuning import finetune, finetune_summary
    from resnext_flax.pipeline import LoaderOptions

    result = finetune(args.train, config_from_args(args), args.output_dir, val=args.val_dir,
                      loader=LoaderOptions(args.workers, args.threads),
                      progress=not args.no_progress, cache_dir=args.cache_dir)
    return finetune_summary(result) + (
        f"\npredict with: resnext-flax predict IMAGE --model {args.model} --checkpoint "
        f"{os.path.join(args.output_dir, 'best.safetensors')}")
