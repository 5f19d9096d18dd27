"""Weight files read and written one tensor at a time (``weights.stored``): what lets the largest
models load in about their weights' memory. The memory itself is measured by
``benchmarks/large_models.py``; here, that a load reads each tensor only after the last is on
the device, and that the files are exactly what safetensors reads and writes."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file
from torch_reference import torch_model

import resnext_flax
from resnext_flax.weights import stored
from resnext_flax.weights.files import WeightFileError, read_weight_file
from resnext_flax.weights.stored import StoredTensor, read_tensors, write_tensors


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    reference = torch_model("resnet18", seed=5, num_classes=10)
    path = tmp_path_factory.mktemp("stored") / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    return path, reference


def _events(monkeypatch) -> list[str]:
    """'read' per tensor read from a file, 'put' per array sent to the device, in order."""
    events = []
    read, put = StoredTensor.read, jax.device_put
    monkeypatch.setattr(StoredTensor, "read", lambda self: events.append("read") or read(self))
    monkeypatch.setattr(jax, "device_put",
                        lambda x, *a, **k: events.append("put") or put(x, *a, **k))
    return events


def _streamed(events: list[str]) -> bool:
    """Each tensor read only once the one before it is on the device."""
    reads = puts = 0
    for event in events:
        reads, puts = reads + (event == "read"), puts + (event == "put")
        if reads > puts + 1:
            return False
    return reads > 0


def test_a_file_is_read_as_placeholders(resnet18_file):
    path, reference = resnet18_file
    content = read_weight_file(path).content
    assert all(isinstance(v, StoredTensor) for v in content.values())
    value = content["layer1.0.conv1.weight"]
    assert value.shape == (64, 64, 3, 3) and value.dtype == np.float32 and value.ndim == 4
    np.testing.assert_array_equal(np.asarray(value),
                                  reference.state_dict()["layer1.0.conv1.weight"].numpy())
    assert content["bn1.num_batches_tracked"].dtype == np.int64


def test_a_load_reads_each_tensor_after_the_last_is_on_the_device(resnet18_file, monkeypatch,
                                                                  tmp_path):
    path, reference = resnet18_file
    events = _events(monkeypatch)
    model = resnext_flax.load_model(path)
    assert _streamed(events), events
    assert events.count("read") == len(reference.state_dict()) - 20  # no BN step counters
    expected = reference.state_dict()["layer4.1.bn2.running_var"].numpy()
    np.testing.assert_array_equal(resnext_flax.to_torch_state_dict(model)
                                  ["layer4.1.bn2.running_var"], expected)

    resnext_flax.save_checkpoint(model, tmp_path / "converted.safetensors")
    events.clear()
    again = resnext_flax.load_checkpoint(tmp_path / "converted.safetensors")
    assert _streamed(events), events
    np.testing.assert_array_equal(resnext_flax.to_torch_state_dict(again)
                                  ["layer4.1.bn2.running_var"], expected)


def test_the_check_can_fail():
    assert not _streamed(["read", "read", "put", "put"])
    assert _streamed(["read", "put", "read", "put"])


def test_a_file_that_shrinks_after_opening_names_the_tensor(resnet18_file, tmp_path):
    path = tmp_path / "shrinking.safetensors"
    path.write_bytes(resnet18_file[0].read_bytes())
    weight_file = read_weight_file(path)
    with open(path, "r+b") as f:  # past the first tensor's bytes, before the others'
        f.truncate(8 + int.from_bytes(f.read(8), "little") + 16)
    with pytest.raises(WeightFileError, match=r"'fc.weight'.*changed after it was opened"):
        np.asarray(weight_file.content["fc.weight"])
    with pytest.raises(WeightFileError, match="changed after it was opened"):
        resnext_flax.load_model(weight_file)
    with pytest.raises(WeightFileError, match="not fully covered"):  # read again: refused
        resnext_flax.load_model(path)


def test_a_file_renamed_over_the_path_is_not_read(resnet18_file, tmp_path):
    """The tensors come from the file that was checked, not from one written over its path
    (an atomic rewrite of a cache entry) between the check and the load."""
    path, reference = resnet18_file
    target = tmp_path / "r18.safetensors"
    target.write_bytes(path.read_bytes())
    weight_file = read_weight_file(target)
    other = torch_model("resnet18", seed=6, num_classes=10)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "new")
    (tmp_path / "new").replace(target)
    model = resnext_flax.load_model(weight_file)
    np.testing.assert_array_equal(resnext_flax.to_torch_state_dict(model)["fc.weight"],
                                  reference.state_dict()["fc.weight"].numpy())


def test_a_read_is_complete_whatever_the_os_returns_per_call(resnet18_file, monkeypatch):
    path, reference = resnet18_file
    preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, offset: preadv(
        fd, [bufs[0][:1000]], offset))  # at most 1000 bytes per call
    value = read_weight_file(path).content["layer4.0.conv2.weight"]
    np.testing.assert_array_equal(np.asarray(value),
                                  reference.state_dict()["layer4.0.conv2.weight"].numpy())
    monkeypatch.delattr(os, "preadv")  # the pread form
    np.testing.assert_array_equal(np.asarray(value),
                                  reference.state_dict()["layer4.0.conv2.weight"].numpy())


def test_written_files_are_safetensors(tmp_path):
    tensors = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "scalar": np.array(3, np.int64),
        "bf16": jnp.linspace(0, 1, 20, dtype=jnp.bfloat16).reshape(4, 5),
        "empty": np.zeros((0, 3), np.float16),
        "fortran": np.asfortranarray(np.random.default_rng(0).standard_normal((3, 4))),
        "flag": np.array([True, False]),
    }
    path = tmp_path / "t.safetensors"
    with open(path, "wb") as f:
        write_tensors(f, tensors, {"note": "x"})
    theirs = load_file(path)
    ours = read_tensors(str(path))
    assert sorted(ours) == sorted(theirs) == sorted(tensors)
    for key, value in tensors.items():
        value = np.asarray(value)
        for got in (theirs[key], np.asarray(ours[key])):
            assert got.dtype == value.dtype and got.shape == value.shape, key
            np.testing.assert_array_equal(got.astype(np.float64), value.astype(np.float64))
    assert ours["bf16"].dtype == ml_dtypes.bfloat16
    assert (8 + int.from_bytes(path.read_bytes()[:8], "little")) % 8 == 0  # aligned data


def test_writing_refuses_a_dtype_safetensors_lacks(tmp_path):
    with open(tmp_path / "c.safetensors", "wb") as f, \
            pytest.raises(TypeError, match="'z': a safetensors file cannot hold complex64"):
        write_tensors(f, {"z": np.zeros(2, np.complex64)})


def test_other_dtypes_go_through_the_safetensors_reader(tmp_path, monkeypatch):
    path = tmp_path / "f64.safetensors"
    save_file({"x": torch.arange(4, dtype=torch.float64)}, path)
    monkeypatch.delitem(stored._NUMPY_DTYPES, "F64")
    content = read_tensors(str(path))
    assert isinstance(content["x"], np.ndarray)
    np.testing.assert_array_equal(content["x"], np.arange(4.0))
