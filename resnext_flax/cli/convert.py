"""``resnext-flax convert``: a ResNet checkpoint (torchvision, timm, Lightning, MoCo, Hugging
Face...) into a resnext_flax checkpoint, verified against torchvision.

The trunk is found as ``resnext-flax inspect`` shows (``--prefix``, ``--ema``, ``--key``,
``--num-classes`` pick among several), the model inferred (or checked against ``--model``),
loaded strictly, verified on a random probe batch, and written atomically with what the model
records (class names, preprocessing).
"""

from __future__ import annotations

import argparse
from typing import Any

from resnext_flax.cli.common import (
    add_checkpoint_options,
    add_compilation_options,
    checkpoint_options,
)
from resnext_flax.models.variants import VARIANTS

DESCRIPTION = ("Convert a ResNet checkpoint (torchvision, timm, Lightning, MoCo, Hugging "
               "Face...) into a resnext_flax checkpoint.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The converter's arguments (also those of ``convert/convert_torchvision.py``)."""
    parser.add_argument("input", help="checkpoint: .pth/.pt/.bin/.ckpt/.safetensors or a "
                                      "Hugging Face model folder")
    parser.add_argument("--output", "-o", required=True,
                        help="Flax checkpoint to write (its folder must exist)")
    parser.add_argument("--model", choices=list(VARIANTS), metavar="NAME",
                        help="architecture (default: inferred from the state dict; see "
                             "`resnext-flax list`)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the comparison with torchvision")
    parser.add_argument("--probe-size", type=int, default=224,
                        help="height and width of the random probe batch (default: 224)")
    parser.add_argument("--probe-batch", type=int, default=2,
                        help="images in the random probe batch (default: 2)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest accepted relative logits error (default: 0.0001)")
    parser.add_argument("--no-progress", action="store_true",
                        help="say nothing on stderr while reading and verifying")
    add_checkpoint_options(parser)
    add_compilation_options(parser)
    parser.set_defaults(run=run, check=check, interrupted="; nothing written")


def add_parser(commands: Any) -> None:
    add_arguments(commands.add_parser("convert", help="convert a checkpoint, verified",
                                      description=DESCRIPTION))


def check(args: argparse.Namespace) -> None:
    """The output, before anything is imported or read (``convert_checkpoint`` checks it
    again, for its Python callers)."""
    from resnext_flax.outputs import check_output_path, weight_source_files

    check_output_path(args.output, weight_source_files(args.input), what="the output")


def run(args: argparse.Namespace) -> str:
    """Convert, verify, write; what was verified and written."""
    from resnext_flax.weights.conversion import convert_checkpoint

    report = convert_checkpoint(
        args.input, args.output, name=args.model, verify=not args.no_verify,
        probe_shape=(args.probe_batch, args.probe_size, args.probe_size),
        tolerance=args.tolerance, progress=not args.no_progress, **checkpoint_options(args))
    lines = [] if report is None else [f"verified against torchvision: {report}"]
    return "\n".join([*lines, f"wrote {args.output}"])
