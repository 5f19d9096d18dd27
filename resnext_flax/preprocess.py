"""Image preprocessing identical to torchvision's ``weights.transforms()`` on PIL images.

torchvision's ``ImageClassification`` transform resizes a PIL image with Pillow's own
(antialiased) filter, center-crops it, converts it to float32 in [0, 1] and normalizes it. We
run the same Pillow resize with the same output size and the same crop offsets, then do the
float arithmetic in the same order in float32, so the result equals torchvision's bit for bit
(up to float32 division rounding) — without importing torch. Output is NHWC float32.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from resnext_flax.metadata import Preprocessing

ImageInput = Image.Image | str | os.PathLike | np.ndarray

# torchvision's InterpolationMode -> Pillow filter (torchvision's F.pil_modes_mapping).
_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


def preprocessing_config(config: Any) -> Preprocessing:
    """The preprocessing to use: `config` itself, or what a weight set or a model's
    ``pretrained_cfg`` records (anything with a ``preprocessing`` attribute), or ImageNet's
    default for None."""
    if config is None:
        return Preprocessing()
    if isinstance(config, Preprocessing):
        return config
    recorded = getattr(config, "preprocessing", None)
    if isinstance(recorded, Preprocessing):
        return recorded
    if recorded is None and hasattr(config, "preprocessing"):
        return Preprocessing()
    raise TypeError(f"expected a Preprocessing or a WeightSet, got {type(config).__name__}")


def load_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a PIL image, a file path, or a uint8 array (H, W, 3), (H, W, 1)
    or (H, W). Grayscale, palette and RGBA images are converted with Pillow's ``convert("RGB")``
    (alpha is dropped), which is what torchvision's pipeline needs for 3-channel weights.

    16- and 32-bit integer images (modes ``I;16`` and ``I``) are scaled to 8 bits by the range
    their samples can hold, ``round(v * 255 / top)`` (:func:`integer_range`: 65535 for 16-bit
    PNG, TIFF and PGM files, 2**31 - 1 for a 32-bit TIFF), the nearest 8-bit value to
    torchvision's ``convert_image_dtype(pil_to_tensor(image), torch.float)``. Pillow's
    ``convert("RGB")``, which torchvision's ``ImageFolder`` applies, clips them at 255 instead:
    a 16-bit photograph turns white. Negative pixels and float images (mode ``F``) have no
    8-bit meaning and are refused.
    """
    if isinstance(image, Image.Image):
        pil = _to_8_bit(image, "the image")
    elif isinstance(image, str | os.PathLike):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no image file at {path!r}")
        try:
            with Image.open(path) as opened:
                opened.load()
                pil = _to_8_bit(opened, repr(path))
                pil = pil.copy() if pil is opened else pil
        except (OSError, Image.DecompressionBombError) as err:
            raise ValueError(f"could not read {path!r} as an image: {err}") from err
    elif isinstance(image, np.ndarray):
        pil = Image.fromarray(_check_array(image))
    else:
        raise TypeError(
            "expected a PIL image, a file path or a uint8 (H, W, 3) array, got "
            f"{type(image).__name__}"
        )
    return pil if pil.mode == "RGB" else pil.convert("RGB")


#: TIFF tags: bits per sample, and the sample format (1 unsigned, 2 signed).
_TIFF_BITS, _TIFF_FORMAT = 258, 339


def _tag(tags: Any, key: int, default: int) -> int:
    value = tags.get(key, default)
    return int(value[0] if isinstance(value, tuple) else value)


def integer_range(image: Image.Image) -> tuple[np.ndarray, int]:
    """(int64 pixels, the largest value its samples can hold) of a mode ``I`` or ``I;16*``
    image, from what its file declares: 65535 for 16-bit samples, and for mode ``I`` from any
    file but a TIFF (Pillow scales a PGM's ``maxval`` to 16 bits); ``2**bits - 1`` (unsigned)
    or ``2**(bits - 1) - 1`` (signed) for a TIFF's. Without a file's declaration (an image
    built in memory) mode ``I`` holds int32, so 2**31 - 1, as torchvision's
    ``convert_image_dtype`` takes it."""
    pixels = np.asarray(image)
    if image.mode.startswith("I;16"):
        return pixels.astype(np.int64), 65535
    tags = getattr(image, "tag_v2", None)
    if image.format == "TIFF" and tags is not None:
        bits = _tag(tags, _TIFF_BITS, 32)
        signed = _tag(tags, _TIFF_FORMAT, 1) == 2
        if bits == 32 and not signed:  # Pillow keeps unsigned 32-bit samples in int32
            pixels = pixels.view(np.uint32)
        return pixels.astype(np.int64), 2 ** (bits - signed) - 1
    if image.format is not None:  # PNG, PGM/PPM...: no other format stores over 16 bits
        return pixels.astype(np.int64), 65535  # (Pillow before 10.4 opens 16-bit PNGs as I)
    return pixels.astype(np.int64), 2**31 - 1


