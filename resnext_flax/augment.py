"""Training augmentation as torchvision's classification reference
(``presets.ClassificationPresetTrain``) does it: on the PIL image
``RandomResizedCrop(crop_size, interpolation)``, ``RandomHorizontalFlip``, optionally an
automatic augmentation policy (:mod:`resnext_flax.autoaugment`); then the same ``x / 255`` and
normalization as evaluation; then, optionally, ``RandomErasing`` on the normalized array.

The random decisions are drawn from a ``numpy.random.Generator`` (Grain hands each record its
own, seeded by the pipeline seed and the record's position, so augmentation is reproducible
and independent of the number of workers) into a :class:`TrainDecision`; given the decision,
the pixels equal torchvision's functional ops bit for bit (tested).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from resnext_flax.autoaugment import GEOMETRIC_INTERPOLATIONS, POLICIES, Op, apply_ops, draw_ops
from resnext_flax.metadata import Preprocessing
from resnext_flax.preprocess import ImageInput, load_image, normalize, pil_filter

#: (top, left, height, width) of a crop box, torchvision's ``get_params`` convention.
Box = tuple[int, int, int, int]

#: torchvision's ``RandomErasing`` defaults, which its classification reference keeps: the
#: erased area's fraction of the image and the range of its aspect ratio (height / width).
ERASE_SCALE = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """torchvision's ``RandomResizedCrop(scale, ratio)`` and ``RandomHorizontalFlip(p)``
    settings; the defaults are torchvision's (and its classification reference's).

    - `auto_augment`: None, or a policy of the reference's ``--auto-augment``: ``"ta_wide"``
      (TrivialAugmentWide), ``"ra"`` (RandAugment, 2 operations at bin `ra_magnitude` of 31)
      or ``"imagenet"`` (AutoAugment's ImageNet policy); after the flip, with the weight
      set's interpolation and a black fill, as the reference.
    - `random_erase`: ``RandomErasing``'s probability (``--random-erase``), on the
      normalized image; `erase_value` is what fills the box: a number (the reference's 0)
      or ``"random"`` (standard normal noise per pixel and channel).
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    auto_augment: str | None = None
    ra_magnitude: int = 9
    random_erase: float = 0.0
    erase_value: float | str = 0.0

    def __post_init__(self) -> None:
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1] < math.inf:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip is a probability, got {self.hflip}")
        if self.auto_augment is not None and self.auto_augment not in POLICIES:
            raise ValueError(f"auto_augment must be None or one of {POLICIES}, got "
                             f"{self.auto_augment!r}")
        if (not isinstance(self.ra_magnitude, int) or isinstance(self.ra_magnitude, bool)
                or not 0 <= self.ra_magnitude <= 30):
            raise ValueError(f"ra_magnitude is a bin in [0, 30], got {self.ra_magnitude!r}")
        if not 0 <= self.random_erase <= 1:
            raise ValueError(f"random_erase is a probability, got {self.random_erase}")
        if self.erase_value != "random" and not (
                isinstance(self.erase_value, int | float) and math.isfinite(self.erase_value)):
            raise ValueError(f"erase_value must be a finite number or 'random', got "
                             f"{self.erase_value!r}")


@dataclasses.dataclass(frozen=True)
class Erase:
    """A box to erase, torchvision's ``RandomErasing.get_params``: (top, left, height,
    width) and the float32 value, (height, width, channels) noise or one per channel."""

    top: int
    left: int
    height: int
    width: int
    value: np.ndarray


@dataclasses.dataclass(frozen=True)
class TrainDecision:
    """Every random decision of one training image: the crop box, the flip, the
    auto-augment operations, the erased box (None: nothing erased)."""

    box: Box
    flip: bool
    ops: tuple[Op, ...] = ()
    erase: Erase | None = None


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            augmentation: Augmentation = Augmentation()) -> Box:
    """torchvision's ``RandomResizedCrop.get_params``: up to 10 tries at a box of a random
    area fraction in `scale` and a log-uniform aspect ratio in `ratio` that fits the image,
    else the central crop clamped to the ratio range."""
    area = height * width
    log_ratio = (math.log(augmentation.ratio[0]), math.log(augmentation.ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*augmentation.scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(augmentation.ratio):
        w, h = width, round(width / min(augmentation.ratio))
    elif in_ratio > max(augmentation.ratio):
        h, w = height, round(height * max(augmentation.ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: Image.Image, box: Box, size: int, interpolation: str) -> np.ndarray:
    """torchvision's ``F.resized_crop`` on a PIL image: crop `box`, resize to (size, size)
    with Pillow's filter (skipped when the crop already has that size); uint8 (H, W, 3)."""
    top, left, height, width = box
    crop = image.crop((left, top, left + width, top + height))
    if (height, width) != (size, size):
        crop = crop.resize((size, size), pil_filter(interpolation))
    return np.asarray(crop, dtype=np.uint8)


def erase_box(height: int, width: int, channels: int, rng: np.random.Generator,
              augmentation: Augmentation = Augmentation()) -> Erase | None:
    """torchvision's ``RandomErasing(p=random_erase, value=erase_value)``: erase with
    probability `random_erase`; then up to 10 tries at a box of a random area fraction in
    :data:`ERASE_SCALE` and a log-uniform aspect ratio in :data:`ERASE_RATIO`, smaller than the
    image on both sides (noise drawn before its position, as torchvision), else nothing."""
    if not rng.random() < augmentation.random_erase:
        return None
    log_ratio = (math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]))
    for _ in range(10):
        erase_area = height * width * rng.uniform(*ERASE_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        h = round(math.sqrt(erase_area * aspect))
        w = round(math.sqrt(erase_area / aspect))
        if not (h < height and w < width):
            continue
        if augmentation.erase_value == "random":
            value = rng.standard_normal((h, w, channels), dtype=np.float32)
        else:
            value = np.full(channels, augmentation.erase_value, np.float32)
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        return Erase(top, left, h, w, value)
    return None


def apply_erase(array: np.ndarray, erase: Erase | None) -> np.ndarray:
    """torchvision's ``F.erase`` on an (H, W, C) array: a copy with the box set to the
    erase value (`array` itself when there is nothing to erase)."""
    if erase is None:
        return array
    out = array.copy()
    out[erase.top:erase.top + erase.height, erase.left:erase.left + erase.width] = erase.value
    return out


def check_augmentation(config: Preprocessing, augmentation: Augmentation) -> None:
    """A clear error, before any image is read, for settings torchvision cannot run: the
    auto-augment policies' geometric operations resample with nearest, bilinear or bicubic
    only."""
    if augmentation.auto_augment and config.interpolation not in GEOMETRIC_INTERPOLATIONS:
        raise ValueError(
            f"auto_augment={augmentation.auto_augment!r} resamples with the weight set's "
            f"interpolation, {config.interpolation!r}, which Pillow's geometric transforms do "
            f"not support; use one of {GEOMETRIC_INTERPOLATIONS}")


def draw_decision(height: int, width: int, crop_size: int, rng: np.random.Generator,
                  augmentation: Augmentation = Augmentation()) -> TrainDecision:
    """The random decisions for an image of `height` x `width`, drawn in the reference's
    order: crop box, flip, auto-augment operations (on the crop), erased box."""
    box = random_resized_crop_box(height, width, rng, augmentation)
    flip = bool(rng.random() < augmentation.hflip)
    ops = () if augmentation.auto_augment is None else draw_ops(
        augmentation.auto_augment, rng, crop_size, crop_size, augmentation.ra_magnitude)
    erase = None if not augmentation.random_erase else erase_box(
        crop_size, crop_size, 3, rng, augmentation)
    return TrainDecision(box, flip, ops, erase)


def apply_decision(image: ImageInput, decision: TrainDecision,
                   config: Preprocessing) -> np.ndarray:
    """One training image for drawn decisions: crop and resize to ``config.crop_size`` with
    the weight set's interpolation, flip, the auto-augment operations, normalization,
    erasing; float32 (crop, crop, 3)."""
    array = resized_crop(load_image(image), decision.box, config.crop_size,
                         config.interpolation)
    if decision.flip:
        array = array[:, ::-1]
    if decision.ops:
        pil = apply_ops(Image.fromarray(np.ascontiguousarray(array)), decision.ops,
                        config.interpolation)
        array = np.asarray(pil, dtype=np.uint8)
    return apply_erase(normalize(array, config), decision.erase)


def augment_image(image: ImageInput, config: Preprocessing, rng: np.random.Generator,
                  augmentation: Augmentation = Augmentation()) -> np.ndarray:
    """One training image: :func:`draw_decision` then :func:`apply_decision`."""
    pil = load_image(image)
    decision = draw_decision(pil.height, pil.width, config.crop_size, rng, augmentation)
    return apply_decision(pil, decision, config)
