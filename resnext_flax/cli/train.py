"""``resnext-flax train``: train a model on an image folder, from scratch or from weights,
with a published recipe's settings (``--recipe torchvision-v2``) or one's own, around
:func:`resnext_flax.finetuning.train`. The options are spelled as torchvision's
classification reference spells them, and mean what they mean there, except ``-b``: the global
batch over all devices and processes, not one GPU's. The resolved settings are printed before
the run starts."""

from __future__ import annotations

import argparse
import os
from typing import Any

from resnext_flax.cli.common import add_compilation_options, add_loader_arguments
from resnext_flax.cli.finetune import check_output_dir
from resnext_flax.distributed import add_arguments as add_distributed_arguments
from resnext_flax.distributed import initialize_from_arguments
from resnext_flax.models.variants import VARIANTS

_DESCRIPTION = (
    "Train a model on an ImageFolder layout or a list file, from scratch or from weights. "
    "--recipe torchvision-v2 sets the settings torchvision trained its V2 weights with (each "
    "option given overrides it); the resolved settings are printed first. Checkpoints, "
    "metrics.jsonl, metrics.png and best.safetensors go to --output-dir; rerun to resume.")

#: (flags, config field, type, metavar, help, default shown when there is no recipe). The
#: shown defaults are TrainConfig's and Augmentation's (a test compares them).
_OPTIONS: tuple[tuple[tuple[str, ...], str, Any, str | None, str, Any], ...] = (
    (("--epochs",), "epochs", int, "N", "passes over the training data", 10),
    (("-b", "--batch-size"), "batch_size", int, "N",
     "GLOBAL batch over all devices and processes (torchvision's is per GPU)", 64),
    (("--opt",), "optimizer", str, "{sgd,adamw}", "optimizer", "sgd"),
    (("--lr",), "lr", float, "LR", "peak learning rate", 0.01),
    (("--momentum",), "momentum", float, "M", "SGD momentum", 0.9),
    (("--wd", "--weight-decay"), "weight_decay", float, "WD",
     "weight decay of conv and linear weights", 0.0001),
    (("--norm-weight-decay",), "norm_weight_decay", float, "WD",
     "weight decay of BatchNorm parameters", 0.0),
    (("--bias-weight-decay",), "bias_weight_decay", float, "WD",
     "weight decay of biases (default: --wd's)", None),
    (("--label-smoothing",), "label_smoothing", float, "F", "label smoothing", 0.1),
    (("--lr-warmup-epochs",), "warmup_epochs", float, "N", "warm-up length in epochs", 1.0),
    (("--lr-warmup-method",), "warmup_method", str, "{linear,constant}", "warm-up shape",
     "linear"),
    (("--lr-warmup-decay",), "warmup_decay", float, "F",
     "the warm-up starts at lr times this", 0.01),
    (("--lr-min",), "lr_min", float, "LR", "the cosine decay's end", 0.0),
    (("--lr-step",), "schedule_unit", str, "{step,epoch}",
     "change the learning rate every epoch, as torchvision's reference, or every step",
     "epoch"),
    (("--auto-augment",), "auto_augment", str, "{ta_wide,ra,imagenet}",
     "automatic augmentation policy after the crop and flip", None),
    (("--ra-magnitude",), "ra_magnitude", int, "BIN", "RandAugment's magnitude bin (of 31)", 9),
    (("--random-erase",), "random_erase", float, "P", "RandomErasing's probability", 0.0),
    (("--mixup-alpha",), "mixup_alpha", float, "A", "MixUp's alpha (0: no MixUp)", 0.0),
    (("--cutmix-alpha",), "cutmix_alpha", float, "A", "CutMix's alpha (0: no CutMix)", 0.0),
    (("--model-ema-steps",), "ema_steps", int, "N",
     "update the weights' moving average every N optimizer steps (0: no average; given "
     "alone it turns the average on)", 0),
    (("--model-ema-decay",), "ema_decay", float, "D",
     "the average's decay before the reference's adjustment to the run", 0.99998),
    (("--ra-reps",), "ra_reps", int, "N",
     "repeated augmentation: each image N times an epoch (1: off; given alone it turns the "
     "sampler on)", 1),
    (("--clip-grad-norm",), "clip_grad_norm", float, "NORM",
     "clip the gradients' global norm", None),
    (("--grad-accum-steps",), "grad_accum_steps", int, "N",
     "one optimizer step per N batches (the step sees N times --batch-size images)", 1),
    (("--train-crop-size",), "train_crop_size", int, "PX",
     "training crop when it differs from the evaluation crop", None),
    (("--seed",), "seed", int, "N", "shuffling, augmentation and initialization", 0),
    (("--val-split",), "val_split", float, "F",
     "hold out this fraction of each class for validation", None),
    (("--save-every",), "save_every", int, "STEPS", "also checkpoint every N steps", 0),
)


