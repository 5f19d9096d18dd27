"""The recipe's image augmentations against torchvision: TrivialAugmentWide, RandAugment and
AutoAugment (ImageNet policy) have torchvision's magnitude bins, policy table and draw
structure, and for the same operations give its pixels bit for bit on PIL images;
RandomErasing equals ``F.erase`` for the same box; the whole training transform equals the
reference preset's composition for the same decisions."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from folder_helpers import photo_crop
from PIL import Image
from torchvision.transforms import (
    Compose,
    ConvertImageDtype,
    InterpolationMode,
    Normalize,
    PILToTensor,
    RandomErasing,
    RandomHorizontalFlip,
    RandomResizedCrop,
)
from torchvision.transforms import autoaugment as tva

from resnext_flax import autoaugment as aa
from resnext_flax.augment import (
    Augmentation,
    TrainDecision,
    apply_decision,
    apply_erase,
    augment_image,
    check_augmentation,
    draw_decision,
    erase_box,
    random_resized_crop_box,
)
from resnext_flax.metadata import Preprocessing

INTERPOLATIONS = ["nearest", "bilinear", "bicubic"]


def _torch_space(policy: str, num_bins: int, height: int, width: int):
    if policy == "ta_wide":
        return tva.TrivialAugmentWide()._augmentation_space(num_bins)
    module = tva.RandAugment() if policy == "ra" else tva.AutoAugment()
    return module._augmentation_space(num_bins, (height, width))


@pytest.mark.parametrize("policy, num_bins, size", [
    ("ta_wide", 31, (224, 224)), ("ta_wide", 10, (1, 1)), ("ta_wide", 57, (1, 1)),
    ("ra", 31, (224, 224)), ("ra", 31, (97, 131)), ("ra", 31, (32, 32)), ("ra", 16, (176, 176)),
    ("imagenet", 10, (224, 224)), ("imagenet", 10, (193, 257)), ("imagenet", 31, (64, 48)),
])
def test_magnitude_bins_equal_torchvision(policy, num_bins, size):
    ours = aa.augmentation_space(policy, num_bins, *size)
    theirs = _torch_space(policy, num_bins, *size)
    assert list(ours) == list(theirs)  # the order an op index draws from
    for name, (magnitudes, signed) in theirs.items():
        assert ours[name][1] == signed, name
        if magnitudes.ndim == 0:
            assert ours[name][0] is None, name
        else:
            expected = magnitudes.numpy()
            assert ours[name][0].dtype == expected.dtype, name
            np.testing.assert_array_equal(ours[name][0], expected, err_msg=name)


def test_linspace32_is_torch_linspace_bit_for_bit():
    rng = np.random.default_rng(0)
    for _ in range(300):
        start, end = (float(x) for x in rng.uniform(-400, 400, 2))
        steps = int(rng.integers(1, 300))
        np.testing.assert_array_equal(aa.linspace32(start, end, steps),
                                      torch.linspace(start, end, steps).numpy())


def test_imagenet_policy_is_torchvisions():
    theirs = tva.AutoAugment()._get_policies(tva.AutoAugmentPolicy.IMAGENET)
    assert [tuple(sub) for sub in theirs] == list(aa.IMAGENET_POLICY)


def _photo(seed: int, low: int = 29, high: int = 61) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(photo_crop(seed % 2,
                                                           np.random.default_rng(seed),
                                                           low, high)))


def _theirs(image: Image.Image, ops, interpolation: str, fill=None) -> np.ndarray:
    for op in ops:
        image = tva._apply_op(image, op.name, op.magnitude, InterpolationMode(interpolation),
                              fill)
    return np.asarray(image)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_every_operation_equals_torchvisions_apply_op(interpolation):
    image = _photo(3)
    ops = set()
    for policy, num_bins in (("ta_wide", 31), ("ra", 31), ("imagenet", 10)):
        for name, (magnitudes, signed) in aa.augmentation_space(
                policy, num_bins, image.height, image.width).items():
            values = [0.0] if magnitudes is None else [float(m) for m in magnitudes]
            ops |= {aa.Op(name, s * v) for v in values for s in ((1, -1) if signed else (1,))}
    assert {op.name for op in ops} == {*aa.augmentation_space("ra", 31, 1, 1), "Invert"}
    for op in sorted(ops, key=lambda o: (o.name, o.magnitude)):
        ours = np.asarray(aa.apply_op(image, op, interpolation))
        np.testing.assert_array_equal(ours, _theirs(image, [op], interpolation), err_msg=op)
    for name, magnitude in (("Rotate", 33.5), ("ShearY", -0.4), ("TranslateX", 9.7)):
        op = aa.Op(name, magnitude)  # a fill of the uncovered area
        np.testing.assert_array_equal(
            np.asarray(aa.apply_op(image, op, interpolation, fill=(10, 200, 30))),
            _theirs(image, [op], interpolation, fill=[10, 200, 30]))


class _Recording:
    """A numpy Generator that records every integer it draws."""

    def __init__(self, seed: int | np.random.Generator):
        self.rng, self.drawn = np.random.default_rng(seed), []

    def integers(self, *args, **kwargs):
        value = self.rng.integers(*args, **kwargs)
        self.drawn.append(int(value))
        return value


class _Replay:
    """torch.randint replaced by a queue of values (the draws ours made), which must be
    consumed exactly."""

    def __init__(self, values):
        self.values = list(values)

    def __call__(self, *args, **kwargs):
        return torch.tensor([self.values.pop(0)])


def _same_decision(a: TrainDecision, b: TrainDecision) -> bool:
    erases = (a.erase, b.erase)
    same_erase = erases == (None, None) or (None not in erases and all(
        np.array_equal(getattr(a.erase, f), getattr(b.erase, f))
        for f in ("top", "left", "height", "width", "value")))
    return (a.box, a.flip, a.ops) == (b.box, b.flip, b.ops) and same_erase


@pytest.mark.parametrize("policy", ["ta_wide", "ra"])
def test_trivial_and_rand_augment_replayed_through_torchvision(policy, monkeypatch):
    """torchvision's own forward, its random integers replaced by the ones ours drew, gives
    our pixels: the draws (which happen, in what order, what each value means) are
    torchvision's."""
    for seed in range(40):
        image = _photo(seed)
        interpolation = INTERPOLATIONS[seed % 3]
        rng = _Recording(seed)
        ops = aa.draw_ops(policy, rng, image.height, image.width, ra_magnitude=seed % 31)
        replay = _Replay(rng.drawn)
        monkeypatch.setattr(torch, "randint", replay)
        mode = InterpolationMode(interpolation)
        module = (tva.TrivialAugmentWide(interpolation=mode) if policy == "ta_wide"
                  else tva.RandAugment(magnitude=seed % 31, interpolation=mode))
        theirs = np.asarray(module(image))
        monkeypatch.undo()
        assert not replay.values
        np.testing.assert_array_equal(np.asarray(aa.apply_ops(image, ops, interpolation)),
                                      theirs, err_msg=str(ops))


