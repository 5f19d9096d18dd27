"""From a weight file (or an in-memory state dict) to a filled model, one way:

read it (``files``) -> resolve what it holds (``resolve``) -> map the keys (``torch_port``)
-> build and fill the model. ``from_pretrained(..., checkpoint=...)``, the converter and the
download cache all load through :func:`load_model`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from flax import nnx

from resnext_flax.models.resnet import ResNet
from resnext_flax.models.variants import find_variant, get_spec
from resnext_flax.weights.checkpoint import model_from_converted
from resnext_flax.weights.files import WeightFile, WeightFileError, read_weight_file
from resnext_flax.weights.resolve import (
    describe,
    infer_architecture,
    infer_spec,
    resolve_state_dict,
)
from resnext_flax.weights.torch_port import (
    StateDictMismatchError,
    load_torch_state_dict,
    to_numpy,
)

Source = str | os.PathLike | Mapping[str, Any]


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Read a torchvision checkpoint file into a torchvision-keyed dict of numpy arrays.

    ``.safetensors`` needs no torch; anything else is read with
    ``torch.load(..., weights_only=True)``. A checkpoint that wraps its state dict under
    ``"state_dict"`` or ``"model"`` is unwrapped, ``module.``/``_orig_mod.`` prefixes are
    stripped and ``num_batches_tracked`` dropped.
    """
    weight_file = read_weight_file(path)
    if weight_file.kind == "converted":
        raise ValueError(
            f"{weight_file.path!r} is a converted resnext_flax checkpoint, not a torchvision "
            "state dict: load it with resnext_flax.load_checkpoint(path)")
    try:
        return {key: to_numpy(key, value)
                for key, value in _torch_state_dict(weight_file).items()}
    except ValueError as err:
        raise WeightFileError(f"{weight_file.path!r}: {err}") from None


def _torch_state_dict(weight_file: WeightFile) -> dict[str, Any]:
    return resolve_state_dict(weight_file.content, source=repr(weight_file.path)).state_dict


def model_from_state_dict(
    state_dict: Mapping[str, Any], name: str | None = None, *, dtype: Any = None,
    source: str | os.PathLike | None = None,
) -> ResNet:
    """Build the architecture a state dict belongs to (checked against `name` if given) and
    load it strictly, without a random initialization; returns the model in eval mode.
    `source` (the file it came from) is named in errors."""
    where = f" (from {os.fspath(source)!r})" if source is not None else ""
    state_dict = resolve_state_dict(state_dict, source="the state dict").state_dict
    if name is None:
        name = infer_architecture(state_dict)
        if name is None:
            raise WeightFileError(
                f"cannot tell which model this state dict{where} belongs to: "
                f"{describe(state_dict)}; pass its name (one of resnext_flax.list_models())"
            )
    spec = get_spec(name)
    inferred = infer_spec(state_dict)
    num_classes = inferred[1] if inferred else 1000
    model = nnx.eval_shape(lambda: ResNet(spec, num_classes=num_classes, dtype=dtype,
                                          rngs=nnx.Rngs(0)))
    try:
        load_torch_state_dict(model, state_dict, strict=True)
    except StateDictMismatchError as err:
        raise StateDictMismatchError(err.report, name + where) from None
    model.eval()
    return model


def load_model(source: Source, name: str | None = None, *, dtype: Any = None) -> ResNet:
    """A model (eval mode) from a ``.pth``/``.safetensors`` file, a converted checkpoint or an
    in-memory state dict, loaded strictly; `name`, if given, must match what it holds."""
    if isinstance(source, Mapping):
        return model_from_state_dict(source, name, dtype=dtype)
    weight_file = read_weight_file(source)
    if weight_file.kind == "torch":
        return model_from_state_dict(_torch_state_dict(weight_file), name, dtype=dtype,
                                     source=weight_file.path)
    model = model_from_converted(weight_file, dtype=dtype)
    held = find_variant(model.spec)
    if name is not None and held != name:
        raise ValueError(f"{weight_file.path!r} holds a {held or model.spec} checkpoint, "
                         f"not {name}")
    return model
