"""What a model's weights come with, kept apart from where they are stored.

- :class:`Preprocessing`: torchvision's ``ImageClassification`` transform (resize, crop,
  normalization) that a weight set's accuracy was measured with;
- the ImageNet-1K label tables (:func:`imagenet_categories`, :func:`imagenet_wnids`);
- :class:`PretrainedCfg`: the record a model built from weights carries as
  ``model.pretrained_cfg`` (architecture, where the weights came from, class names,
  preprocessing, what the load dropped), so everything downstream reads it from the model.

The data side (``preprocess``, ``datasets``, ``augment``, ``pipeline``) imports this module,
never ``weights``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math
from typing import Any

from resnext_flax.errors import short_repr
from resnext_flax.models.variants import ModelSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: The largest ``resize_size``/``crop_size`` a :class:`Preprocessing` may ask for: eight times
#: the largest torchvision's weights use (600), and a 4096x4096 float32 batch row is already
#: 200 MB; a larger size in a file's header would allocate gigabytes per image.
MAX_IMAGE_SIZE = 4096

#: torchvision's ``InterpolationMode`` values (all map onto a Pillow resampling filter).
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """torchvision's ``ImageClassification`` transform: resize the shorter side to
    `resize_size`, center-crop `crop_size`, scale to [0, 1], normalize with `mean` / `std`.

    `interpolation` is a torchvision ``InterpolationMode`` value; on PIL images torchvision
    always antialiases (bilinear/bicubic), and so does this library.
    """

    resize_size: int = 256
    crop_size: int = 224
    interpolation: str = "bilinear"
    antialias: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        for field in ("mean", "std"):  # lists (JSON arrays) are accepted as tuples
            if isinstance(getattr(self, field), list):
                object.__setattr__(self, field, tuple(getattr(self, field)))
        for field in ("resize_size", "crop_size"):
            size = getattr(self, field)
            if not (isinstance(size, int) and not isinstance(size, bool)
                    and 1 <= size <= MAX_IMAGE_SIZE):
                raise ValueError(f"{field} must be an int from 1 to {MAX_IMAGE_SIZE} "
                                 f"(MAX_IMAGE_SIZE), got {short_repr(size)}")
        if not isinstance(self.interpolation, str) or self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"unknown interpolation {short_repr(self.interpolation)}; expected one of "
                f"{', '.join(INTERPOLATIONS)}"
            )
        if not isinstance(self.antialias, bool):
            raise ValueError(f"antialias must be true or false, got {short_repr(self.antialias)}")
        for field in ("mean", "std"):
            values = getattr(self, field)
            if not (isinstance(values, tuple) and len(values) == 3 and all(
                    _finite_number(v) and (field == "mean" or v > 0) for v in values)):
                raise ValueError(f"{field} must be 3 finite numbers{', > 0' * (field == 'std')}"
                                 f", got {short_repr(values)}")

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON values (a converted checkpoint's header)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Preprocessing:
        """The inverse of :meth:`to_json`; TypeError/ValueError for malformed data."""
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _finite_number(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _package_lines(name: str) -> tuple[str, ...]:
    text = importlib.resources.files("resnext_flax").joinpath(f"data/{name}").read_text(
        encoding="utf-8")
    lines = tuple(text.splitlines())
    if len(lines) != 1000:
        raise RuntimeError(f"the packaged file {name} holds {len(lines)} lines, not 1000")
    return lines


@functools.cache
def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet-1K class names in torchvision's order (shipped as package data)."""
    return _package_lines("imagenet_categories.txt")


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1K WordNet ids (``n01440764``...), index by index with
    :func:`imagenet_categories`: torchvision's class order is the sorted order of these ids,
    which is how ImageNet's validation folders are named (package data, generated by
    ``scripts/generate_imagenet_wnids.py``)."""
    return _package_lines("imagenet_wnids.txt")


@dataclasses.dataclass(frozen=True)
class PretrainedCfg:
    """What a model was loaded with; attached as ``model.pretrained_cfg`` by every loader
    (None on a randomly initialized model). It travels inside the module (through
    ``nnx.split``/``merge``, ``nnx.clone`` and BatchNorm folding) in a slot that keeps it out
    of what ``jax.jit`` compares (``models.resnet.RecordSlot``).

    **Fields:**
    - `architecture`: torchvision's name (``"resnet50"``); `spec`: its :class:`ModelSpec`.
    - `num_classes`: outputs of the head the weights were loaded with (0: headless).
    - `weights`: the published weight set (``"resnet50.IMAGENET1K_V2"``) whose class names,
      preprocessing and reference accuracy apply, if any.
    - `source`: the file (or URL) the tensors were read from; `sha256`: its hash, where known.
    - `class_names`: one name per output, where known (torchvision's categories, a converted
      or fine-tuned checkpoint's header, a Hugging Face ``id2label``).
    - `preprocessing`: the transform the weights expect, where known.
    - `dropped`: the file's keys the load did not use; `notes`: choices the load made.
    - `license`: the weights' license, where known.
    """

    architecture: str | None
    spec: ModelSpec
    num_classes: int
    weights: str | None = None
    source: str | None = None
    sha256: str | None = None
    class_names: tuple[str, ...] | None = None
    preprocessing: Preprocessing | None = None
    dropped: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    license: str | None = None

    def __post_init__(self) -> None:
        names = self.class_names
        if names is not None and len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} outputs")

    def with_head(self, num_classes: int) -> PretrainedCfg:
        """The record of the same trunk under a fresh head of `num_classes`: the class names
        and the weight set (whose outputs and published accuracy were the old head's) go;
        where the trunk came from stays."""
        return dataclasses.replace(self, num_classes=num_classes, class_names=None,
                                   weights=None)

    def fill(self, *, class_names: tuple[str, ...] | None = None,
             preprocessing: Preprocessing | None = None) -> PretrainedCfg:
        """Missing labels taken from a weight set named alongside the file: its class names
        where the file records none and the head has as many outputs, its preprocessing
        where the file records none. The weight set itself is not recorded: the tensors are
        the file's."""
        fits = (self.class_names is None and class_names is not None
                and len(class_names) == self.num_classes)
        return dataclasses.replace(
            self, class_names=class_names if fits else self.class_names,
            preprocessing=self.preprocessing or preprocessing)


def pretrained_cfg(model: Any) -> PretrainedCfg | None:
    """The record a model carries, or None (random initialization, or any other object)."""
    cfg = getattr(model, "pretrained_cfg", None)
    return cfg if isinstance(cfg, PretrainedCfg) else None


def class_names(model: Any) -> tuple[str, ...] | None:
    """The model's class names, one per output, or None where unknown."""
    cfg = pretrained_cfg(model)
    if cfg is None or cfg.class_names is None:
        return None
    return cfg.class_names if len(cfg.class_names) == getattr(model, "num_classes", -1) else None
