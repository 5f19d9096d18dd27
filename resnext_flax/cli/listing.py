"""``resnext-flax list``: the models and their weight sets, with accuracy, size and license."""

from __future__ import annotations

import argparse
from typing import Any

from resnext_flax.models.variants import VARIANTS

#: ``--sort`` keys: the column and whether larger comes first.
SORT_KEYS = {"table": None, "acc1": True, "acc5": True, "params": False, "gflops": False,
             "model": False}


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "list", help="models and weight sets, with accuracy, size and license",
        description="Every weight set the library loads by name: torchvision's, Facebook's "
                    "WSL and SSL/SWSL sets and timm's (see docs/weight_sets.md); any other "
                    "timm repository loads as --weights hf-hub:owner/repository.")
    parser.add_argument("--model", choices=list(VARIANTS), metavar="NAME",
                        help="only this model")
    parser.add_argument("--source", metavar="SOURCE",
                        help="only this publisher's sets (torchvision, WSL-Images, "
                             "semi-supervised-ImageNet1K-models, timm)")
    parser.add_argument("--sort", choices=list(SORT_KEYS), default="table",
                        help="order: table, acc1/acc5 (best first; unpublished last), "
                             "params, gflops, model (default: table)")
    parser.add_argument("--commercial", action="store_true",
                        help="only sets whose license allows commercial use")
    parser.set_defaults(run=run)


def _number(value: float | None, fmt: str) -> str:
    """As published (``g``: no digits the publisher did not give), ``-`` where unknown."""
    return "-" if value is None else format(value, fmt)


def run(args: argparse.Namespace) -> str:
    """The table of weight sets (of ``--model`` / ``--source`` only, if given)."""
    from resnext_flax.weights.catalog import list_weight_sets

    sets = list_weight_sets(args.model, source=args.source)
    if args.commercial:
        sets = [ws for ws in sets if not ws.non_commercial]
    descending = SORT_KEYS[args.sort]
    if descending is not None:
        attr = "num_params" if args.sort == "params" else args.sort
        known = [ws for ws in sets if getattr(ws, attr) is not None]
        sets = sorted(known, key=lambda ws: getattr(ws, attr), reverse=descending) + [
            ws for ws in sets if getattr(ws, attr) is None]
    header = ("model", "weights", "acc@1", "acc@5", "params", "GFLOPS", "file", "resize/crop",
              "license", "source")
    rows = [header]
    for ws in sets:
        tag = ws.tag + (" (DEFAULT)" if ws.is_default else "")
        pre = ws.preprocessing
        interpolation = "" if pre.interpolation == "bilinear" else f" {pre.interpolation}"
        params = None if ws.num_params is None else ws.num_params / 1e6
        rows.append((ws.model, tag, _number(ws.acc1, "g"), _number(ws.acc5, "g"),
                     _number(params, ".1f") + "M" * (params is not None),
                     _number(ws.gflops, ".2f"),
                     "-" if ws.file_size_mb is None else f"{ws.file_size_mb:.1f} MB",
                     f"{pre.resize_size}/{pre.crop_size}{interpolation}", ws.license,
                     ws.source))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    left = {0, 1, 8, 9}
    lines = ["  ".join(cell.ljust(w) if i in left else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
