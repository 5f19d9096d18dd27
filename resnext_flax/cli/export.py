"""``resnext-flax export``: a model as a StableHLO or ONNX file that runs without this library,
verified against the model before it is written (``docs/deploy.md``)."""

from __future__ import annotations

import argparse
from typing import Any

from resnext_flax.cli.common import add_checkpoint_options, checkpoint_options
from resnext_flax.models.variants import VARIANTS

DESCRIPTION = ("Export a model (a model name with its weights, or a weight file or checkpoint) "
               "as StableHLO (jax.export: loads with jax alone) or ONNX (ONNX Runtime and "
               "other ONNX runtimes), BatchNorm folded, verified against the model.")


def add_parser(commands: Any) -> None:
    """``resnext-flax export SOURCE --output PATH [--model NAME] [--weights TAG|PATH] ...``"""
    p = commands.add_parser("export", help="export to StableHLO or ONNX, verified",
                            description=DESCRIPTION)
    p.add_argument("source", metavar="SOURCE",
                   help="a model name (with --weights) or a .pth/.safetensors/converted "
                        "checkpoint or Hugging Face folder")
    p.add_argument("--output", "-o", required=True, metavar="PATH",
                   help="file to write: *.stablehlo (a zip of the program, its weights and "
                        "its record) or *.onnx")
    p.add_argument("--model", choices=list(VARIANTS), metavar="NAME",
                   help="architecture of a SOURCE file (default: inferred from it)")
    p.add_argument("--weights", metavar="TAG|PATH",
                   help="weights of a SOURCE model name: a tag (IMAGENET1K_V1...) or a local "
                        "file (default: DEFAULT)")
    p.add_argument("--format", choices=("stablehlo", "onnx"),
                   help="format to write (default: from the output's suffix)")
    p.add_argument("--platforms", metavar="LIST",
                   help="StableHLO: comma-separated platforms to lower for, among cpu, cuda, "
                        "rocm, tpu (default: cpu,cuda)")
    p.add_argument("--fixed-size", nargs="?", const="crop", type=_fixed_size, metavar="PX",
                   help="fix height and width at PX, or without PX at the crop size the "
                        "weights record, instead of leaving them symbolic")
    p.add_argument("--onnx-layout", choices=("nhwc", "nchw"), default="nhwc",
                   help="ONNX: input layout, nhwc (the library's) or nchw (torchvision's) "
                        "(default: nhwc)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip running the artifact on a probe batch against the model")
    p.add_argument("--probe-size", type=int, metavar="PX",
                   help="height and width of the random probe images, at least 33 "
                        "(default: 224; a --fixed-size artifact: its size)")
    p.add_argument("--probe-batch", type=int, default=3, metavar="N",
                   help="random probe images; the artifact also runs on the first one and "
                        "the first 3 (default: 3)")
    p.add_argument("--tolerance", type=float, default=1e-5,
                   help="largest accepted relative error, max|artifact - model| / max|model| "
                        "(default: 1e-05)")
    p.add_argument("--cache-dir", metavar="DIR", help="converted-checkpoint cache")
    p.add_argument("--no-progress", action="store_true", help="say nothing on stderr")
    add_checkpoint_options(p)
    p.set_defaults(run=run, check=check, interrupted="; nothing written")


def _fixed_size(text: str) -> int | str:
    if text == "crop":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size in pixels, got {text!r}") from None


def _platforms(args: argparse.Namespace) -> tuple[str, ...] | None:
    """``--platforms`` as given (None: the format's default; the export refuses it for
    ONNX)."""
    if args.platforms is None:
        return None
    return tuple(p.strip() for p in args.platforms.split(",") if p.strip())


def check(args: argparse.Namespace) -> None:
    """The format and every output file, before anything is imported or read."""
    from resnext_flax.export import check_outputs, output_format, source_files

    output_format(args.output, args.format)
    check_outputs(args.output, source_files(args.source, args.weights, None, args.cache_dir))


def run(args: argparse.Namespace) -> str:
    """Export, verify, write; the report."""
    from resnext_flax.export import export

    report = export(
        args.source, args.output, format=args.format, weights=args.weights, name=args.model,
        platforms=_platforms(args), verify=not args.no_verify,
        probe_batch=args.probe_batch, probe_size=args.probe_size,
        tolerance=args.tolerance, fixed_size=args.fixed_size,
        onnx_layout=args.onnx_layout.upper(), cache_dir=args.cache_dir,
        progress=not args.no_progress, **checkpoint_options(args))
    return str(report)
