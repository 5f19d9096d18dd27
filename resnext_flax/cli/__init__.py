"""The ``resnext-flax`` command: one module per subcommand (``predict``, ``list``,
``inspect``, ``evaluate``, ``finetune``, ``convert``), each with ``add_parser`` and a ``run``
that returns what is printed. argparse (stdlib) keeps the command free of extra dependencies;
the subcommands import the library inside ``run``, so ``--help`` and ``list`` start fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from resnext_flax.cli import convert, evaluate, finetune, inspect, listing, predict
from resnext_flax.cli.common import (
    add_checkpoint_options,
    checkpoint_options,
    compilation_cache_for,
    fix_renderer,
    render_error,
)
from resnext_flax.errors import ResnextFlaxError

#: The subcommands, in the order ``--help`` lists them.
SUBCOMMANDS = (predict, listing, inspect, evaluate, finetune, convert)


def parser() -> argparse.ArgumentParser:
    """The parser of every subcommand."""
    root = argparse.ArgumentParser(
        prog="resnext-flax",
        description="torchvision's ResNet / ResNeXt / Wide ResNet in JAX + Flax NNX.",
    )
    commands = root.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        command.add_parser(commands)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``resnext-flax``; returns the exit status (1 on a reported error)."""
    args = parser().parse_args(argv)
    from resnext_flax.weights.files import sigterm_as_interrupt

    try:
        # A terminated run cleans its temporary files up; what compiles is kept on disk.
        with sigterm_as_interrupt(), compilation_cache_for(args):
            output = args.run(args)
    except (ResnextFlaxError, OSError, ValueError, ImportError) as err:
        print(f"resnext-flax: error: {render_error(err, fix_renderer(args))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"resnext-flax: interrupted{getattr(args, 'interrupted', '')}", file=sys.stderr)
        return 130
    try:
        print(output, flush=True)
    except BrokenPipeError:  # the reader went away, e.g. `resnext-flax list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


__all__ = ["add_checkpoint_options", "checkpoint_options", "main", "parser", "render_error"]
