"""Fine-tune a ResNet on scikit-learn's handwritten digits, written out as an image folder:
a thin wrapper over ``resnext-flax finetune`` (``resnext_flax.finetuning.finetune``).

    python examples/finetune.py                          # resnet18, random init, 5 epochs
    python examples/finetune.py --weights resnet18.pth   # start from a local torchvision file
    python examples/finetune.py --output-dir run         # interrupt (Ctrl-C) and rerun: resumes

The 8x8 digits (1797 images, shipped with scikit-learn: nothing is downloaded) are saved as
PNG files in ``DATA_DIR/train/<digit>/`` and ``DATA_DIR/val/<digit>/`` (a fixed 80/20 split);
then this is the same as

    resnext-flax finetune DATA_DIR/train --val-dir DATA_DIR/val --model resnet18 --weights none \\
        --resize-size 32 --crop-size 32 --min-scale 0.6 --hflip 0 ...

Any other ``resnext-flax finetune`` option passes through (``--optimizer adamw``, ``--bf16``,
``--freeze-backbone``, ``--workers 4``...). The best model ends in
``OUTPUT_DIR/best.safetensors``; ``resnext-flax predict IMG --model resnet18 --checkpoint
OUTPUT_DIR/best.safetensors`` prints digit names.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image

from resnext_flax.cli import finetune as commands
from resnext_flax.finetuning import FinetuneResult, finetune


def write_digits(data_dir: str, *, train_limit: int = 0, seed: int = 0) -> tuple[str, str]:
    """Save the digits as ``train/`` and ``val/`` image folders (once; reused if present)."""
    from sklearn.datasets import load_digits

    train_dir, val_dir = os.path.join(data_dir, "train"), os.path.join(data_dir, "val")
    marker = os.path.join(data_dir, f".complete-{train_limit}-{seed}")
    if os.path.exists(marker):
        return train_dir, val_dir
    digits = load_digits()
    images = (digits.images * 255 / 16).round().astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))
    split = int(0.8 * len(images))
    train, val = order[:split], order[split:]
    if train_limit:
        train = train[:train_limit]
    for folder, indices in ((train_dir, train), (val_dir, val)):
        for i in indices:
            path = os.path.join(folder, str(digits.target[i]), f"{i:04d}.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(images[i]).save(path)
    open(marker, "w").close()
    return train_dir, val_dir


class StopRun(Exception):
    """Raised after --stop-after-steps steps: an abrupt stop without saving (a crash)."""


def run(argv: list[str] | None = None) -> FinetuneResult | None:
    """Write the digits, fine-tune; None when stopped by --stop-after-steps."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="digits_folder")
    p.add_argument("--size", type=int, default=32, help="image side after resizing")
    p.add_argument("--train-limit", type=int, default=0, help="use only N training images")
    p.add_argument("--stop-after-steps", type=int, default=0,
                   help="stop abruptly after N steps without saving (simulates a crash)")
    own, rest = p.parse_known_args(argv)
    train_dir, val_dir = write_digits(own.data_dir, train_limit=own.train_limit)
    defaults = ["--model", "resnet18", "--weights", "none", "--epochs", "5", "--lr", "0.05",
                "--weight-decay", "5e-4", "--min-scale", "0.6", "--hflip", "0",
                "--warmup-epochs", "0", "--output-dir", "finetune_digits"]
    args = commands.finetune_parser().parse_args(
        [train_dir, "--val-dir", val_dir, "--resize-size", str(own.size),
         "--crop-size", str(own.size), *defaults, *rest])

    def stop(step: int, _metrics: dict) -> None:
        if own.stop_after_steps and step >= own.stop_after_steps:
            raise StopRun

    try:
        return finetune(args.train, commands.config_from_args(args), args.output_dir,
                        val=args.val_dir, progress=not args.no_progress, on_step=stop,
                        extend=args.extend)
    except StopRun:
        return None


def main(argv: list[str] | None = None) -> int:
    result = run(argv)
    if result is not None:
        print(f"best epoch {result.best_epoch}: {result.best_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
