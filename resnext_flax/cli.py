"""The ``resnext-flax`` command: ``predict`` images with a pretrained model, ``list`` the models
and their weight sets, ``evaluate`` and ``finetune`` on image folders (``commands.py``).
argparse (stdlib) keeps the command free of extra dependencies."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from resnext_flax import commands as folder_commands
from resnext_flax.models.variants import VARIANTS
from resnext_flax.weights.catalog import list_weight_sets


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnext-flax",
        description="torchvision's ResNet / ResNeXt / Wide ResNet in JAX + Flax NNX.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    predict = commands.add_parser("predict", help="classify images with a pretrained model")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    predict.add_argument("--model", required=True, choices=list(VARIANTS), metavar="NAME",
                         help="model name, e.g. resnet50 (see `resnext-flax list`)")
    predict.add_argument("--weights", default="DEFAULT", metavar="TAG",
                         help="weight set: DEFAULT, IMAGENET1K_V1 or IMAGENET1K_V2")
    predict.add_argument("--checkpoint", metavar="PATH",
                         help="local .pth / .safetensors / converted checkpoint (no download)")
    predict.add_argument("--top-k", type=int, default=5, metavar="K")
    predict.add_argument("--batch-size", type=int, default=16, metavar="N")
    predict.add_argument("--cache-dir", metavar="DIR",
                         help="converted-checkpoint cache (default $RESNEXT_FLAX_CACHE or "
                              "~/.cache/resnext_flax)")
    predict.add_argument("--no-progress", action="store_true", help="no download progress bar")

    listing = commands.add_parser("list", help="models and weight sets, with accuracy and size")
    listing.add_argument("--model", choices=list(VARIANTS), metavar="NAME",
                         help="only this model")
    folder_commands.add_evaluate_parser(commands)
    folder_commands.add_finetune_parser(commands)
    return parser


def _list(model: str | None) -> str:
    header = ("model", "weights", "acc@1", "acc@5", "params", "GFLOPS", "file", "resize/crop")
    rows = [header]
    for ws in list_weight_sets(model):
        tag = ws.tag + (" (DEFAULT)" if ws.is_default else "")
        pre = ws.preprocessing
        rows.append((ws.model, tag, f"{ws.acc1:.3f}", f"{ws.acc5:.3f}",
                     f"{ws.num_params / 1e6:.1f}M", f"{ws.gflops:.2f}",
                     f"{ws.file_size_mb:.1f} MB", f"{pre.resize_size}/{pre.crop_size}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _predict(args: argparse.Namespace) -> str:
    from resnext_flax.inference import Predictor

    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    predictor = Predictor.from_pretrained(
        args.model, args.weights, checkpoint=args.checkpoint, cache_dir=args.cache_dir,
        progress=not args.no_progress, top_k=args.top_k, batch_size=args.batch_size,
    )
    result = predictor.classify(args.images)
    lines = []
    for i, image in enumerate(args.images):
        lines.append(image)
        for rank, (label, p) in enumerate(result.top(i), start=1):
            lines.append(f"  {rank}. {label:<40} {100 * p:6.2f}%")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``resnext-flax``; returns the exit status (1 on a reported error)."""
    args = _parser().parse_args(argv)
    try:
        run = {"list": lambda a: _list(a.model), "predict": _predict,
               "evaluate": folder_commands.run_evaluate,
               "finetune": folder_commands.run_finetune}[args.command]
        output = run(args)
    except (OSError, ValueError, ImportError) as err:
        print(f"resnext-flax: error: {err}", file=sys.stderr)
        return 1
    try:
        print(output, flush=True)
    except BrokenPipeError:  # the reader went away, e.g. `resnext-flax list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
