"""Preprocessing equals torchvision's ``weights.transforms()`` on PIL images, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from folder_helpers import write_gray_tiff
from PIL import Image
from pretrained_helpers import sample_image_paths
from torchvision.models import get_model_weights
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from resnext_flax.metadata import Preprocessing
from resnext_flax.preprocess import (
    center_crop_offsets,
    load_image,
    preprocess,
    preprocess_image,
    resized_size,
)
from resnext_flax.weights.catalog import get_weight_set


def reference(transform, image: Image.Image) -> np.ndarray:
    """torchvision's output as HWC float32."""
    return transform(image).permute(1, 2, 0).numpy()


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sample_image_paths()]


# resnet50 has both recipes: V1 resizes to 256, V2 to 232.
@pytest.mark.parametrize("tag", ["IMAGENET1K_V1", "IMAGENET1K_V2"])
def test_sample_photos_equal_torchvision(photos, tag):
    transform = get_model_weights("resnet50")[tag].transforms()
    ws = get_weight_set("resnet50", tag)
    for photo, path in zip(photos, sample_image_paths(), strict=True):
        expected = reference(transform, photo)
        assert expected.shape == (224, 224, 3)
        np.testing.assert_array_equal(preprocess_image(photo, ws), expected)
        np.testing.assert_array_equal(preprocess_image(path, ws), expected)
        np.testing.assert_array_equal(preprocess_image(np.asarray(photo), ws), expected)


# Landscape, portrait, square, tiny, extreme aspect, already-at-size, and sizes whose crop
# offset is a half pixel (Python's round-half-to-even decides it).
SIZES = [(427, 640), (640, 427), (233, 233), (5, 7), (17, 1000), (256, 256), (256, 301),
         (301, 256), (224, 224), (1, 1)]


@pytest.mark.parametrize("size", SIZES)
def test_synthetic_sizes_equal_torchvision(size):
    image = noise_image(*size)
    for ws in (get_weight_set("resnet18"), get_weight_set("resnext101_64x4d")):
        transform = get_model_weights(ws.model)[ws.tag].transforms()
        np.testing.assert_array_equal(preprocess_image(image, ws), reference(transform, image))


@pytest.mark.parametrize(
    ("resize", "crop", "interpolation"),
    [
        (200, 224, "bilinear"),  # smaller than the crop: torchvision zero-pads
        (225, 224, "bilinear"),  # half-pixel crop offset
        (227, 224, "bilinear"),
        (160, 128, "bicubic"),
        (160, 129, "nearest"),
        (96, 80, "lanczos"),
        (100, 99, "box"),
        (100, 64, "hamming"),
    ],
)
def test_other_configs_equal_torchvision(resize, crop, interpolation):
    transform = ImageClassification(crop_size=crop, resize_size=resize,
                                    interpolation=InterpolationMode(interpolation))
    config = Preprocessing(resize_size=resize, crop_size=crop, interpolation=interpolation)
    for size in [(427, 640), (123, 91), (50, 300)]:
        image = noise_image(*size, seed=sum(size))
        np.testing.assert_array_equal(preprocess_image(image, config), reference(transform, image))


def test_torchvision_rounding_rules():
    assert resized_size(427, 640, 256) == (256, 383)  # int(256 * 640 / 427) = 383 (truncated)
    assert resized_size(640, 427, 232) == (347, 232)
    assert center_crop_offsets(225, 225, 224) == (0, 0)  # round(0.5) == 0
    assert center_crop_offsets(227, 229, 224) == (2, 2)  # round(1.5) == 2, round(2.5) == 2


def test_image_modes_are_converted_to_rgb(photos):
    transform = get_model_weights("resnet18").DEFAULT.transforms()
    ws = get_weight_set("resnet18")
    gray = photos[0].convert("L")
    rgba = photos[1].convert("RGBA")
    np.testing.assert_array_equal(preprocess_image(gray, ws),
                                  reference(transform, gray.convert("RGB")))
    np.testing.assert_array_equal(preprocess_image(np.asarray(gray), ws),
                                  reference(transform, gray.convert("RGB")))
    np.testing.assert_array_equal(preprocess_image(np.asarray(gray)[..., None], ws),
                                  reference(transform, gray.convert("RGB")))
    np.testing.assert_array_equal(preprocess_image(rgba, ws),
                                  reference(transform, rgba.convert("RGB")))
    assert load_image(rgba).mode == "RGB"


def test_batched_path(photos):
    ws = get_weight_set("resnet50")
    paths = sample_image_paths()
    one_by_one = np.stack([preprocess_image(p, ws) for p in paths])
    batch = preprocess(paths, ws)
    assert batch.shape == (2, 224, 224, 3) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch, one_by_one)
    np.testing.assert_array_equal(preprocess(paths, ws, num_workers=1), one_by_one)
    np.testing.assert_array_equal(preprocess(np.stack([np.asarray(p) for p in photos]), ws),
                                  one_by_one)
    np.testing.assert_array_equal(preprocess(paths[0], ws), one_by_one[:1])
    transform = get_model_weights("resnet50").DEFAULT.transforms()
    expected = torch.stack([transform(p) for p in photos]).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(batch, expected)


