"""The weight port: torchvision state dicts <-> this library's NNX state, matched by name.

Module names mirror torchvision's, so a torch key is the NNX path joined by dots with the leaf
renamed; only two transforms exist (conv kernels OIHW <-> HWIO, linear weights transposed).
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnext_flax.variants import ModelSpec, find_variant

# NNX leaf name -> torch leaf name.
_TORCH_LEAF = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
_IGNORED_SUFFIXES = ("num_batches_tracked",)  # torch's BN step counter; no Flax counterpart
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:  # conv: HWIO -> OIHW
        return value.transpose(3, 2, 0, 1)
    if leaf == "kernel" and value.ndim == 2:  # linear: (in, out) -> (out, in)
        return value.T
    return value


def _from_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:  # conv: OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _torch_key(path: tuple[Any, ...]) -> str:
    *modules, leaf = path
    return ".".join([*map(str, modules), _TORCH_LEAF[leaf]])


def torch_variables(model: nnx.Module) -> dict[str, tuple[str, nnx.Variable]]:
    """torch key -> (NNX leaf name, the model's Variable), for every weight and statistic."""
    out = {}
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Param | nnx.BatchStat):
            out[_torch_key(path)] = (path[-1], variable)
    return out


def to_torch_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's weights and BN statistics as a torchvision state dict of numpy arrays.

    torchvision's ``load_state_dict(..., strict=True)`` accepts it (after
    ``torch.from_numpy``); ``num_batches_tracked`` is torch's step counter and is omitted.
    """
    return {
        key: np.array(_to_torch_layout(leaf, np.asarray(var.get_value())), order="C")
        for key, (leaf, var) in torch_variables(model).items()
    }


def _to_numpy(key: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; torch is not imported unless it is used
        value = value.detach().cpu()
        if not value.is_floating_point():
            raise ValueError(f"{key!r}: expected a floating-point tensor, got {value.dtype}")
        return value.float().numpy() if value.dtype.itemsize < 4 else value.numpy()
    array = np.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise ValueError(f"{key!r}: expected a floating-point array, got {array.dtype}")
    return array


def normalize_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Strip DataParallel/DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes and
    drop ``num_batches_tracked``; values are left as they are."""
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        out[key] = value
    return out


def infer_spec(state_dict: Mapping[str, Any]) -> tuple[ModelSpec, int] | None:
    """The architecture (and class count) a torchvision-named state dict was saved from."""
    sd = normalize_state_dict(state_dict)
    try:
        blocks = []
        for stage in range(1, 5):
            indices = {int(m.group(1)) for k in sd
                       if (m := re.match(rf"layer{stage}\.(\d+)\.conv1\.weight$", k))}
            blocks.append(len(indices))
        bottleneck = "layer1.0.conv3.weight" in sd
        conv2 = tuple(sd["layer1.0.conv2.weight"].shape)
        num_classes = int(sd["fc.weight"].shape[0])
    except (KeyError, AttributeError, IndexError, TypeError):
        return None
    if not all(blocks):
        return None
    if bottleneck:
        width, per_group = conv2[0], conv2[1]
        groups = width // per_group
        spec = ModelSpec("bottleneck", tuple(blocks), groups=groups, width_per_group=per_group)
    else:
        spec = ModelSpec("basic", tuple(blocks))
    return spec, num_classes


def infer_architecture(state_dict: Mapping[str, Any]) -> str | None:
    """torchvision's name for the architecture of a state dict, or None if not one of ours."""
    inferred = infer_spec(state_dict)
    return find_variant(inferred[0]) if inferred else None


def _describe_source(state_dict: Mapping[str, Any]) -> str:
    inferred = infer_spec(state_dict)
    if inferred is None:
        return "it does not look like a torchvision ResNet-family state dict"
    spec, num_classes = inferred
    name = find_variant(spec)
    arch = name if name else f"an unlisted ResNet ({spec})"
    return f"it looks like {arch} with num_classes={num_classes}"


