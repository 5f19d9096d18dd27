"""Bounded work before a file is trusted: every count, size and range a weight file declares is
checked against the architectures' real limits before anything is parsed in full, inflated,
built or allocated, and the error names the field, the value and the limit. Files are crafted
small; the largest inflates to 16 MiB."""

from __future__ import annotations

import json
import math
import pathlib
import time
import warnings
import zipfile

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import resnext_flax
from resnext_flax import cli
from resnext_flax.metadata import MAX_IMAGE_SIZE, Preprocessing
from resnext_flax.models.resnet import MAX_CLASSES
from resnext_flax.models.variants import (
    MAX_BLOCK_WIDTH,
    MAX_BLOCKS,
    MAX_BLOCKS_PER_STAGE,
    VARIANTS,
    ModelSpec,
)
from resnext_flax.weights import limits
from resnext_flax.weights.checkpoint import CheckpointError
from resnext_flax.weights.files import WeightFileError
from resnext_flax.weights.torch_port import NonFiniteWeightsWarning, expected_shapes

FAST = 10  # seconds: generous for a loaded machine; the unbounded cases took minutes
SPEC = {"block": "basic", "layers": [2, 2, 2, 2], "groups": 1, "width_per_group": 64}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("c") / "resnet18.safetensors"
    resnext_flax.save_checkpoint(resnext_flax.resnet18(num_classes=10), path)
    return path


def _metadata(path: pathlib.Path) -> dict[str, str]:
    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata())


def _with_header(source, dest, tensors=None, **changes) -> pathlib.Path:
    meta = {**_metadata(source), **changes}
    save_file(load_file(str(source)) if tensors is None else tensors, str(dest), metadata=meta)
    return dest


def _refused(action, error, *phrases) -> str:
    start = time.perf_counter()
    with pytest.raises(error) as info:
        action()
    assert time.perf_counter() - start < FAST
    message = str(info.value)
    for phrase in phrases:
        assert phrase in message, message
    return message


def _inspect_fails_in_one_line(path, capsys, *phrases) -> None:
    status = cli.main(["inspect", str(path)])
    err = capsys.readouterr().err
    assert status == 1 and len(err.strip().splitlines()) == 1, err
    for phrase in phrases:
        assert phrase in err, err


# ---- converted-checkpoint headers: the architecture ------------------------------------------


def test_many_blocks_backed_by_zero_size_tensors_are_refused_before_building(
        tmp_path, converted, capsys):
    # Enough empty tensors to pass the "one tensor per block" check: the old loader built the
    # 3000-block model, and compiling a model with a few hundred blocks takes minutes.
    empty = {f"t{i}": np.zeros((0,), np.float32) for i in range(3010)}
    spec = json.dumps({**SPEC, "layers": [3000, 2, 2, 2]})
    path = _with_header(converted, tmp_path / "deep.safetensors", empty, spec=spec)
    _refused(lambda: resnext_flax.load_checkpoint(path), CheckpointError, "field 'spec'",
             "MAX_BLOCKS_PER_STAGE", "3000", str(path))
    _inspect_fails_in_one_line(path, capsys, "MAX_BLOCKS_PER_STAGE")