def add_parser(commands: Any) -> None:
    """``resnext-flax train TRAIN_DIR --model NAME [--recipe torchvision-v2] ...``"""
    parser = commands.add_parser("train", help="train on an image folder (recipes, from "
                                               "scratch or from weights)",
                                 description=_DESCRIPTION)
    _add_arguments(parser)
    add_compilation_options(parser)
    parser.set_defaults(run=run, check=check_output_dir, checkpoint=None)


def train_parser() -> argparse.ArgumentParser:
    """A stand-alone parser of the ``train`` arguments (for scripts that wrap it)."""
    parser = argparse.ArgumentParser(prog="resnext-flax train", description=_DESCRIPTION)
    _add_arguments(parser)
    parser.set_defaults(checkpoint=None)
    return parser


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("train", metavar="TRAIN_DIR", help="training folder or list file")
    p.add_argument("--val-dir", metavar="DIR", help="validation folder or list file")
    p.add_argument("--model", required=True, choices=list(VARIANTS), metavar="NAME")
    p.add_argument("--recipe", choices=("torchvision-v2",),
                   help="start from a published recipe's settings (docs/recipes.md)")
    p.add_argument("--weights", default="none", metavar="TAG|PATH",
                   help="start from a weight set tag or a local file (default: none, random "
                        "initialization)")
    head = p.add_mutually_exclusive_group()
    head.add_argument("--new-head", dest="new_head", action="store_const", const=True,
                      help="always give the model a new head for the data's classes")
    head.add_argument("--keep-head", dest="new_head", action="store_const", const=False,
                      help="keep the weights' head (it must fit the data's classes)")
    p.add_argument("--output-dir", default="train-run", metavar="DIR",
                   help="checkpoints, metrics and best.safetensors; rerun with the same "
                        "directory to resume (default: train-run)")
    for flags, field, kind, metavar, text, default in _OPTIONS:
        shown = f" (default: {default})" if default is not None else ""
        p.add_argument(*flags, dest=field, type=kind, metavar=metavar, help=text + shown)
    p.add_argument("--lr-scheduler", choices=("cosineannealinglr",),
                   help="the schedule after the warm-up: cosine to --lr-min, the only one "
                        "(accepted so that torchvision's commands carry over)")
    p.add_argument("--model-ema", action="store_true",
                   help="keep a moving average of the weights (every 32 steps unless "
                        "--model-ema-steps says otherwise); it is validated and exported")
    p.add_argument("--ra-sampler", action="store_true",
                   help="repeated augmentation (3 repetitions unless --ra-reps says otherwise)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute (torchvision: --amp)")
    p.add_argument("--hflip", type=float, help="horizontal flip probability (default: 0.5)")
    p.add_argument("--extend", action="store_true",
                   help="let the run in --output-dir go on to more --epochs")
    add_loader_arguments(p, val_prefix=True)
    add_distributed_arguments(p)
    p.set_defaults(fix_keywords=frozenset({"name", "extend"}))


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, by config (or augmentation) field."""
    fields = [field for _, field, *_ in _OPTIONS] + ["resize_size", "crop_size", "hflip",
                                                     "new_head"]
    given = {field: getattr(args, field) for field in fields if getattr(args, field) is not None}
    if args.bf16:
        given["bf16"] = True
    return given


def _switches(args: argparse.Namespace, recipe: dict[str, Any]) -> dict[str, Any]:
    """torchvision's ``--model-ema`` and ``--ra-sampler``: on, with the period or repetitions
    given, else the recipe's, else the reference's defaults (32, 3)."""
    out = {}
    if args.model_ema and args.ema_steps is None:
        out["ema_steps"] = recipe.get("ema_steps") or 32
    if args.ra_sampler and args.ra_reps is None:
        out["ra_reps"] = recipe.get("ra_reps", 1) if recipe.get("ra_reps", 1) > 1 else 3
    return out


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~resnext_flax.finetuning.TrainConfig` the arguments describe: the recipe's
    settings (or TrainConfig's defaults) with the options given on top."""
    from resnext_flax.recipes import recipe_config, recipe_settings

    weights = None if args.weights.lower() in ("none", "random") else args.weights
    recipe = recipe_settings(args.recipe, args.model) if args.recipe else {}
    return recipe_config(args.recipe, args.model, **given_settings(args),
                         **_switches(args, recipe), weights=weights)


def run(args: argparse.Namespace) -> str:
    """Print the resolved settings, run ``train`` and return the summary."""
    from resnext_flax.finetuning import finetune_summary, train
    from resnext_flax.pipeline import LoaderOptions
    from resnext_flax.recipes import describe_config

    settings = initialize_from_arguments(args)  # before JAX starts its backend
    config = config_from_args(args)
    if settings.process_id == 0:
        print(describe_config(config, args.recipe, given_settings(args)), flush=True)
        if settings.multi_process:
            print(settings.describe(), flush=True)
    result = train(args.train, config, args.output_dir, val=args.val_dir,
                   loader=LoaderOptions(args.workers, args.threads),
                   progress=not args.no_progress, cache_dir=args.cache_dir,
                   extend=args.extend)
    return finetune_summary(result) + (
        f"\nmetrics: {os.path.join(args.output_dir, 'metrics.jsonl')} and metrics.png")
