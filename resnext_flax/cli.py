"""The ``resnext-flax`` command: ``predict`` images with a pretrained model, ``list`` the models
and their weight sets, ``inspect`` a checkpoint file, ``evaluate`` and ``finetune`` on image
folders (``commands.py``). argparse (stdlib) keeps the command free of extra dependencies."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from resnext_flax import commands as folder_commands
from resnext_flax.models.variants import VARIANTS
from resnext_flax.weights.catalog import list_weight_sets
from resnext_flax.weights.files import sigterm_as_interrupt


def add_checkpoint_options(parser: argparse.ArgumentParser) -> None:
    """The options every checkpoint reader takes (``inspect``, the converter): which trunk,
    which head, whether to trust the pickle."""
    parser.add_argument("--prefix", metavar="PREFIX",
                        help="key prefix of the trunk to load where several hold one, "
                             "e.g. module.encoder_k. ('' for none)")
    parser.add_argument("--ema", action="store_true",
                        help="load the EMA weights (model_ema, state_dict_ema)")
    parser.add_argument("--key", metavar="KEY",
                        help="container to load, dotted for nesting (e.g. state_dict_ema)")
    parser.add_argument("--num-classes", type=int, metavar="N",
                        help="classes of the model's head: 0 headless, N a fresh head unless "
                             "the file's has N (default: the file's head)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="unpickle types outside the allow-list: RUNS CODE FROM THE FILE; "
                             "only for files you trust")


def checkpoint_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`resnext_flax.load_model` given on the command line."""
    return {"prefix": args.prefix, "ema": args.ema, "key": args.key,
            "num_classes": args.num_classes, "trust_pickle": args.trust_pickle}


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

    inspect = commands.add_parser(
        "inspect", help="what a checkpoint file holds and what a load would take from it")
    inspect.add_argument("file", metavar="FILE",
                         help=".pth/.pt/.bin/.ckpt/.safetensors file or Hugging Face folder")
    inspect.add_argument("--model", choices=list(VARIANTS), metavar="NAME",
                         help="the model to load it as (default: inferred)")
    add_checkpoint_options(inspect)
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

    for option, value in (("--top-k", args.top_k), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{option} must be at least 1, got {value}")
    predictor = Predictor.from_pretrained(
        args.model, args.weights, checkpoint=args.checkpoint, cache_dir=args.cache_dir,
        progress=not args.no_progress, top_k=args.top_k, batch_size=args.batch_size,
    )
    result = predictor.classify(args.images)
    lines = []
    for i, image in enumerate(args.images):
        lines.append(image)
        if not result.finite[i]:
            lines.append("  non-finite logits (NaN or Inf in the image or the weights)")
            continue
        for rank, (label, p) in enumerate(result.top(i), start=1):
            lines.append(f"  {rank}. {label:<40} {100 * p:6.2f}%")
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> str:
    from resnext_flax.weights.loading import inspect_checkpoint

    report = inspect_checkpoint(args.file, args.model, **checkpoint_options(args))
    if report.error or report.problems:  # the survey on stdout, why on stderr, status 1
        print(report.format(), flush=True)
        report.require()
        raise ValueError(f"the strict load would fail: {'; '.join(report.problems)}")
    return report.format()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``resnext-flax``; returns the exit status (1 on a reported error)."""
    args = _parser().parse_args(argv)
    commands = {"list": lambda: _list(args.model), "predict": lambda: _predict(args),
                "inspect": lambda: _inspect(args),
                "evaluate": lambda: folder_commands.run_evaluate(args),
                "finetune": lambda: folder_commands.run_finetune(args)}
    try:
        with sigterm_as_interrupt():
            output = commands[args.command]()
    except (OSError, ValueError, ImportError) as err:
        print(f"resnext-flax: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("resnext-flax: interrupted", file=sys.stderr)
        return 130
    try:
        print(output, flush=True)
    except BrokenPipeError:  # the reader went away, e.g. `resnext-flax list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
