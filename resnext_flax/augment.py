"""Training augmentation as torchvision's classification reference does it on PIL images:
``RandomResizedCrop(crop_size, interpolation)``, ``RandomHorizontalFlip``, then the same
``x / 255`` and normalization as evaluation.

The random parameters are drawn from a ``numpy.random.Generator`` (Grain hands each record its
own, seeded by the pipeline seed and the record's position, so augmentation is reproducible
and independent of the number of workers); given the parameters, the pixels equal
torchvision's ``F.resized_crop`` + ``F.hflip`` bit for bit (tested).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from resnext_flax.metadata import Preprocessing
from resnext_flax.preprocess import ImageInput, load_image, normalize, pil_filter

#: (top, left, height, width) of a crop box, torchvision's ``get_params`` convention.
Box = tuple[int, int, int, int]


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """torchvision's ``RandomResizedCrop(scale, ratio)`` and ``RandomHorizontalFlip(p)``
    settings; the defaults are torchvision's (and its classification reference's)."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5

    def __post_init__(self) -> None:
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1] < math.inf:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip is a probability, got {self.hflip}")


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


def augment_image(image: ImageInput, config: Preprocessing, rng: np.random.Generator,
                  augmentation: Augmentation = Augmentation()) -> np.ndarray:
    """One training image: random resized crop to ``config.crop_size`` with the weight set's
    interpolation, a random horizontal flip, normalization; float32 (crop, crop, 3)."""
    pil = load_image(image)
    box = random_resized_crop_box(pil.height, pil.width, rng, augmentation)
    array = resized_crop(pil, box, config.crop_size, config.interpolation)
    if rng.random() < augmentation.hflip:
        array = array[:, ::-1]
    return normalize(array, config)
