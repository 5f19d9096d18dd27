"""The survey of a foreign checkpoint: every ResNet trunk in it, wherever it sits.

Checkpoints come in many shapes (see ``docs/checkpoints.md``): training-script containers
(torchvision's reference scripts, timm, PyTorch Lightning, MoCo), a trunk under any prefix
(``backbone.``, ``module.encoder_q.``), ``nn.Sequential(*list(resnet.children())[:-1])``
numbering, Hugging Face transformers' ResNet names, no head or an MLP head. :func:`candidates`
finds every trunk in every state dict of the object, renamed to torchvision's keys and checked
against the architecture its shapes describe.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from resnext_flax.models.variants import MAX_BLOCKS_PER_STAGE, ModelSpec, find_variant
from resnext_flax.weights.foreign.names import (
    TRUNK_CHILDREN,
    rename_sequential,
    rename_transformers,
    trunk_prefixes,
)
from resnext_flax.weights.torch_port import arch_phrase, expected_shapes, infer_spec

#: Container keys that hold exponential-moving-average weights (torchvision's reference
#: scripts: ``model_ema``; timm: ``state_dict_ema``; others).
EMA_KEYS = ("model_ema", "state_dict_ema", "ema", "ema_state_dict", "ema_model")
_MAX_CONTAINER_DEPTH = 4


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    """How to pick weights from a checkpoint that holds more than one model; every loader
    (``load_model``, ``from_pretrained(checkpoint=...)``, the converter, ``inspect``) takes
    the same ones.

    - `prefix`: the key prefix of the trunk to load (``"module.encoder_k."``; ``""`` for
      none) when several prefixes hold a complete trunk.
    - `ema`: take the exponential-moving-average weights (``model_ema``, ``state_dict_ema``).
    - `key`: the container to take, dotted for nesting (``"state_dict_ema"``, ``"teacher"``).
    - `num_classes`: the head of the model: None keeps the file's linear head (or none); 0
      builds a headless model; N != the file's builds a freshly initialized N-class head.
    """

    prefix: str | None = None
    ema: bool = False
    key: str | None = None
    num_classes: int | None = None

    def __post_init__(self) -> None:
        n = self.num_classes
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            raise ValueError(f"num_classes must be None or an int >= 0, got {n!r}")
        if self.prefix is not None and not isinstance(self.prefix, str):
            raise ValueError(f"prefix must be a string, got {self.prefix!r}")
        if self.prefix and not self.prefix.endswith("."):
            object.__setattr__(self, "prefix", self.prefix + ".")
        if self.key is not None and self.ema:
            raise ValueError("pass either key= or ema=True, not both")


@dataclasses.dataclass(frozen=True)
class Head:
    """The classifier found beside a trunk: ``"none"``, ``"linear"`` (`num_classes`),
    ``"mlp"`` (``fc.0``/``fc.2``…, never loaded) or ``"other"`` (unrecognized ``fc`` keys)."""

    kind: str
    num_classes: int = 0
    keys: tuple[str, ...] = ()
    shapes: tuple[tuple[int, ...], ...] = ()

    def __str__(self) -> str:
        if self.kind == "none":
            return "none (a backbone without classifier)"
        if self.kind == "linear":
            return f"linear, {self.num_classes} classes"
        layers = ", ".join(f"{k} {tuple(s)}" for k, s in zip(self.keys, self.shapes, strict=True)
                           if k.endswith("weight"))
        return f"{'MLP' if self.kind == 'mlp' else 'unrecognized'} head ({layers})"


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One ResNet trunk found in a checkpoint.

    `container`: the keys followed from the top to its state dict; `prefix`: the key prefix
    of its torchvision names (after renaming `key_style` keys); `missing` / `mismatched`:
    trunk keys of the inferred architecture it lacks or holds with another shape.
    """

    container: tuple[str, ...]
    prefix: str
    key_style: str
    spec: ModelSpec | None
    head: Head
    missing: tuple[str, ...]
    mismatched: tuple[str, ...]
    state_dict: dict[str, Any] = dataclasses.field(repr=False, compare=False)
    original_keys: dict[str, str] = dataclasses.field(repr=False, compare=False)
    problem: str = ""  # why no architecture could be built from its keys, where known

    @property
    def complete(self) -> bool:
        return self.spec is not None and not self.missing and not self.mismatched

    @property
    def ema(self) -> bool:
        return any(part in EMA_KEYS for part in self.container)

    @property
    def architecture(self) -> str | None:
        return find_variant(self.spec) if self.spec is not None else None

    def label(self) -> str:
        state = arch_phrase(self.spec)
        if self.problem:
            state += f" ({self.problem})"
        if not self.complete and (self.missing or self.mismatched or not self.problem):
            absent = self.missing + self.mismatched
            state += f", incomplete: {len(absent)} trunk key(s) missing or mis-shaped " \
                     f"({', '.join(absent[:3])}{', ...' if len(absent) > 3 else ''})"
        return f"container {container_path(self.container)}, prefix {self.prefix!r}: {state}"


