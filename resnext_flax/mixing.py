"""MixUp and CutMix with ``torchvision.transforms.v2``'s semantics, as pure JAX functions.

torchvision's reference recipe mixes each batch with ``RandomChoice([MixUp(alpha=0.2),
CutMix(alpha=1.0)])``: one of the two per batch, each image paired with its predecessor in
the batch (the batch rolled by one), lambda drawn from Beta(alpha, alpha), CutMix's box
centred on a uniform pixel with sides ``sqrt(1 - lambda)`` of the image's and clipped to it,
and the label weight corrected to the clipped box's real area. Targets become soft
``(N, num_classes)`` vectors, for :func:`resnext_flax.training.cross_entropy`.

The random *decision* (which transform, lambda, the box) is drawn apart from applying it, so
a decision can be replayed in torchvision and compared, and the application is a pure,
jit-able function of arrays: :func:`draw_decision` (a JAX key, inside a jitted step) or
:func:`draw_decision_numpy` (a numpy Generator, on the host, with torchvision's float64 box
arithmetic), then :func:`apply_decision`; :func:`mix` does both. torchvision mixes each
process's batch (it runs in the DataLoader's collate function): to mix per-device groups of
a global batch, ``jax.vmap`` :func:`apply_decision` over a reshaped ``(groups, n, ...)``
batch with one decision per group.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@dataclasses.dataclass(frozen=True)
class MixConfig:
    """The reference's ``--mixup-alpha``, ``--cutmix-alpha`` and the class count.

    An alpha of 0 leaves that transform out (as the reference does); ``p`` weighs
    ``(mixup, cutmix)`` as ``RandomChoice(p=...)`` does (normalized; None: equal).
    """

    num_classes: int
    mixup_alpha: float = 0.2
    cutmix_alpha: float = 1.0
    p: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or \
                self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {self.num_classes!r}")
        for name in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not self.mixup_alpha and not self.cutmix_alpha:
            raise ValueError("mixup_alpha and cutmix_alpha are both 0: nothing to mix")
        if self.p is not None and (len(self.p) != 2 or not all(
                math.isfinite(v) and v >= 0 for v in self.p) or not sum(self.p)):
            raise ValueError(f"p must be two finite weights >= 0, not both 0, got {self.p!r}")

    @property
    def cutmix_probability(self) -> float:
        """The chance that a batch gets CutMix rather than MixUp."""
        if not self.mixup_alpha or not self.cutmix_alpha:
            return 0.0 if not self.cutmix_alpha else 1.0
        weights = self.p or (1.0, 1.0)
        return weights[1] / (weights[0] + weights[1])


@struct.dataclass
class MixDecision:
    """One batch's draw. ``lam`` and ``center`` (x, y) are the raw draws torchvision makes
    (``center`` only matters for CutMix); ``box`` (x1, y1, x2, y2, pasted from the paired
    image) and ``label_lam`` (the weight of an image's own label) follow from them."""

    cutmix: jax.Array
    lam: jax.Array
    center: jax.Array
    box: jax.Array
    label_lam: jax.Array


def cutmix_box(lam, center_x, center_y, height: int, width: int):
    """torchvision's box for a draw, and the label weight for its clipped area.

    Works on numpy float64 scalars (exactly torchvision's arithmetic) and on JAX arrays
    (float32: where ``r * size`` lies within float32 rounding of an integer, a side may
    differ by one pixel from the float64 result).
    """
    xp = jnp if isinstance(lam, jax.Array) else np
    r = 0.5 * xp.sqrt(1.0 - lam)
    half_w = xp.floor(r * width).astype(xp.int32)  # r >= 0: int() truncation is floor
    half_h = xp.floor(r * height).astype(xp.int32)
    x1 = xp.maximum(center_x - half_w, 0)
    y1 = xp.maximum(center_y - half_h, 0)
    x2 = xp.minimum(center_x + half_w, width)
    y2 = xp.minimum(center_y + half_h, height)
    area, total = (x2 - x1) * (y2 - y1), width * height
    # float64: torchvision's expression; float32: the exact integer ratio's quotient (XLA
    # may divide by a constant through its reciprocal: within an ulp or two of torchvision's).
    label_lam = 1.0 - area / total if xp is np else (total - area) / total
    return xp.stack([x1, y1, x2, y2]).astype(xp.int32), label_lam


def draw_decision(config: MixConfig, key: jax.Array, height: int, width: int) -> MixDecision:
    """A decision from a JAX key (jit-able; `height` and `width` static)."""
    k_choice, k_mix, k_cut, k_x, k_y = jax.random.split(key, 5)
    cutmix = jax.random.bernoulli(k_choice, config.cutmix_probability)
    lam_mix = _beta(k_mix, config.mixup_alpha)
    lam_cut = _beta(k_cut, config.cutmix_alpha)
    center = jnp.stack([jax.random.randint(k_x, (), 0, width),
                        jax.random.randint(k_y, (), 0, height)]).astype(jnp.int32)
    box, label_lam = cutmix_box(lam_cut, center[0], center[1], height, width)
    return MixDecision(
        cutmix=cutmix,
        lam=jnp.where(cutmix, lam_cut, lam_mix),
        center=jnp.where(cutmix, center, 0),
        box=jnp.where(cutmix, box, 0),
        label_lam=jnp.where(cutmix, label_lam, lam_mix).astype(jnp.float32),
    )


def draw_decision_numpy(config: MixConfig, rng: np.random.Generator, height: int,
                        width: int) -> MixDecision:
    """A decision from a numpy Generator, drawn in torchvision's order (the choice, then
    lambda, then the centre's x and y); lambda is rounded to float32 as torch samples it,
    and the box computed in float64 as torchvision does."""
    cutmix = bool(rng.random() < config.cutmix_probability)
    alpha = config.cutmix_alpha if cutmix else config.mixup_alpha
    lam = np.float64(np.float32(rng.beta(alpha, alpha)))
    if cutmix:
        center = np.array([rng.integers(width), rng.integers(height)], np.int32)
        box, label_lam = cutmix_box(lam, np.int64(center[0]), np.int64(center[1]), height,
                                    width)
    else:
        center, box, label_lam = np.zeros(2, np.int32), np.zeros(4, np.int32), lam
    return MixDecision(cutmix=np.bool_(cutmix), lam=np.float32(lam), center=center, box=box,
                       label_lam=np.float32(label_lam))


def apply_decision(decision: MixDecision, images: jax.Array, labels: jax.Array,
                   num_classes: int) -> tuple[jax.Array, jax.Array]:
    """Mix a batch: NHWC float images and labels (class indices ``(N,)`` or probabilities
    ``(N, num_classes)``) -> mixed images and ``(N, num_classes)`` float32 targets."""
    images = jnp.asarray(images)
    labels = jnp.asarray(labels)
    if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be a float NHWC batch, got shape {images.shape} and "
                         f"dtype {images.dtype}")
    targets = _targets(labels, images.shape[0], num_classes)
    rolled = jnp.roll(images, 1, axis=0)
    lam = decision.lam.astype(images.dtype)
    mixed = rolled * (1 - lam) + images * lam
    x1, y1, x2, y2 = (decision.box[i] for i in range(4))
    rows = jnp.arange(images.shape[1])[:, None]
    cols = jnp.arange(images.shape[2])[None, :]
    inside = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)
    cut = jnp.where(inside[None, :, :, None], rolled, images)
    label_lam = decision.label_lam.astype(jnp.float32)
    targets = jnp.roll(targets, 1, axis=0) * (1 - label_lam) + targets * label_lam
    return jnp.where(decision.cutmix, cut, mixed), targets


