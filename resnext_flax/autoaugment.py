"""torchvision's automatic augmentation policies on PIL images: ``TrivialAugmentWide``,
``RandAugment`` and ``AutoAugment`` with the ImageNet policy.

Drawing and applying are separate. The draws (which operation, which magnitude bin, which
sign, which policy and whether each of its operations fires) follow torchvision's code path
with a ``numpy.random.Generator`` and return the operations to apply as plain :class:`Op`
records; :func:`apply_ops` applies them with the same Pillow calls torchvision makes on a PIL
image, so for the same operations the pixels are torchvision's bit for bit (tested against
``torchvision.transforms.autoaugment``). The magnitude bins are torchvision's float32
``torch.linspace`` values, reproduced exactly (:func:`linspace32`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from resnext_flax.preprocess import pil_filter

#: The policies by the names torchvision's classification reference takes
#: (``--auto-augment``): TrivialAugmentWide, RandAugment, AutoAugment's ImageNet policy.
POLICIES = ("ta_wide", "ra", "imagenet")

#: Pillow's geometric transforms accept these filters only (torchvision passes them on).
GEOMETRIC_INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic")

#: AutoAugment's ImageNet policy (torchvision's ``_get_policies(AutoAugmentPolicy.IMAGENET)``):
#: 25 sub-policies of two (operation, probability, magnitude bin of 10) each.
IMAGENET_POLICY: tuple[tuple[tuple[str, float, int | None], ...], ...] = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)

#: Operation -> (magnitudes, signed); magnitudes None for an operation without one.
Space = dict[str, tuple[np.ndarray | None, bool]]


@dataclasses.dataclass(frozen=True)
class Op:
    """One operation to apply: torchvision's name and its signed magnitude (the float32 bin
    value as a Python float, negated where the draw flipped its sign; 0.0 where unused)."""

    name: str
    magnitude: float = 0.0


def _fma32(a: np.float32, b: np.float32, c: np.float32) -> np.float32:
    """``a * b + c`` rounded once to float32 (round half to even)."""
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    guess = np.float32(float(exact))
    candidates = (np.nextafter(guess, np.float32(-np.inf)), guess,
                  np.nextafter(guess, np.float32(np.inf)))
    return min(candidates, key=lambda v: (abs(Fraction(float(v)) - exact),
                                          int(np.array(v).view(np.uint32)) & 1))


@functools.lru_cache(maxsize=256)
def _linspace32(start: float, end: float, steps: int) -> tuple[float, ...]:
    first, last = np.float32(start), np.float32(end)
    if steps == 1:
        return (float(first),)
    step = np.float32(last - first) / np.float32(steps - 1)
    half = steps // 2
    return tuple(float(_fma32(step, np.float32(i), first) if i < half
                       else _fma32(-step, np.float32(steps - i - 1), last))
                 for i in range(steps))


def linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """torch's float32 ``torch.linspace(start, end, steps)`` on the CPU, bit for bit: float32
    ends and step, the first half counted up from `start` and the rest down from `end`, each
    value one fused multiply-add (its compiler contracts ``start + step * i``)."""
    return np.array(_linspace32(float(start), float(end), int(steps)), np.float32)


def _posterize_bins(num_bins: int, levels: int) -> np.ndarray:
    """``8 - (torch.arange(n) / ((n - 1) / levels)).round().int()`` in float32, rounding
    half to even as torch does."""
    ratio = np.float32((num_bins - 1) / levels)
    return 8 - np.round(np.arange(num_bins, dtype=np.float32) / ratio).astype(np.int32)


def augmentation_space(policy: str, num_bins: int, height: int, width: int) -> Space:
    """torchvision's ``_augmentation_space`` of `policy`'s class, in its order (an op index
    draws from it): TrivialAugmentWide's wide ranges, or RandAugment's and AutoAugment's,
    whose translations scale with the image (`height`, `width`)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown auto-augment policy {policy!r}; expected one of {POLICIES}")
    if num_bins < 2:
        raise ValueError(f"num_bins must be at least 2, got {num_bins}")
    if policy == "ta_wide":
        shear, translate_x, translate_y, rotate, enhance, levels = 0.99, 32.0, 32.0, 135.0, 0.99, 6
    else:
        shear, rotate, enhance, levels = 0.3, 30.0, 0.9, 4
        translate_x, translate_y = 150.0 / 331.0 * width, 150.0 / 331.0 * height
    space: Space = {} if policy == "imagenet" else {"Identity": (None, False)}
    space.update({
        "ShearX": (linspace32(0.0, shear, num_bins), True),
        "ShearY": (linspace32(0.0, shear, num_bins), True),
        "TranslateX": (linspace32(0.0, translate_x, num_bins), True),
        "TranslateY": (linspace32(0.0, translate_y, num_bins), True),
        "Rotate": (linspace32(0.0, rotate, num_bins), True),
        **{name: (linspace32(0.0, enhance, num_bins), True)
           for name in ("Brightness", "Color", "Contrast", "Sharpness")},
        "Posterize": (_posterize_bins(num_bins, levels), False),
        "Solarize": (linspace32(255.0, 0.0, num_bins), False),
        "AutoContrast": (None, False),
        "Equalize": (None, False),
    })
    if policy == "imagenet":
        space["Invert"] = (None, False)
    return space