def test_auto_augment_replayed_through_torchvision(monkeypatch):
    for seed in range(60):
        image = _photo(seed)
        interpolation = INTERPOLATIONS[seed % 3]
        params = aa.auto_augment_params(np.random.default_rng(seed))
        if seed == 0:  # a probability draw equal to the sub-policy's (float32) probability
            params = (0, np.array([0.4, 0.6], np.float32), np.array([1, 0]))
        ops = aa.auto_augment_ops(params, image.height, image.width)
        replayed = (params[0], torch.from_numpy(params[1]), torch.from_numpy(params[2]))
        monkeypatch.setattr(tva.AutoAugment, "get_params",
                            staticmethod(lambda n, drawn=replayed: drawn))
        theirs = tva.AutoAugment(interpolation=InterpolationMode(interpolation))(image)
        monkeypatch.undo()
        np.testing.assert_array_equal(np.asarray(aa.apply_ops(image, ops, interpolation)),
                                      np.asarray(theirs), err_msg=str(ops))
        if seed == 0:
            assert [op.name for op in ops] == ["Posterize", "Rotate"]


def test_draws_follow_torchvisions_distribution():
    rng = np.random.default_rng(0)
    space = aa.augmentation_space("ta_wide", 31, 1, 1)
    drawn = [aa.trivial_augment_wide(rng)[0] for _ in range(7000)]
    counts = Counter(op.name for op in drawn)
    assert set(counts) == set(space) and all(350 < c < 650 for c in counts.values()), counts
    rotations = [op.magnitude for op in drawn if op.name == "Rotate"]
    assert 0.4 < np.mean(np.array(rotations) < 0) < 0.6  # signs are fair
    assert {abs(m) for m in rotations} == {float(m) for m in space["Rotate"][0]}  # all bins
    ra = [aa.rand_augment(rng, 224, 224, magnitude=9) for _ in range(500)]
    assert all(len(ops) == 2 for ops in ra)
    ra_space = aa.augmentation_space("ra", 31, 224, 224)
    for op in (op for ops in ra for op in ops):
        magnitudes, _ = ra_space[op.name]
        assert abs(op.magnitude) == (0.0 if magnitudes is None else float(magnitudes[9]))
    # AutoAugment: each sub-policy's operation fires with its probability.
    fired, seen = Counter(), Counter()
    for _ in range(6000):
        policy, probs, signs = aa.auto_augment_params(rng)
        seen[policy] += 1
        fired[policy] += len(aa.auto_augment_ops((policy, probs, signs), 224, 224))
    assert set(seen) == set(range(25))
    for policy, count in seen.items():
        expected = sum(p for _, p, _ in aa.IMAGENET_POLICY[policy])
        assert fired[policy] / count == pytest.approx(expected, abs=0.2)
    with pytest.raises(ValueError, match="magnitude must be a bin"):
        aa.rand_augment(rng, 224, 224, magnitude=31)
    with pytest.raises(ValueError, match="unknown auto-augment policy 'augmix'"):
        aa.augmentation_space("augmix", 31, 224, 224)


