"""Pretrained weight sets: torchvision's published ImageNet weights for the ten architectures.

Kept apart from the architecture table (``models/variants.py``): one architecture has several weight
sets (``IMAGENET1K_V1``, ``IMAGENET1K_V2``), each with its own file, preprocessing and accuracy.
The values were generated from torchvision 0.29's weight enums by
``scripts/generate_weight_sets.py`` and are plain data here, so nothing imports torchvision at
run time; ``tests/test_weight_sets.py`` checks them against the installed torchvision.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import re
from types import MappingProxyType

from resnext_flax.models.variants import VARIANTS, get_spec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: torchvision's ``InterpolationMode`` values (all map onto a Pillow resampling filter).
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")

#: torch hub's rule: the file name ends in ``-<first hex digits of its sha256>.<ext>``.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,64})\.[A-Za-z]+$")


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
        if self.resize_size < 1 or self.crop_size < 1:
            raise ValueError(
                f"resize_size and crop_size must be positive, got {self.resize_size} and "
                f"{self.crop_size}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"unknown interpolation {self.interpolation!r}; expected one of "
                f"{', '.join(INTERPOLATIONS)}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values, std > 0; got {self.mean}, {self.std}")


@dataclasses.dataclass(frozen=True)
class WeightSet:
    """One published weight file and what goes with it.

    **Arguments:**
    - `model`, `tag`: torchvision's names (``"resnet50"``, ``"IMAGENET1K_V2"``).
    - `url`: where torchvision downloads the ``.pth`` file; the file name carries the first
      hex digits of its sha256 (``resnet50-11ad3fa6.pth``).
    - `preprocessing`: the transform the accuracy was measured with.
    - `acc1`, `acc5`: ImageNet-1K validation accuracy (%) published by torchvision.
    - `num_params`, `gflops`, `file_size_mb`: size of the model and of the file.
    - `recipe`: how the weights were trained.
    - `is_default`: whether torchvision's ``DEFAULT`` points here.
    """

    model: str
    tag: str
    url: str
    preprocessing: Preprocessing
    acc1: float
    acc5: float
    num_params: int
    gflops: float
    file_size_mb: float
    recipe: str
    is_default: bool = False
    num_classes: int = 1000

    @property
    def name(self) -> str:
        """``"resnet50.IMAGENET1K_V2"``."""
        return f"{self.model}.{self.tag}"

    @property
    def filename(self) -> str:
        """The file name of the ``.pth`` file (the last component of the URL)."""
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def sha256_prefix(self) -> str:
        """The leading hex digits of the file's sha256, taken from its name as torch hub does."""
        match = _HASH_IN_NAME.search(self.filename)
        if match is None:
            raise ValueError(
                f"{self.name}: file name {self.filename!r} does not end in '-<sha256 prefix>.pth'"
            )
        return match.group(1)

    @property
    def categories(self) -> tuple[str, ...]:
        """The class names, index by index (ImageNet-1K's 1000 for every published set)."""
        return imagenet_categories()


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


# Generated by scripts/generate_weight_sets.py from torchvision 0.29.1:
# (model, tag, is_default, url, resize, crop, acc@1, acc@5, params, GFLOPS, file MB, recipe)
_ROWS = (
    ("resnet18", "IMAGENET1K_V1", True,
     "https://download.pytorch.org/models/resnet18-f37072fd.pth",
     256, 224, 69.758, 89.078, 11_689_512, 1.814, 44.661,
     "https://github.com/pytorch/vision/tree/main/references/classification#resnet"),
    ("resnet34", "IMAGENET1K_V1", True,
     "https://download.pytorch.org/models/resnet34-b627a593.pth",
     256, 224, 73.314, 91.42, 21_797_672, 3.664, 83.275,
     "https://github.com/pytorch/vision/tree/main/references/classification#resnet"),
    ("resnet50", "IMAGENET1K_V1", False,
     "https://download.pytorch.org/models/resnet50-0676ba61.pth",
     256, 224, 76.13, 92.862, 25_557_032, 4.089, 97.781,
     "https://github.com/pytorch/vision/tree/main/references/classification#resnet"),
    ("resnet50", "IMAGENET1K_V2", True,
     "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
     232, 224, 80.858, 95.434, 25_557_032, 4.089, 97.79,
     "https://github.com/pytorch/vision/issues/3995#issuecomment-1013906621"),
    ("resnet101", "IMAGENET1K_V1", False,
     "https://download.pytorch.org/models/resnet101-63fe2227.pth",
     256, 224, 77.374, 93.546, 44_549_160, 7.801, 170.511,
     "https://github.com/pytorch/vision/tree/main/references/classification#resnet"),
    ("resnet101", "IMAGENET1K_V2", True,
     "https://download.pytorch.org/models/resnet101-cd907fc2.pth",
     232, 224, 81.886, 95.78, 44_549_160, 7.801, 170.53,
     "https://github.com/pytorch/vision/issues/3995#new-recipe"),
    ("resnet152", "IMAGENET1K_V1", False,
     "https://download.pytorch.org/models/resnet152-394f9c45.pth",
     256, 224, 78.312, 94.046, 60_192_808, 11.514, 230.434,
     "https://github.com/pytorch/vision/tree/main/references/classification#resnet"),
    ("resnet152", "IMAGENET1K_V2", True,
     "https://download.pytorch.org/models/resnet152-f82ba261.pth",
     232, 224, 82.284, 96.002, 60_192_808, 11.514, 230.474,
     "https://github.com/pytorch/vision/issues/3995#new-recipe"),
    ("resnext50_32x4d", "IMAGENET1K_V1", False,
     "https://download.pytorch.org/models/resnext50_32x4d-7cdf4587.pth",
     256, 224, 77.618, 93.698, 25_028_904, 4.23, 95.789,
     "https://github.com/pytorch/vision/tree/main/references/classification#resnext"),
    ("resnext50_32x4d", "IMAGENET1K_V2", True,
     "https://download.pytorch.org/models/resnext50_32x4d-1a0047aa.pth",
     232, 224, 81.198, 95.34, 25_028_904, 4.23, 95.833,
     "https://github.com/pytorch/vision/issues/3995#new-recipe"),
    ("resnext101_32x8d", "IMAGENET1K_V1", False,
     "https://download.pytorch.org/models/resnext101_32x8d-8ba56ff5.pth",
     256, 224, 79.312, 94.526, 88_791_336, 16.414, 339.586,
     "https://github.com/pytorch/vision/tree/main/references/classification#resnext"),
    ("resnext101_32x8d", "IMAGENET1K_V2", True,
     "https://download.pytorch.org/models/resnext101_32x8d-110c445d.pth",
     232, 224, 82.834, 96.228, 88_791_336, 16.414, 339.673,
     "https://github.com/pytorch/vision/issues/3995#new-recipe-with-fixres"),
    ("resnext101_64x4d", "IMAGENET1K_V1", True,
     "https://download.pytorch.org/models/resnext101_64x4d-173b62eb.pth",
     232, 224, 83.246, 96.454, 83_455_272, 15.46, 319.318,
     "https://github.com/pytorch/vision/pull/5935"),
    ("wide_resnet50_2", "IMAGENET1K_V1", False,
     "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
     256, 224, 78.468, 94.086, 68_883_240, 11.398, 131.82,
     "https://github.com/pytorch/vision/pull/912#issue-445437439"),
    ("wide_resnet50_2", "IMAGENET1K_V2", True,
     "https://download.pytorch.org/models/wide_resnet50_2-9ba9bcbe.pth",
     232, 224, 81.602, 95.758, 68_883_240, 11.398, 263.124,
     "https://github.com/pytorch/vision/issues/3995#new-recipe-with-fixres"),
    ("wide_resnet101_2", "IMAGENET1K_V1", False,
     "https://download.pytorch.org/models/wide_resnet101_2-32ee1156.pth",
     256, 224, 78.848, 94.284, 126_886_696, 22.753, 242.896,
     "https://github.com/pytorch/vision/pull/912#issue-445437439"),
    ("wide_resnet101_2", "IMAGENET1K_V2", True,
     "https://download.pytorch.org/models/wide_resnet101_2-d733dc28.pth",
     232, 224, 82.51, 96.02, 126_886_696, 22.753, 484.747,
     "https://github.com/pytorch/vision/issues/3995#new-recipe"),
)