@pytest.mark.parametrize(("changes", "field", "phrase"), [
    ({"spec": json.dumps({**SPEC, "layers": [MAX_BLOCKS_PER_STAGE + 1, 2, 2, 2]})}, "spec",
     "MAX_BLOCKS_PER_STAGE"),
    ({"spec": json.dumps({**SPEC, "layers": [MAX_BLOCKS_PER_STAGE, MAX_BLOCKS_PER_STAGE, 1, 1]})},
     "spec", "(MAX_BLOCKS)"),
    ({"spec": json.dumps({**SPEC, "groups": 0})}, "spec", "groups must be a positive int"),
    ({"spec": json.dumps({"block": "bottleneck", "layers": [1, 1, 1, 1], "groups": 10**6,
                          "width_per_group": 4})}, "spec", "MAX_BLOCK_WIDTH"),
    ({"spec": json.dumps({"block": "bottleneck", "layers": [1, 1, 1, 1], "groups": 1,
                          "width_per_group": 10**400})}, "spec", "MAX_BLOCK_WIDTH"),
    ({"num_classes": str(10**13)}, "num_classes", f"{MAX_CLASSES:,}"),
    ({"num_classes": "9" * 5000}, "num_classes", "non-negative integer"),
    ({"spec": "[" * 100_000 + "]" * 100_000}, "spec", "nested too deeply"),
    ({"classes": "[" * 100_000 + "]" * 100_000}, "classes", "nested too deeply"),
])
def test_header_beyond_the_architectures_limits_fails_load_and_inspect(
        tmp_path, converted, capsys, changes, field, phrase):
    path = _with_header(converted, tmp_path / "hostile.safetensors", **changes)
    message = _refused(lambda: resnext_flax.load_checkpoint(path), CheckpointError,
                       f"field '{field}'", phrase)
    assert len(message) < 1000  # a huge value is cut in the message
    _inspect_fails_in_one_line(path, capsys, f"field '{field}'", phrase)


def test_inspect_fails_where_the_strict_load_fails_on_shapes(tmp_path, converted, capsys):
    tensors = load_file(str(converted))
    tensors["fc.kernel"] = np.zeros((3,), np.float32)
    path = _with_header(converted, tmp_path / "misshaped.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"fc\.kernel"):
        resnext_flax.load_checkpoint(path)
    assert resnext_flax.inspect_checkpoint(path).error is not None
    assert cli.main(["inspect", str(path)]) == 1
    assert "fc.kernel" in capsys.readouterr().err
    assert cli.main(["inspect", str(converted)]) == 0


def test_inspect_with_another_model_fails_as_the_load_does(converted, capsys):
    with pytest.raises(ValueError, match="not resnet50"):
        resnext_flax.load_model(converted, "resnet50")
    assert cli.main(["inspect", str(converted), "--model", "resnet50"]) == 1
    assert "not resnet50" in capsys.readouterr().err


def test_state_dict_with_too_many_blocks_names_the_bound(tmp_path):
    state = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.zeros(64)}
    for stage, blocks in ((1, MAX_BLOCKS_PER_STAGE + 1), (2, 1), (3, 1), (4, 1)):
        for block in range(blocks):
            state[f"layer{stage}.{block}.conv1.weight"] = torch.zeros(0)
    path = tmp_path / "deep.pth"
    torch.save(state, path)
    error = str(resnext_flax.inspect_checkpoint(path).error)
    assert f"layer1 holds {MAX_BLOCKS_PER_STAGE + 1} blocks" in error
    assert "MAX_BLOCKS_PER_STAGE" in error and "0 trunk key(s)" not in error


def test_limits_leave_room_for_every_variant():
    widest = max(spec.block_width(512) for spec in VARIANTS.values())
    deepest = max(max(spec.layers) for spec in VARIANTS.values())
    # room for deeper relatives of the table's (ResNet-269: 3-30-48-8) and wider ones
    wsl_32x48d = int(512 * 48 / 64) * 32  # the widest published ResNeXt
    assert max(deepest, 48) <= MAX_BLOCKS_PER_STAGE and 4 * widest <= MAX_BLOCK_WIDTH
    assert wsl_32x48d <= MAX_BLOCK_WIDTH
    assert max(sum(spec.layers) for spec in VARIANTS.values()) * 2 <= MAX_BLOCKS
    assert sum((3, 30, 48, 8)) <= MAX_BLOCKS
    largest = max(sum(math.prod(s) for s in expected_shapes(spec, 1000).values())
                  for spec in VARIANTS.values())
    assert 2 * 8 * largest <= limits.MAX_ZIP_MEMBER_BYTES  # float64, with headroom
    rest = MAX_BLOCKS - MAX_BLOCKS_PER_STAGE - 2
    at_the_limit = ModelSpec("bottleneck", (1, rest, MAX_BLOCKS_PER_STAGE, 1))
    keys = len(expected_shapes(at_the_limit, 1000))
    assert 5 * keys <= limits.MAX_SAFETENSORS_TENSORS