def mix(config: MixConfig, key: jax.Array, images: jax.Array,
        labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Draw a decision from `key` and apply it: one ``RandomChoice([MixUp, CutMix])``."""
    decision = draw_decision(config, key, images.shape[1], images.shape[2])
    return apply_decision(decision, images, labels, config.num_classes)


def _beta(key: jax.Array, alpha: float) -> jax.Array:
    # A disabled transform is never chosen; its lambda only has to be a number.
    return jax.random.beta(key, alpha, alpha) if alpha else jnp.ones((), jnp.float32)


def _targets(labels: jax.Array, batch: int, num_classes: int) -> jax.Array:
    """One-hot or probability targets, float32; shapes checked at trace time."""
    if labels.ndim == 1 and jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.shape[0] != batch:
            raise ValueError(f"{labels.shape[0]} labels for a batch of {batch} images")
        # Out-of-range labels would become zero rows: check them where batches come from
        # (resnext_flax.training.validate_labels).
        return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if labels.ndim == 2 and jnp.issubdtype(labels.dtype, jnp.floating):
        if labels.shape != (batch, num_classes):
            raise ValueError(f"probability labels must have shape {(batch, num_classes)}, "
                             f"got {labels.shape}")
        return labels.astype(jnp.float32)
    raise ValueError("labels must be class indices (N,) of an integer dtype or probabilities "
                     f"(N, num_classes) of a float dtype, got shape {labels.shape} and dtype "
                     f"{labels.dtype}")
