"""Building models by name: ``list_models``, ``create_model`` and one constructor per variant.

The constructors are thin, explicit functions (visible to IDEs, type checkers and ``help()``);
the architecture of each comes from the one table, ``models.variants.VARIANTS``. Like
torchvision's builders they take ``weights=`` for pretrained weights, and ``num_classes`` must
then agree with the weights; a local file goes in ``weights=`` or ``checkpoint=``, read as
:func:`resnext_flax.from_pretrained` reads it (``weights.pretrained.split_weights``).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypedDict

import jax.numpy as jnp
from flax import nnx

from resnext_flax.errors import WeightsError
from resnext_flax.models.resnet import ResNet
from resnext_flax.models.variants import VARIANTS, get_spec
from resnext_flax.weights.catalog import WeightSet
from resnext_flax.weights.pretrained import check_file_options, load_weight_set, split_weights

if TYPE_CHECKING:
    from typing_extensions import Unpack


class ModelOptions(TypedDict, total=False):
    """Keyword arguments of every constructor (see :func:`create_model`)."""

    weights: str | os.PathLike | WeightSet | None
    checkpoint: str | os.PathLike | None
    num_classes: int | None
    rngs: nnx.Rngs | None
    dtype: Any
    param_dtype: Any
    zero_init_residual: bool
    prefix: str | None
    ema: bool
    key: str | None
    trust_pickle: bool


def list_models(
    include: str | Iterable[str] | None = None, exclude: str | Iterable[str] | None = None
) -> list[str]:
    """torchvision names of the architectures this library builds, in table order.

    `include` / `exclude` are wildcard patterns (``"resnext*"``) or lists of them, as in
    ``torchvision.models.list_models``.
    """
    def patterns(value: str | Iterable[str] | None) -> list[str]:
        return [value] if isinstance(value, str) else list(value or [])

    names = list(VARIANTS)
    if include is not None:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns(include))]
    return [n for n in names if not any(fnmatch.fnmatch(n, p) for p in patterns(exclude))]


def create_model(
    name: str,
    *,
    weights: str | os.PathLike | WeightSet | None = None,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    rngs: nnx.Rngs | None = None,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    zero_init_residual: bool = False,
    prefix: str | None = None,
    ema: bool = False,
    key: str | None = None,
    trust_pickle: bool = False,
) -> ResNet:
    """Build the named architecture, with random weights or a published weight set.

    **Arguments:**
    - `name`: one of :func:`list_models` (torchvision's names).
    - `weights`: None for torchvision-style random initialization; a tag (``"DEFAULT"``,
      ``"IMAGENET1K_V2"``) or a :class:`WeightSet` for pretrained weights, or a local weight
      file (:func:`resnext_flax.from_pretrained`; the model comes back in eval mode, its
      ``pretrained_cfg`` recording the weight set; None with random weights).
    - `checkpoint`: a local weight file (torchvision, timm, Hugging Face..., or converted)
      loaded as the weight set `weights` (``DEFAULT`` when None), which fills in the class
      names and preprocessing the file lacks; `prefix`, `ema`, `key`, `trust_pickle` say how
      to read it (:func:`resnext_flax.load_model`).
    - `num_classes`: classifier size (default 1000); 0 builds a headless model whose output
      is the pooled features. With a weight set it must equal the weights' class count; with
      a local file, None keeps the file's head and N asks for an N-class one (a fresh head
      unless the file's has N).
    - `rngs`: random streams; ``nnx.Rngs(0)`` when omitted (deterministic).
    - `dtype`: compute dtype, e.g. ``jnp.bfloat16`` for mixed precision.
    - `param_dtype`: parameter dtype (float32 with `weights`).
    - `zero_init_residual`: zero-init the last BatchNorm of each block (random init only).
    """
    spec = get_spec(name)
    if weights is not None or checkpoint is not None:
        ws, path = split_weights(name, weights, checkpoint)
        if path is None and num_classes is not None and num_classes != ws.num_classes:
            raise WeightsError(
                f"num_classes={num_classes} conflicts with {ws.name}, which has "
                f"{ws.num_classes} classes; load it as is and call "
                "model.reset_classifier(num_classes) for a new head")
        if jnp.dtype(param_dtype) != jnp.float32:
            raise WeightsError("pretrained weights load as float32 parameters; use dtype= for "
                               "the compute dtype")
        return load_weight_set(ws, checkpoint=path, dtype=dtype, num_classes=num_classes,
                               prefix=prefix, ema=ema, key=key, trust_pickle=trust_pickle)
    check_file_options(prefix, ema, key, trust_pickle)
    model = ResNet(
        spec,
        num_classes=1000 if num_classes is None else num_classes,
        zero_init_residual=zero_init_residual,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs if rngs is not None else nnx.Rngs(0),
    )
    model.pretrained_cfg = None
    return model


def resnet18(**options: Unpack[ModelOptions]) -> ResNet:
    """ResNet-18 (torchvision's ``resnet18``); options as :func:`create_model`."""
    return create_model("resnet18", **options)


def resnet34(**options: Unpack[ModelOptions]) -> ResNet:
    """ResNet-34 (torchvision's ``resnet34``); options as :func:`create_model`."""
    return create_model("resnet34", **options)


def resnet50(**options: Unpack[ModelOptions]) -> ResNet:
    """ResNet-50 (torchvision's ``resnet50``, V1.5: stride in the 3x3 conv); options as
    :func:`create_model`."""
    return create_model("resnet50", **options)


def resnet101(**options: Unpack[ModelOptions]) -> ResNet:
    """ResNet-101 (torchvision's ``resnet101``); options as :func:`create_model`."""
    return create_model("resnet101", **options)


def resnet152(**options: Unpack[ModelOptions]) -> ResNet:
    """ResNet-152 (torchvision's ``resnet152``); options as :func:`create_model`."""
    return create_model("resnet152", **options)


def resnext50_32x4d(**options: Unpack[ModelOptions]) -> ResNet:
    """ResNeXt-50 32x4d (torchvision's ``resnext50_32x4d``): 32 groups of 4 channels in the
    first stage's 3x3 conv; options as :func:`create_model`."""
    return create_model("resnext50_32x4d", **options)


def resnext101_32x8d(**options: Unpack[ModelOptions]) -> ResNet:
    """ResNeXt-101 32x8d (torchvision's ``resnext101_32x8d``); options as
    :func:`create_model`."""
    return create_model("resnext101_32x8d", **options)


def resnext101_64x4d(**options: Unpack[ModelOptions]) -> ResNet:
    """ResNeXt-101 64x4d (torchvision's ``resnext101_64x4d``); options as
    :func:`create_model`."""
    return create_model("resnext101_64x4d", **options)


def resnext101_32x16d(**options: Unpack[ModelOptions]) -> ResNet:
    """ResNeXt-101 32x16d (``resnext101_32x16d``, the weakly supervised WSL model: torchvision's
    ResNeXt with ``width_per_group=16``, 194 M parameters); options as :func:`create_model`."""
    return create_model("resnext101_32x16d", **options)


def resnext101_32x32d(**options: Unpack[ModelOptions]) -> ResNet:
    """ResNeXt-101 32x32d (``resnext101_32x32d``, the weakly supervised WSL model:
    ``width_per_group=32``, 469 M parameters); options as :func:`create_model`."""
    return create_model("resnext101_32x32d", **options)


def resnext101_32x48d(**options: Unpack[ModelOptions]) -> ResNet:
    """ResNeXt-101 32x48d (``resnext101_32x48d``, the weakly supervised WSL model:
    ``width_per_group=48``, 828 M parameters, 3.3 GB of float32 weights); options as
    :func:`create_model`."""
    return create_model("resnext101_32x48d", **options)


def wide_resnet50_2(**options: Unpack[ModelOptions]) -> ResNet:
    """Wide ResNet-50-2 (torchvision's ``wide_resnet50_2``): twice the bottleneck width;
    options as :func:`create_model`."""
    return create_model("wide_resnet50_2", **options)


def wide_resnet101_2(**options: Unpack[ModelOptions]) -> ResNet:
    """Wide ResNet-101-2 (torchvision's ``wide_resnet101_2``); options as
    :func:`create_model`."""
    return create_model("wide_resnet101_2", **options)


#: name -> constructor, for code that iterates over the models.
CONSTRUCTORS = {fn.__name__: fn for fn in (
    resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d, resnext101_32x8d,
    resnext101_64x4d, resnext101_32x16d, resnext101_32x32d, resnext101_32x48d, wide_resnet50_2,
    wide_resnet101_2)}
assert tuple(CONSTRUCTORS) == tuple(VARIANTS), "one constructor per variant, in table order"
