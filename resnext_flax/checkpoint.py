"""Converted checkpoints: one ``.safetensors`` file per model, readable without torch.

Tensors are stored under their NNX paths (``layer1.0.conv2.kernel``, HWIO) and the
architecture in the file's metadata, so :func:`load_checkpoint` rebuilds the model from the file
alone. safetensors is a flat, memory-mappable, pickle-free format with a JSON header that any
framework reads; orbax is the tool for training state (see the fine-tuning example).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnext_flax.model import ResNet
from resnext_flax.variants import ModelSpec, find_variant

FORMAT = "resnext_flax"
FORMAT_VERSION = "1"


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


def _flat_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    return {
        ".".join(map(str, path)): var
        for path, var in nnx.iter_graph(model)
        if isinstance(var, nnx.Param | nnx.BatchStat)
    }


def save_checkpoint(
    model: ResNet, path: str | os.PathLike, *, metadata: dict[str, str] | None = None
) -> None:
    """Write the model's parameters and BN statistics to a ``.safetensors`` file, atomically."""
    from safetensors.numpy import save

    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": json.dumps(_spec_to_json(model.spec)),
        "num_classes": str(model.num_classes),
        "model": find_variant(model.spec) or "",
        **(metadata or {}),
    }
    tensors = {key: np.asarray(var.get_value()) for key, var in _flat_variables(model).items()}
    blob = save(tensors, metadata=header)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(blob)

    atomic_write(path, write)


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata header of a converted checkpoint; ValueError if it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception as err:
        raise ValueError(f"{os.fspath(path)!r} is not a readable safetensors file: {err}") from err
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{os.fspath(path)!r} is not a resnext_flax checkpoint (no '{FORMAT}' metadata); "
            "torchvision files load with resnext_flax.read_state_dict"
        )
    return meta


def load_checkpoint(
    path: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = jnp.float32
) -> ResNet:
    """Rebuild a model from a converted checkpoint (no torch, no random initialization).

    Returns the model in eval mode. Every stored tensor must match the architecture recorded in
    the file, key by key and shape by shape.
    """
    from safetensors.numpy import load_file

    meta = read_checkpoint_metadata(path)
    spec = _spec_from_json(json.loads(meta["spec"]))
    num_classes = int(meta["num_classes"])
    tensors = load_file(os.fspath(path))
    model = nnx.eval_shape(
        lambda: ResNet(spec, num_classes=num_classes, dtype=dtype, param_dtype=param_dtype,
                       rngs=nnx.Rngs(0))
    )
    variables = _flat_variables(model)
    missing = sorted(variables.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - variables.keys())
    mismatched = [
        f"{k}: expected {tuple(variables[k].get_value().shape)}, got {tensors[k].shape}"
        for k in sorted(variables.keys() & tensors.keys())
        if tuple(variables[k].get_value().shape) != tensors[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{os.fspath(path)!r} does not match its recorded architecture {spec}: "
            f"missing {missing}, unexpected {unexpected}, mismatched {mismatched}"
        )
    for key, var in variables.items():
        var.set_value(jax.device_put(jnp.asarray(tensors[key], dtype=var.get_value().dtype)))
    model.eval()
    return model


def _spec_to_json(spec: ModelSpec) -> dict[str, Any]:
    return {"block": spec.block, "layers": list(spec.layers), "groups": spec.groups,
            "width_per_group": spec.width_per_group}


def _spec_from_json(data: dict[str, Any]) -> ModelSpec:
    return ModelSpec(data["block"], tuple(data["layers"]), data["groups"],
                     data["width_per_group"])
