"""``resnext-flax inspect``: what a checkpoint file holds and what a load would take."""

from __future__ import annotations

import argparse
from typing import Any

from resnext_flax.cli.common import add_checkpoint_options, checkpoint_options, render_error
from resnext_flax.models.variants import VARIANTS


def add_parser(commands: Any) -> None:
    inspect = commands.add_parser(
        "inspect", help="what a checkpoint file holds and what a load would take from it")
    inspect.add_argument("file", metavar="FILE",
                         help=".pth/.pt/.bin/.ckpt/.safetensors file or Hugging Face folder")
    inspect.add_argument("--model", choices=list(VARIANTS), metavar="NAME",
                         help="the model to load it as (default: inferred)")
    add_checkpoint_options(inspect)
    inspect.set_defaults(run=run)


def run(args: argparse.Namespace) -> str:
    """The report; where the load would fail, the report on stdout and why as the error."""
    from resnext_flax.weights.loading import inspect_checkpoint

    report = inspect_checkpoint(args.file, args.model, **checkpoint_options(args))
    if report.error or report.problems:  # the survey on stdout, why on stderr, status 1
        print(render_error(report.format()), flush=True)
        report.require()
        raise ValueError(f"the strict load would fail: {'; '.join(report.problems)}")
    return render_error(report.format())