def _op(space: Space, name: str, bin_index: int | None, negate: bool) -> Op:
    magnitudes, signed = space[name]
    magnitude = 0.0 if magnitudes is None or bin_index is None else float(
        magnitudes[bin_index])
    return Op(name, -magnitude if signed and negate else magnitude)


def trivial_augment_wide(rng: np.random.Generator, num_bins: int = 31) -> tuple[Op, ...]:
    """``TrivialAugmentWide``: one operation of 14, a uniform magnitude bin where it has
    magnitudes, a random sign where it is signed."""
    space = augmentation_space("ta_wide", num_bins, 1, 1)
    name = list(space)[int(rng.integers(len(space)))]
    magnitudes, signed = space[name]
    bin_index = None if magnitudes is None else int(rng.integers(len(magnitudes)))
    return (_op(space, name, bin_index, signed and bool(rng.integers(2))),)


def rand_augment(rng: np.random.Generator, height: int, width: int, num_ops: int = 2,
                 magnitude: int = 9, num_bins: int = 31) -> tuple[Op, ...]:
    """``RandAugment(num_ops, magnitude, num_magnitude_bins)``: `num_ops` operations of 14
    drawn with replacement, all at bin `magnitude`, each signed one with a random sign."""
    if not 0 <= magnitude < num_bins:
        raise ValueError(f"magnitude must be a bin in [0, {num_bins - 1}], got {magnitude}")
    space = augmentation_space("ra", num_bins, height, width)
    ops = []
    for _ in range(num_ops):
        name = list(space)[int(rng.integers(len(space)))]
        ops.append(_op(space, name, magnitude, space[name][1] and bool(rng.integers(2))))
    return tuple(ops)


def auto_augment_params(rng: np.random.Generator) -> tuple[int, np.ndarray, np.ndarray]:
    """``AutoAugment.get_params``: a sub-policy index, two uniform probabilities (float32),
    two signs (1 keeps a magnitude, 0 negates it)."""
    policy = int(rng.integers(len(IMAGENET_POLICY)))
    return policy, rng.random(2, dtype=np.float32), rng.integers(2, size=2)


def auto_augment_ops(params: tuple[int, np.ndarray, np.ndarray], height: int,
                     width: int) -> tuple[Op, ...]:
    """The operations of ``AutoAugment(IMAGENET)`` for drawn `params`: sub-policy operation
    ``i`` fires when its probability draw is at most its probability; magnitudes from 10
    bins."""
    policy, probs, signs = params
    space = augmentation_space("imagenet", 10, height, width)
    return tuple(_op(space, name, bin_index, signs[i] == 0)
                 for i, (name, p, bin_index) in enumerate(IMAGENET_POLICY[policy])
                 if probs[i] <= np.float32(p))


