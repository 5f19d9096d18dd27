"""One exception root, the old names where they were (with their old bases, so existing
``except`` clauses still catch them), and fixes that each layer spells its own way."""

from __future__ import annotations

import importlib

import pytest

from resnext_flax.cli.common import render_error, render_fix
from resnext_flax.errors import (
    DatasetError,
    Fix,
    Message,
    ResnextFlaxError,
    WeightsError,
    WeightsUnavailableError,
)


@pytest.mark.parametrize(("module", "name", "base"), [
    ("resnext_flax.weights.checkpoint", "CheckpointError", ValueError),
    ("resnext_flax.weights.resolve", "CheckpointLayoutError", ValueError),
    ("resnext_flax.weights.torch_port", "StateDictMismatchError", ValueError),
    ("resnext_flax.weights.files", "UntrustedPickleError", ValueError),
    ("resnext_flax.weights.files", "WeightFileError", ValueError),
    ("resnext_flax.weights.cache", "WeightsUnavailableError", OSError),
    ("resnext_flax.weights.cache", "ChecksumError", ValueError),
    ("resnext_flax.datasets", "DatasetError", ValueError),
    ("resnext_flax.errors", "DatasetError", ValueError),
])
def test_old_names_keep_their_place_and_base(module, name, base):
    error = getattr(importlib.import_module(module), name)
    assert issubclass(error, ResnextFlaxError) and issubclass(error, base)


def test_the_subclasses_say_what_went_wrong():
    from resnext_flax.weights.cache import ChecksumError
    from resnext_flax.weights.checkpoint import CheckpointError

    assert issubclass(CheckpointError, WeightsError) and issubclass(ChecksumError, WeightsError)
    assert not issubclass(WeightsUnavailableError, WeightsError)
    assert not issubclass(DatasetError, WeightsError)


def test_a_fix_is_keywords_in_the_library_and_flags_on_the_command_line():
    message = Message("pick one: ", Fix.of(prefix="a."), " or ", Fix.of(key=""),
                      "; or (", Fix.of(name="resnet18", aside=True), ")")
    assert str(message) == "pick one: prefix='a.' or key=''; or (name='resnet18')"
    assert render_error(message) == ("pick one: prefix='a.' (--prefix a.) or key='' "
                                     "(--key ''); or (name='resnet18', --model resnet18)")
    assert render_fix(Fix.of(ema=True, num_classes=0)) == (
        "ema=True, num_classes=0 (--ema --num-classes 0)")
    error = WeightsError(Message("no trunk; ", Fix.of(trust_pickle=True)))
    assert str(error) == "no trunk; trust_pickle=True"
    assert render_error(error) == "no trunk; trust_pickle=True (--trust-pickle)"
    assert render_error(ValueError("plain")) == "plain"