def _build() -> MappingProxyType[str, MappingProxyType[str, WeightSet]]:
    table: dict[str, dict[str, WeightSet]] = {name: {} for name in VARIANTS}
    for (model, tag, default, url, resize, crop, acc1, acc5, params, gflops, size,
         recipe) in _ROWS:
        table[model][tag] = WeightSet(
            model=model, tag=tag, url=url,
            preprocessing=Preprocessing(resize_size=resize, crop_size=crop),
            acc1=acc1, acc5=acc5, num_params=params, gflops=gflops, file_size_mb=size,
            recipe=recipe, is_default=default,
        )
    return MappingProxyType({name: MappingProxyType(sets) for name, sets in table.items()})


#: model name -> tag -> :class:`WeightSet` (``DEFAULT`` is not a key; see ``DEFAULT_TAGS``).
WEIGHT_SETS = _build()
#: model name -> the tag torchvision's ``DEFAULT`` stands for.
DEFAULT_TAGS = MappingProxyType(
    {name: next(t for t, ws in sets.items() if ws.is_default) for name, sets in WEIGHT_SETS.items()}
)


def get_weight_set(model: str, tag: str = "DEFAULT") -> WeightSet:
    """The weight set `tag` of `model`.

    `tag` is ``"DEFAULT"``, a tag such as ``"IMAGENET1K_V1"``, or torchvision's spelling
    ``"ResNet50_Weights.IMAGENET1K_V2"`` / ``"resnet50.IMAGENET1K_V2"``.
    """
    if model not in WEIGHT_SETS:
        raise ValueError(f"unknown model {model!r}; known models: {', '.join(WEIGHT_SETS)}")
    if not isinstance(tag, str):
        raise TypeError(f"weights must be a tag string or a WeightSet, got {type(tag).__name__}")
    short = tag.rsplit(".", 1)[-1]
    if short == "DEFAULT":
        short = DEFAULT_TAGS[model]
    sets = WEIGHT_SETS[model]
    if short not in sets:
        raise ValueError(
            f"{model} has no weight set {tag!r}; available: DEFAULT (= {DEFAULT_TAGS[model]}), "
            f"{', '.join(sets)}"
        )
    return sets[short]


def resolve_weights(model: str, weights: str | WeightSet | None) -> WeightSet:
    """The weight set `weights` (a tag or a :class:`WeightSet`) of `model`, checked to belong
    to it."""
    get_spec(model)  # a clear error for unknown names
    if isinstance(weights, WeightSet):
        if weights.model != model:
            raise ValueError(f"weight set {weights.name} is for {weights.model}, not {model}")
        return weights
    if weights is None:
        raise ValueError(
            "pretrained weights need a weight set (e.g. 'DEFAULT'); for random weights use "
            f"resnext_flax.create_model({model!r})"
        )
    return get_weight_set(model, weights)


def list_weight_sets(model: str | None = None) -> list[WeightSet]:
    """Every weight set, or those of one model, in table order."""
    if model is not None:
        get_weight_set(model)  # validates the name
        return list(WEIGHT_SETS[model].values())
    return [ws for sets in WEIGHT_SETS.values() for ws in sets.values()]
