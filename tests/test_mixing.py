"""MixUp/CutMix against ``torchvision.transforms.v2`` on the same inputs and the same draws:
torchvision's random draws (Beta's sample, ``torch.randint`` for the box centre and
``torch.multinomial`` for RandomChoice) are replaced by the library's decision, then images
and targets are compared; and the soft-target loss against ``torch.nn.CrossEntropyLoss``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from classification_reference import get_mixup_cutmix, replaying
from torch_reference import relative_error, to_nchw

from resnext_flax import mixing, training

NUM_CLASSES = 7
BATCH, HEIGHT, WIDTH = 5, 13, 17  # H != W: a swapped axis shows


def _batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((BATCH, HEIGHT, WIDTH, 3)).astype(np.float32)
    return images, rng.integers(0, NUM_CLASSES, BATCH)


def _torchvision(decision: mixing.MixDecision, images, labels, config: mixing.MixConfig):
    """The reference's ``RandomChoice`` over the transforms whose alpha is > 0, replaying
    `decision`."""
    choice = get_mixup_cutmix(mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha,
                              num_classes=NUM_CLASSES)
    with replaying(choice, decision, HEIGHT, WIDTH):
        out, targets = choice(to_nchw(images), torch.from_numpy(labels))
    return out.numpy().transpose(0, 2, 3, 1), targets.numpy()


def _decisions(config: mixing.MixConfig, count: int):
    """Decisions from both drawers, both transforms among them."""
    rng = np.random.default_rng(3)
    keys = jax.random.split(jax.random.key(3), count)
    draw = jax.jit(mixing.draw_decision, static_argnums=(0, 2, 3))
    out = [mixing.draw_decision_numpy(config, rng, HEIGHT, WIDTH) for _ in range(count)]
    out += [jax.tree.map(np.asarray, draw(config, k, HEIGHT, WIDTH)) for k in keys]
    return out


@pytest.mark.parametrize("config", [
    mixing.MixConfig(NUM_CLASSES),
    mixing.MixConfig(NUM_CLASSES, mixup_alpha=0.0),
    mixing.MixConfig(NUM_CLASSES, cutmix_alpha=0.0),
], ids=["both", "cutmix", "mixup"])
def test_same_decision_same_images_and_targets_as_torchvision(config):
    images, labels = _batch()
    apply = jax.jit(mixing.apply_decision, static_argnums=3)
    decisions = _decisions(config, 12)
    kinds = {bool(d.cutmix) for d in decisions}
    assert kinds == {True, False} if config.mixup_alpha and config.cutmix_alpha else len(kinds)
    for decision in decisions:
        expected_images, expected_targets = _torchvision(decision, images, labels, config)
        got_images, got_targets = apply(decision, images, labels, NUM_CLASSES)
        if bool(decision.cutmix):  # a copy, not arithmetic: exact
            np.testing.assert_array_equal(got_images, expected_images)
        else:
            assert relative_error(got_images, expected_images) < 1e-6
        np.testing.assert_allclose(got_targets, expected_targets, rtol=1e-6, atol=1e-7)
        assert got_targets.shape == (BATCH, NUM_CLASSES)
        np.testing.assert_allclose(got_targets.sum(1), 1.0, rtol=1e-6)


def test_a_cut_box_clipped_at_the_border_corrects_lambda():
    """A centre in the corner: the box is clipped and the label weight follows the area that
    was really pasted, not lambda."""
    config = mixing.MixConfig(NUM_CLASSES, mixup_alpha=0.0)
    lam = np.float64(np.float32(0.3))
    box, label_lam = mixing.cutmix_box(lam, np.int64(0), np.int64(HEIGHT - 1), HEIGHT, WIDTH)
    assert box[0] == 0 and box[3] == HEIGHT and label_lam > lam
    decision = mixing.MixDecision(cutmix=np.bool_(True), lam=np.float32(lam),
                                  center=np.array([0, HEIGHT - 1], np.int32), box=box,
                                  label_lam=np.float32(label_lam))
    images, labels = _batch(1)
    expected = _torchvision(decision, images, labels, config)
    got = mixing.apply_decision(decision, images, labels, NUM_CLASSES)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-6, atol=1e-7)


def test_the_float32_box_equals_torchvisions_float64_box():
    """The jit-able drawer computes the box in float32; on these draws it equals
    torchvision's float64 arithmetic for the same lambda and centre."""
    config = mixing.MixConfig(NUM_CLASSES, mixup_alpha=0.0)
    height, width = 224, 176
    draw = jax.jit(jax.vmap(lambda k: mixing.draw_decision(config, k, height, width)))
    decisions = jax.tree.map(np.asarray, draw(jax.random.split(jax.random.key(0), 2000)))
    for lam, (x, y), box, label_lam in zip(decisions.lam, decisions.center, decisions.box,
                                           decisions.label_lam, strict=True):
        box64, label_lam64 = mixing.cutmix_box(np.float64(lam), np.int64(x), np.int64(y),
                                               height, width)
        np.testing.assert_array_equal(box, box64)
        assert abs(label_lam - label_lam64) < 1e-6


