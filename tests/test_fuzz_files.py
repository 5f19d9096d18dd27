"""Fuzzing the file readers (a seeded random loop, bounded in time): truncated and bit-flipped
``.pth``, torchvision ``.safetensors`` and converted files; state dicts with keys deleted,
renamed, reshaped or retyped; random header edits. Every case either loads or ends in one of the
library's exception types naming the file, fast, with the target model unchanged and no file
left behind in the output folder."""

from __future__ import annotations

import json
import pathlib
import random
import time
import warnings

import numpy as np
import pytest
import torch
from flax import nnx
from pretrained_helpers import save_torchvision_file
from torch_reference import torch_model

import resnext_flax
from resnext_flax.weights.checkpoint import CheckpointError
from resnext_flax.weights.conversion import convert_checkpoint
from resnext_flax.weights.files import WeightFileError
from resnext_flax.weights.torch_port import NonFiniteWeightsWarning, StateDictMismatchError

LIBRARY_ERRORS = (WeightFileError, CheckpointError, StateDictMismatchError)
CASES_PER_KIND = 8
SECONDS_PER_CASE = 30  # generous for a loaded 2-core machine; a hang is minutes


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, pathlib.Path]:
    from safetensors.torch import save_file

    reference = torch_model("resnet18", seed=7)
    folder = tmp_path_factory.mktemp("sources")
    tv_safetensors = folder / "resnet18.safetensors"
    save_file(reference.state_dict(), str(tv_safetensors))
    pth = save_torchvision_file(reference, folder, "resnet18")
    converted = folder / "converted.safetensors"
    resnext_flax.save_checkpoint(resnext_flax.load_model(pth), converted)
    return {"pth": pth, "safetensors": tv_safetensors, "converted": converted}


def _corrupt(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    if rng.random() < 0.4:
        cut = rng.randrange(len(data))
        return data[:cut], f"truncated at {cut}"
    data = bytearray(data)
    # Flip bytes near the start (headers, pickles) more often than in tensor data.
    spans = [min(len(data), 4096), len(data)]
    positions = [rng.randrange(rng.choice(spans)) for _ in range(rng.randint(1, 16))]
    for p in positions:
        data[p] ^= 1 << rng.randrange(8)
    return bytes(data), f"bytes flipped at {sorted(positions)[:6]}"


def _assert_ends_well(action, path: pathlib.Path, case: str) -> None:
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonFiniteWeightsWarning)  # flipped tensor bits
            action()
    except LIBRARY_ERRORS as err:
        assert str(path) in str(err), f"{case}: the error does not name the file: {err}"
    except FileNotFoundError:
        raise AssertionError(f"{case}: the file exists") from None
    except Exception as err:
        raise AssertionError(f"{case}: {type(err).__name__}: {err}") from err
    assert time.perf_counter() - start < SECONDS_PER_CASE, f"{case}: too slow"


@pytest.mark.parametrize("kind", ["pth", "safetensors", "converted"])
def test_corrupted_files_load_or_fail_cleanly(sources, tmp_path, kind):
    rng = random.Random(f"corrupt-{kind}")
    data = sources[kind].read_bytes()
    output = tmp_path / "out"
    output.mkdir()
    for i in range(CASES_PER_KIND):
        bad, how = _corrupt(data, rng)
        path = tmp_path / f"case{i}{sources[kind].suffix}"
        path.write_bytes(bad)
        case = f"{kind} {how}"
        _assert_ends_well(lambda p=path: resnext_flax.load_model(p), path, case)
        if kind != "converted" and i % 2 == 0:  # the converter writes nothing on failure
            target = output / "converted.safetensors"
            _assert_ends_well(lambda p=path, t=target: convert_checkpoint(p, t, verify=False),
                              path, f"convert {case}")
            assert [p.name for p in output.iterdir()] in ([], ["converted.safetensors"]), case
            target.unlink(missing_ok=True)


def _mutate(state_dict: dict, rng: random.Random) -> tuple[dict, str]:
    state_dict = dict(state_dict)
    # torch's step counters are dropped on purpose: mutating one changes nothing.
    key = rng.choice(sorted(k for k in state_dict if not k.endswith("num_batches_tracked")))
    kind = rng.choice(["delete", "rename", "reshape", "retype", "add"])
    value = state_dict[key]
    if kind == "delete":
        del state_dict[key]
    elif kind == "rename":
        state_dict[key.replace(".", "_", 1)] = state_dict.pop(key)
    elif kind == "reshape":
        state_dict[key] = value.reshape(-1)[: max(1, value.numel() - 1)]
    elif kind == "retype":
        state_dict[key] = value.to(rng.choice([torch.int32, torch.uint8, torch.bool]))
    else:
        key = f"extra.{rng.randrange(100)}"
        state_dict[key] = value
    return state_dict, f"{kind} {key}"  # the error must name `key`


def test_mutated_state_dicts_fail_without_touching_the_model():
    reference = torch_model("resnet18", seed=8)
    rng = random.Random("mutate")
    model = nnx.eval_shape(lambda: resnext_flax.create_model("resnet18"))
    resnext_flax.load_torch_state_dict(model, reference.state_dict())
    before = resnext_flax.to_torch_state_dict(model)
    for _ in range(3 * CASES_PER_KIND):
        mutated, case = _mutate(reference.state_dict(), rng)
        with pytest.raises(StateDictMismatchError, match=case.split()[-1].replace(".", r"\.")):
            resnext_flax.load_torch_state_dict(model, mutated)
        after = resnext_flax.to_torch_state_dict(model)
        assert all(np.array_equal(after[k], before[k]) for k in before), case


def _header_edit(rng: random.Random) -> tuple[str, str | None]:
    field = rng.choice(["spec", "num_classes", "format_version", "model", "spec", "spec"])
    junk = [None, "", "{", "[]", "null", "-1", "1e9", "0", json.dumps({"block": "basic"}),
            json.dumps({"block": "basic", "layers": [2, 2, 2, rng.randrange(-1, 9)],
                        "groups": rng.choice([0, 1, 2, "1"]), "width_per_group": 64})]
    return field, rng.choice(junk)


def test_random_header_edits_fail_cleanly(sources, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(sources["converted"]))
    with safe_open(str(sources["converted"]), framework="numpy") as f:
        meta = dict(f.metadata())
    rng = random.Random("header")
    for i in range(CASES_PER_KIND):
        edited = dict(meta)
        field, value = _header_edit(rng)
        if value is None:
            edited.pop(field)
        else:
            edited[field] = value
        path = tmp_path / f"header{i}.safetensors"
        save_file(tensors, str(path), metadata=edited)
        _assert_ends_well(lambda p=path: resnext_flax.load_checkpoint(p), path,
                          f"header {field}={value!r}")