# ---- converted-checkpoint headers: preprocessing ----------------------------------------------


@pytest.mark.parametrize(("preprocessing", "phrase"), [
    ({"resize_size": 20000, "crop_size": 20000}, "resize_size must be an int from 1 to 4096"),
    ({"resize_size": 256, "crop_size": 32.5}, "crop_size must be an int"),
    ({"crop_size": True}, "crop_size must be an int"),
    ({"mean": [0.5, "x", 0.5]}, "mean must be 3 finite numbers"),
    ({"std": [1, 1, float("nan")]}, "std must be 3 finite numbers"),
    ({"antialias": "yes"}, "antialias must be true or false"),
    ({"interpolation": ["bilinear"]}, "unknown interpolation"),
])
def test_header_preprocessing_is_typed_and_bounded(tmp_path, converted, capsys, preprocessing,
                                                   phrase):
    path = _with_header(converted, tmp_path / "pre.safetensors",
                        preprocessing=json.dumps(preprocessing))
    _refused(lambda: resnext_flax.load_checkpoint(path), CheckpointError,
             "field 'preprocessing'", phrase)
    _inspect_fails_in_one_line(path, capsys, "field 'preprocessing'", phrase)


def test_preprocessing_bound_is_named():
    with pytest.raises(ValueError, match=r"crop_size .* 4096 \(MAX_IMAGE_SIZE\), got 5000"):
        Preprocessing(resize_size=256, crop_size=5000)
    assert Preprocessing(resize_size=MAX_IMAGE_SIZE, crop_size=MAX_IMAGE_SIZE).crop_size == 4096
    assert Preprocessing(mean=[0.5, 0.5, 0.5]).mean == (0.5, 0.5, 0.5)


# ---- .pth zip archives -------------------------------------------------------------------------


