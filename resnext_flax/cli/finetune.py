"""``resnext-flax finetune``: fine-tune on an image folder, around
:func:`resnext_flax.finetuning.finetune`; :func:`finetune_parser` and :func:`config_from_args`
serve scripts that wrap it."""

from __future__ import annotations

import argparse
import os
from typing import Any

from resnext_flax.cli.common import add_compilation_options, add_loader_arguments
from resnext_flax.distributed import add_arguments as add_distributed_arguments
from resnext_flax.distributed import initialize_from_arguments
from resnext_flax.models.variants import VARIANTS

_FINETUNE_DESCRIPTION = (
    "Fine-tune a model on an ImageFolder layout or a list file: a new head for its classes, "
    "validation each epoch, resumable checkpoints in --output-dir, and the best model written "
    "to OUTPUT_DIR/best.safetensors with the class names in its header.")


def add_parser(commands: Any) -> None:
    """``resnext-flax finetune TRAIN_DIR [--val-dir DIR | --val-split F] --model NAME ...``"""
    parser = commands.add_parser(
        "finetune", help="fine-tune on an image folder (new head for its classes)",
        description=_FINETUNE_DESCRIPTION)
    _add_finetune_arguments(parser)
    add_compilation_options(parser)
    parser.set_defaults(run=run, check=check_output_dir)


def finetune_parser() -> argparse.ArgumentParser:
    """A stand-alone parser of the ``finetune`` arguments (for scripts that wrap it)."""
    parser = argparse.ArgumentParser(prog="resnext-flax finetune",
                                     description=_FINETUNE_DESCRIPTION)
    _add_finetune_arguments(parser)
    return parser


def _add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    # Unset options are left to FinetuneConfig's defaults (None here), so building the parser
    # imports nothing heavy.
    p.add_argument("train", metavar="TRAIN_DIR", help="training folder or list file")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-dir", metavar="DIR", help="validation folder or list file")
    val.add_argument("--val-split", type=float, metavar="F",
                     help="hold out this fraction of each class for validation")
    p.add_argument("--model", required=True, choices=list(VARIANTS), metavar="NAME")
    p.add_argument("--weights", default="DEFAULT", metavar="TAG|PATH",
                   help="weight set tag, a local .pth/.safetensors file, or 'none' for random "
                        "initialization (default: DEFAULT)")
    p.add_argument("--checkpoint", metavar="PATH", help="start from this local file (same as "
                                                        "--weights PATH)")
    p.add_argument("--output-dir", default="finetune-run", metavar="DIR",
                   help="checkpoints, history.json and best.safetensors; its parent folder "
                        "must exist; rerun with the same directory to resume (default: "
                        "finetune-run)")
    # The defaults in the help are FinetuneConfig's and Augmentation's (a test compares them).
    p.add_argument("--epochs", type=int, help="passes over the training data (default: 10)")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="global batch, a multiple of the device count (default: 64)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), help="sgd or adamw (default: sgd)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 0.01)")
    p.add_argument("--momentum", type=float, help="SGD momentum (default: 0.9)")
    p.add_argument("--weight-decay", type=float,
                   help="on conv and linear kernels only (default: 0.0001)")
    p.add_argument("--warmup-epochs", type=float,
                   help="linear warm-up of the learning rate, then cosine decay (default: 1.0)")
    p.add_argument("--label-smoothing", type=float,
                   help="label smoothing of the loss (default: 0.1)")
    p.add_argument("--freeze-backbone", action="store_true", help="train the head only")
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute")
    p.add_argument("--seed", type=int,
                   help="shuffling, augmentation and the new head (default: 0)")
    p.add_argument("--min-scale", type=float,
                   help="RandomResizedCrop's smallest area fraction (default: 0.08)")
    p.add_argument("--hflip", type=float, help="horizontal flip probability (default: 0.5)")
    p.add_argument("--save-every", type=int, metavar="STEPS",
                   help="also checkpoint every N steps (default: 0, each epoch only)")
    p.add_argument("--extend", action="store_true",
                   help="let the run in --output-dir go on to more --epochs (its warm-up and "
                        "cosine schedule are rebuilt for the new total)")
    add_loader_arguments(p)
    add_distributed_arguments(p)
    # A start file's options (--prefix...) are `convert`'s: a fix naming them is spelled as
    # that command, whose output the run then starts from.
    p.set_defaults(fix_keywords=frozenset({"name", "extend"}))


#: Options passed to FinetuneConfig under their own names, when given.
_CONFIG_OPTIONS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
                   "warmup_epochs", "label_smoothing", "seed", "val_split", "save_every")


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`FinetuneConfig` the ``finetune`` arguments describe (its defaults for
    options not given)."""
    from resnext_flax.augment import Augmentation
    from resnext_flax.finetuning import FinetuneConfig

    given = {k: getattr(args, k) for k in _CONFIG_OPTIONS if getattr(args, k) is not None}
    augmentation = {}
    if args.min_scale is not None:
        augmentation["scale"] = (args.min_scale, 1.0)
    if args.hflip is not None:
        augmentation["hflip"] = args.hflip
    weights = args.checkpoint or args.weights
    return FinetuneConfig(
        model=args.model, weights=None if weights.lower() in ("none", "random") else weights,
        freeze_backbone=args.freeze_backbone, bf16=args.bf16, resize_size=args.resize_size,
        crop_size=args.crop_size, augmentation=Augmentation(**augmentation), **given)


def check_output_dir(args: argparse.Namespace) -> None:
    """Before any work: ``--output-dir`` is not (inside) an input folder, does not hold a
    file the run reads where the run writes, and can be created or written."""
    from resnext_flax.outputs import check_finetune_output

    check_finetune_output(args.output_dir, [args.train, args.val_dir],
                          args.checkpoint or args.weights, what="--output-dir")


def run(args: argparse.Namespace) -> str:
    """Run ``finetune`` (epoch lines are printed as they come) and return the summary."""
    from resnext_flax.finetuning import finetune, finetune_summary
    from resnext_flax.pipeline import LoaderOptions

    check_output_dir(args)
    initialize_from_arguments(args)  # before JAX starts its backend
    result = finetune(args.train, config_from_args(args), args.output_dir, val=args.val_dir,
                      loader=LoaderOptions(args.workers, args.threads),
                      progress=not args.no_progress, cache_dir=args.cache_dir,
                      extend=args.extend)
    return finetune_summary(result) + (
        f"\npredict with: resnext-flax predict IMAGE --model {args.model} --checkpoint "
        f"{os.path.join(args.output_dir, 'best.safetensors')}")
