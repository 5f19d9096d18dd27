"""What a torch-side weight object holds: the state dict inside it and its architecture.

The second step of every load (after ``weights.files`` read the file): unwrap a training
checkpoint's container (``{"state_dict": ...}``, ``{"model": ...}``), strip wrapper prefixes
(``module.`` from DataParallel/DDP, ``_orig_mod.`` from ``torch.compile``), drop torch's
BatchNorm step counters, and infer which of the ten architectures the keys describe.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from resnext_flax.models.variants import ModelSpec, find_variant
from resnext_flax.weights.files import WeightFileError

_IGNORED_SUFFIXES = ("num_batches_tracked",)  # torch's BN step counter; no Flax counterpart
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile
_CONTAINER_KEYS = ("state_dict", "model")


@dataclasses.dataclass(frozen=True)
class ResolvedStateDict:
    """A torchvision-keyed state dict found in a weight object, and how it was found.

    - `state_dict`: torchvision keys -> tensors or arrays (values untouched).
    - `container`: the keys followed to reach it (``("state_dict",)``; empty: the object itself).
    """

    state_dict: dict[str, Any]
    container: tuple[str, ...] = ()


def resolve_state_dict(obj: Any, *, source: str = "the object") -> ResolvedStateDict:
    """Find the state dict in `obj` (a state dict, or a checkpoint nesting one) and normalize
    its keys (see the module docstring). `source` names the object in errors."""
    container: list[str] = []
    while isinstance(obj, Mapping):
        inner = next((k for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        container.append(inner)
        obj = obj[inner]
    if not isinstance(obj, Mapping):
        raise WeightFileError(f"{source} holds a {type(obj).__name__}, not a state dict")
    return ResolvedStateDict(normalize_state_dict(obj), tuple(container))


def normalize_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Strip DataParallel/DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes and
    drop ``num_batches_tracked``; values are left as they are."""
    out = {}
    for key, value in state_dict.items():
        key = str(key)
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
    """The architecture and class count (0: no ``fc``) a torchvision-named state dict was
    saved from, or None if its keys do not describe a ResNet-family model."""
    sd = normalize_state_dict(state_dict)
    try:
        blocks = []
        for stage in range(1, 5):
            indices = {int(m.group(1)) for k in sd
                       if (m := re.match(rf"layer{stage}\.(\d+)\.conv1\.weight$", k))}
            blocks.append(len(indices))
        bottleneck = "layer1.0.conv3.weight" in sd
        conv2 = tuple(sd["layer1.0.conv2.weight"].shape)
        num_classes = int(sd["fc.weight"].shape[0]) if "fc.weight" in sd else 0
        if not all(blocks):
            return None
        if bottleneck:
            width, per_group = conv2[0], conv2[1]
            spec = ModelSpec("bottleneck", tuple(blocks), groups=width // per_group,
                             width_per_group=per_group)
        else:
            spec = ModelSpec("basic", tuple(blocks))
    except (KeyError, AttributeError, IndexError, TypeError, ValueError, ZeroDivisionError):
        return None
    return spec, num_classes


def infer_architecture(state_dict: Mapping[str, Any]) -> str | None:
    """torchvision's name for the architecture of a state dict, or None if not one of ours."""
    inferred = infer_spec(state_dict)
    return find_variant(inferred[0]) if inferred else None


def describe(state_dict: Mapping[str, Any]) -> str:
    """One phrase for messages: which architecture the state dict looks like."""
    inferred = infer_spec(state_dict)
    if inferred is None:
        return "it does not look like a torchvision ResNet-family state dict"
    spec, num_classes = inferred
    name = find_variant(spec)
    arch = name if name else f"an unlisted ResNet ({spec})"
    return f"it looks like {arch} with num_classes={num_classes}"
