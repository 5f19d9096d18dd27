"""The published recipes against the commands torchvision's reference ran, and
``resnext-flax train``'s options over them."""

from __future__ import annotations

import argparse
import dataclasses
import shlex

import pytest

from resnext_flax import cli
from resnext_flax.cli import train as train_command
from resnext_flax.errors import UnknownModelError
from resnext_flax.finetuning import TrainConfig
from resnext_flax.recipes import (
    RECIPES,
    describe_config,
    recipe_config,
    recipe_models,
    recipe_settings,
    recipe_source,
)

# The commands as torchvision's reference documents them for each V2 weight set (8 GPUs of
# 128: a global batch of 1024); the data path and launcher are left out.
_COMMON = ("--batch-size 128 --lr 0.5 --lr-scheduler cosineannealinglr --lr-warmup-epochs 5 "
           "--lr-warmup-method linear --auto-augment ta_wide --epochs 600 --random-erase 0.1 "
           "--weight-decay 0.00002 --norm-weight-decay 0.0 --label-smoothing 0.1 "
           "--mixup-alpha 0.2 --cutmix-alpha 1.0 --model-ema --val-resize-size 232")
_FIXRES = " --train-crop-size 176"
_RA = " --train-crop-size 176 --ra-sampler --ra-reps 4"
PUBLISHED = {
    "resnet50": _COMMON + _RA,
    "resnet101": _COMMON,
    "resnet152": _COMMON,
    "resnext50_32x4d": _COMMON,
    "resnext101_32x8d": _COMMON + _FIXRES,
    "resnext101_64x4d": _COMMON + _RA,
    "wide_resnet50_2": _COMMON + _FIXRES,
    "wide_resnet101_2": _COMMON,
}


def reference_args(command: str) -> argparse.Namespace:
    """torchvision reference train.py's parser, for the flags the commands use, with its
    defaults."""
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--opt", default="sgd")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--norm-weight-decay", type=float, default=None)
    p.add_argument("--bias-weight-decay", type=float, default=None)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--mixup-alpha", type=float, default=0.0)
    p.add_argument("--cutmix-alpha", type=float, default=0.0)
    p.add_argument("--lr-scheduler", default="steplr")
    p.add_argument("--lr-warmup-epochs", type=int, default=0)
    p.add_argument("--lr-warmup-method", default="constant")
    p.add_argument("--lr-warmup-decay", type=float, default=0.01)
    p.add_argument("--lr-min", type=float, default=0.0)
    p.add_argument("--auto-augment", default=None)
    p.add_argument("--ra-magnitude", type=int, default=9)
    p.add_argument("--random-erase", type=float, default=0.0)
    p.add_argument("--model-ema", action="store_true")
    p.add_argument("--model-ema-steps", type=int, default=32)
    p.add_argument("--model-ema-decay", type=float, default=0.99998)
    p.add_argument("--val-resize-size", type=int, default=256)
    p.add_argument("--val-crop-size", type=int, default=224)
    p.add_argument("--train-crop-size", type=int, default=224)
    p.add_argument("--ra-sampler", action="store_true")
    p.add_argument("--ra-reps", type=int, default=3)
    p.add_argument("--clip-grad-norm", type=float, default=None)
    return p.parse_args(shlex.split(command))


def expected_config(model: str, gpus: int = 8) -> dict:
    a = reference_args(PUBLISHED[model])
    assert a.lr_scheduler == "cosineannealinglr"
    return {
        "epochs": a.epochs, "batch_size": a.batch_size * gpus, "optimizer": a.opt,
        "lr": a.lr, "momentum": a.momentum, "weight_decay": a.weight_decay,
        "norm_weight_decay": a.norm_weight_decay, "bias_weight_decay": a.bias_weight_decay,
        "label_smoothing": a.label_smoothing, "mixup_alpha": a.mixup_alpha,
        "cutmix_alpha": a.cutmix_alpha, "warmup_epochs": a.lr_warmup_epochs,
        "warmup_method": a.lr_warmup_method, "warmup_decay": a.lr_warmup_decay,
        "lr_min": a.lr_min, "schedule_unit": "epoch",
        "ema_steps": a.model_ema_steps if a.model_ema else 0,
        "ema_decay": a.model_ema_decay, "resize_size": a.val_resize_size,
        "crop_size": a.val_crop_size,
        "train_crop_size": None if a.train_crop_size == a.val_crop_size else a.train_crop_size,
        "ra_reps": a.ra_reps if a.ra_sampler else 1, "clip_grad_norm": a.clip_grad_norm,
        "augmentation.auto_augment": a.auto_augment,
        "augmentation.ra_magnitude": a.ra_magnitude,
        "augmentation.random_erase": a.random_erase,
    }