def draw_ops(policy: str, rng: np.random.Generator, height: int, width: int,
             ra_magnitude: int = 9) -> tuple[Op, ...]:
    """The operations `policy` (one of :data:`POLICIES`, with the classification reference's
    settings) draws for an image of `height` x `width`."""
    if policy == "ta_wide":
        return trivial_augment_wide(rng)
    if policy == "ra":
        return rand_augment(rng, height, width, magnitude=ra_magnitude)
    if policy == "imagenet":
        return auto_augment_ops(auto_augment_params(rng), height, width)
    raise ValueError(f"unknown auto-augment policy {policy!r}; expected one of {POLICIES}")


def _inverse_affine(center: Sequence[float], angle: float, translate: Sequence[float],
                    shear: Sequence[float]) -> list[float]:
    """torchvision's ``_get_inverse_affine_matrix`` at scale 1: output -> input pixel
    coordinates, the arithmetic in its order (Pillow samples with these doubles)."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    (cx, cy), (tx, ty) = center, translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    matrix = [d, -b, 0.0, -c, a, 0.0]
    matrix[2] += matrix[0] * (-cx - tx) + matrix[1] * (-cy - ty)
    matrix[5] += matrix[3] * (-cx - tx) + matrix[4] * (-cy - ty)
    matrix[2] += cx
    matrix[5] += cy
    return matrix


def _affine(image: Image.Image, matrix: list[float], resample: Image.Resampling,
            fill: tuple[int, ...]) -> Image.Image:
    return image.transform(image.size, Image.Transform.AFFINE, matrix, resample,
                           fillcolor=fill)


_ENHANCERS = {"Brightness": ImageEnhance.Brightness, "Color": ImageEnhance.Color,
              "Contrast": ImageEnhance.Contrast, "Sharpness": ImageEnhance.Sharpness}


def apply_op(image: Image.Image, op: Op, interpolation: str = "nearest",
             fill: Sequence[int] | None = None) -> Image.Image:
    """torchvision's ``_apply_op`` on a PIL image: the same Pillow call with the same
    arguments. `interpolation` resamples the geometric operations; `fill` (black by default,
    as torchvision's None) the area they uncover."""
    if interpolation not in GEOMETRIC_INTERPOLATIONS:
        raise ValueError(f"auto-augment's geometric operations resample with one of "
                         f"{GEOMETRIC_INTERPOLATIONS}, not {interpolation!r}")
    resample = pil_filter(interpolation)
    bands = len(image.getbands())
    colour = tuple(int(v) for v in (fill or (0,) * bands))
    if len(colour) == 1:
        colour *= bands
    if len(colour) != bands:
        raise ValueError(f"fill has {len(colour)} values for an image of {bands} channels")
    name, magnitude = op.name, op.magnitude
    width, height = image.size
    if name in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(magnitude))
        matrix = _inverse_affine([0, 0], 0.0, [0, 0],
                                 [shear, 0.0] if name == "ShearX" else [0.0, shear])
        return _affine(image, matrix, resample, colour)
    if name in ("TranslateX", "TranslateY"):
        shift = [int(magnitude), 0] if name == "TranslateX" else [0, int(magnitude)]
        matrix = _inverse_affine([width * 0.5, height * 0.5], 0.0, shift, [0.0, 0.0])
        return _affine(image, matrix, resample, colour)
    if name == "Rotate":
        return image.rotate(magnitude, resample, False, None, fillcolor=colour)
    if name in _ENHANCERS:
        return _ENHANCERS[name](image).enhance(1.0 + magnitude)
    if name == "Posterize":
        return ImageOps.posterize(image, int(magnitude))
    if name == "Solarize":
        return ImageOps.solarize(image, magnitude)
    simple = {"AutoContrast": ImageOps.autocontrast, "Equalize": ImageOps.equalize,
              "Invert": ImageOps.invert, "Identity": lambda im: im}
    if name in simple:
        return simple[name](image)
    raise ValueError(f"unknown auto-augment operation {name!r}")


def apply_ops(image: Image.Image, ops: Sequence[Op], interpolation: str = "nearest",
              fill: Sequence[int] | None = None) -> Image.Image:
    """`ops` applied in order (:func:`apply_op`)."""
    for op in ops:
        image = apply_op(image, op, interpolation, fill)
    return image