@dataclasses.dataclass(frozen=True)
class StateDictReport:
    """How a state dict fits a model: keys the model needs but the dict lacks, keys the dict has
    but the model does not, and keys whose shapes differ ``(key, expected, got)``."""

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]
    source: str

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def format(self, model_name: str) -> str:
        lines = [f"state dict does not fit {model_name}: {self.source}."]
        if self.missing:
            lines.append(f"{len(self.missing)} missing key(s): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"{len(self.unexpected)} unexpected key(s): {', '.join(self.unexpected)}")
        if self.mismatched:
            lines.append(f"{len(self.mismatched)} key(s) with mismatched shapes:")
            lines += [f"  {k}: expected {tuple(e)}, got {tuple(g)}" for k, e, g in self.mismatched]
        return "\n".join(lines)


class StateDictMismatchError(ValueError):
    """A state dict does not fit the model; the message lists every offending key."""

    def __init__(self, report: StateDictReport, model_name: str):
        super().__init__(report.format(model_name))
        self.report = report


class StateDictMismatchWarning(UserWarning):
    """Emitted by a non-strict load for the keys it could not load."""


def compare_state_dict(model: nnx.Module, state_dict: Mapping[str, Any]) -> StateDictReport:
    """Which keys of a (torchvision-named) state dict fit the model, without loading any."""
    sd = normalize_state_dict(state_dict)
    expected = torch_variables(model)
    mismatched = []
    for key in expected.keys() & sd.keys():
        leaf, var = expected[key]
        want = _torch_shape(leaf, var.get_value().shape)
        got = tuple(np.shape(sd[key]))
        if want != got:
            mismatched.append((key, want, got))
    return StateDictReport(
        missing=tuple(k for k in expected if k not in sd),
        unexpected=tuple(k for k in sd if k not in expected),
        mismatched=tuple(sorted(mismatched)),
        source=_describe_source(sd),
    )


def model_name(model: nnx.Module) -> str:
    """The torchvision name of a model's architecture, for messages."""
    spec = getattr(model, "spec", None)
    name = find_variant(spec) if spec is not None else None
    return name or type(model).__name__


def load_torch_state_dict(
    model: nnx.Module, state_dict: Mapping[str, Any], *, strict: bool = True
) -> nnx.Module:
    """Pour a torchvision state dict into `model` in place and return it.

    Values may be torch tensors or numpy arrays of any floating dtype; they are cast to the
    dtype of the model's variables. ``module.``/``_orig_mod.`` prefixes are stripped and
    ``num_batches_tracked`` dropped. With ``strict=True`` any missing, unexpected or
    mis-shaped key raises one :class:`StateDictMismatchError` listing them all, before
    anything is written; with ``strict=False`` the fitting keys load and the rest are
    reported as a :class:`StateDictMismatchWarning`.
    """
    report = compare_state_dict(model, state_dict)
    if not report.ok:
        if strict:
            raise StateDictMismatchError(report, model_name(model))
        warnings.warn(report.format(model_name(model)), StateDictMismatchWarning, stacklevel=2)
    sd = normalize_state_dict(state_dict)
    skip = {k for k, _, _ in report.mismatched}
    for key, (leaf, var) in torch_variables(model).items():
        if key in sd and key not in skip:
            array = _from_torch_layout(leaf, _to_numpy(key, sd[key]))
            # A copy: on the CPU jnp.asarray may alias the torch tensor's memory, which torch
            # could later change in place.
            var.set_value(jnp.array(array, dtype=var.get_value().dtype, copy=True))
    return model


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a torchvision checkpoint file into a dict of numpy arrays.

    ``.safetensors`` needs no torch; anything else is read with
    ``torch.load(..., weights_only=True)``. A checkpoint that wraps its state dict under
    ``"state_dict"`` or ``"model"`` is unwrapped.
    """
    path = os.fspath(path)
    obj = _read_safetensors(path) if path.endswith(".safetensors") else _read_torch_file(path)
    return {key: _to_numpy(key, value) for key, value in obj.items()
            if not key.endswith(_IGNORED_SUFFIXES)}


def _read_safetensors(path: str) -> Mapping[str, Any]:
    # The flax (jax.numpy) reader understands bfloat16, which numpy's reader does not.
    from safetensors.flax import load_file

    try:
        return {key: np.asarray(value) for key, value in load_file(path).items()}
    except Exception as err:
        raise ValueError(f"could not read {path!r} as a safetensors file: {err}") from err


def _read_torch_file(path: str) -> Mapping[str, Any]:
    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"reading {path!r} needs PyTorch: pip install 'resnext-flax[torch]' "
            "(or convert it to .safetensors first)"
        ) from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"could not read {path!r} as a PyTorch checkpoint: {err}") from err
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict")
    return obj
