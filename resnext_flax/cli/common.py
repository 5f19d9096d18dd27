"""What several subcommands share: the checkpoint options and how fixes are spelled on the
command line."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from resnext_flax.errors import Fix, Placeholder, render

#: Keyword arguments whose flag is not their name.
_FLAGS = {"name": "--model"}
#: The fixes' keywords a subcommand with ``--model`` and :func:`add_checkpoint_options` takes.
CHECKPOINT_KEYWORDS = frozenset({"name", "prefix", "ema", "key", "num_classes", "trust_pickle"})


def _flag(keyword: str, value: Any) -> str:
    flag = _FLAGS.get(keyword, "--" + keyword.replace("_", "-"))
    return flag if value is True else f"{flag} {value or repr(value)}"


def _flags(fix: Fix) -> str:
    return " ".join(_flag(k, v) for k, v in fix.options)


def _asks_for_a_value(fix: Fix) -> bool:
    return any(isinstance(value, Placeholder) for _, value in fix.options)


def render_fix(fix: Fix) -> str:
    """A fix as the library names it and as flags: ``prefix='a.' (--prefix a.)``."""
    if _asks_for_a_value(fix):
        return f"{fix} or {_flags(fix)}"
    return f"{fix}, {_flags(fix)}" if fix.aside else f"{fix} ({_flags(fix)})"


def fix_renderer(args: argparse.Namespace) -> Callable[[Fix], str]:
    """How the running subcommand spells a fix. Its own flags only where it takes them all
    (``fix_keywords``, set by its parser), since a flag it rejects would fail again; else the
    ``convert`` command that applies the fix to the weight file it was given, which it then
    loads as a converted checkpoint; else the library's keywords alone. A fix that asks for
    a value of the user's (``checkpoint=PATH``: a :class:`~resnext_flax.errors.Placeholder`)
    is the subcommand's own flag alone (``--checkpoint PATH``) where it has that option: there
    is no library call to mirror."""
    accepted = getattr(args, "fix_keywords", frozenset())
    source = getattr(args, "checkpoint", None) or getattr(args, "weights", None)
    source = source if source and os.path.exists(source) else None

    def spell(fix: Fix) -> str:
        if _asks_for_a_value(fix):
            has_options = all(keyword in vars(args) for keyword, _ in fix.options)
            return _flags(fix) if has_options else str(fix)
        if all(keyword in accepted for keyword, _ in fix.options):
            return render_fix(fix)
        if source is None:
            return str(fix)
        import shlex

        stem = os.path.splitext(os.path.basename(os.path.normpath(source)))[0]
        output = shlex.quote(stem + "-converted.safetensors")
        steps = (f"resnext-flax convert {shlex.quote(source)} --output {output} {_flags(fix)}, "
                 f"then --checkpoint {output}")
        return f"{fix}, {steps}" if fix.aside else f"{fix} ({steps})"

    return spell


def render_error(error: Any, fix: Callable[[Fix], str] = render_fix) -> str:
    """An exception or message for the terminal, its fixes spelled by `fix` (by default with
    their flags; :func:`fix_renderer` for what the running subcommand takes)."""
    return render(error, fix)


def add_checkpoint_options(parser: argparse.ArgumentParser, *, head: bool = True) -> None:
    """The options every checkpoint reader takes (``inspect``, ``convert``, and ``predict``
    and ``evaluate`` for their ``--checkpoint``; all have ``--model``): which trunk, whether
    to trust the pickle, and with `head` which head (``predict`` and ``evaluate`` use the
    file's own head)."""
    keywords = CHECKPOINT_KEYWORDS if head else CHECKPOINT_KEYWORDS - {"num_classes"}
    parser.set_defaults(fix_keywords=keywords)
    parser.add_argument("--prefix", metavar="PREFIX",
                        help="key prefix of the trunk to load where several hold one, "
                             "e.g. module.encoder_k. ('' for none)")
    parser.add_argument("--ema", action="store_true",
                        help="load the EMA weights (model_ema, state_dict_ema)")
    parser.add_argument("--key", metavar="KEY",
                        help="container to load, dotted for nesting (e.g. state_dict_ema)")
    if head:
        parser.add_argument("--num-classes", type=int, metavar="N",
                            help="classes of the model's head: 0 headless, N a fresh head "
                                 "unless the file's has N (default: the file's head)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="unpickle types outside the allow-list: RUNS CODE FROM THE FILE; "
                             "only for files you trust")


def checkpoint_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`resnext_flax.load_model` given on the command line
    (``num_classes`` only where the subcommand takes ``--num-classes``)."""
    options = {"prefix": args.prefix, "ema": args.ema, "key": args.key,
               "trust_pickle": args.trust_pickle}
    if "num_classes" in args.fix_keywords:
        options["num_classes"] = args.num_classes
    return options


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """``--model``, optional where ``--checkpoint`` names a file that records it (see
    :func:`model_name`)."""
    from resnext_flax.models.variants import VARIANTS

    parser.add_argument("--model", choices=list(VARIANTS), metavar="NAME",
                        help="model name, e.g. resnet50 (see `resnext-flax list`; default: "
                             "the one a converted --checkpoint records)")


def local_weight_file(args: argparse.Namespace) -> str | None:
    """The local file a command reads its weights from: ``--checkpoint``, or ``--weights``
    naming an existing file (the library's rule, without importing it: an existing file is
    treated as read, which errs on the safe side for the output guard)."""
    if args.checkpoint is not None:
        return args.checkpoint
    weights = getattr(args, "weights", None)
    return weights if isinstance(weights, str) and os.path.exists(weights) else None


def model_name(args: argparse.Namespace) -> str:
    """``--model``, or the architecture a converted ``--checkpoint`` records in its header
    (read without its tensors), or the one a ``--weights hf-hub:...`` repository's
    ``config.json`` names; other files do not say, and then ``--model`` is required."""
    if args.model is not None:
        return args.model
    weights = getattr(args, "weights", None)
    if args.checkpoint is None and isinstance(weights, str) and weights.startswith("hf-hub:"):
        from resnext_flax.weights.hub import hub_config

        return hub_config(weights, cache_dir=getattr(args, "cache_dir", None),
                          progress=not getattr(args, "no_progress", False)).architecture
    path = local_weight_file(args)
    if path is None:
        raise ValueError("--model is required unless --checkpoint names a converted "
                         "checkpoint (which records its model) or --weights a Hub repository "
                         "(hf-hub:owner/repository)")
    from resnext_flax.weights.files import CONVERTED_FORMAT, read_safetensors_metadata

    if not os.path.exists(path):
        from resnext_flax.errors import WeightFileNotFoundError

        raise WeightFileNotFoundError(f"no file or folder at {path!r} (--checkpoint)")

    meta = (read_safetensors_metadata(path) if os.path.isfile(path)
            and path.endswith(".safetensors") else {})
    name = meta.get("model") if meta.get("format") == CONVERTED_FORMAT else None
    if not name:
        raise ValueError(f"--model is required: {path!r} does not record its model (converted "
                         f"checkpoints do); `resnext-flax inspect {path}` shows what it holds")
    return name


def add_loader_arguments(parser: argparse.ArgumentParser, *,
                         val_prefix: bool = False) -> None:
    """The input pipeline's options (``evaluate``, ``finetune``, ``train``); `val_prefix`
    also spells the sizes as torchvision's reference does (``--val-resize-size``)."""
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="Grain worker processes decoding images; see docs/data.md "
                             "(default: 0, in-process threads only)")
    parser.add_argument("--threads", type=int, default=2, metavar="N",
                        help="decoding threads per process (default: 2)")
    for size in ("resize", "crop"):
        flags = [f"--{size}-size"]
        if val_prefix:
            flags.insert(0, f"--val-{size}-size")
        parser.add_argument(*flags, dest=f"{size}_size", type=int, metavar="PX",
                            help=f"override the weights' {size} size (evaluation)")
    parser.add_argument("--cache-dir", metavar="DIR", help="converted-checkpoint cache")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_compilation_options(parser: argparse.ArgumentParser) -> None:
    """``--no-compilation-cache``, for the subcommands that compile (``predict``,
    ``evaluate``, ``finetune``, ``convert``)."""
    parser.set_defaults(compiles=True)
    parser.add_argument("--no-compilation-cache", action="store_true",
                        help="do not keep compiled programs on disk or load them from there "
                             "(default: kept under $RESNEXT_FLAX_CACHE/jax-compilation; "
                             "RESNEXT_FLAX_COMPILATION_CACHE=0 also turns it off, =DIR moves "
                             "it); see docs/compilation.md")


@contextlib.contextmanager
def compilation_cache_for(args: argparse.Namespace) -> Iterator[None]:
    """JAX's persistent compilation cache around a subcommand that compiles (unless turned
    off), JAX's settings restored after it. A cache folder that cannot be used is reported on
    stderr and the command runs without it: the cache only saves time."""
    if not getattr(args, "compiles", False) or args.no_compilation_cache:
        yield
        return
    from resnext_flax.compilation import command_line_cache_dir, compilation_cache

    directory = command_line_cache_dir()
    if directory is None:
        yield
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(compilation_cache(directory))
        except OSError as err:
            print(f"resnext-flax: warning: compilation cache off: {err}", file=sys.stderr)
        yield