def container_path(container: tuple[str, ...]) -> str:
    return repr(".".join(container)) if container else "(top level)"


def is_tensor(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def as_mapping(obj: Any) -> Any:
    """A pickled torch module (``torch.save(model)``, read with ``trust_pickle``) stands for
    its ``state_dict()``."""
    state_dict = getattr(obj, "state_dict", None)
    if not isinstance(obj, Mapping) and callable(state_dict):
        return state_dict()
    return obj


def state_dicts(obj: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict]]:
    """Every mapping holding tensors under string keys, and its path of container keys."""
    obj = as_mapping(obj)
    if not isinstance(obj, Mapping) or len(path) > _MAX_CONTAINER_DEPTH:
        return []
    found = []
    tensors = {str(k): v for k, v in obj.items() if is_tensor(v)}
    if tensors:
        found.append((path, tensors))
    for key, value in obj.items():
        if not is_tensor(value):
            found += state_dicts(value, (*path, str(key)))
    return found


def _classify_head(sub: Mapping[str, Any]) -> Head:
    keys = tuple(sorted(k for k in sub if k.split(".", 1)[0] == "fc"))
    shapes = tuple(tuple(sub[k].shape) for k in keys)
    if not keys:
        return Head("none")
    weight = sub.get("fc.weight")
    if set(keys) <= {"fc.weight", "fc.bias"} and weight is not None and len(weight.shape) == 2:
        return Head("linear", int(weight.shape[0]), keys, shapes)
    if all(re.fullmatch(r"fc\.\d+\.(weight|bias)", k) for k in keys):
        return Head("mlp", 0, keys, shapes)
    return Head("other", 0, keys, shapes)


def candidates(container: tuple[str, ...], tensors: dict[str, Any]) -> list[Candidate]:
    keys = list(tensors)
    styles = {}
    renames = rename_transformers(keys)
    styles.update({new: "transformers" for new in renames.values()})
    seq = rename_sequential([k for k in keys if k not in renames])
    styles.update({new: "sequential" for new in seq.values()})
    renames.update(seq)
    named = {renames.get(k, k): k for k in keys}
    found = []
    for prefix in trunk_prefixes(named):
        sub = {k[len(prefix):]: tensors[named[k]] for k in named if k.startswith(prefix)}
        originals = {k[len(prefix):]: named[k] for k in named if k.startswith(prefix)}
        sub = {k: v for k, v in sub.items()
               if k.split(".", 1)[0] in (*TRUNK_CHILDREN, "fc")}
        spec = _spec(sub)
        mismatched: tuple[str, ...] = ()
        if spec is not None:
            expected = expected_shapes(spec)
            missing = tuple(k for k in expected if k not in sub)
            mismatched = tuple(k for k in expected if k in sub
                               and tuple(sub[k].shape) != expected[k])
        else:  # too little to tell the architecture: name the absent parts
            missing = tuple(f"{part}.*" for part in TRUNK_CHILDREN
                            if not any(k.startswith(part + ".") for k in sub))
        style = styles.get(prefix + "conv1.weight", "torchvision")
        found.append(Candidate(container, prefix, style, spec, _classify_head(sub), missing,
                               mismatched, sub, {k: originals[k] for k in sub},
                               "" if spec is not None else _depth_problem(sub)))
    return found


def _depth_problem(sub: Mapping[str, Any]) -> str:
    """Why keys naming more blocks than a stage may hold (``MAX_BLOCKS_PER_STAGE``) describe
    no architecture; empty otherwise."""
    for stage in range(1, 5):
        blocks = {m.group(1) for k in sub if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        if len(blocks) > MAX_BLOCKS_PER_STAGE:
            return (f"layer{stage} holds {len(blocks)} blocks, above {MAX_BLOCKS_PER_STAGE} "
                    "(MAX_BLOCKS_PER_STAGE)")
    return ""


def _spec(sub: Mapping[str, Any]) -> ModelSpec | None:
    """The architecture the shapes describe, if a model of it can be built (a file's shapes
    may describe widths no ResNet has)."""
    inferred = infer_spec(sub)
    if inferred is None:
        return None
    try:
        expected_shapes(inferred[0])
    except (ValueError, TypeError):
        return None
    return inferred[0]
