"""Convert a ResNet checkpoint (torchvision, timm, Lightning, MoCo, Hugging Face...) into a
resnext_flax checkpoint: ``resnext-flax convert`` as a script.

    python convert/convert_torchvision.py resnet50-11ad3fa6.pth --output resnet50.safetensors

See ``resnext-flax convert --help`` (``resnext_flax/cli/convert.py``).
"""

from __future__ import annotations

import sys

from resnext_flax.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    """``resnext-flax convert ARGV``; returns the exit status."""
    return cli_main(["convert", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
