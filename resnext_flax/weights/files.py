"""Reading and writing weight files: the first step of every load, and atomic writes.

A file is read once, whatever its format, into a :class:`WeightFile`: a torchvision-style
state dict (``.pth``/``.pt``/``.bin``/``.ckpt`` through ``torch.load(weights_only=True)``, or a
``.safetensors`` file without this library's header) or a converted checkpoint of this library
(``.safetensors`` with a ``resnext_flax`` header). A Hugging Face model folder is read through
its ``model.safetensors`` or ``pytorch_model.bin``, with its ``config.json``. What the file's
tensors mean is decided later (``weights.resolve``).

Pickles: ``weights_only=True`` refuses every global outside torch's allow-list, which also
refuses training checkpoints that pickle their command-line arguments. :data:`SAFE_GLOBALS`
lets a few harmless types through (building them runs no code from the file); anything else is
an :class:`UntrustedPickleError` naming the globals, and only ``trust_pickle=True`` (which runs
the file's code) reads it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np

#: The header value that marks a converted checkpoint of this library.
CONVERTED_FORMAT = "resnext_flax"


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


class UntrustedPickleError(ValueError):
    """A ``.pth`` file pickles globals outside the allow-list; reading it would run them."""


def safe_globals() -> list[Any]:
    """Types a checkpoint may pickle besides tensors and containers, let through
    ``torch.load(weights_only=True)``: ``argparse.Namespace`` (the arguments torchvision's
    reference scripts and timm save), ``pathlib`` paths and numpy scalars. Rebuilding them
    sets attributes or copies bytes; it calls nothing named in the file."""
    import argparse
    import pathlib

    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    dtypes = [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64",
                                          "bool")]
    return [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
            pathlib.PureWindowsPath, scalar, (scalar, "numpy.core.multiarray.scalar"),
            np.dtype, *dtypes]


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file's header (without reading its tensors)."""
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception as err:
        raise ValueError(f"{path!r} is not a readable safetensors file: {err}") from err


def read_weight_file(path: str | os.PathLike, *, trust_pickle: bool = False) -> WeightFile:
    """Read a ``.pth``/``.pt``/``.bin``/``.ckpt`` or ``.safetensors`` file, or a Hugging Face
    model folder (see the module docstring). `trust_pickle`: unpickle anything, running code
    the file contains; only for files you trust."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = _weights_in_folder(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
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
    raise FileNotFoundError(f"{folder!r} is a folder without {' or '.join(HF_WEIGHT_FILES)}; "
                            "pass the weight file itself")


def _read_hf_config(path: str) -> dict[str, Any] | None:
    """The ``config.json`` beside a Hugging Face weight file (by its name), if any."""
    config = os.path.join(os.path.dirname(path), "config.json")
    if os.path.basename(path) not in HF_WEIGHT_FILES or not os.path.isfile(config):
        return None
    try:
        with open(config, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not read {config!r} as JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{config!r} holds a {type(data).__name__}, not a JSON object")
    return data


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    # The flax (jax.numpy) reader understands bfloat16, which numpy's reader does not.
    from safetensors.flax import load_file

    try:
        return {key: np.asarray(value) for key, value in load_file(path).items()}
    except Exception as err:
        raise ValueError(f"could not read {path!r} as a safetensors file: {err}") from err


def _read_torch_file(path: str, trust_pickle: bool = False) -> Any:
    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"reading {path!r} needs PyTorch: pip install 'resnext-flax[torch]' "
            "(or convert it to .safetensors first)"
        ) from err
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        unsafe = _unsafe_globals(torch, path)
        if unsafe:
            raise UntrustedPickleError(
                f"{path!r} pickles {', '.join(unsafe)}, outside the allow-list of harmless "
                "types (resnext_flax.weights.files.safe_globals); reading it would run code "
                "from the file. If you trust its source: trust_pickle=True (--trust-pickle), "
                "which unpickles it with torch.load(weights_only=False) and runs any code "
                "it contains") from None
        raise ValueError(f"could not read {path!r} as a PyTorch checkpoint: {err}") from err


def _unsafe_globals(torch: Any, path: str) -> list[str]:
    """The globals a pickle names beyond torch's and our allow-lists (never unpickled)."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        return []


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside `path`, then rename it into place,
    so a failure never leaves a partial file at `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
