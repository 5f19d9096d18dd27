"""Convert a ResNet checkpoint (torchvision, timm, Lightning, MoCo, Hugging Face...) into a
resnext_flax checkpoint.

    python convert/convert_torchvision.py resnet50-11ad3fa6.pth --output resnet50.safetensors

The trunk is found as `resnext-flax inspect` shows (--prefix, --ema, --key, --num-classes pick
among several), the model inferred (or checked against --model), loaded strictly, verified
against torchvision on a random probe batch, and written atomically.
"""

from __future__ import annotations

import argparse
import sys

from resnext_flax import list_models
from resnext_flax.cli import add_checkpoint_options, checkpoint_options
from resnext_flax.weights.conversion import convert_checkpoint
from resnext_flax.weights.files import sigterm_as_interrupt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="checkpoint: .pth/.pt/.bin/.ckpt/.safetensors or a "
                                      "Hugging Face model folder")
    parser.add_argument("--output", "-o", required=True, help="Flax checkpoint to write")
    parser.add_argument("--model", choices=list_models(),
                        help="architecture (default: inferred from the state dict)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the comparison with torchvision")
    parser.add_argument("--probe-size", type=int, default=224,
                        help="height and width of the random probe batch (default 224)")
    parser.add_argument("--probe-batch", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest accepted relative logits error (default 1e-4)")
    add_checkpoint_options(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with sigterm_as_interrupt():  # a terminated run cleans its temporary file up
            report = convert_checkpoint(
                args.input,
                args.output,
                name=args.model,
                verify=not args.no_verify,
                probe_shape=(args.probe_batch, args.probe_size, args.probe_size),
                tolerance=args.tolerance,
                **checkpoint_options(args),
            )
    except (ValueError, OSError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing written", file=sys.stderr)
        return 130
    if report is not None:
        print(f"verified against torchvision: {report}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