def _torch_erased(array: np.ndarray, erase) -> np.ndarray:
    value = torch.from_numpy(np.asarray(erase.value, np.float32))
    value = value.permute(2, 0, 1) if value.ndim == 3 else value[:, None, None]
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    out = TF.erase(tensor, erase.top, erase.left, erase.height, erase.width, value)
    return out.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("value", [0.0, -1.5, "random"])
def test_random_erasing_equals_torchvision_erase(value):
    rng = np.random.default_rng(1)
    aug = Augmentation(random_erase=1.0, erase_value=value)
    for height, width in [(32, 32), (29, 47), (224, 224)]:
        array = rng.standard_normal((height, width, 3), dtype=np.float32)
        for _ in range(20):
            erase = erase_box(height, width, 3, rng, aug)
            if erase is None:
                continue
            assert erase.height < height and erase.width < width  # torchvision's rule
            assert 0 <= erase.top <= height - erase.height
            assert 0 <= erase.left <= width - erase.width
            ours = apply_erase(array, erase)
            np.testing.assert_array_equal(ours, _torch_erased(array, erase))
            if value != "random":
                assert (ours[erase.top, erase.left] == value).all()
    # In a 1x1 image only empty boxes fit, torchvision's as ours: nothing is erased.
    torch.manual_seed(0)
    box = RandomErasing.get_params(torch.zeros(3, 1, 1), (0.02, 0.33), (0.3, 3.3), [0.0])
    assert box[2] * box[3] == 0
    ones = np.ones((1, 1, 3), np.float32)
    for _ in range(20):
        np.testing.assert_array_equal(apply_erase(ones, erase_box(1, 1, 3, rng, aug)), ones)


def test_random_erasing_boxes_follow_torchvision_rules():
    rng = np.random.default_rng(2)
    half = Augmentation(random_erase=0.5)
    boxes = [erase_box(64, 64, 3, rng, half) for _ in range(3000)]
    assert 0.45 < np.mean([b is not None for b in boxes]) < 0.55
    areas = np.array([b.height * b.width / 64**2 for b in boxes if b is not None])
    ratios = np.array([b.height / b.width for b in boxes if b is not None])
    assert areas.min() > 0.015 and areas.max() < 0.36  # scale (0.02, 0.33), rounded
    assert ratios.min() > 0.25 and ratios.max() < 4.0  # ratio (0.3, 3.3), rounded
    assert np.median(ratios) == pytest.approx(1, abs=0.15)
    assert all(erase_box(64, 64, 3, rng, Augmentation()) is None for _ in range(50))


def _reference_preset(image: Image.Image, decision: TrainDecision, cfg: Preprocessing):
    """torchvision's ``ClassificationPresetTrain`` (PIL backend) for the same decisions, its
    functional ops in its order: RandomResizedCrop, RandomHorizontalFlip, the policy,
    PILToTensor, ConvertImageDtype, Normalize, RandomErasing."""
    mode = InterpolationMode(cfg.interpolation)
    out = TF.resized_crop(image, *decision.box, [cfg.crop_size] * 2, mode, antialias=True)
    if decision.flip:
        out = TF.hflip(out)
    for op in decision.ops:
        out = tva._apply_op(out, op.name, op.magnitude, interpolation=mode, fill=None)
    tensor = TF.convert_image_dtype(TF.pil_to_tensor(out), torch.float)
    tensor = TF.normalize(tensor, list(cfg.mean), list(cfg.std)).permute(1, 2, 0).numpy()
    return tensor if decision.erase is None else _torch_erased(tensor, decision.erase)


@pytest.mark.parametrize("policy", ["ta_wide", "ra", "imagenet", None])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_train_transform_equals_the_reference_preset(policy, interpolation):
    cfg = Preprocessing(resize_size=64, crop_size=48, interpolation=interpolation)
    aug = Augmentation(auto_augment=policy, ra_magnitude=12, random_erase=0.5,
                       erase_value="random" if interpolation == "bicubic" else 0.0)
    applied = 0
    for seed in range(12):
        image = _photo(seed, 30, 150)
        decision = draw_decision(image.height, image.width, 48, np.random.default_rng(seed),
                                 aug)
        applied += len(decision.ops)
        ours = apply_decision(image, decision, cfg)
        np.testing.assert_array_equal(ours, _reference_preset(image, decision, cfg))
        # augment_image is the two steps with the same generator.
        np.testing.assert_array_equal(
            augment_image(image, cfg, np.random.default_rng(seed), aug), ours)
    assert applied > 0 or policy is None


