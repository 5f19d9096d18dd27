"""``resnext-flax predict``: classify images with a pretrained or local model; the class
names and preprocessing are what the loaded model records."""

from __future__ import annotations

import argparse
from typing import Any

from resnext_flax.cli.common import (
    add_checkpoint_options,
    add_compilation_options,
    add_model_argument,
    checkpoint_options,
    model_name,
)


def add_parser(commands: Any) -> None:
    predict = commands.add_parser("predict", help="classify images with a pretrained model")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    add_model_argument(predict)
    predict.add_argument("--weights", default="DEFAULT", metavar="TAG|PATH",
                         help="weight set (DEFAULT, IMAGENET1K_V1 or IMAGENET1K_V2) or a local "
                              "file (the same as --checkpoint PATH) (default: DEFAULT)")
    predict.add_argument("--checkpoint", metavar="PATH",
                         help="local .pth / .safetensors / converted checkpoint (no download)")
    predict.add_argument("--top-k", type=int, default=5, metavar="K",
                         help="classes shown per image (default: 5)")
    predict.add_argument("--batch-size", type=int, default=16, metavar="N",
                         help="images per forward pass (default: 16)")
    predict.add_argument("--cache-dir", metavar="DIR",
                         help="converted-checkpoint cache (default: $RESNEXT_FLAX_CACHE or "
                              "~/.cache/resnext_flax)")
    predict.add_argument("--no-progress", action="store_true",
                         help="no download progress bar, no compilation messages")
    add_checkpoint_options(predict, head=False)
    add_compilation_options(predict)
    predict.set_defaults(run=run)


def run(args: argparse.Namespace) -> str:
    """The top classes of each image."""
    from resnext_flax.compilation import report_compilation
    from resnext_flax.inference import Predictor, batch_bucket
    from resnext_flax.weights.pretrained import from_pretrained

    for option, value in (("--top-k", args.top_k), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{option} must be at least 1, got {value}")
    name = model_name(args)
    model = from_pretrained(name, args.weights, checkpoint=args.checkpoint,
                            cache_dir=args.cache_dir, progress=not args.no_progress,
                            **checkpoint_options(args))
    predictor = Predictor.from_model(model, top_k=args.top_k, batch_size=args.batch_size)
    crop = predictor.preprocessing.crop_size
    first = min(len(args.images), args.batch_size)
    batch = min(batch_bucket(first), args.batch_size)  # as classify pads it
    with report_compilation(f"{name} for {batch}x{crop}x{crop}",
                            enabled=not args.no_progress):
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