def _to_8_bit(image: Image.Image, name: str) -> Image.Image:
    """`image` with 16- or 32-bit integer pixels scaled to 8 bits ("L") by the range they can
    hold (:func:`integer_range`); other modes unchanged."""
    if image.mode == "F":
        raise ValueError(f"{name} has floating-point pixels (mode F) with no defined range; "
                         "convert it to 8 bits per channel first")
    if not (image.mode == "I" or image.mode.startswith("I;16")):
        return image
    pixels, top = integer_range(image)
    if pixels.size and pixels.min() < 0:
        raise ValueError(f"{name} has negative pixel values (as low as {pixels.min()}), which "
                         "no 8-bit image can show; convert it to 8 bits per channel first")
    return Image.fromarray(((pixels * 255 + top // 2) // top).astype(np.uint8), mode="L")


def _check_array(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 image array with values 0..255, got dtype {array.dtype}; a float "
            "array is ambiguous ([0, 1] or [0, 255]) — convert it with "
            "(x * 255).round().astype(np.uint8) or pass a PIL image"
        )
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)):
        hint = " (this looks like CHW; transpose it to HWC)" if (
            array.ndim == 3 and array.shape[0] in (1, 3)) else ""
        raise ValueError(
            f"expected an image array of shape (H, W, 3), (H, W, 1) or (H, W), got "
            f"{array.shape}{hint}"
        )
    if min(array.shape[:2]) < 1:
        raise ValueError(f"empty image array of shape {array.shape}")
    return np.ascontiguousarray(array)


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to `size`, rounded as torchvision does
    (``int(size * long / short)``, i.e. truncated)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop_offsets(height: int, width: int, crop: int) -> tuple[int, int]:
    """(top, left) of torchvision's center crop: ``int(round((size - crop) / 2))``, with
    Python's round-half-to-even, on an image that is already at least `crop` on each side."""
    return round((height - crop) / 2.0), round((width - crop) / 2.0)


def _pad_to_crop(array: np.ndarray, crop: int) -> np.ndarray:
    """torchvision's center_crop zero-pads an image smaller than the crop: (crop - size) // 2
    before, the rest after."""
    height, width = array.shape[:2]
    pad_h, pad_w = max(crop - height, 0), max(crop - width, 0)
    if not (pad_h or pad_w):
        return array
    return np.pad(array, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))


def preprocess_image(
    image: ImageInput, config: Any = None
) -> np.ndarray:
    """One image -> float32 (crop, crop, 3), exactly torchvision's ``weights.transforms()``.

    `config` is a weight set (its preprocessing is used) or a :class:`Preprocessing`;
    ImageNet's resize 256 / crop 224 when omitted. Arrays are treated as the PIL image
    ``Image.fromarray(array)`` would be.
    """
    cfg = preprocessing_config(config)
    pil = load_image(image)
    height, width = pil.height, pil.width
    new_height, new_width = resized_size(height, width, cfg.resize_size)
    if (new_height, new_width) != (height, width):  # torchvision skips a no-op resize
        pil = pil.resize((new_width, new_height), pil_filter(cfg.interpolation))
    array = _pad_to_crop(np.asarray(pil, dtype=np.uint8), cfg.crop_size)
    top, left = center_crop_offsets(array.shape[0], array.shape[1], cfg.crop_size)
    return normalize(array[top:top + cfg.crop_size, left:left + cfg.crop_size], cfg)


def pil_filter(interpolation: str) -> Image.Resampling:
    """The Pillow filter torchvision resizes a PIL image with for an ``InterpolationMode``."""
    return _PIL_FILTERS[interpolation]


def normalize(array: np.ndarray, config: Preprocessing) -> np.ndarray:
    """uint8 (H, W, 3) -> float32, torchvision's ``x / 255`` then ``(x - mean) / std``: the
    same float32 operations in the same order, so the result is bit-identical."""
    out = array.astype(np.float32) / np.float32(255)
    out -= np.asarray(config.mean, np.float32)
    out /= np.asarray(config.std, np.float32)
    return out


def image_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One image, a sequence of images or a uint8 (N, H, W, 3) batch as a non-empty list."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        items: list[ImageInput] = list(images)
    elif isinstance(images, Image.Image | str | os.PathLike | np.ndarray):
        items = [images]
    elif isinstance(images, Sequence):
        items = list(images)
    else:
        raise TypeError(
            "expected an image or a sequence of images (PIL images, file paths or uint8 "
            f"arrays), got {type(images).__name__}"
        )
    if not items:
        raise ValueError("no images to preprocess")
    return items


def preprocess(
    images: ImageInput | Sequence[ImageInput],
    config: Any = None,
    *,
    num_workers: int | None = None,
) -> np.ndarray:
    """Images -> float32 NHWC batch (N, crop, crop, 3), for the model or a Predictor.

    Accepts one image (PIL, path, or uint8 (H, W, 3) array), a sequence of them, or a uint8
    batch array (N, H, W, 3). Many images are decoded and resized on `num_workers` threads
    (Pillow releases the GIL while resizing); the result is the same as one at a time.
    """
    cfg = preprocessing_config(config)
    items = image_list(images)
    out = np.empty((len(items), cfg.crop_size, cfg.crop_size, 3), np.float32)

    def fill(index: int) -> None:
        out[index] = preprocess_image(items[index], cfg)

    workers = num_workers if num_workers is not None else min(len(items), os.cpu_count() or 1)
    if workers <= 1 or len(items) == 1:
        for i in range(len(items)):
            fill(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(fill, range(len(items))))
    return out