def test_default_config_is_imagenet_256_224(photos):
    transform = ImageClassification(crop_size=224, resize_size=256)
    np.testing.assert_array_equal(preprocess_image(photos[0]), reference(transform, photos[0]))


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        preprocess_image(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="looks like CHW"):
        preprocess_image(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"shape \(H, W, 3\)"):
        preprocess_image(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(FileNotFoundError, match="no image file"):
        preprocess_image(tmp_path / "missing.jpg")
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("hello")
    with pytest.raises(ValueError, match="could not read"):
        preprocess_image(not_an_image)
    with pytest.raises(TypeError, match="PIL image, a file path"):
        preprocess_image(42)
    with pytest.raises(ValueError, match="no images"):
        preprocess([])
    with pytest.raises(TypeError, match="Preprocessing or a WeightSet"):
        preprocess_image(noise_image(8, 8), "resnet50")


def _torchvision_float(path) -> np.ndarray:
    """torchvision's tensor path for an integer image: ``pil_to_tensor`` then
    ``convert_image_dtype(float)``, i.e. ``v / max(dtype)``, as (H, W)."""
    from torchvision.transforms import functional as F

    with Image.open(path) as image:
        return F.convert_image_dtype(F.pil_to_tensor(image), torch.float)[0].double().numpy()


def _ramp(top: int, dtype, shape=(48, 80)) -> np.ndarray:
    return np.linspace(0, top, shape[0] * shape[1]).reshape(shape).round().astype(dtype)


@pytest.mark.parametrize("top", [2**31 - 1, 65535, 1000])
def test_32_bit_tiff_is_scaled_by_its_range_as_torchvision(tmp_path, top):
    """A mode-I (int32) TIFF maps to the nearest 8-bit value of torchvision's float image
    (v / (2**31 - 1)): neither refused above 65535 nor taken as 16-bit (v / 257) below."""
    path = tmp_path / "int32.tiff"
    Image.fromarray(_ramp(top, np.int32)).save(path)
    with Image.open(path) as raw:
        assert raw.mode == "I"
    ours = np.asarray(load_image(path))
    assert (ours == ours[..., :1]).all()  # gray in every channel
    expected = _torchvision_float(path) * 255
    assert np.abs(ours[..., 0] - expected).max() <= 0.5 + 1e-3
    if top == 2**31 - 1:
        assert abs(ours.mean() - 127.5) < 0.5


def test_16_bit_png_matches_torchvision_to_8_bits(tmp_path):
    path = tmp_path / "u16.png"
    Image.fromarray(_ramp(65535, np.uint16)).save(path)
    ours = np.asarray(load_image(path))[..., 0]
    assert np.abs(ours - _torchvision_float(path) * 255).max() <= 0.5 + 1e-3


def test_a_16_bit_png_opened_as_mode_i_keeps_its_16_bit_range(tmp_path, monkeypatch):
    """Pillow before 10.4 opens 16-bit grayscale PNGs as mode I (later versions as I;16),
    which the project's Pillow floor allows: such an image is 16-bit, not black."""
    from PIL import PngImagePlugin

    path = tmp_path / "u16.png"
    Image.fromarray(_ramp(65535, np.uint16)).save(path)
    monkeypatch.setitem(PngImagePlugin._MODES, (16, 0), ("I", "I;16B"))
    with Image.open(path) as raw:
        assert raw.mode == "I"
    ours = np.asarray(load_image(path))[..., 0]
    assert ours.min() == 0 and ours.max() == 255 and abs(ours.mean() - 127.5) < 0.5


def test_integer_images_use_the_range_their_file_declares(tmp_path):
    """Unsigned 32-bit and signed 16-bit TIFF samples, and 16-bit PGMs (which Pillow opens as
    mode I, scaled to 16 bits): each by its own range. torchvision divides every mode-I image
    by 2**31 - 1, so a 16-bit PGM is black there (docs/data.md says so)."""
    u32 = write_gray_tiff(tmp_path / "u32.tiff", _ramp(2**32 - 1, np.uint32), signed=False)
    s16 = write_gray_tiff(tmp_path / "s16.tiff", _ramp(32767, np.int16), signed=True)
    pgm = tmp_path / "p16.pgm"
    pgm.write_bytes(b"P5\n80 48\n1023\n" + _ramp(1023, ">u2").tobytes())
    for path in (u32, s16, pgm):
        with Image.open(path) as raw:
            assert raw.mode == "I"
        ours = np.asarray(load_image(path))[..., 0]
        assert ours.min() == 0 and ours.max() == 255 and abs(ours.mean() - 127.5) < 0.5, path
    assert _torchvision_float(pgm).max() < 1 / 255
    negative = write_gray_tiff(tmp_path / "neg.tiff", _ramp(30000, np.int16) - 5, signed=True)
    with pytest.raises(ValueError, match=r"negative pixel values \(as low as -5\)"):
        load_image(negative)
