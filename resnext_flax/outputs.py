"""Where commands write: one guard, called before any work, so that no command writes over a
file it reads and no run fails at its end for want of a folder it can write to.

Every writer checks its output with :func:`check_output_path` first: ``convert``
(:func:`~resnext_flax.weights.conversion.convert_checkpoint`), ``evaluate --json``,
``finetune --output-dir``, and any command added later (``export`` included) that writes a
file or a folder. Missing parent folders are reported, never created: a typo in a path should
fail at once, not leave a tree of folders behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from resnext_flax.errors import OutputPathError

#: The configuration a Hugging Face weight file is read with, beside it.
HF_CONFIG = "config.json"

PathLike = str | os.PathLike

#: What a fine-tuning run writes in its output folder
#: (:func:`resnext_flax.finetuning.finetune`).
FINETUNE_RUN_FILES = ("best.safetensors", "history.json", "checkpoints")


def weight_source_files(source: PathLike) -> list[str]:
    """The files a weight load reads from `source`: a file and, where its name is a Hugging
    Face weight file's, the ``config.json`` beside it; for a folder, the Hugging Face weight
    files and ``config.json`` found in it (every one of them, whichever the load picks)."""
    from resnext_flax.weights.files import HF_WEIGHT_FILES

    source = os.fspath(source)
    if os.path.isdir(source):
        found = [os.path.join(source, name) for name in (*HF_WEIGHT_FILES, HF_CONFIG)]
        return [path for path in found if os.path.exists(path)]
    config = os.path.join(os.path.dirname(source), HF_CONFIG)
    beside = os.path.basename(source) in HF_WEIGHT_FILES and os.path.exists(config)
    return [source, config] if beside else [source]


def check_output_path(
    output: PathLike,
    inputs: Iterable[PathLike | None],
    *,
    what: str = "the output",
    directory: bool = False,
    writes: Iterable[str] = (),
) -> Path:
    """Check, before any work, that `output` can be written without touching an input.

    **Arguments:**
    - `inputs`: every file the command reads (None entries are skipped). A folder stands for
      every file under it; pass the files a folder is actually read through where they are
      fewer (:func:`weight_source_files` for weight folders, a dataset's image paths).
    - `what`: how the message names the output (``"--json"``, ``"the output"``).
    - `directory`: `output` is a folder the command fills (created if missing) rather than a
      file; `writes` are the names it writes inside it (``"best.safetensors"``...).

    Refused with :class:`~resnext_flax.errors.OutputPathError`: an output that is an input
    (the same path, or the same file through a symbolic or hard link), an existing file inside
    an input folder, a folder where a file is written or a file where a folder is, a folder
    output inside an input folder or whose `writes` hold an input, and a parent folder that is
    missing, not a folder, or not writable. Returns the output as an absolute path.
    """
    given = os.fspath(output)
    path = Path(os.path.abspath(given))
    _check_parent_as_written(given, what)
    files = [os.fspath(p) for p in inputs if p is not None]
    if directory:
        _check_folder_output(given, path, files, what, tuple(writes))
    else:
        _check_file_output(given, path, files, what)
    return path


def _check_parent_as_written(given: str, what: str) -> None:
    """The parent folder as the system resolves it, one component at a time: ``missing/..``
    names no folder there, though the text normalizes to an existing one."""
    trimmed = given.rstrip(os.sep) or given
    parent = os.path.dirname(trimmed) or os.curdir
    if not os.path.lexists(trimmed) and not os.path.exists(parent):
        raise _fail(what, given, f"cannot be written: the folder {parent!r} does not exist (it "
                                 "is not created for you: create it, or fix the path)")


def _fail(what: str, given: str, why: str) -> OutputPathError:
    return OutputPathError(f"{what} {given!r} {why}")


def _within(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies under it, comparing real paths (links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _is_same_file(stat: os.stat_result, path: str) -> bool:
    try:
        return os.path.samestat(stat, os.stat(path))
    except OSError:
        return False


def _input_behind(output: str, inputs: list[str]) -> tuple[str, str] | None:
    """(the input, the file in it) that the existing file `output` is, if any."""
    try:
        stat = os.stat(output)
    except OSError:  # nothing there yet: it cannot be a file that is read
        return None
    for source in inputs:
        if not os.path.isdir(source):
            if _is_same_file(stat, source):
                return source, source
        elif _within(output, source):
            return source, os.path.realpath(output)
        elif stat.st_nlink > 1:  # a hard link elsewhere to a file inside the folder
            for root, _, names in os.walk(source):
                for name in names:
                    if _is_same_file(stat, os.path.join(root, name)):
                        return source, os.path.join(root, name)
    return None


def _conflict_message(given: str, source: str, file: str) -> str:
    if file == source:
        link = "" if os.path.realpath(given) == os.path.realpath(source) else (
            " (the same file through a link)")
        where = f"is the input file {source!r}{link}"
    else:
        where = f"is {file!r}, a file of the input {source!r}"
    return f"{where}; choose another output path (the input would be overwritten)"


def _check_file_output(given: str, path: Path, inputs: list[str], what: str) -> None:
    if path.is_dir():
        raise _fail(what, given, "is a folder; name the file to write")
    behind = _input_behind(given, inputs)
    if behind is not None:
        raise _fail(what, given, _conflict_message(given, *behind))
    _check_writable_folder(path.parent, given, what)


def _check_folder_output(given: str, path: Path, inputs: list[str], what: str,
                         writes: tuple[str, ...]) -> None:
    if path.exists() and not path.is_dir():
        raise _fail(what, given, "is a file; name a folder to write into")
    for source in inputs:
        if os.path.isdir(source) and _within(given, source):
            raise _fail(what, given, f"is inside the input folder {source!r}; the run would "
                                     "write into its data: choose a folder outside it")
        for name in writes:
            target = os.path.join(given, name)
            behind = _input_behind(target, [source])
            if behind is not None or _within(source, target):
                raise _fail(what, given, f"would receive {name}, which is the input "
                                         f"{source!r}; choose another folder")
    _check_writable_folder(path if path.exists() else path.parent, given, what)


def _check_writable_folder(folder: Path, given: str, what: str) -> None:
    if not folder.exists():
        raise _fail(what, given, f"cannot be written: the folder {str(folder)!r} does not "
                                 "exist (it is not created for you: create it, or fix the "
                                 "path)")
    if not folder.is_dir():
        raise _fail(what, given, f"cannot be written: {str(folder)!r} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _fail(what, given, f"cannot be written: the folder {str(folder)!r} is not "
                                 "writable")


def check_finetune_output(output_dir: PathLike, data: Iterable[object],
                          weights: object = None, *, what: str = "output_dir") -> Path:
    """The guard of a fine-tuning run's folder: not (inside) a data folder, holding no file
    the run reads where it writes :data:`FINETUNE_RUN_FILES`, and creatable or writable.
    `data` are the training and validation sources (folders, list files; anything else, such
    as an in-memory data set, is skipped); `weights` the start weights (a local file counts)."""
    paths = [os.fspath(d) for d in data if isinstance(d, str | os.PathLike)]
    read = (weight_source_files(weights) if isinstance(weights, str | os.PathLike)
            and os.path.exists(weights) else [])
    return check_output_path(output_dir, [*paths, *read], what=what, directory=True,
                             writes=FINETUNE_RUN_FILES)

