"""``resnext-flax list``: the models and their weight sets, with accuracy and size."""

from __future__ import annotations

import argparse
from typing import Any

from resnext_flax.models.variants import VARIANTS


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("list", help="models and weight sets, with accuracy and size")
    parser.add_argument("--model", choices=list(VARIANTS), metavar="NAME",
                        help="only this model")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> str:
    """The table of weight sets (of ``--model`` only, if given)."""
    from resnext_flax.weights.catalog import list_weight_sets

    header = ("model", "weights", "acc@1", "acc@5", "params", "GFLOPS", "file", "resize/crop")
    rows = [header]
    for ws in list_weight_sets(args.model):
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
