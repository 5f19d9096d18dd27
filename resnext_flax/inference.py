"""Jit-compiled inference: classify images (:class:`Predictor`) and extract features
(:class:`FeatureExtractor`).

Both run a model through the program every wrapper of an equal model shares
(``models.programs.forward_program``): a second wrapper of the same model, or of a model of the
same architecture, mode and conv policy loaded again, compiles nothing for the shapes the
first one ran. Batches are zero-padded to a few sizes (:func:`batch_bucket`), so a new batch
size compiles once per bucket rather than once per size.

The forward function is a constructor argument of :class:`Predictor`, so an optimized forward
(e.g. BatchNorm folded into the convolutions) drops in without touching the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnext_flax.metadata import Preprocessing, PretrainedCfg, class_names, pretrained_cfg
from resnext_flax.models.folding import check_not_optimized, optimize_for_inference
from resnext_flax.models.functional import CompiledModel, pure_forward
from resnext_flax.models.programs import ModuleForward, eval_split
from resnext_flax.models.resnet import FEATURE_NAMES, ResNet, check_input
from resnext_flax.nn.policy import ConvPolicy
from resnext_flax.preprocess import ImageInput, image_list, preprocess, preprocessing_config
from resnext_flax.weights.catalog import WeightSet
from resnext_flax.weights.pretrained import from_pretrained

#: A pure forward function: ``apply_fn(variables, images NHWC float) -> logits (N, C)``.
ApplyFn = Callable[[Any, jax.Array], jax.Array]

#: Batches up to this size are padded to the next power of two, larger ones to a multiple of it.
_BUCKET_STEP = 64


def batch_bucket(n: int) -> int:
    """The batch size `n` images are padded to: the next power of two up to 64 (1, 2, 4, ...,
    64), then the next multiple of 64. At most twice the work, and a handful of compiled
    programs for every batch size a service sees."""
    if n <= _BUCKET_STEP:
        return 1 << max(n - 1, 0).bit_length()
    return -(-n // _BUCKET_STEP) * _BUCKET_STEP


def _pad_rows(images: Any, size: int) -> jax.Array:
    """`images` with zero images appended up to `size` rows, as a device array; padded on the
    host, so a new batch size compiles nothing for its padding."""
    missing = size - images.shape[0]
    if missing <= 0:
        return jnp.asarray(images)
    images = np.asarray(images)
    return jnp.asarray(np.concatenate([images, np.zeros((missing, *images.shape[1:]),
                                                        images.dtype)]))


def _compiled(apply_fn: ApplyFn) -> ApplyFn:
    """`apply_fn` compiled: a model's forward through the program its other wrappers share,
    any other function jitted on its own."""
    if isinstance(apply_fn, ModuleForward):
        return apply_fn.compiled
    return jax.jit(apply_fn)


@functools.partial(jax.jit, static_argnums=1)
def _top_k(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    logits = logits.astype(jnp.float32)
    top_p, top_i = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), min(k, logits.shape[-1]))
    return logits, top_p, top_i


@dataclasses.dataclass(frozen=True)
class Predictions:
    """Top-k results for a batch: `indices` and `probabilities` are (N, k), best first;
    `labels` holds the category names of `indices`; `logits` is the full (N, C) output."""

    logits: np.ndarray
    probabilities: np.ndarray
    indices: np.ndarray
    labels: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def finite(self) -> np.ndarray:
        """Per image, whether its logits are all finite (NaN/Inf in an image or in the weights
        makes every probability meaningless)."""
        return np.isfinite(self.logits).all(axis=-1)

    def top(self, i: int) -> list[tuple[str, float]]:
        """``[(label, probability), ...]`` for image `i`, best first; a ValueError if its
        logits are not finite (there is no top class then)."""
        if not self.finite[i]:
            raise ValueError(f"image {i}: non-finite logits (NaN or Inf in the image or in the "
                             "weights); no class can be reported")
        return [(label, float(p)) for label, p in zip(self.labels[i], self.probabilities[i],
                                                     strict=True)]


class Predictor:
    """Classify images with a jit-compiled forward pass.

    **Arguments:**
    - `apply_fn`: pure ``apply_fn(variables, images) -> logits``; see :func:`pure_forward`.
      Any function of that shape works, e.g. an inference-optimized (BN-folded) forward; a
      model that is itself a callable pytree runs as ``Predictor(lambda m, x: m(x), folded)``.
    - `variables`: the pytree `apply_fn` takes (an ``nnx.State`` for :meth:`from_model`).
    - `categories`: class names; ``"class <i>"`` for classes without one.
    - `preprocessing`: used by :meth:`classify` for raw images (ImageNet's 256/224 if omitted).
    - `top_k`: how many classes to report (clamped to the class count).
    - `batch_size`: :meth:`classify` runs batches of this size; the last one is padded, so one
      compiled program serves every batch.
    - `pad_batches`: pad each batch to its :func:`batch_bucket`, at most to `batch_size` (zero
      images, dropped from the result), so new batch sizes reuse a compiled program; False runs
      each size as it is. By default on for a model's forward (:meth:`from_model`, whose rows
      are independent in eval mode) and off for other functions, which may mix rows.

    Use :meth:`from_model` or :meth:`from_pretrained` to build one from a model.
    """

    def __init__(
        self,
        apply_fn: ApplyFn,
        variables: Any,
        *,
        categories: Sequence[str] | None = None,
        preprocessing: Preprocessing | WeightSet | PretrainedCfg | None = None,
        top_k: int = 5,
        batch_size: int = 16,
        pad_batches: bool | None = None,
    ):
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.variables = variables
        self.categories = tuple(categories) if categories is not None else None
        self.preprocessing = preprocessing_config(preprocessing)
        self.top_k = top_k
        self.batch_size = batch_size
        self.pad_batches = isinstance(apply_fn, ModuleForward) if pad_batches is None \
            else pad_batches
        self.apply_fn = apply_fn
        self._forward = _compiled(apply_fn)

    @classmethod
    def from_model(
        cls,
        model: nnx.Module,
        *,
        categories: Sequence[str] | None = None,
        preprocessing: Preprocessing | WeightSet | PretrainedCfg | None = None,
        top_k: int = 5,
        batch_size: int = 16,
        pad_batches: bool = True,
        policy: ConvPolicy | None = None,
    ) -> Predictor:
        """A predictor over `model`'s current weights, run in eval mode (BatchNorm on running
        statistics); the model object is not modified. `categories` and `preprocessing`
        default to what the model's ``pretrained_cfg`` records. With a `policy`, the
        predictor runs ``optimize_for_inference(model, policy=policy)`` instead (BatchNorm
        folded, fused)."""
        module = _optimized(model, policy)
        if getattr(module, "num_classes", None) == 0:
            raise ValueError("a headless model (num_classes=0) outputs pooled features, not "
                             "classes: load it with num_classes=N, or use FeatureExtractor")
        if categories is None:
            categories = class_names(module)
        if preprocessing is None:
            preprocessing = pretrained_cfg(module)
        fn, state = pure_forward(module)
        return cls(fn, state, categories=categories, preprocessing=preprocessing,
                   top_k=top_k, batch_size=batch_size, pad_batches=pad_batches)

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        weights: str | WeightSet = "DEFAULT",
        *,
        checkpoint: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
        top_k: int = 5,
        batch_size: int = 16,
        pad_batches: bool = True,
        policy: ConvPolicy | None = None,
    ) -> Predictor:
        """A predictor for torchvision's pretrained `name` with its weight set's preprocessing
        and category names (see :func:`resnext_flax.from_pretrained`). A `checkpoint` that
        records class names and preprocessing (fine-tuned, converted, a Hugging Face folder)
        uses those instead: both are read from the model's ``pretrained_cfg``."""
        model = from_pretrained(name, weights, checkpoint=checkpoint, cache_dir=cache_dir,
                                progress=progress)
        return cls.from_model(model, top_k=top_k, batch_size=batch_size,
                              pad_batches=pad_batches, policy=policy)

    def _label(self, index: int) -> str:
        if self.categories is not None and index < len(self.categories):
            return self.categories[index]
        return f"class {index}"

    def __call__(self, images: Any) -> Predictions:
        """Predict on preprocessed NHWC float images (one compiled program per shape, or per
        :func:`batch_bucket` with `pad_batches`)."""
        check_input(images, hint="; raw images go through Predictor.classify")
        n = images.shape[0]
        # Padded (never beyond the batch size the caller chose) into one kind of argument, a
        # device array, so numpy and jax inputs share one compilation.
        size = min(batch_bucket(n), max(n, self.batch_size)) if self.pad_batches else n
        images = _pad_rows(images, size)
        logits = self._forward(self.variables, images)
        logits, top_p, top_i = (a[:n] for a in jax.device_get(_top_k(logits, self.top_k)))
        labels = tuple(tuple(self._label(int(i)) for i in row) for row in top_i)
        return Predictions(np.asarray(logits), np.asarray(top_p), np.asarray(top_i), labels)

    def classify(self, images: ImageInput | Sequence[ImageInput]) -> Predictions:
        """Preprocess raw images (PIL, paths, uint8 arrays) and predict, `batch_size` at a
        time (so memory stays bounded); a short last batch is zero-padded to `batch_size` so
        it reuses the compiled program, and a single batch runs at its bucket size
        (`pad_batches`)."""
        items = image_list(images)
        if len(items) <= self.batch_size:
            return self(preprocess(items, self.preprocessing))
        parts = []
        for start in range(0, len(items), self.batch_size):
            chunk = preprocess(items[start:start + self.batch_size], self.preprocessing)
            n = len(chunk)
            if n < self.batch_size:
                chunk = np.concatenate([chunk, np.zeros((self.batch_size - n, *chunk.shape[1:]),
                                                        chunk.dtype)])
            out = self(chunk)
            parts.append(Predictions(out.logits[:n], out.probabilities[:n], out.indices[:n],
                                     out.labels[:n]))
        return Predictions(
            np.concatenate([p.logits for p in parts]),
            np.concatenate([p.probabilities for p in parts]),
            np.concatenate([p.indices for p in parts]),
            tuple(label for p in parts for label in p.labels),
        )


