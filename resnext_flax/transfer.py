"""Transfer learning: features from a pretrained backbone, and a new classifier head.

:class:`FeatureExtractor` compiles ``forward_features`` the way :class:`~resnext_flax.Predictor`
compiles the classifier (one pure jitted function of the split state); :func:`replace_head`
swaps the ``fc`` layer for a freshly initialized one of another size, keeping every backbone
weight and BatchNorm statistic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnext_flax.inference import pure_forward
from resnext_flax.layers import linear_bias_init, linear_kernel_init
from resnext_flax.model import FEATURE_NAMES, ResNet


class FeatureExtractor:
    """Jit-compiled intermediate outputs of a model (eval mode), one program per input shape.

    **Arguments:**
    - `model`: a :class:`~resnext_flax.ResNet` (e.g. from ``from_pretrained``).
    - `names`: which of ``FEATURE_NAMES`` to return (``"stem"``, ``"layer1"``..``"layer4"``
      NHWC maps; ``"pre_logits"``, the pooled (N, num_features) embedding).
    """

    def __init__(self, model: ResNet, names: Sequence[str] = ("pre_logits",)):
        unknown = [n for n in names if n not in FEATURE_NAMES]
        if unknown or not names:
            raise ValueError(
                f"unknown feature names {unknown}; choose from {', '.join(FEATURE_NAMES)}"
            )
        self.names = tuple(names)
        fn, self.variables = pure_forward(model, "forward_features")

        def run(variables: Any, images: jax.Array) -> dict[str, jax.Array]:
            features = fn(variables, images)
            return {name: features[name] for name in self.names}

        self._run = jax.jit(run)

    def __call__(self, images: Any) -> dict[str, np.ndarray]:
        """Features of preprocessed NHWC float images, keyed by name."""
        features = self._run(self.variables, jnp.asarray(images))
        return {name: np.asarray(value) for name, value in jax.device_get(features).items()}

    def embed(self, images: Any) -> np.ndarray:
        """The pooled pre-logits embedding (N, num_features), e.g. for a linear probe."""
        if "pre_logits" not in self.names:
            raise ValueError("this extractor was built without 'pre_logits' in names")
        return self(images)["pre_logits"]


def replace_head(model: ResNet, num_classes: int, *, rngs: nnx.Rngs) -> ResNet:
    """Give `model` a new ``fc`` for `num_classes` classes, initialized like torch's
    ``nn.Linear`` (kernel and bias uniform(+-1/sqrt(num_features))), as torchvision's
    fine-tuning recipes do with ``model.fc = nn.Linear(...)``. Every other weight and BN
    statistic is kept. Modifies `model` in place and returns it."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    in_features = model.num_features
    model.fc = nnx.Linear(
        in_features,
        num_classes,
        kernel_init=linear_kernel_init,
        bias_init=linear_bias_init(in_features),
        dtype=model.dtype,
        param_dtype=model.fc.kernel.get_value().dtype,
        rngs=rngs,
    )
    model.num_classes = num_classes
    return model