def test_draws_follow_the_configured_distributions():
    """RandomChoice's weights and Beta(alpha, alpha)'s mean and variance, for both drawers."""
    config = mixing.MixConfig(NUM_CLASSES, p=(1.0, 3.0))
    assert config.cutmix_probability == 0.75
    draw = jax.jit(jax.vmap(lambda k: mixing.draw_decision(config, k, 32, 32)))
    ours = jax.tree.map(np.asarray, draw(jax.random.split(jax.random.key(1), 4000)))
    rng = np.random.default_rng(1)
    host = [mixing.draw_decision_numpy(config, rng, 32, 32) for _ in range(4000)]
    for cutmix, lam in [(ours.cutmix, ours.lam),
                        (np.array([d.cutmix for d in host]), np.array([d.lam for d in host]))]:
        assert abs(cutmix.mean() - 0.75) < 0.03
        for chosen, alpha in [(cutmix, 1.0), (~cutmix, 0.2)]:
            sample = lam[chosen]
            assert abs(sample.mean() - 0.5) < 0.05
            assert abs(sample.var() - 1 / (4 * (2 * alpha + 1))) < 0.02


def test_groups_mix_independently_under_vmap():
    """Mixing per device (torchvision mixes each process's batch): vmap over groups equals
    mixing each group alone, pairs never crossing a group."""
    config = mixing.MixConfig(NUM_CLASSES)
    rng = np.random.default_rng(2)
    images = rng.standard_normal((2, 4, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, (2, 4))
    decisions = jax.vmap(lambda k: mixing.draw_decision(config, k, 8, 8))(
        jax.random.split(jax.random.key(5), 2))
    grouped = jax.vmap(mixing.apply_decision, in_axes=(0, 0, 0, None))(
        decisions, images, labels, NUM_CLASSES)
    for g in range(2):
        alone = mixing.apply_decision(jax.tree.map(lambda v, g=g: v[g], decisions), images[g],
                                      labels[g], NUM_CLASSES)
        np.testing.assert_array_equal(grouped[0][g], alone[0])
        np.testing.assert_array_equal(grouped[1][g], alone[1])


def test_mix_is_jittable_and_draws_from_its_key():
    config = mixing.MixConfig(NUM_CLASSES)
    images, labels = _batch()
    run = jax.jit(mixing.mix, static_argnums=0)
    first = run(config, jax.random.key(0), images, labels)
    np.testing.assert_array_equal(first[0], run(config, jax.random.key(0), images, labels)[0])
    assert not np.array_equal(first[0], run(config, jax.random.key(1), images, labels)[0])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_target_cross_entropy_matches_torch(smoothing: float):
    """The reference's criterion on mixed targets: CrossEntropyLoss(label_smoothing=0.1)
    with probability targets."""
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((BATCH, NUM_CLASSES)) * 3).astype(np.float32)
    images, labels = _batch()
    decision = mixing.draw_decision(mixing.MixConfig(NUM_CLASSES), jax.random.key(2), HEIGHT,
                                    WIDTH)
    _, targets = mixing.apply_decision(decision, images, labels, NUM_CLASSES)
    expected = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)(
        torch.from_numpy(logits), torch.from_numpy(np.asarray(targets))).item()
    got = float(training.cross_entropy(jnp.asarray(logits), targets, label_smoothing=smoothing))
    assert abs(got - expected) <= 1e-6 * abs(expected)
    with pytest.raises(ValueError, match="logits' shape"):
        training.cross_entropy(jnp.asarray(logits), targets[:, :3])


@pytest.mark.parametrize("kwargs, message", [
    ({"num_classes": 0}, "num_classes must be a positive integer"),
    ({"num_classes": 3, "mixup_alpha": -1.0}, "mixup_alpha must be a finite number >= 0"),
    ({"num_classes": 3, "cutmix_alpha": float("nan")}, "cutmix_alpha must be a finite"),
    ({"num_classes": 3, "mixup_alpha": 0.0, "cutmix_alpha": 0.0}, "nothing to mix"),
    ({"num_classes": 3, "p": (0.0, 0.0)}, "p must be two finite weights"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mixing.MixConfig(**kwargs)


def test_bad_batches_are_refused():
    config = mixing.MixConfig(NUM_CLASSES)
    images, labels = _batch()
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="float NHWC batch"):
        mixing.mix(config, key, images.astype(np.uint8), labels)
    with pytest.raises(ValueError, match="4 labels for a batch of 5"):
        mixing.mix(config, key, images, labels[:4])
    with pytest.raises(ValueError, match="class indices"):
        mixing.mix(config, key, images, labels[:, None])
    with pytest.raises(ValueError, match="probability labels must have shape"):
        mixing.mix(config, key, images, np.ones((BATCH, 3), np.float32))
