"""Reading and writing weight files: the first step of every load, and atomic writes.

A file is read once, whatever its format, into a :class:`WeightFile`: a torchvision-style
state dict (``.pth``/``.pt`` through ``torch.load(weights_only=True)``, or a ``.safetensors``
file without this library's header) or a converted checkpoint of this library (``.safetensors``
with a ``resnext_flax`` header). What the file's tensors mean is decided later
(``weights.resolve``).
"""

from __future__ import annotations

import dataclasses
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
    """

    path: str
    kind: Literal["converted", "torch"]
    content: Any
    metadata: Mapping[str, str]


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file's header (without reading its tensors)."""
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception as err:
        raise ValueError(f"{path!r} is not a readable safetensors file: {err}") from err


def read_weight_file(path: str | os.PathLike) -> WeightFile:
    """Read a ``.pth``/``.pt`` or ``.safetensors`` file (see the module docstring)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    if path.endswith(".safetensors"):
        metadata = read_safetensors_metadata(path)
        kind = "converted" if metadata.get("format") == CONVERTED_FORMAT else "torch"
        return WeightFile(path, kind, _read_safetensors(path), metadata)
    return WeightFile(path, "torch", _read_torch_file(path), {})


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    # The flax (jax.numpy) reader understands bfloat16, which numpy's reader does not.
    from safetensors.flax import load_file

    try:
        return {key: np.asarray(value) for key, value in load_file(path).items()}
    except Exception as err:
        raise ValueError(f"could not read {path!r} as a safetensors file: {err}") from err


def _read_torch_file(path: str) -> Any:
    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"reading {path!r} needs PyTorch: pip install 'resnext-flax[torch]' "
            "(or convert it to .safetensors first)"
        ) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"could not read {path!r} as a PyTorch checkpoint: {err}") from err


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
