"""Pretrained weight sets: torchvision's published ImageNet weights, and those published
elsewhere for the same architectures (Facebook's WSL and SSL/SWSL weights, timm's).

Kept apart from the architecture table (``models/variants.py``): one architecture has several weight
sets (``IMAGENET1K_V1``, ``IMAGENET1K_V2``, ``fb_swsl_ig1b_ft_in1k``...), each with its own file,
preprocessing, accuracy and license. Preprocessing and the ImageNet label tables live on the data
side (``resnext_flax.metadata``) and are re-exported here.

torchvision's rows were generated from torchvision 0.29's weight enums by
``scripts/generate_weight_sets.py`` and are plain data here, so nothing imports torchvision at
run time; ``tests/test_weight_sets.py`` checks them against the installed torchvision. The other
sets are one table, ``data/weight_sets.csv``, copied from their publishers' tables
(``docs/weight_sets.md`` names each); they download from the Hugging Face Hub
(``weights.hub``).
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.resources
import re
import warnings
from types import MappingProxyType

from resnext_flax.errors import UnknownModelError
from resnext_flax.metadata import Preprocessing, imagenet_categories, imagenet_wnids
from resnext_flax.models.variants import VARIANTS, get_spec

#: torch hub's rule: the file name ends in ``-<first hex digits of its sha256>.<ext>``.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,64})\.[A-Za-z]+$")
#: Where each ``source`` of the table publishes its weights.
SOURCES = MappingProxyType({
    "torchvision": "https://github.com/pytorch/vision",
    "WSL-Images": "https://github.com/facebookresearch/WSL-Images",
    "semi-supervised-ImageNet1K-models":
        "https://github.com/facebookresearch/semi-supervised-ImageNet1K-models",
    "timm": "https://github.com/huggingface/pytorch-image-models",
    "hf-hub": "https://huggingface.co",
})


class LicenseWarning(UserWarning):
    """Weights whose license restricts their use (non-commercial) were loaded; said once per
    weight set and process."""


@dataclasses.dataclass(frozen=True)
class WeightSet:
    """One published weight file and what goes with it.

    **Arguments:**
    - `model`, `tag`: the model and the publisher's name of the set (``"resnet50"``,
      ``"IMAGENET1K_V2"``; timm's tag, ``"fb_swsl_ig1b_ft_in1k"``, for the others).
    - `url`: the ``.pth`` file as its publisher serves it (empty where it only lives on the
      Hub); the file name carries the first hex digits of its sha256
      (``resnet50-11ad3fa6.pth``).
    - `preprocessing`: the transform the accuracy was measured with.
    - `acc1`, `acc5`: ImageNet-1K validation accuracy (%) as its publisher reports it (None
      where it reports none).
    - `num_params`, `gflops`, `file_size_mb`: size of the model (GFLOPS at 224x224) and of
      the file (None where unknown).
    - `recipe`: how the weights were trained (a paper or a page).
    - `is_default`: whether the model's ``DEFAULT`` points here (torchvision's choice where
      torchvision publishes the model).
    - `source`: who publishes the set (a key of :data:`SOURCES`); `license`: its license (an
      SPDX identifier); `hub_id`: its Hugging Face Hub repository, from which it is
      downloaded (None: from `url`).
    - `class_names`: the classes, where they are not ImageNet-1K's (empty: unknown).
    """

    model: str
    tag: str
    url: str
    preprocessing: Preprocessing
    acc1: float | None
    acc5: float | None
    num_params: int | None
    gflops: float | None
    file_size_mb: float | None
    recipe: str
    is_default: bool = False
    num_classes: int = 1000
    source: str = "torchvision"
    license: str = "BSD-3-Clause"
    hub_id: str | None = None
    class_names: tuple[str, ...] | None = None

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
    def categories(self) -> tuple[str, ...] | None:
        """The class names, index by index (ImageNet-1K's 1000 for every set of the table;
        None for a Hub repository of another class count that names none)."""
        if self.class_names is not None:
            return self.class_names or None
        return imagenet_categories() if self.num_classes == 1000 else None

    @property
    def non_commercial(self) -> bool:
        """Whether the license forbids commercial use (the CC ``-NC`` licenses)."""
        return "-nc" in self.license.lower()

    @property
    def published(self) -> tuple[float, float] | None:
        """(acc@1, acc@5) where the publisher reports both, else None."""
        if self.acc1 is None or self.acc5 is None:
            return None
        return self.acc1, self.acc5


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


# Generated by scripts/generate_weight_sets.py (torch's FlopCounterMode on the meta device,
# multiply-adds at 224x224 as torchvision counts them) for the models torchvision publishes no
# weights for: model -> (parameters, GFLOPS).
_COSTS_BEYOND_TORCHVISION = {
    "resnext101_32x16d": (194_026_792, 36.163),
    "resnext101_32x32d": (468_530_472, 87.107),
    "resnext101_32x48d": (828_411_176, 153.31),
}
#: The table of weight sets beyond torchvision's (package data).
TABLE_FILE = "data/weight_sets.csv"


def _torchvision_sets() -> list[WeightSet]:
    return [WeightSet(
        model=model, tag=tag, url=url,
        preprocessing=Preprocessing(resize_size=resize, crop_size=crop),
        acc1=acc1, acc5=acc5, num_params=params, gflops=gflops, file_size_mb=size,
        recipe=recipe, is_default=default,
    ) for (model, tag, default, url, resize, crop, acc1, acc5, params, gflops, size,
           recipe) in _ROWS]


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split())


def _sets_beyond_torchvision(costs: dict[str, tuple[int, float]]) -> list[WeightSet]:
    text = importlib.resources.files("resnext_flax").joinpath(TABLE_FILE).read_text(
        encoding="utf-8")
    sets = []
    for line, row in enumerate(csv.DictReader(text.splitlines()), start=2):
        try:
            params, gflops = costs[row["model"]]
            sets.append(WeightSet(
                model=row["model"], tag=row["tag"], url=row["url"],
                preprocessing=Preprocessing(
                    resize_size=int(row["resize"]), crop_size=int(row["crop"]),
                    interpolation=row["interpolation"], mean=_floats(row["mean"]),
                    std=_floats(row["std"])),
                acc1=float(row["acc1"]) if row["acc1"] else None,
                acc5=float(row["acc5"]) if row["acc5"] else None,
                num_params=params, gflops=gflops, file_size_mb=None, recipe=row["recipe"],
                is_default=row["default"] == "yes", source=row["source"],
                license=row["license"], hub_id=row["hub_id"] or None))
        except (KeyError, ValueError, TypeError) as err:
            raise RuntimeError(f"{TABLE_FILE} line {line}: {err!r}") from err
    return sets


def _build() -> MappingProxyType[str, MappingProxyType[str, WeightSet]]:
    table: dict[str, dict[str, WeightSet]] = {name: {} for name in VARIANTS}
    torchvision = _torchvision_sets()
    costs = {ws.model: (ws.num_params, ws.gflops) for ws in torchvision}
    for ws in [*torchvision, *_sets_beyond_torchvision({**costs, **_COSTS_BEYOND_TORCHVISION})]:
        if ws.source not in SOURCES or ws.tag in table[ws.model]:
            raise RuntimeError(f"{ws.name}: unknown source {ws.source!r} or a second row")
        table[ws.model][ws.tag] = ws
    return MappingProxyType({name: MappingProxyType(sets) for name, sets in table.items()})


#: model name -> tag -> :class:`WeightSet` (``DEFAULT`` is not a key; see ``DEFAULT_TAGS``).
WEIGHT_SETS = _build()
#: model name -> the tag ``DEFAULT`` stands for: torchvision's ``DEFAULT`` where torchvision
#: publishes the model, else the most accurate published set (models with a weight set only).
DEFAULT_TAGS = MappingProxyType(
    {name: next(t for t, ws in sets.items() if ws.is_default)
     for name, sets in WEIGHT_SETS.items() if sets}
)


def get_weight_set(model: str, tag: str = "DEFAULT") -> WeightSet:
    """The weight set `tag` of `model` (a :class:`WeightSet`).

    `tag` is ``"DEFAULT"``, a tag such as ``"IMAGENET1K_V1"``, or one qualified by this model,
    in torchvision's spelling ``"ResNet50_Weights.IMAGENET1K_V2"`` or as
    ``"resnet50.IMAGENET1K_V2"`` (:attr:`WeightSet.name`). Raises
    :class:`~resnext_flax.errors.UnknownModelError` (a ``ValueError``) for an unknown model,
    an unknown tag, or a tag qualified by another model; ``TypeError`` when `tag` is not a
    string.
    """
    if model not in WEIGHT_SETS:
        raise UnknownModelError(
            f"unknown model {model!r}; known models: {', '.join(WEIGHT_SETS)}")
    if not isinstance(tag, str):
        raise TypeError(f"a weight set's tag must be a string such as 'DEFAULT' (a tag string), "
                        f"got {type(tag).__name__}")
    qualifier, _, short = tag.rpartition(".")
    owner = qualifier.rsplit(".", 1)[-1].lower()
    if qualifier and owner not in (model, f"{model}_weights"):
        raise UnknownModelError(
            f"weight set {tag!r} is not one of {model}'s; ask for {model}.{short} or {short}")
    if model not in DEFAULT_TAGS:
        raise UnknownModelError(
            f"{model} has no weight set in the catalog; load a local weight file with "
            f"resnext_flax.from_pretrained(path) or build it with random weights")
    if short == "DEFAULT":
        short = DEFAULT_TAGS[model]
    sets = WEIGHT_SETS[model]
    if short not in sets:
        raise UnknownModelError(
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
            raise UnknownModelError(
                f"weight set {weights.name} is for {weights.model}, not {model}")
        return weights
    if weights is None:
        raise UnknownModelError(
            "pretrained weights need a weight set (e.g. 'DEFAULT'); for random weights use "
            f"resnext_flax.create_model({model!r})"
        )
    return get_weight_set(model, weights)


def list_weight_sets(model: str | None = None, *, source: str | None = None) -> list[WeightSet]:
    """Every weight set (:class:`WeightSet` objects, not tags), or those of one model, or of
    one `source` (a key of :data:`SOURCES`, e.g. ``"torchvision"``), in table order
    (torchvision's first); ``DEFAULT`` is not an entry of its own (:attr:`WeightSet.is_default`
    marks the set it stands for). Raises :class:`~resnext_flax.errors.UnknownModelError` for
    an unknown model or source."""
    if source is not None and source not in SOURCES:
        raise UnknownModelError(f"unknown source {source!r}; known: {', '.join(SOURCES)}")
    if model is not None:
        get_spec(model)  # a clear error for unknown names
        sets = list(WEIGHT_SETS[model].values())
    else:
        sets = [ws for sets in WEIGHT_SETS.values() for ws in sets.values()]
    return [ws for ws in sets if source is None or ws.source == source]


def find_hub_weight_set(repo_id: str) -> WeightSet | None:
    """The weight set of the table that Hub repository `repo_id` holds, if any."""
    return next((ws for ws in list_weight_sets() if ws.hub_id == repo_id), None)


_WARNED: set[str] = set()


def warn_license(weights: WeightSet) -> None:
    """A :class:`LicenseWarning`, once per process and weight set, where `weights`' license
    forbids commercial use: whoever loads them should know before building on them."""
    if not weights.non_commercial or weights.name in _WARNED:
        return
    _WARNED.add(weights.name)
    warnings.warn(f"{weights.name} ({weights.source}) is licensed {weights.license}: "
                  "non-commercial use only", LicenseWarning, stacklevel=3)


__all__ = [
    "DEFAULT_TAGS",
    "SOURCES",
    "WEIGHT_SETS",
    "LicenseWarning",
    "Preprocessing",
    "WeightSet",
    "find_hub_weight_set",
    "get_weight_set",
    "imagenet_categories",
    "imagenet_wnids",
    "list_weight_sets",
    "resolve_weights",
    "warn_license",
]
