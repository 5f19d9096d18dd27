"""What several subcommands share: the checkpoint options and how fixes are spelled on the
command line."""

from __future__ import annotations

import argparse
from typing import Any

from resnext_flax.errors import Fix, render

#: Keyword arguments whose flag is not their name.
_FLAGS = {"name": "--model"}


def _flag(keyword: str, value: Any) -> str:
    flag = _FLAGS.get(keyword, "--" + keyword.replace("_", "-"))
    return flag if value is True else f"{flag} {value or repr(value)}"


def render_fix(fix: Fix) -> str:
    """A fix as the library names it and as flags: ``prefix='a.' (--prefix a.)``."""
    flags = " ".join(_flag(k, v) for k, v in fix.options)
    return f"{fix}, {flags}" if fix.aside else f"{fix} ({flags})"


def render_error(error: Any) -> str:
    """An exception or message for the terminal, its fixes spelled with their flags."""
    return render(error, render_fix)


def add_checkpoint_options(parser: argparse.ArgumentParser) -> None:
    """The options every checkpoint reader takes (``inspect``, ``convert``): which trunk,
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


def checkpoint_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`resnext_flax.load_model` given on the command line."""
    return {"prefix": args.prefix, "ema": args.ema, "key": args.key,
            "num_classes": args.num_classes, "trust_pickle": args.trust_pickle}


def add_loader_arguments(parser: argparse.ArgumentParser) -> None:
    """The input pipeline's options (``evaluate``, ``finetune``)."""
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="Grain worker processes decoding images (default 0: in-process "
                             "threads only); see docs/data.md")
    parser.add_argument("--threads", type=int, default=2, metavar="N",
                        help="decoding threads per process (default 2)")
    parser.add_argument("--resize-size", type=int, metavar="PX",
                        help="override the weights' resize size")
    parser.add_argument("--crop-size", type=int, metavar="PX",
                        help="override the weights' crop size")
    parser.add_argument("--cache-dir", metavar="DIR", help="converted-checkpoint cache")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
