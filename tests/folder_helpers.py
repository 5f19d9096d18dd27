"""Small generated image folders for the data, evaluation and fine-tuning tests: crops of
scikit-learn's two sample photographs (JPEG, PNG, RGBA, odd sizes, images smaller than the
crop) and its 8x8 digits (grayscale PNG), a few deliberately corrupt files, and files that are
not images. Nothing is downloaded."""

from __future__ import annotations

import functools
import os
import pathlib

import numpy as np
from PIL import Image


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(load_sample_images().images)  # china, flower: (427, 640, 3) uint8


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images * 255 / 16).round().astype(np.uint8), digits.target


def photo_crop(which: int, rng: np.random.Generator, low: int = 24, high: int = 160
               ) -> np.ndarray:
    """A random crop (random size, random place) of sample photograph `which` (0 or 1)."""
    photo = _photos()[which]
    h, w = (int(x) for x in rng.integers(low, high, 2))
    top, left = int(rng.integers(0, photo.shape[0] - h)), int(rng.integers(0, photo.shape[1] - w))
    return photo[top:top + h, left:left + w]


def digit(index: int) -> tuple[np.ndarray, int]:
    """scikit-learn's digit `index` as an 8x8 uint8 image, and its label."""
    images, labels = _digits()
    return images[index], int(labels[index])


def write_image(path: pathlib.Path, array: np.ndarray, mode: str | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    image.save(path, quality=90) if path.suffix.lower() in (".jpg", ".jpeg") else image.save(path)
    return str(path)


def corrupt_files(folder: pathlib.Path) -> list[str]:
    """Two unreadable images: garbage bytes named .jpg, and a truncated JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    garbage = folder / "garbage.jpg"
    garbage.write_bytes(b"this is not a JPEG file" * 10)
    good = folder / "_source.tmp"
    Image.fromarray(photo_crop(0, np.random.default_rng(99), 64, 96)).save(good, format="JPEG")
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:400])
    good.unlink()
    return [str(garbage), str(truncated)]


def mixed_folder(root: pathlib.Path, *, seed: int = 0) -> dict[str, list[str]]:
    """Six classes of assorted images for evaluation parity: JPEG and PNG photo crops, an
    upper-case extension, an RGBA PNG, an image smaller than a 224 crop, grayscale digits,
    a nested sub-folder, a text file and a file without an image extension (ignored by
    torchvision and by us), and two corrupt images. Returns {"corrupt": [...]}."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(["bay", "city", "petals", "stem", "zero", "one"]):
        folder = root / name
        for i in range(3):
            if name in ("zero", "one"):
                image, _ = digit(10 * i + c - 4)
                write_image(folder / f"d{i}.png", image)
            else:
                ext = (".jpg", ".png", ".JPG")[i]
                write_image(folder / f"img{i}{ext}", photo_crop(c % 2, rng))
    write_image(root / "city" / "nested" / "deeper.jpeg", photo_crop(0, rng))
    write_image(root / "petals" / "alpha.png", photo_crop(1, rng), mode="RGBA")
    write_image(root / "stem" / "tiny.png", photo_crop(1, rng, 20, 40))
    (root / "bay" / "notes.txt").write_text("not an image")
    (root / "bay" / "img.jpg.bak").write_bytes(b"ignored: no image extension")
    return {"corrupt": corrupt_files(root / "one")}


def learnable_folder(root: pathlib.Path, per_class: int, *, seed: int = 0) -> list[str]:
    """Three visually distinct classes for fine-tuning: crops of the china photo, crops of
    the flower photo, and grayscale digits; PNG and JPEG; one corrupt file. Returns the
    class names."""
    rng = np.random.default_rng(seed)
    images, _ = _digits()
    for i in range(per_class):
        write_image(root / "china" / f"{i:03d}.jpg", photo_crop(0, rng, 40, 160))
        write_image(root / "flower" / f"{i:03d}.png", photo_crop(1, rng, 40, 160))
        write_image(root / "digits" / f"{i:03d}.png", images[(100 * seed + i) % len(images)])
    (root / "flower" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return sorted(os.listdir(root))


def write_gray_tiff(path: pathlib.Path, pixels: np.ndarray, *, signed: bool) -> str:
    """An uncompressed little-endian grayscale TIFF of `pixels` (16 or 32 bits) declaring the
    sample format: Pillow writes only signed 32-bit TIFFs, real files also hold unsigned
    32-bit or signed 16-bit samples."""
    import struct

    bits = pixels.dtype.itemsize * 8
    data = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    height, width = pixels.shape
    tags = [(256, 4, width), (257, 4, height), (258, 3, bits), (259, 3, 1), (262, 3, 1),
            (273, 4, 0), (277, 3, 1), (278, 4, height), (279, 4, len(data)),
            (339, 3, 2 if signed else 1)]
    offset = 8 + 2 + 12 * len(tags) + 4  # image data right after the one directory
    ifd = struct.pack("<H", len(tags))
    for tag, kind, value in tags:
        value = offset if tag == 273 else value
        packed = struct.pack("<HI", value, 0)[:4] if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + data)
    return str(path)