@pytest.mark.parametrize("policy", ["ta_wide", "ra", "imagenet"])
def test_the_reference_preset_replayed(policy, monkeypatch):
    """torchvision's preset transforms themselves, in the preset's order (RandomResizedCrop,
    RandomHorizontalFlip, the policy, PILToTensor, ConvertImageDtype, Normalize,
    RandomErasing(p)), their random draws replaced by ours, give our training images."""
    cfg = Preprocessing(resize_size=64, crop_size=48, interpolation="bilinear")
    aug = Augmentation(auto_augment=policy, ra_magnitude=5, random_erase=0.5)
    mode = InterpolationMode.BILINEAR
    module = {"ta_wide": tva.TrivialAugmentWide(interpolation=mode),
              "ra": tva.RandAugment(magnitude=5, interpolation=mode),
              "imagenet": tva.AutoAugment(interpolation=mode)}[policy]
    preset = Compose([RandomResizedCrop(48, interpolation=mode, antialias=True),
                      RandomHorizontalFlip(0.5), module, PILToTensor(),
                      ConvertImageDtype(torch.float), Normalize(cfg.mean, cfg.std),
                      RandomErasing(p=0.5)])
    erased = 0
    for seed in range(10):
        image = _photo(seed, 30, 150)
        # The decision, drawn step by step in draw_decision's order.
        rng = np.random.default_rng(seed)
        box = random_resized_crop_box(image.height, image.width, rng, aug)
        flip = bool(rng.random() < aug.hflip)
        recording = _Recording(rng)
        params = aa.auto_augment_params(rng) if policy == "imagenet" else None
        ops = (aa.auto_augment_ops(params, 48, 48) if params
               else aa.draw_ops(policy, recording, 48, 48, aug.ra_magnitude))
        erase = erase_box(48, 48, 3, rng, aug)
        decision = TrainDecision(box, flip, ops, erase)
        assert _same_decision(decision, draw_decision(image.height, image.width, 48,
                                                      np.random.default_rng(seed), aug))
        monkeypatch.setattr(RandomResizedCrop, "get_params",
                            staticmethod(lambda img, scale, ratio, box=box: box))
        rand, randint = _Replay([0.0 if flip else 0.99, 0.0 if erase else 0.99]), _Replay(
            recording.drawn)
        monkeypatch.setattr(torch, "rand", rand)
        monkeypatch.setattr(torch, "randint", randint)
        if params:
            replayed = (params[0], torch.from_numpy(params[1]), torch.from_numpy(params[2]))
            monkeypatch.setattr(tva.AutoAugment, "get_params",
                                staticmethod(lambda n, drawn=replayed: drawn))
        if erase:
            chw = torch.from_numpy(np.asarray(erase.value)).reshape(-1, 1, 1)
            box_value = (erase.top, erase.left, erase.height, erase.width, chw)
            monkeypatch.setattr(RandomErasing, "get_params", staticmethod(
                lambda img, scale, ratio, value, drawn=box_value: drawn))
        theirs = preset(image).permute(1, 2, 0).numpy()
        monkeypatch.undo()
        assert not rand.values and not randint.values
        erased += erase is not None
        np.testing.assert_array_equal(apply_decision(image, decision, cfg), theirs)
    assert 0 < erased < 10


def test_settings_are_checked():
    for bad, match in [({"auto_augment": "augmix"}, "auto_augment"),
                       ({"ra_magnitude": 31}, "ra_magnitude"),
                       ({"ra_magnitude": 9.0}, "ra_magnitude"),
                       ({"random_erase": 1.5}, "random_erase"),
                       ({"random_erase": float("nan")}, "random_erase"),
                       ({"erase_value": "noise"}, "erase_value"),
                       ({"erase_value": float("inf")}, "erase_value")]:
        with pytest.raises(ValueError, match=match):
            Augmentation(**bad)
    lanczos = Preprocessing(resize_size=36, crop_size=32, interpolation="lanczos")
    with pytest.raises(ValueError, match="'lanczos'"):
        check_augmentation(lanczos, Augmentation(auto_augment="ta_wide"))
    check_augmentation(lanczos, Augmentation())  # a crop alone resizes with any filter
    with pytest.raises(ValueError, match="fill has 2 values"):
        aa.apply_op(_photo(0), aa.Op("Rotate", 10.0), "bilinear", fill=(1, 2))