def resolved(config: TrainConfig) -> dict:
    out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    out.update({f"augmentation.{f.name}": getattr(config.augmentation, f.name)
                for f in dataclasses.fields(config.augmentation)})
    return out


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_torchvision_v2_is_the_published_command(model):
    config = resolved(recipe_config("torchvision-v2", model))
    expected = expected_config(model)
    assert {k: config[k] for k in expected} == expected
    tag, source = recipe_source("torchvision-v2", model)
    assert source.startswith("https://github.com/pytorch/vision/")
    from resnext_flax.weights.catalog import get_weight_set

    weight_set = get_weight_set(model, tag)  # the recipe names weights the catalog holds,
    assert weight_set.recipe == source  # and the same link
    assert (weight_set.preprocessing.resize_size, weight_set.preprocessing.crop_size) == (
        expected["resize_size"], expected["crop_size"])


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_the_published_command_given_to_train_is_the_recipe(model):
    """torchvision's command carries over as written; only ``-b`` differs: here it is the
    global batch (8 GPUs of 128 in the reference)."""
    args = train_command.train_parser().parse_args(
        ["data", "--model", model, *shlex.split(PUBLISHED[model])])
    ours = resolved(train_command.config_from_args(args))
    recipe = resolved(recipe_config("torchvision-v2", model))
    assert (ours.pop("batch_size"), recipe.pop("batch_size")) == (128, 1024)
    # No --val-crop-size: the weights' crop, 224 for every V2 set (and the default).
    assert ours.pop("crop_size") is None and recipe.pop("crop_size") == 224
    assert ours == recipe


def test_switches_keep_a_recipes_values_and_an_explicit_zero():
    parse = train_command.train_parser().parse_args
    args = parse(["data", "--model", "resnet50", "--recipe", "torchvision-v2", "--ra-sampler",
                  "--model-ema"])
    config = train_command.config_from_args(args)
    assert (config.ra_reps, config.ema_steps) == (4, 32)  # the recipe's, not 3 and 32
    config = train_command.config_from_args(parse(["data", "--model", "resnet50",
                                                   "--model-ema", "--model-ema-steps", "0",
                                                   "--ra-sampler"]))
    assert (config.ema_steps, config.ra_reps) == (0, 3)
    with pytest.raises(SystemExit):
        parse(["data", "--model", "resnet50", "--lr-scheduler", "steplr"])


def test_recipe_tables_cover_the_published_models_only():
    assert set(recipe_models("torchvision-v2")) == set(PUBLISHED) and set(RECIPES) == {
        "torchvision-v2"}
    with pytest.raises(UnknownModelError, match="no settings for 'resnet18'"):
        recipe_settings("torchvision-v2", "resnet18")
    with pytest.raises(ValueError, match="unknown recipe 'timm'"):
        recipe_config("timm", "resnet50")
    with pytest.raises(ValueError, match=r"unknown training settings \['lr_decay'\]"):
        recipe_config("torchvision-v2", "resnet50", lr_decay=0.1)


def test_options_given_override_the_recipe_and_are_marked(capsys):
    parser = train_command.train_parser()
    args = parser.parse_args(["data", "--model", "resnext50_32x4d", "--recipe",
                              "torchvision-v2", "--lr", "0.1", "-b", "64", "--random-erase",
                              "0.25", "--hflip", "0.0"])
    config = train_command.config_from_args(args)
    assert (config.lr, config.batch_size, config.epochs) == (0.1, 64, 600)
    assert config.augmentation.random_erase == 0.25 and config.augmentation.hflip == 0.0
    assert config.augmentation.auto_augment == "ta_wide" and config.weights is None
    text = describe_config(config, "torchvision-v2", train_command.given_settings(args))
    assert text.splitlines()[0].startswith("recipe torchvision-v2 for resnext50_32x4d "
                                           "(resnext50_32x4d.IMAGENET1K_V2: https://")
    lines = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert lines["lr"].endswith("0.1  (set)") and lines["epochs"].endswith("600")
    assert lines["augmentation.random_erase"].endswith("(set)")


def test_without_a_recipe_the_options_default_to_train_configs():
    args = train_command.train_parser().parse_args(["data", "--model", "resnet18"])
    assert train_command.config_from_args(args) == TrainConfig(model="resnet18")


def test_train_help_shows_the_defaults_a_run_without_recipe_uses():
    from resnext_flax.augment import Augmentation

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    defaults.update({f.name: f.default for f in dataclasses.fields(Augmentation)})
    for flags, field, _, _, text, shown in train_command._OPTIONS:
        if shown is not None:
            assert defaults[field] == shown, (flags, field)
        assert text
    text = cli.parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--recipe {torchvision-v2}" in text and "--model-ema" in text
