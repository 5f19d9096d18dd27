"""The weight port: round trip, prefixes, dtypes, and errors that name every offending key."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import torchvision
from flax import nnx
from torch_reference import (
    flax_architecture,
    randomize_batchnorm,
    real_weight_cases,
    torch_architecture,
    torch_model,
)

import resnext_flax
from resnext_flax.weights.torch_port import (
    StateDictMismatchError,
    StateDictMismatchWarning,
    infer_architecture,
)


def abstract_model(name: str, **kwargs) -> resnext_flax.ResNet:
    return nnx.eval_shape(lambda: resnext_flax.create_model(name, **kwargs))


@pytest.mark.parametrize("name", real_weight_cases())
def test_round_trip_is_bit_exact_and_torchvision_accepts_it(name: str):
    reference = torch_model(name, seed=3)
    state_dict = reference.state_dict()
    abstract = nnx.eval_shape(lambda: flax_architecture(name))
    model = resnext_flax.load_torch_state_dict(abstract, state_dict)
    back = resnext_flax.to_torch_state_dict(model)

    expected = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    assert back.keys() == expected.keys()
    for key, value in expected.items():
        assert back[key].dtype == np.float32, key
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)

    fresh = torch_architecture(name)
    missing, unexpected = fresh.load_state_dict(
        {k: torch.from_numpy(v) for k, v in back.items()}, strict=False
    )
    assert not unexpected
    assert all(k.endswith("num_batches_tracked") for k in missing)


def test_wrapper_prefixes_and_step_counters_are_handled():
    reference = torch_model("resnet18", seed=1)
    wrapped = {f"module._orig_mod.{k}": v for k, v in reference.state_dict().items()}
    assert any(k.endswith("num_batches_tracked") for k in wrapped)
    model = resnext_flax.load_torch_state_dict(abstract_model("resnet18"), wrapped)
    np.testing.assert_array_equal(
        resnext_flax.to_torch_state_dict(model)["layer3.1.bn2.running_var"],
        reference.layer3[1].bn2.running_var.numpy(),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_floating_dtype_is_cast_to_the_param_dtype(dtype):
    reference = torch_model("resnet18", seed=2)
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v
                  for k, v in reference.state_dict().items()}
    model = resnext_flax.load_torch_state_dict(abstract_model("resnet18"), state_dict)
    assert model.conv1.kernel.get_value().dtype == np.float32
    np.testing.assert_array_equal(
        resnext_flax.to_torch_state_dict(model)["fc.weight"],
        state_dict["fc.weight"].float().numpy(),
    )


def test_numpy_state_dicts_load_too():
    reference = torch_model("resnet18", seed=4)
    numpy_sd = {k: v.numpy() for k, v in reference.state_dict().items()
                if v.is_floating_point()}
    model = resnext_flax.load_torch_state_dict(abstract_model("resnet18"), numpy_sd)
    np.testing.assert_array_equal(
        np.asarray(model.conv1.kernel.get_value()),
        numpy_sd["conv1.weight"].transpose(2, 3, 1, 0),
    )


def test_another_architecture_is_named_and_every_key_listed():
    resnet50 = torch_model("resnet50").state_dict()
    model = abstract_model("resnext50_32x4d")
    with pytest.raises(StateDictMismatchError) as info:
        resnext_flax.load_torch_state_dict(model, resnet50)
    message = str(info.value)
    assert "resnext50_32x4d" in message
    assert "it looks like resnet50" in message
    report = info.value.report
    # Every 1x1/3x3 conv and BN inside the bottlenecks is twice as wide in ResNeXt-50 32x4d.
    assert ("layer1.0.conv1.weight", (128, 64, 1, 1), (64, 64, 1, 1)) in report.mismatched
    assert ("layer1.0.conv2.weight", (128, 4, 3, 3), (64, 64, 3, 3)) in report.mismatched
    for key, expected, got in report.mismatched:
        assert f"{key}: expected {expected}, got {got}" in message
    assert not report.missing and not report.unexpected


def test_missing_unexpected_and_misshaped_keys_are_reported_together():
    state_dict = dict(torch_model("resnet18").state_dict())
    del state_dict["layer4.1.bn2.running_var"]
    state_dict["layer5.0.conv1.weight"] = torch.zeros(3)
    state_dict["fc.weight"] = torch.zeros(10, 512)
    model = abstract_model("resnet18")
    with pytest.raises(StateDictMismatchError) as info:
        resnext_flax.load_torch_state_dict(model, state_dict)
    report = info.value.report
    assert report.missing == ("layer4.1.bn2.running_var",)
    assert report.unexpected == ("layer5.0.conv1.weight",)
    assert report.mismatched == (("fc.weight", (1000, 512), (10, 512)),)
    message = str(info.value)
    assert "1 missing key(s): layer4.1.bn2.running_var" in message
    assert "1 unexpected key(s): layer5.0.conv1.weight" in message
    assert "fc.weight: expected (1000, 512), got (10, 512)" in message
    # Nothing was written before the error.
    assert isinstance(model.conv1.kernel.get_value(), jax.ShapeDtypeStruct)


def test_non_strict_load_takes_what_fits_and_reports_the_rest():
    reference = torch_model("resnet18", seed=5)
    state_dict = dict(reference.state_dict())
    state_dict["fc.weight"] = torch.zeros(10, 512)
    state_dict["fc.bias"] = torch.zeros(10)
    model = resnext_flax.resnet18(rngs=nnx.Rngs(7))
    head_before = np.asarray(model.fc.kernel.get_value()).copy()
    with pytest.warns(StateDictMismatchWarning, match="fc.weight: expected"):
        resnext_flax.load_torch_state_dict(model, state_dict, strict=False)
    np.testing.assert_array_equal(np.asarray(model.fc.kernel.get_value()), head_before)
    np.testing.assert_array_equal(
        np.asarray(model.layer1[0].bn1.mean.get_value()),
        reference.layer1[0].bn1.running_mean.numpy(),
    )


def test_integer_tensors_are_rejected_by_name():
    state_dict = dict(torch_model("resnet18").state_dict())
    state_dict["bn1.running_mean"] = torch.zeros(64, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"not floating point: bn1\.running_mean \(torch\.int64\)"):
        resnext_flax.load_torch_state_dict(abstract_model("resnet18"), state_dict)


@pytest.mark.parametrize("name", resnext_flax.list_models())
def test_architecture_is_inferred_from_a_state_dict(name: str):
    with torch.device("meta"):  # shapes only: no random init
        model = torch_architecture(name, num_classes=7)
    # read-only views of one zero: the largest models' shapes without their memory
    shapes = {k: np.broadcast_to(np.float32(0), v.shape) for k, v in model.state_dict().items()}
    assert infer_architecture(shapes) == name


def test_read_state_dict_pth_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    reference = randomize_batchnorm(torchvision.models.resnet18(), seed=0)
    state_dict = reference.state_dict()
    torch.save({"state_dict": state_dict}, tmp_path / "wrapped.pth")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp_path / "r18.safetensors")
    for path in (tmp_path / "wrapped.pth", tmp_path / "r18.safetensors"):
        loaded = resnext_flax.read_state_dict(path)
        assert "bn1.num_batches_tracked" not in loaded
        np.testing.assert_array_equal(loaded["bn1.running_var"],
                                      state_dict["bn1.running_var"].numpy())


def test_read_state_dict_rejects_a_corrupt_file(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read"):
        resnext_flax.read_state_dict(path)