class FeatureExtractor:
    """Jit-compiled intermediate outputs of a model (eval mode), one program per input shape.

    **Arguments:**
    - `model`: a :class:`~resnext_flax.ResNet` (e.g. from ``from_pretrained``).
    - `names`: which of ``FEATURE_NAMES`` to return (``"stem"``, ``"layer1"``..``"layer4"``
      NHWC maps; ``"pre_logits"``, the pooled (N, num_features) embedding).
    - `policy`: run ``optimize_for_inference(model, policy=policy)`` instead of `model` as is.
    - `pad_batches`: pad every batch to its :func:`batch_bucket` (see :class:`Predictor`).
    """

    def __init__(self, model: ResNet, names: Sequence[str] = ("pre_logits",), *,
                 policy: ConvPolicy | None = None, pad_batches: bool = True):
        unknown = [n for n in names if n not in FEATURE_NAMES]
        if unknown or not names:
            raise ValueError(
                f"unknown feature names {unknown}; choose from {', '.join(FEATURE_NAMES)}"
            )
        self.names = tuple(names)
        self.pad_batches = pad_batches
        graphdef, self.variables = eval_split(_optimized(model, policy))
        self._forward = ModuleForward(graphdef, "forward_features", self.names).compiled

    def __call__(self, images: Any) -> dict[str, np.ndarray]:
        """Features of preprocessed NHWC float images, keyed by name."""
        check_input(images)
        n = images.shape[0]
        images = _pad_rows(images, batch_bucket(n) if self.pad_batches else n)
        features = jax.device_get(self._forward(self.variables, images))
        return {name: np.asarray(value)[:n] for name, value in features.items()}

    def embed(self, images: Any) -> np.ndarray:
        """The pooled pre-logits embedding (N, num_features), e.g. for a linear probe."""
        if "pre_logits" not in self.names:
            raise ValueError("this extractor was built without 'pre_logits' in names")
        return self(images)["pre_logits"]


def _optimized(model: nnx.Module | CompiledModel, policy: ConvPolicy | None) -> nnx.Module:
    """`model`, or its inference-optimized module under `policy`; an already optimized model
    (``optimize_for_inference``'s result) as it is."""
    if isinstance(model, CompiledModel):
        if policy is not None:
            check_not_optimized(model, "policy=")
        return model.module()
    return model if policy is None else optimize_for_inference(model, policy=policy).module()
