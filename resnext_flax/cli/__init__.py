"""The ``resnext-flax`` command: one module per subcommand (``predict``, ``list``, ``inspect``,
``evaluate``, ``train``, ``finetune``, ``convert``, ``export``), each with ``add_parser`` and a
``run`` that returns what is printed. argparse (stdlib) keeps the command free of extra
dependencies; the subcommands import the library inside ``run``, so ``--help`` and ``list``
start fast.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from resnext_flax.cli import (
    convert,
    evaluate,
    export,
    finetune,
    inspect,
    listing,
    predict,
    train,
)
from resnext_flax.cli.common import (
    add_checkpoint_options,
    checkpoint_options,
    compilation_cache_for,
    fix_renderer,
    render_error,
)
from resnext_flax.errors import ResnextFlaxError

#: The subcommands, in the order ``--help`` lists them.
SUBCOMMANDS = (predict, listing, inspect, evaluate, train, finetune, convert, export)


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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt so that the same cleanup runs
    (temporary files removed, a fine-tuning run saved); the exit status tells them apart."""


#: Exit statuses of an interrupted command, as a shell reports a process a signal ended
#: (128 + the signal's number: SIGINT 2, SIGTERM 15).
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` inside the block (from the main thread only, where
    Python runs signal handlers); the previous handler is restored after it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_now(code: int) -> None:
    """End the process without interpreter teardown. Every cleanup has run by now (temporary
    files removed, a fine-tuning run saved and its checkpoint writes waited for); an
    interrupted XLA compilation can leave compiler threads behind that crash the teardown
    (exit status 139 instead of the interrupt's)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``resnext-flax``; returns the exit status: 1 on a reported error, 130
    after Ctrl-C, 143 after SIGTERM (one line on stderr each, no traceback)."""
    args = None
    try:
        with _terminate_as_interrupt():
            args = parser().parse_args(argv)
            if hasattr(args, "check"):  # where it writes, before JAX is even imported
                args.check(args)
            # A terminated run cleans its temporary files up; what compiles is kept on disk.
            with compilation_cache_for(args):
                output = args.run(args)
    except (ResnextFlaxError, OSError, ValueError, ImportError) as err:
        print(f"resnext-flax: error: {render_error(err, fix_renderer(args))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        how = "terminated" if isinstance(err, Terminated) else "interrupted"
        print(f"resnext-flax: {how}{getattr(args, 'interrupted', '')}", file=sys.stderr)
        code = EXIT_TERMINATED if isinstance(err, Terminated) else EXIT_INTERRUPTED
        if argv is None:  # the program itself, not a caller of main()
            _exit_now(code)
        return code
    try:
        print(output, flush=True)
    except BrokenPipeError:  # the reader went away, e.g. `resnext-flax list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


__all__ = ["EXIT_INTERRUPTED", "EXIT_TERMINATED", "Terminated", "add_checkpoint_options",
           "checkpoint_options", "main", "parser", "render_error"]
