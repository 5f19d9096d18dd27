"""Reading and writing weight files: the first step of every load, and atomic writes.

A file is read once, whatever its format, into a :class:`WeightFile`: a torchvision-style
state dict (``.pth``/``.pt``/``.bin``/``.ckpt`` through ``torch.load(weights_only=True)``, or a
``.safetensors`` file without this library's header) or a converted checkpoint of this library
(``.safetensors`` with a ``resnext_flax`` header). A Hugging Face model folder is read through
its ``model.safetensors`` or ``pytorch_model.bin``, with its ``config.json``. What the file's
tensors mean is decided later (``weights.foreign``).

Pickles: ``weights_only=True`` refuses every global outside torch's allow-list, which also
refuses training checkpoints that pickle their command-line arguments. :func:`safe_globals`
lets a few harmless types through (building them runs no code from the file); anything else is
an :class:`UntrustedPickleError` naming the globals, and only ``trust_pickle=True`` (which runs
the file's code) reads it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

from resnext_flax.errors import Fix, Message, WeightFileNotFoundError, WeightsError
from resnext_flax.weights import limits

#: The header value that marks a converted checkpoint of this library.
CONVERTED_FORMAT = "resnext_flax"
#: Temporary files of atomic writes are named ``.<target>.<TEMP_MARK><pid>+<host>+<random>``
#: (the writer, so that a cleaner can tell whether it still runs: :func:`is_stale_leftover`).
TEMP_MARK = "resnext-flax-tmp-"
#: A temporary file of ours whose writer cannot be checked (another host, no writer in its
#: name) is a leftover of a killed process once unchanged this long.
STALE_TEMP_SECONDS = 15 * 60
#: A leftover whose writer's pid runs is still stale once unchanged this long: the pid was
#: reused by another process (no write of this library takes a day).
LIVE_WRITER_MAX_SECONDS = 24 * 3600
#: What follows a temporary name's prefix: ``<pid>+<host>+<random>`` (see :func:`writer_tag`;
#: ``tempfile``'s 8 random characters), or the random part alone, as names had before.
_TEMP_REST = re.compile(r"(\d+\+[A-Za-z0-9._-]+\+)?[a-z0-9_]{8}")


class WeightFileError(WeightsError):
    """A weight file cannot be read as what it claims to be; the message names the file,
    says what it looks like and which function reads it."""


@dataclasses.dataclass(frozen=True)
class WeightFile:
    """What a weight file holds, as read.

    - `kind`: ``"converted"`` (this library's checkpoint: tensors under NNX paths, the
      architecture in `metadata`) or ``"torch"`` (any other object: a state dict, or a
      container holding one).
    - `content`: the tensors (converted) or the object ``torch.load`` / safetensors returned.
    - `metadata`: the safetensors header's metadata (empty for ``.pth`` files).
    - `config`: a Hugging Face ``config.json`` beside the file, parsed (else None).
    """

    path: str
    kind: Literal["converted", "torch"]
    content: Any
    metadata: Mapping[str, str]
    config: Mapping[str, Any] | None = None


#: Weight files of a Hugging Face model folder, in the order they are looked for.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class UntrustedPickleError(WeightFileError):
    """A ``.pth`` file pickles globals outside the allow-list; reading it would run them."""


def safe_globals() -> list[Any]:
    """Types a checkpoint may pickle besides tensors and containers, let through
    ``torch.load(weights_only=True)``: ``argparse.Namespace`` (the arguments torchvision's
    reference scripts and timm save), ``pathlib`` paths and numpy scalars. Rebuilding them
    sets attributes or copies bytes; it calls nothing named in the file."""
    import argparse
    import pathlib

    import numpy as np

    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    dtypes = [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64",
                                          "bool")]
    return [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
            pathlib.PureWindowsPath, scalar, (scalar, "numpy.core.multiarray.scalar"),
            np.dtype, *dtypes]


def _check_readable(path: str) -> None:
    """Raise the real OSError (permission denied, a directory...) rather than a parser's
    message about a file that exists."""
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise OSError(err.errno, f"cannot read {path!r}: {err.strerror}") from err


def _refuse(problem: str | None) -> None:
    """Raise a WeightFileError for a file that exceeds a bound of ``weights.limits``."""
    if problem:
        raise WeightFileError(problem)


def describe_file(path: str) -> str:
    """What a file looks like, from its size and first bytes, for error messages."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as err:
        return f"unreadable ({err.strerror})"
    if size == 0:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return f"a zip archive of {size} bytes (the container torch.save writes)"
    if head[:1] == b"\x80":
        return f"a pickle of {size} bytes (torch.save's legacy format)"
    if len(head) >= 8 and int.from_bytes(head[:8], "little") < size:
        return f"a {size}-byte file with a safetensors-like header length"
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return f"a text file of {size} bytes starting {head.decode('ascii')!r}"
    return f"a {size}-byte binary file of unknown format"


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file's header (without reading its tensors)."""
    from safetensors import safe_open

    path = os.fspath(path)
    _check_readable(path)
    _refuse(limits.safetensors_header_problem(path))
    try:
        with safe_open(path, framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception as err:
        raise WeightFileError(
            f"{path!r} is not a readable safetensors file ({describe_file(path)}): {err}"
        ) from err


def read_weight_file(path: str | os.PathLike, *, trust_pickle: bool = False) -> WeightFile:
    """Read a ``.pth``/``.pt``/``.bin``/``.ckpt`` or ``.safetensors`` file, or a Hugging Face
    model folder (see the module docstring). `trust_pickle`: unpickle anything, running code
    the file contains; only for files you trust."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = _weights_in_folder(path)
    if not os.path.isfile(path):
        raise WeightFileNotFoundError(f"no checkpoint file at {path!r}")
    _check_readable(path)
    config = _read_hf_config(path)
    if path.endswith(".safetensors"):
        metadata = read_safetensors_metadata(path)
        kind = "converted" if metadata.get("format") == CONVERTED_FORMAT else "torch"
        return WeightFile(path, kind, _read_safetensors(path), metadata, config)
    return WeightFile(path, "torch", _read_torch_file(path, trust_pickle), {}, config)


def _weights_in_folder(folder: str) -> str:
    for name in HF_WEIGHT_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise WeightFileNotFoundError(f"{folder!r} is a folder without "
                                  f"{' or '.join(HF_WEIGHT_FILES)}; pass the weight file itself")


def _read_hf_config(path: str) -> dict[str, Any] | None:
    """The ``config.json`` beside a Hugging Face weight file (by its name), if any."""
    config = os.path.join(os.path.dirname(path), "config.json")
    if os.path.basename(path) not in HF_WEIGHT_FILES or not os.path.isfile(config):
        return None
    _refuse(limits.config_size_problem(config))
    try:
        with open(config, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise WeightFileError(f"could not read {config!r} as JSON: {err}") from err
    except RecursionError:
        raise WeightFileError(f"could not read {config!r} as JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise WeightFileError(f"{config!r} holds a {type(data).__name__}, not a JSON object")
    return data


def _read_safetensors(path: str) -> dict[str, Any]:
    """The tensors, as placeholders read one at a time when used (``weights.stored``), read
    without JAX (reading a file starts no backend); safetensors checks the header (offsets,
    sizes) on opening."""
    from resnext_flax.weights.stored import read_tensors

    try:
        return read_tensors(path)
    except Exception as err:
        raise WeightFileError(
            f"could not read {path!r} as a safetensors file ({describe_file(path)}): {err}"
        ) from err


def _read_torch_file(path: str, trust_pickle: bool = False) -> Any:
    _refuse(limits.zip_members_problem(path))
    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"reading {path!r} needs PyTorch: pip install 'resnext-flax[torch]' "
            "(or convert it to .safetensors first)"
        ) from err
    if trust_pickle:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise WeightFileError(_torch_load_failure(path, err)) from err
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        unsafe = _unsafe_globals(torch, path)
        if unsafe:
            raise UntrustedPickleError(Message(
                f"{path!r} pickles {', '.join(unsafe)}, outside the allow-list of harmless "
                "types (resnext_flax.weights.files.safe_globals); reading it would run code "
                "from the file. If you trust its source: ", Fix.of(trust_pickle=True),
                ", which unpickles it with torch.load(weights_only=False) and runs any code "
                "it contains")) from None
        raise WeightFileError(_torch_load_failure(path, err)) from err


def _unsafe_globals(torch: Any, path: str) -> list[str]:
    """The globals a pickle names beyond torch's and our allow-lists (found by reading the
    pickle's opcodes; nothing is unpickled)."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        return []


def _torch_load_failure(path: str, err: Exception) -> str:
    """One message for a file torch.load refused: what the file looks like and what to do.
    torch's own message for refused pickles recommends weights_only=False, which would run
    code from the file; that advice is not repeated."""
    reason = str(err).strip()
    if "Weights only load failed" in reason:
        detail = [line.strip() for line in reason.splitlines()
                  if "Unsupported global" in line or "Unsupported operand" in line]
        reason = detail[0] if detail else "the pickle holds objects other than tensors"
    reason = reason or type(err).__name__
    return (f"could not read {path!r} as a PyTorch checkpoint ({describe_file(path)}): "
            f"{reason}. torchvision .pth/.pt files are read by resnext_flax.read_state_dict; "
            "converted .safetensors files by resnext_flax.load_checkpoint")


def _umask() -> int:
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def writer_tag() -> str:
    """``<pid>+<host>+``: what temporary names of this process embed after their prefix, so a
    cleaner can tell a live writer's file from a dead one's (see :func:`is_stale_leftover`)."""
    return f"{os.getpid()}+{_host()}+"


@functools.cache
def _host() -> str:
    """This host's name, with its boot id and process-id namespace where it has them: machines
    that share a host name (and a cache over a network file system) differ in boot id, and
    containers that share a host see each other's cache folders but not each other's
    processes."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "unknown"
    try:  # two machines' first pid namespaces share an inode number, never a boot id
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            host += "_" + re.sub(r"[^0-9a-f]", "", f.read())[:12]
        host += "_" + re.sub(r"\D", "", os.readlink("/proc/self/ns/pid"))
    except OSError:
        pass
    return host


def _writer_alive(rest: str) -> bool | None:
    """Whether the writer named at the start of `rest` (``<pid>+<host>+...``) runs: True or
    False for a process of this host, None where that cannot be told (another host, a name
    without a writer)."""
    pid, _, tail = rest.partition("+")
    host, sep, _ = tail.partition("+")
    if not (sep and pid.isdigit()) or host != _host():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: the pid exists, another user's process
        return True
    return True


def is_stale_leftover(rest: str, age_seconds: float) -> bool:
    """Whether a temporary file or folder of ours, its name continuing with `rest` after its
    prefix and last changed `age_seconds` ago, is a killed writer's leftover: its writer is a
    dead process of this host, or, where liveness cannot be told, it is older than
    ``STALE_TEMP_SECONDS``. A live writer's file is stale only after
    ``LIVE_WRITER_MAX_SECONDS`` (its pid reused); a name this library does not make, never."""
    if not is_temporary_name(rest):
        return False
    alive = _writer_alive(rest)
    if alive is not None:
        return not alive or age_seconds > LIVE_WRITER_MAX_SECONDS
    return age_seconds > STALE_TEMP_SECONDS


def is_temporary_name(rest: str) -> bool:
    """Whether `rest`, what follows a temporary name's prefix, is one this library makes: a
    file or folder of someone else's that merely starts alike is never deleted."""
    return _TEMP_REST.fullmatch(rest) is not None


def remove_stale_temp_files(directory: str | os.PathLike, target: str | None = None) -> None:
    """Delete leftovers of atomic writes to `target` (None: to any file) in `directory` that a
    killed process (SIGKILL, a power cut) could not clean up: ours by name
    (``.<target>.<TEMP_MARK>...``), and stale by :func:`is_stale_leftover`, so a concurrent
    writer's file is left alone."""
    now = time.time()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        head, mark, rest = entry.name.partition(TEMP_MARK)
        if not mark or not head.startswith(".") or not head.endswith("."):
            continue
        if target is not None and head != f".{target}.":
            continue
        try:
            if entry.is_file(follow_symlinks=False) and is_stale_leftover(
                    rest, now - entry.stat(follow_symlinks=False).st_mtime):
                os.remove(entry.path)
        except OSError:
            pass


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside `path`, then rename it into place,
    so a failure never leaves a partial file at `path`.

    The file gets the mode a plain ``open(path, "w")`` would give under the current umask
    (``mkstemp`` creates 0600, and a rename keeps it). The temporary file is named
    ``.<name>.resnext-flax-tmp-<pid>+<host>+*`` and removed on any exception, Ctrl-C and
    SIGTERM included (:func:`sigterm_as_interrupt` with ``then_default=True``); one left by a
    killed process is removed by a later write to the same path once stale.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    target = os.path.basename(path)
    os.makedirs(directory, exist_ok=True)
    remove_stale_temp_files(directory, target)
    with sigterm_as_interrupt(then_default=True):
        fd, tmp = tempfile.mkstemp(prefix=f".{target}.{TEMP_MARK}{writer_tag()}", dir=directory)
        os.close(fd)
        try:
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


@contextmanager
def sigterm_as_interrupt(*, then_default: bool = False) -> Iterator[None]:
    """Inside the block, SIGTERM raises KeyboardInterrupt as Ctrl-C does, so cleanup (e.g.
    of an atomic write's temporary file) runs when a process is terminated. Only in the main
    thread (elsewhere the block runs unchanged); the previous handler is restored on leaving.

    `then_default`: for library code, which must leave a process's own signal handling alone:
    act only where SIGTERM has its default action (a handler the program installed, or
    SIG_IGN, already decides), and once the block has cleaned up, end the process by SIGTERM
    as that default action would have, even if the KeyboardInterrupt was caught inside.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if then_default and previous is not signal.SIG_DFL:
        yield
        return
    if previous is None:  # installed outside Python: what it would do is unknown
        previous = signal.SIG_DFL
    received: list[int] = []

    def interrupt(signum, frame):
        received.append(signum)
        if len(received) == 1 or not then_default:  # a library's cleanup is not cut short
            raise KeyboardInterrupt(f"terminated by signal {signum}")

    try:  # installed inside: a signal right after it still restores the previous handler
        signal.signal(signal.SIGTERM, interrupt)
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if then_default and received:
            os.kill(os.getpid(), signal.SIGTERM)
