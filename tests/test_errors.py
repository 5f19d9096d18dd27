"""One exception root, the old names where they were (with their old bases, so existing
``except`` clauses still catch them), and fixes that each layer spells its own way."""

from __future__ import annotations

import importlib
import re

import pytest

from resnext_flax.cli.common import render_error, render_fix
from resnext_flax.errors import (
    DatasetError,
    Fix,
    Message,
    ResnextFlaxError,
    UnknownModelError,
    WeightFileNotFoundError,
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


def test_the_new_subclasses_keep_a_builtin_base():
    assert issubclass(UnknownModelError, ValueError)
    assert issubclass(WeightFileNotFoundError, WeightsUnavailableError)
    assert issubclass(WeightFileNotFoundError, FileNotFoundError)


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """A converted resnet18, the same weights as a torchvision-keyed safetensors file, an
    unreadable cache entry for resnet18's default weights, and a folder without weights."""
    import numpy as np
    from safetensors.numpy import save_file

    import resnext_flax
    from resnext_flax.weights.cache import cached_checkpoint_path
    from resnext_flax.weights.catalog import get_weight_set

    root = tmp_path_factory.mktemp("errors")
    model = resnext_flax.resnet18()
    resnext_flax.save_checkpoint(model, root / "converted.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in
               resnext_flax.to_torch_state_dict(model).items()}, root / "torchvision.safetensors")
    cached = cached_checkpoint_path(get_weight_set("resnet18"), root / "cache")
    cached.parent.mkdir()
    cached.write_bytes(b"not a safetensors file")
    (root / "empty").mkdir()
    return {"root": root, "model": model}


def _unparity(*args, **kwargs):
    from resnext_flax.weights.conversion import ParityReport

    return ParityReport(max_abs_error=1.0, relative_error=1.0, top1_agreement=0.0)


def _calls():
    """(id, call(files, monkeypatch), the builtin base it raised before the root, a part of
    the message that shows the intended check raised it)."""
    import jax.numpy as jnp

    import resnext_flax as rf
    from resnext_flax.weights.catalog import get_weight_set, resolve_weights
    from resnext_flax.weights.conversion import convert_checkpoint
    from resnext_flax.weights.files import read_weight_file
    from resnext_flax.weights.pretrained import load_weight_set

    def converted(f):
        return f["root"] / "converted.safetensors"

    def torchvision(f):
        return f["root"] / "torchvision.safetensors"

    def mismatch(f, monkeypatch):
        monkeypatch.setattr("resnext_flax.weights.conversion.verify_against_torchvision",
                            _unparity)
        convert_checkpoint(torchvision(f), f["root"] / "out.safetensors",
                           probe_shape=(1, 32, 32))

    return [
        ("unknown model", lambda f, m: rf.create_model("resnet19"), ValueError,
         "unknown model 'resnet19'"),
        ("unknown tag", lambda f, m: rf.resnet18(weights="V9"), ValueError,
         "no weight set 'V9'"),
        ("weight set of another model",
         lambda f, m: resolve_weights("resnet18", get_weight_set("resnet50")), ValueError,
         "not resnet18"),
        ("no weight set", lambda f, m: resolve_weights("resnet18", None), ValueError,
         "need a weight set"),
        ("num_classes conflict", lambda f, m: rf.resnet18(weights="DEFAULT", num_classes=10),
         ValueError, "num_classes=10 conflicts"),
        ("param_dtype with weights",
         lambda f, m: rf.resnet18(weights="DEFAULT", param_dtype=jnp.bfloat16), ValueError,
         "float32 parameters"),
        ("load_checkpoint of a torchvision file",
         lambda f, m: rf.load_checkpoint(torchvision(f)), ValueError,
         "not a resnext_flax checkpoint"),
        ("reserved metadata", lambda f, m: rf.save_checkpoint(
            f["model"], f["root"] / "out.safetensors", metadata={"format": "x"}), ValueError,
         "reserved"),
        ("non-string metadata", lambda f, m: rf.save_checkpoint(
            f["model"], f["root"] / "out.safetensors", metadata={"epoch": 3}), ValueError,
         "strings to strings"),
        ("converted file of another model",
         lambda f, m: rf.load_model(converted(f), "resnet50"), ValueError, "not resnet50"),
        ("prefix with a converted file",
         lambda f, m: rf.load_model(converted(f), prefix="module."), ValueError,
         "apply to PyTorch files"),
        ("read_state_dict of a converted file",
         lambda f, m: rf.read_state_dict(converted(f)), ValueError,
         "not a torchvision state dict"),
        ("prefix without checkpoint",
         lambda f, m: rf.from_pretrained("resnet18", prefix="module."), ValueError,
         "checkpoint= files only"),
        ("unreadable cache file", lambda f, m: load_weight_set(
            get_weight_set("resnet18"), cache_dir=f["root"] / "cache"), ValueError,
         "unreadable; delete it"),
        ("converting a converted file", lambda f, m: convert_checkpoint(
            converted(f), f["root"] / "out.safetensors"), ValueError,
         "not a torchvision state dict"),
        ("verification mismatch", mismatch, ValueError, "does not match torchvision"),
        ("missing weight file",
         lambda f, m: read_weight_file(f["root"] / "missing.pth"), FileNotFoundError,
         "no checkpoint file"),
        ("folder without weights",
         lambda f, m: read_weight_file(f["root"] / "empty"), FileNotFoundError,
         "a folder without"),
    ]


CALLS = _calls()


@pytest.mark.parametrize(("call", "base", "says"), [c[1:] for c in CALLS],
                         ids=[c[0] for c in CALLS])
def test_errors_raised_on_purpose_share_the_root(call, base, says, weight_files,
                                                 monkeypatch):
    with pytest.raises(ResnextFlaxError, match=re.escape(says)) as info:
        call(weight_files, monkeypatch)
    assert isinstance(info.value, base), type(info.value).__mro__
    assert not (weight_files["root"] / "out.safetensors").exists()
