"""Published training recipes as :class:`~resnext_flax.finetuning.TrainConfig` settings.

``torchvision-v2`` is the command torchvision's classification reference ran for each model's
``IMAGENET1K_V2`` weights (``resnext101_64x4d``: its only weights, trained the same way). The
commands differ by model only in the FixRes crop (train at 176, evaluate at 224 after a resize
to 232) and the repeated-augmentation sampler; their global batch is 1024 (8 GPUs of 128),
which ``lr`` 0.5 goes with: a smaller global batch wants a proportionally smaller ``lr``.

A recipe is data: :func:`recipe_settings` gives the settings, :func:`recipe_config` the config
with the caller's overrides on top, and :func:`describe_config` the resolved settings as
printed at the start of ``resnext-flax train``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from resnext_flax.augment import Augmentation
from resnext_flax.errors import UnknownModelError
from resnext_flax.finetuning import TrainConfig

#: torchvision reference's ``train.py`` flags common to every V2 command, as config fields.
_TORCHVISION_V2 = MappingProxyType({
    "epochs": 600,
    "batch_size": 1024,
    "optimizer": "sgd",
    "lr": 0.5,
    "momentum": 0.9,
    "weight_decay": 2e-5,
    "norm_weight_decay": 0.0,
    "bias_weight_decay": None,  # no --bias-weight-decay: biases decay like weights
    "warmup_epochs": 5,
    "warmup_method": "linear",
    "warmup_decay": 0.01,
    "lr_min": 0.0,
    "schedule_unit": "epoch",
    "label_smoothing": 0.1,
    "mixup_alpha": 0.2,
    "cutmix_alpha": 1.0,
    "ema_steps": 32,
    "ema_decay": 0.99998,
    "resize_size": 232,
    "crop_size": 224,
    "auto_augment": "ta_wide",
    "random_erase": 0.1,
})
_FIXRES = MappingProxyType({"train_crop_size": 176})
_REPEATED = MappingProxyType({"train_crop_size": 176, "ra_reps": 4})

#: Per model: the weight set the recipe produced, its recipe link, and the settings beyond
#: the common ones.
_TORCHVISION_V2_MODELS = MappingProxyType({
    "resnet50": ("IMAGENET1K_V2",
                 "https://github.com/pytorch/vision/issues/3995#issuecomment-1013906621",
                 _REPEATED),
    "resnet101": ("IMAGENET1K_V2", "https://github.com/pytorch/vision/issues/3995#new-recipe",
                  {}),
    "resnet152": ("IMAGENET1K_V2", "https://github.com/pytorch/vision/issues/3995#new-recipe",
                  {}),
    "resnext50_32x4d": ("IMAGENET1K_V2",
                        "https://github.com/pytorch/vision/issues/3995#new-recipe", {}),
    "resnext101_32x8d": (
        "IMAGENET1K_V2", "https://github.com/pytorch/vision/issues/3995#new-recipe-with-fixres",
        _FIXRES),
    "resnext101_64x4d": ("IMAGENET1K_V1", "https://github.com/pytorch/vision/pull/5935",
                         _REPEATED),
    "wide_resnet50_2": (
        "IMAGENET1K_V2", "https://github.com/pytorch/vision/issues/3995#new-recipe-with-fixres",
        _FIXRES),
    "wide_resnet101_2": ("IMAGENET1K_V2",
                         "https://github.com/pytorch/vision/issues/3995#new-recipe", {}),
})

#: The recipes by name: each maps a model to (weight set, source, settings).
RECIPES = MappingProxyType({"torchvision-v2": _TORCHVISION_V2_MODELS})
_COMMON = MappingProxyType({"torchvision-v2": _TORCHVISION_V2})

#: Settings that belong to :class:`~resnext_flax.augment.Augmentation`, not the config.
_AUGMENTATION_FIELDS = frozenset(f.name for f in dataclasses.fields(Augmentation))


def recipe_models(recipe: str) -> tuple[str, ...]:
    """The models `recipe` gives settings for."""
    return tuple(_recipe(recipe))


def recipe_source(recipe: str, model: str) -> tuple[str, str]:
    """(the weight-set tag the recipe produced for `model`, the link to its command)."""
    tag, source, _ = _entry(recipe, model)
    return tag, source


def recipe_settings(recipe: str, model: str) -> dict[str, Any]:
    """The settings `recipe` trains `model` with, by config (or augmentation) field."""
    _, _, extra = _entry(recipe, model)
    return {**_COMMON[recipe], **extra}


def recipe_config(recipe: str | None, model: str, **overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` of `recipe` for `model` (None: TrainConfig's defaults), with
    `overrides` (config or augmentation fields) on top; unknown names are an error naming
    them."""
    settings = {**(recipe_settings(recipe, model) if recipe else {}), **overrides}
    known = {f.name for f in dataclasses.fields(TrainConfig)} | _AUGMENTATION_FIELDS
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
    augmentation = {k: settings.pop(k) for k in list(settings) if k in _AUGMENTATION_FIELDS}
    base = settings.pop("augmentation", Augmentation())
    return TrainConfig(model=model, augmentation=dataclasses.replace(base, **augmentation),
                       **settings)


def describe_config(config: TrainConfig, recipe: str | None = None,
                    overrides: Mapping[str, Any] | None = None) -> str:
    """The resolved settings, one per line, marking those the caller set over the recipe."""
    overrides = overrides or {}
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.name != "augmentation"}
    values.update({f"augmentation.{f.name}": getattr(config.augmentation, f.name)
                   for f in dataclasses.fields(config.augmentation)})
    header = f"recipe {recipe} for {config.model}" if recipe else f"settings for {config.model}"
    if recipe:
        tag, source = recipe_source(recipe, config.model)
        header += f" ({config.model}.{tag}: {source})"
    width = max(len(name) for name in values)
    lines = [header + ":"]
    for name, value in values.items():
        mark = "  (set)" if name.split(".")[-1] in overrides else ""
        lines.append(f"  {name:<{width}}  {value!r}{mark}")
    return "\n".join(lines)


def _recipe(recipe: str) -> Mapping[str, Any]:
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    return RECIPES[recipe]


def _entry(recipe: str, model: str) -> tuple[str, str, Mapping[str, Any]]:
    models = _recipe(recipe)
    if model not in models:
        raise UnknownModelError(f"recipe {recipe!r} has no settings for {model!r}; it covers "
                                f"{', '.join(models)}")
    return models[model]