def _pth(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "small.pth"
    torch.save({"conv1.weight": torch.zeros(4)}, path)
    return path


def _replace_storage(source: pathlib.Path, dest: pathlib.Path, size: int) -> pathlib.Path:
    """`source` with its storage member replaced by `size` deflated zero bytes."""
    with zipfile.ZipFile(source) as z:
        members = {info.filename: z.read(info) for info in z.infolist()}
    with zipfile.ZipFile(dest, "w") as z:
        for name, data in members.items():
            if name.endswith("/data/0"):
                z.writestr(zipfile.ZipInfo(name), bytes(size), zipfile.ZIP_DEFLATED)
            else:
                z.writestr(zipfile.ZipInfo(name), data)
    return dest


def test_zip_bomb_member_is_refused_before_inflating(tmp_path, capsys):
    bomb = _replace_storage(_pth(tmp_path), tmp_path / "bomb.pth", 16 * 2**20)
    assert bomb.stat().st_size < 100_000
    _refused(lambda: resnext_flax.inspect_checkpoint(bomb), WeightFileError, "data/0'",
             "16,777,216", "MAX_ZIP_RATIO", str(bomb))
    _inspect_fails_in_one_line(bomb, capsys, "MAX_ZIP_RATIO")


def test_small_or_stored_members_are_not_ratio_checked(tmp_path):
    small = _replace_storage(_pth(tmp_path), tmp_path / "deflated.pth", 16)
    assert limits.zip_members_problem(str(small)) is None
    assert limits.zip_members_problem(str(_pth(tmp_path))) is None


def _declare_size(path: pathlib.Path, member: str, size: int) -> None:
    """Rewrite `member`'s sizes in the zip's central directory (a stored member: both)."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    at = data.find(b"PK\x01\x02" + bytes(0))
    while at >= 0:
        name_len = int.from_bytes(data[at + 28:at + 30], "little")
        if data[at + 46:at + 46 + name_len] == name:
            data[at + 20:at + 24] = size.to_bytes(4, "little")
            data[at + 24:at + 28] = size.to_bytes(4, "little")
        at = data.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(data))


def test_zip_member_and_total_sizes_are_bounded(tmp_path, monkeypatch):
    path = _pth(tmp_path)
    with zipfile.ZipFile(path) as z:
        storage = next(n for n in z.namelist() if n.endswith("/data/0"))
    # a size a plain (not zip64) central directory entry can declare
    monkeypatch.setattr(limits, "MAX_ZIP_MEMBER_BYTES", 3 * 2**30)
    _declare_size(path, storage, limits.MAX_ZIP_MEMBER_BYTES + 1)
    _refused(lambda: resnext_flax.read_state_dict(path), WeightFileError, repr(storage),
             "MAX_ZIP_MEMBER_BYTES")
    monkeypatch.setattr(limits, "MAX_ZIP_TOTAL_BYTES", 100)
    _refused(lambda: resnext_flax.read_state_dict(_pth(tmp_path)), WeightFileError,
             "MAX_ZIP_TOTAL_BYTES")


# ---- safetensors headers ------------------------------------------------------------------------


def test_safetensors_with_too_many_tensors_is_refused_before_parsing(tmp_path, capsys):
    path = tmp_path / "keys.safetensors"
    count = limits.MAX_SAFETENSORS_TENSORS + 1
    save_file({f"k{i}": np.zeros((0,), np.float32) for i in range(count)}, str(path))
    _refused(lambda: resnext_flax.inspect_checkpoint(path), WeightFileError, f"{count:,}",
             "MAX_SAFETENSORS_TENSORS", str(path))
    _inspect_fails_in_one_line(path, capsys, "MAX_SAFETENSORS_TENSORS")


def test_safetensors_count_also_holds_for_escaped_field_names(tmp_path, monkeypatch):
    header = {f"k{i}": {"dtype": "F32", "shape": [0], "data\\u005foffsets": [0, 0]}
              for i in range(4)}
    text = json.dumps(header).replace("\\\\u005f", "\\u005f").encode()
    path = tmp_path / "escaped.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text)
    monkeypatch.setattr(limits, "MAX_SAFETENSORS_TENSORS", 3)
    _refused(lambda: resnext_flax.read_state_dict(path), WeightFileError, "4 tensors",
             "MAX_SAFETENSORS_TENSORS")


def test_safetensors_header_length_is_bounded(tmp_path):
    path = tmp_path / "long.safetensors"
    size = limits.MAX_SAFETENSORS_HEADER_BYTES + 1
    path.write_bytes(size.to_bytes(8, "little") + b"{}")
    _refused(lambda: resnext_flax.read_state_dict(path), WeightFileError, f"{size:,}",
             "MAX_SAFETENSORS_HEADER_BYTES")


# ---- float64 weights beyond float32's range -----------------------------------------------------


def test_float64_weights_that_overflow_float32_warn(tmp_path, converted):
    from torch_reference import torch_model

    state = {k: v.double() if v.is_floating_point() else v
             for k, v in torch_model("resnet18", seed=3).state_dict().items()}
    state["fc.bias"][0] = 1e300  # finite in float64, Inf in float32
    model = resnext_flax.resnet18()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resnext_flax.load_torch_state_dict(model, state)
    assert [type(w.message) for w in caught] == [NonFiniteWeightsWarning]  # numpy's is not
    assert "fc.bias" in str(caught[0].message)
    tensors = load_file(str(converted))
    tensors = {k: v.astype(np.float64) for k, v in tensors.items()}
    tensors["fc.bias"][0] = -1e300
    path = _with_header(converted, tmp_path / "f64.safetensors", tensors)
    with pytest.warns(NonFiniteWeightsWarning, match="fc.bias"):
        resnext_flax.load_checkpoint(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWeightsWarning)
        resnext_flax.load_checkpoint(converted)


def test_an_oversized_config_json_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    from resnext_flax.weights.files import read_weight_file

    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"fc.bias": np.zeros(3, np.float32)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"architecture": "resnet18", "pad": "' + "x" * 200
                                        + '"}')
    monkeypatch.setattr(limits, "MAX_CONFIG_BYTES", 100)
    with pytest.raises(WeightFileError, match="MAX_CONFIG_BYTES"):
        read_weight_file(folder)
